"""Specification of two-stage retrieval (modeling_imagebert.retrieval.two_stage, .retriever) and of the contrastive
(ITC) embeddings it starts from (get_text_features / get_image_features, the ITC loss, the collators' groups)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from sync_counter import SyncCounter
from test_retrieval_evaluation import tiny_config, tiny_model, tiny_processor, toy_test_split

from modeling_imagebert import ImageBertForPreTraining, ImageBertForRetrieval
from modeling_imagebert.data.collators import (
    DataCollatorForImageBertPretraining,
    DataCollatorForImageTextRetrieval,
)
from modeling_imagebert.losses_imagebert import image_text_contrastive_loss
from modeling_imagebert.processing_imagebert import ImageBertProcessor
from modeling_imagebert.retrieval import metrics as retrieval_metrics
from modeling_imagebert.retrieval.evaluation import compute_metrics, evaluate_retrieval
from modeling_imagebert.retrieval.retriever import ImageBertRetriever
from modeling_imagebert.retrieval.two_stage import (
    evaluate_two_stage,
    final_scores,
    select_candidates,
    two_stage_matrices,
    two_stage_metrics,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def processor(minilm_path) -> ImageBertProcessor:
    return tiny_processor(minilm_path)


@pytest.fixture(scope="module")
def split():
    return toy_test_split(num_images=6)  # 6 images x 5 captions


@pytest.fixture(scope="module")
def model():
    return tiny_model(ImageBertForRetrieval, seed=3).eval()


@pytest.fixture(scope="module")
def full(model, split, processor):
    return evaluate_retrieval(model, split, processor, progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------------


def _inputs(config, batch=3, text=7, regions=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 2000, (batch, text), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    region_mask = torch.ones(batch, regions, dtype=torch.long)
    region_mask[1, -3:] = 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "region_features": torch.randn(batch, regions, config.visual_feature_dim, generator=generator),
        "region_locations": torch.rand(batch, regions, 5, generator=generator),
        "region_attention_mask": region_mask,
    }


@pytest.mark.parametrize("cls", [ImageBertForPreTraining, ImageBertForRetrieval])
def test_features_are_unit_vectors_equal_to_a_manual_unimodal_pass(cls):
    model = tiny_model(cls, seed=1).eval()
    inputs = _inputs(model.config)
    with torch.no_grad():
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output
        image = model.get_image_features(
            inputs["region_features"], inputs["region_locations"], inputs["region_attention_mask"]
        ).pooler_output
        # The reference: the full (not sparse) encoder on text alone -> [CLS]; on regions alone -> mean of real rows.
        model.set_fast_paths(False)
        base = model.imagebert
        cls_row = base(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).last_hidden_state[:, 0]
        regions = base(
            region_features=inputs["region_features"],
            region_locations=inputs["region_locations"],
            region_attention_mask=inputs["region_attention_mask"],
        ).last_hidden_state
        mean = torch.stack(
            [regions[b, inputs["region_attention_mask"][b] == 1].mean(0) for b in range(regions.shape[0])]
        )
        model.set_fast_paths(True)
        expected_text = model.itc_head.text_projection(cls_row)
        expected_image = model.itc_head.image_projection(mean)
    assert text.shape == image.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(
        text, expected_text / expected_text.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        image, expected_image / expected_image.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-5
    )


def test_a_checkpoint_without_the_itc_head_loads_with_an_initialised_one(tmp_path):
    model = tiny_model(ImageBertForPreTraining, seed=2)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    removed = [name for name in weights if name.startswith("itc_head.")]
    assert sorted(removed) == [
        "itc_head.image_projection.weight",
        "itc_head.logit_scale",
        "itc_head.text_projection.weight",
    ]
    save_file(
        {k: v for k, v in weights.items() if k not in removed},
        tmp_path / "model.safetensors",
        {"format": "pt"},
    )

    loaded, info = ImageBertForRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(removed)
    assert float(loaded.itc_head.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))
    projection = loaded.itc_head.text_projection.weight
    assert (
        bool(torch.isfinite(projection).all()) and 0.005 < float(projection.detach().std()) < 0.05
    )  # initializer_range 0.02
    torch.testing.assert_close(loaded.itm_head.weight, model.itm_head.weight)
    with torch.no_grad():
        features = loaded.get_text_features(torch.tensor([[101, 2000, 102]])).pooler_output
    assert bool(torch.isfinite(features).all())


def test_the_itc_head_is_saved_and_loaded_with_the_model(tmp_path):
    model = tiny_model(ImageBertForPreTraining, seed=2)
    with torch.no_grad():
        model.itc_head.logit_scale.fill_(3.0)
    model.save_pretrained(tmp_path)
    loaded = ImageBertForRetrieval.from_pretrained(tmp_path)
    assert float(loaded.itc_head.logit_scale.detach()) == 3.0
    torch.testing.assert_close(
        loaded.itc_head.image_projection.weight, model.itc_head.image_projection.weight
    )


# ----------------------------------------------------------------------------------------------------------------------
# ITC loss
# ----------------------------------------------------------------------------------------------------------------------


def _hand_infonce(text, image, scale, text_groups, image_groups, valid):
    """Written out with Python loops: for each valid row, -log softmax of the positive among the allowed columns."""
    rows = []
    size = len(text)
    for i in range(size):
        if not valid[i]:
            continue
        t2i = [
            scale * float(text[i] @ image[j])
            for j in range(size)
            if j == i or image_groups[j] != text_groups[i]
        ]
        i2t = [
            scale * float(image[i] @ text[j])
            for j in range(size)
            if j == i or text_groups[j] != image_groups[i]
        ]
        positive = scale * float(text[i] @ image[i])
        loss_t2i = -positive + math.log(sum(math.exp(v) for v in t2i))
        loss_i2t = -positive + math.log(sum(math.exp(v) for v in i2t))
        rows.append((loss_t2i + loss_i2t) / 2)
    return sum(rows) / len(rows)


def test_itc_loss_matches_a_hand_computation_and_ignores_other_captions_of_the_same_image():
    generator = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 3, generator=generator), dim=-1)
    image = torch.nn.functional.normalize(torch.randn(4, 3, generator=generator), dim=-1)
    scale = torch.tensor(5.0)
    # Rows 0 and 2 describe the same image; row 3 pairs the caption of image "9" with another image (a negative).
    text_groups = torch.tensor([0, 1, 0, 9])
    image_groups = torch.tensor([0, 1, 0, 3])
    valid = torch.tensor([True, True, True, False])
    loss = image_text_contrastive_loss(text, image, scale, text_groups, image_groups, valid)
    expected = _hand_infonce(text, image, 5.0, text_groups.tolist(), image_groups.tolist(), valid.tolist())
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # Without the groups, row 2's image is a negative of text 0: the loss differs.
    plain = image_text_contrastive_loss(text, image, scale, valid=valid)
    expected_plain = _hand_infonce(text, image, 5.0, [0, 1, 2, 3], [0, 1, 2, 3], valid.tolist())
    assert float(plain) == pytest.approx(expected_plain, rel=1e-5)
    assert abs(float(plain) - float(loss)) > 1e-3


def _examples(count, captions_per_image=2, seed=0, feature_dim=64):
    import numpy as np

    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        n = int(rng.integers(1, 6))
        examples.append(
            {
                "image_id": f"img{i // captions_per_image}",
                "input_ids": [101, *rng.integers(3000, 29000, int(rng.integers(3, 9))).tolist(), 102],
                "region_features": rng.standard_normal((n, feature_dim)).astype(np.float16),
                "region_locations": rng.uniform(0, 1, (n, 5)).astype(np.float32),
                "region_classes": rng.integers(0, 20, n),
                "example_index": i,
            }
        )
    return examples


def test_pretraining_collator_groups_name_the_image_of_each_caption_and_of_each_row(processor):
    examples = _examples(8)
    batch = DataCollatorForImageBertPretraining(processor, itm_negative_rate=0.6, seed=4)(examples)
    matched = batch["itm_labels"] == 1
    assert bool((~matched).any()) and bool(matched.any())
    torch.testing.assert_close(batch["itc_text_groups"][matched], batch["itc_image_groups"][matched])
    # Examples 2k and 2k+1 share an image: a matched row's group is the group of its example's image.
    own = torch.tensor([i // 2 for i in range(8)])
    for row in matched.nonzero().flatten().tolist():
        same = (own == own[row]) & matched
        assert bool((batch["itc_image_groups"][same] == batch["itc_image_groups"][row]).all())
    # A mismatched row shows an image its caption does not describe.
    assert bool((batch["itc_text_groups"][~matched] != batch["itc_image_groups"][~matched]).all())


def test_pretraining_step_with_itc_never_synchronises_and_trains_the_projections(processor):
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(processor.tokenizer),
        itc_loss_weight=1.0,
        hidden_dropout_prob=0.0,
        num_object_classes=24,
    )
    model = ImageBertForPreTraining(config).train()
    batch = DataCollatorForImageBertPretraining(
        processor, mlm_probability=0.3, region_mask_probability=0.3, seed=1
    )(_examples(8))
    with SyncCounter() as counter:
        out = model(**batch)
        out.loss.backward()
    assert counter.total == 0, dict(counter.counts)
    assert out.itc_loss is not None and float(out.itc_loss.detach()) > 0
    torch.testing.assert_close(
        out.loss,
        out.mlm_loss + out.moc_loss + out.mrfr_loss + out.itm_loss + out.itc_loss,
        rtol=1e-6,
        atol=1e-6,
    )
    for parameter in (model.itc_head.text_projection.weight, model.itc_head.logit_scale):
        assert parameter.grad is not None and float(parameter.grad.abs().sum()) > 0
    model.config.itc_loss_weight = 0.0
    assert model(**batch).itc_loss is None  # the paper's recipe: off


def test_retrieval_step_with_binary_plus_itc_never_synchronises(processor):
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(processor.tokenizer),
        retrieval_loss="binary+0.5*itc",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = ImageBertForRetrieval(config).train()
    batch = DataCollatorForImageTextRetrieval(processor, num_candidates=3, seed=2)(_examples(6))
    assert batch["itc_image_groups"].tolist() == [0, 0, 1, 1, 2, 2]
    with SyncCounter() as counter:
        out = model(**batch)
        out.loss.backward()
    assert counter.total == 0, dict(counter.counts)
    torch.testing.assert_close(out.loss, out.binary_loss + 0.5 * out.itc_loss)
    # The ITC term is the loss of the groups' positives (rows 0, P, 2P, ...), same-image positives excluded.
    with torch.no_grad():
        model.eval()
        first = {k: batch[k][::3] for k in ("input_ids", "attention_mask", "token_type_ids")}
        text = model.get_text_features(**first).pooler_output
        image = model.get_image_features(
            batch["region_features"][::3], batch["region_locations"][::3], batch["region_attention_mask"][::3]
        ).pooler_output
        expected = _hand_infonce(
            text, image, float(model.itc_head.scale()), [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [1] * 6
        )
        model.train()
    assert float(out.itc_loss) == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Two-stage evaluation
# ----------------------------------------------------------------------------------------------------------------------


def test_reranked_pairs_get_the_full_ranking_scores_of_the_same_pairs(model, split, processor, full):
    result = evaluate_two_stage(model, split, processor, candidates=2, progress=False)
    chosen = result.candidates
    assert 0 < chosen.num_pairs < 30 * 6
    torch.testing.assert_close(
        result.pair_scores, full.scores[chosen.caption_index, chosen.image_index], rtol=1e-5, atol=1e-5
    )
    # Each direction's matrix keeps the cross-encoder score at its own top-K only.
    finite = torch.isfinite(result.image_matrix)
    assert finite.sum(1).tolist() == [2] * 30
    torch.testing.assert_close(result.image_matrix[finite], full.scores[finite], rtol=1e-5, atol=1e-5)
    assert result.passes == {"embedding": 36, "cross_encoder": chosen.num_pairs, "full": 180}


def test_a_ground_truth_outside_the_top_k_is_a_miss():
    # 3 captions x 3 images; caption 0 belongs to image 2, which its embeddings rank last: the cross-encoder would
    # rank image 2 first, but with K = 2 it never sees the pair.
    similarity = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.3], [0.7, 0.1, 0.2]])
    cross_encoder = torch.tensor([[1.0, 2.0, 9.0], [0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    caption_image_index = torch.tensor([2, 1, 0])
    chosen = select_candidates(similarity, 2)
    image_matrix, text_matrix = two_stage_matrices(cross_encoder, chosen, 2)
    ranks = retrieval_metrics.image_retrieval_ranks(image_matrix, caption_image_index)
    assert ranks.tolist() == [2, 0, 0]  # caption 0: behind both candidates, a miss at R@1 and R@2
    assert retrieval_metrics.image_retrieval_ranks(cross_encoder, caption_image_index).tolist() == [0, 0, 0]
    metrics = two_stage_metrics(image_matrix, text_matrix, caption_image_index, None)
    assert metrics["image_retrieval/R@1"] == pytest.approx(200 / 3)


def test_a_ground_truth_outside_the_top_k_is_a_miss_in_the_evaluation(model, split, processor):
    result = evaluate_two_stage(model, split, processor, candidates=1, progress=False)
    index = result.caption_image_index
    inside = (result.candidates.image_topk[:, 0] == index).float().mean() * 100
    # With K = 1 image retrieval R@1 is exactly the share of captions whose image stage 1 ranks first.
    assert result.metrics["image_retrieval/R@1"] == pytest.approx(float(inside))
    ranks = retrieval_metrics.image_retrieval_ranks(result.image_matrix, index)
    missed = result.candidates.image_topk[:, 0] != index
    assert bool((ranks[missed] == 5).all())  # behind every other image


def test_k_at_least_the_number_of_candidates_equals_full_ranking_exactly(model, split, processor, full):
    result = evaluate_two_stage(model, split, processor, candidates=30, progress=False, full_ranking=True)
    assert result.candidates.num_pairs == 30 * 6
    assert result.metrics == full.metrics
    assert result.full_metrics == full.metrics
    assert torch.isfinite(result.image_matrix).all() and torch.isfinite(result.text_matrix).all()
    torch.testing.assert_close(result.image_matrix, full.scores, rtol=1e-5, atol=1e-5)
    assert result.recall_vs_k[-1]["metrics"] == result.metrics and result.recall_vs_k[-1]["pairs"] == 180
    assert [entry["k"] for entry in result.recall_vs_k] == [1, 2, 4, 8, 16, 30]


def test_interrupted_two_stage_evaluation_resumes_from_its_cache(model, split, processor, tmp_path):
    reference = evaluate_two_stage(model, split, processor, candidates=3, progress=False)

    class Interrupted(Exception):
        pass

    def stop_after_first(shard):
        if shard == 0:
            raise Interrupted

    with pytest.raises(Interrupted):
        evaluate_two_stage(
            model,
            split,
            processor,
            candidates=3,
            progress=False,
            cache_dir=tmp_path,
            shard_size=16,
            shard_callback=stop_after_first,
        )
    resumed = evaluate_two_stage(
        model, split, processor, candidates=3, progress=False, cache_dir=tmp_path, shard_size=16
    )
    assert resumed.num_shards > 1 and 0 not in resumed.computed_shards
    assert len(resumed.computed_shards) == resumed.num_shards - 1
    torch.testing.assert_close(resumed.pair_scores, reference.pair_scores)
    assert resumed.metrics == reference.metrics
    again = evaluate_two_stage(
        model, split, processor, candidates=3, progress=False, cache_dir=tmp_path, shard_size=16
    )
    assert again.computed_shards == []


def test_itm_plus_itc_adds_the_scaled_similarity(model, split, processor):
    itm = evaluate_two_stage(model, split, processor, candidates=2, progress=False)
    both = evaluate_two_stage(model, split, processor, candidates=2, progress=False, final_score="itm+itc")
    finite = torch.isfinite(itm.image_matrix)
    scale = float(model.itc_head.scale())
    torch.testing.assert_close(
        both.image_matrix[finite],
        itm.image_matrix[finite] + scale * itm.similarity[finite],
        rtol=1e-5,
        atol=1e-5,
    )


def test_full_ranking_is_ranked_by_the_same_final_score(model, split, processor, full):
    # With K >= every candidate, two-stage by ITM + ITC is full ranking by ITM + ITC: the full-ranking row must agree.
    both = evaluate_two_stage(
        model, split, processor, candidates=30, progress=False, final_score="itm+itc", full_ranking=True
    )
    scale = float(model.itc_head.scale())
    expected, _ = compute_metrics(full.scores + scale * both.similarity, both.caption_image_index, None)
    assert both.full_metrics == expected == both.metrics
    torch.testing.assert_close(
        final_scores(model, full.scores, both.similarity, "itm+itc"), full.scores + scale * both.similarity
    )
    assert final_scores(model, full.scores, both.similarity, "itm") is full.scores
    with pytest.raises(ValueError, match="final_score must be one of"):
        final_scores(model, full.scores, both.similarity, "itc")


def test_full_ranking_scores_given_are_used_instead_of_scoring_every_pair_again(
    model, split, processor, full
):
    given = evaluate_two_stage(
        model, split, processor, candidates=2, progress=False, final_score="itm+itc", full_scores=full.scores
    )
    scored = evaluate_two_stage(
        model, split, processor, candidates=2, progress=False, final_score="itm+itc", full_ranking=True
    )
    assert given.full_metrics == scored.full_metrics and given.metrics == scored.metrics
    assert given.seconds["full"] is None  # nothing was scored for it
    # Scores of another split's shape are refused, not broadcast.
    with pytest.raises(ValueError, match=r"full_scores: expected .* shape \(30, 6\), got \(30, 5\)"):
        evaluate_two_stage(
            model, split, processor, candidates=2, progress=False, full_scores=full.scores[:, :5]
        )


def test_json_and_plot_report_each_stage(model, split, processor, tmp_path):
    result = evaluate_two_stage(model, split, processor, candidates=2, progress=False)
    result.save_json(tmp_path / "two_stage.json")
    summary = json.loads((tmp_path / "two_stage.json").read_text())
    assert summary["passes"]["full"] == 180 and summary["metrics"]["full"] is None
    assert summary["pair_reduction"] == pytest.approx(180 / result.candidates.num_pairs)
    assert set(summary["metrics"]["stage1"]) >= {"image_retrieval/R@1", "text_retrieval/R@1", "rsum"}
    assert result.plot_recall_vs_k(tmp_path / "recall.png")
    assert (tmp_path / "recall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------------------
# Search API
# ----------------------------------------------------------------------------------------------------------------------


def test_retriever_answers_a_query_with_the_two_stage_ranking(model, split, processor):
    retriever = ImageBertRetriever(model, processor, candidates=3).index(split)
    assert len(retriever.image_ids) == 6
    result = evaluate_two_stage(model, split, processor, candidates=3, progress=False)
    caption = split[7]["caption"]
    hits = retriever.search(caption, top_k=3)[0]
    row = result.image_matrix[7]
    expected = [result.image_ids[i] for i in row.argsort(descending=True, stable=True)[:3].tolist()]
    assert [hit.image_id for hit in hits] == expected
    assert [hit.score for hit in hits] == pytest.approx(
        sorted(row[torch.isfinite(row)].tolist(), reverse=True)
    )
    with pytest.raises(ValueError, match="query 1"):
        retriever.search([caption, " "])


def test_cli_candidates_writes_the_three_rows_the_json_and_the_plot(model, split, processor, tmp_path):
    import importlib.util
    from pathlib import Path

    from modeling_imagebert.data.storage import save_dataset

    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    save_dataset(split, tmp_path / "data")
    script = Path(__file__).resolve().parents[1] / "examples" / "evaluate_retrieval.py"
    spec = importlib.util.spec_from_file_location("evaluate_retrieval_cli_two_stage", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    summary = cli.main(
        [
            "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"), "--candidates", "2",
            "--full_ranking", "--output_json", str(tmp_path / "out.json"), "--recall_plot", str(tmp_path / "k.png"),
            "--no_progress",
        ]
    )  # fmt: skip
    expected = evaluate_two_stage(model, split, processor, candidates=2, progress=False, full_ranking=True)
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["metrics"]["two_stage"] == pytest.approx(expected.metrics)
    assert written["metrics"]["full"] == pytest.approx(expected.full_metrics)
    assert written["passes"] == expected.passes and summary["k"] == 2
    assert (tmp_path / "k.png").is_file()
    with pytest.raises(SystemExit):
        cli.parse_args(["--model", "m", "--toy", "--full_ranking"])  # --full_ranking needs --candidates


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("os").environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1"
)
def test_itc_fine_tuning_lifts_stage_one_recall_well_above_chance(processor):
    """400 steps of `--loss itc` on the toy world (about 35 s on one CPU thread): the embeddings learn to retrieve."""
    from modeling_imagebert.data.toy_world import make_toy_world

    config = tiny_config(retrieval_loss="itc", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    world = make_toy_world(
        "retrieval",
        num_images=100,
        num_validation_images=1,
        num_test_images=20,
        feature_dim=config.visual_feature_dim,
        num_classes=config.num_object_classes - 1,
    )
    train = [
        processor.encode_record(r, index=i)
        for i, r in enumerate(world["train"].with_format("numpy", dtype=None))
    ]
    torch.manual_seed(0)
    model = ImageBertForRetrieval(config)
    before = evaluate_two_stage(model, world["test"], processor, candidates=3, progress=False).stage1_metrics
    collate = DataCollatorForImageTextRetrieval(processor, num_candidates=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(400):
        rows = torch.randperm(len(train), generator=generator)[:32].tolist()
        model(**collate([train[i] for i in rows])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = evaluate_two_stage(model, world["test"], processor, candidates=3, progress=False).stage1_metrics
    # Chance is 5% R@1 over 20 images; measured 5.0 / 5.0 before and 25.0 / 20.0 after (image / text R@1).
    assert after["image_retrieval/R@1"] >= 15.0 and after["text_retrieval/R@1"] >= 15.0, (before, after)
    assert after["rsum"] >= before["rsum"] + 80.0, (before, after)


def test_a_saved_index_answers_like_the_fresh_one_and_refuses_other_weights(
    model, split, processor, tmp_path
):
    retriever = ImageBertRetriever(model, processor, candidates=3).index(split)
    retriever.save_index(tmp_path / "index.pt")
    loaded = ImageBertRetriever(model, processor, candidates=3).load_index(tmp_path / "index.pt")
    assert loaded.image_ids == retriever.image_ids
    caption = split[3]["caption"]
    assert loaded.search(caption) == retriever.search(caption)
    other = tiny_model(ImageBertForRetrieval, seed=9)
    with pytest.raises(ValueError, match="other model weights"):
        ImageBertRetriever(other, processor).load_index(tmp_path / "index.pt")


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("os").environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1"
)
def test_two_processes_rerank_the_same_pairs_as_one(model, split, processor, tmp_path):
    """Two real gloo processes (accelerate launch) split the pair shards and both end with the one-process scores."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from modeling_imagebert.data.storage import save_dataset

    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    save_dataset(split, tmp_path / "data")
    single = evaluate_two_stage(model, split, processor, candidates=2, shard_size=16, progress=False)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    script = Path(__file__).resolve().parents[1] / "examples" / "evaluate_retrieval.py"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
        "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"), "--candidates", "2",
        "--shard_size", "16", "--no_progress", "--save_scores", str(tmp_path / "scores.pt"),
        "--output_json", str(tmp_path / "out.json"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["num_processes"] == 2 and summary["num_shards"] == single.num_shards > 1
    assert summary["computed_shards"] == len(range(0, single.num_shards, 2))  # the main process's shards
    saved = torch.load(tmp_path / "scores.pt")
    torch.testing.assert_close(saved["image_retrieval_scores"], single.image_matrix, rtol=0, atol=1e-6)
    torch.testing.assert_close(saved["text_retrieval_scores"], single.text_matrix, rtol=0, atol=1e-6)
    assert summary["metrics"]["two_stage"] == pytest.approx(single.metrics)
