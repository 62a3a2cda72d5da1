"""Specification of the ImageBERT model trio (tiny configs, CPU)."""

import copy
import dataclasses
import inspect
import json
import os
import textwrap

import pytest
import torch
from isolated import run_without_package
from torch.nn import functional as F

from modeling_imagebert import (
    ImageBertConfig,
    ImageBertForPreTraining,
    ImageBertForRetrieval,
    ImageBertModel,
)
from modeling_imagebert.losses_imagebert import retrieval_losses
from modeling_imagebert.modeling_imagebert import ImageBertForPreTrainingOutput
from modeling_imagebert.tasks_imagebert import PRETRAINING_TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ImageBertTester:
    """Builds a tiny config and padded inputs reused by the tests below."""

    def __init__(
        self, batch_size=5, text_length=7, num_regions=6, feature_dim=16, seed=0, **config_overrides
    ):
        self.batch_size, self.text_length, self.num_regions, self.feature_dim = (
            batch_size,
            text_length,
            num_regions,
            feature_dim,
        )
        self.config_kwargs = dict(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            visual_feature_dim=feature_dim,
            num_object_classes=7,
            max_regions=10,
            max_text_length=12,
            max_position_embeddings=64,
            region_position_id=63,
        )
        self.config_kwargs.update(config_overrides)
        self.generator = torch.Generator().manual_seed(seed)

    def config(self, **overrides) -> ImageBertConfig:
        return ImageBertConfig(**{**self.config_kwargs, **overrides})

    def inputs(self, padded=True) -> dict:
        g, B, T, R = self.generator, self.batch_size, self.text_length, self.num_regions
        input_ids = torch.randint(3, 99, (B, T), generator=g)
        attention_mask = torch.ones(B, T, dtype=torch.long)
        region_attention_mask = torch.ones(B, R, dtype=torch.long)
        if padded:
            text_lengths = torch.randint(2, T + 1, (B,), generator=g)
            text_lengths[0] = T
            region_counts = torch.randint(0, R + 1, (B,), generator=g)
            region_counts[0] = R
            attention_mask = (torch.arange(T)[None] < text_lengths[:, None]).long()
            region_attention_mask = (torch.arange(R)[None] < region_counts[:, None]).long()
            input_ids = input_ids * attention_mask
        corners = torch.rand(B, R, 4, generator=g)
        x1, x2 = corners[..., 0].minimum(corners[..., 2]), corners[..., 0].maximum(corners[..., 2])
        y1, y2 = corners[..., 1].minimum(corners[..., 3]), corners[..., 1].maximum(corners[..., 3])
        region_locations = torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], -1)
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros(B, T, dtype=torch.long),
            region_features=torch.randn(B, R, self.feature_dim, generator=g),
            region_locations=region_locations,
            region_attention_mask=region_attention_mask,
        )

    def pretraining_labels(self, inputs: dict, itm_labels=None) -> dict:
        g, B, T, R = self.generator, self.batch_size, self.text_length, self.num_regions
        text_masked = (torch.rand(B, T, generator=g) < 0.4) & inputs["attention_mask"].bool()
        text_masked[:, 1] = True
        region_masked = (torch.rand(B, R, generator=g) < 0.4) & inputs["region_attention_mask"].bool()
        region_masked[0, 0] = True
        if itm_labels is None:
            itm_labels = torch.ones(B, dtype=torch.long)
            itm_labels[1::2] = 0
        return dict(
            labels=torch.where(text_masked, inputs["input_ids"], -100),
            masked_regions=region_masked,
            region_class_labels=torch.where(region_masked, torch.randint(0, 7, (B, R), generator=g), -100),
            region_feature_targets=inputs["region_features"].clone(),
            itm_labels=itm_labels,
        )


@pytest.fixture
def tester():
    return ImageBertTester()


def _seeded(model_class, config, seed=0):
    torch.manual_seed(seed)
    return model_class(config).eval()


# ---------------------------------------------------------------------------------------------------- configuration


def test_config_keeps_extra_attributes_through_round_trips(tmp_path):
    # As any PreTrainedConfig: keys a newer transformers, a quantisation/PEFT tool or transformers' own test tooling
    # adds must survive to_dict/from_dict, deepcopy and save/load.
    config = ImageBertConfig(
        hidden_size=32, num_attention_heads=4, rms_norm_eps=1e-6, quantization_note="int8"
    )
    config.layer_norm_epsilon = 1e-5
    assert ImageBertConfig.from_dict(config.to_dict()).rms_norm_eps == 1e-6
    copied = copy.deepcopy(config)
    assert (copied.quantization_note, copied.layer_norm_epsilon) == ("int8", 1e-5)
    config.save_pretrained(tmp_path)
    loaded = ImageBertConfig.from_pretrained(tmp_path)
    assert (loaded.rms_norm_eps, loaded.quantization_note, loaded.layer_norm_epsilon) == (1e-6, "int8", 1e-5)
    assert loaded.to_dict() == config.to_dict()


def test_config_warns_when_an_extra_attribute_resembles_a_field(caplog):
    with caplog.at_level("WARNING"):
        config = ImageBertConfig(num_hiden_layers=3)
    assert config.num_hidden_layers == 12 and config.num_hiden_layers == 3
    assert "'num_hiden_layers'" in caplog.text and "did you mean 'num_hidden_layers'" in caplog.text


def test_config_saved_and_loaded_without_warnings(tmp_path, caplog):
    ImageBertConfig(hidden_size=32, num_attention_heads=4).save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        ImageBertConfig.from_pretrained(tmp_path)
    assert "did you mean" not in caplog.text


def test_check_field_names_refuses_a_typo_naming_the_closest_field():
    ImageBertConfig.check_field_names(["num_hidden_layers", "max_regions", "output_hidden_states"])
    with pytest.raises(
        ValueError, match=r"^model\.overrides\.num_hiden_layers: .*did you mean 'num_hidden_layers'"
    ):
        ImageBertConfig.check_field_names(["max_regions", "num_hiden_layers"], where="model.overrides")
    with pytest.raises(ValueError, match=r"zzz: not an ImageBertConfig field; expected one of \["):
        ImageBertConfig.check_field_names(["zzz"])


def test_model_refuses_hidden_size_not_a_multiple_of_heads(tester):
    # The config accepts it (as BertConfig does, and as transformers' ConfigTester builds it); the model cannot.
    config = tester.config(hidden_size=30)
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        ImageBertModel(config)


def test_config_refuses_ill_typed_value():
    with pytest.raises(Exception, match="hidden_size"):
        ImageBertConfig(hidden_size="32")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("retrieval_loss", "binary+hinge", "hinge"),
        ("region_position_id", 512, "region_position_id"),
        ("mlm_loss_weight", -1.0, "mlm_loss_weight"),
    ],
)
def test_config_refuses_out_of_range_values(field, value, message):
    with pytest.raises(Exception, match=message):
        ImageBertConfig(**{field: value})


def test_config_defaults_are_the_paper_settings():
    config = ImageBertConfig()
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
    ) == (
        12,
        768,
        3072,
        12,
    )
    assert (config.visual_feature_dim, config.num_object_classes, config.max_regions) == (2048, 1600, 100)
    assert config.max_sequence_length == 144
    assert config.retrieval_loss_weights == {"binary": 1.0}


def test_every_task_of_the_table_has_its_weight_field_output_loss_and_forward_arguments():
    # A row of the task table names what the config, the output and the forward must declare for the task.
    config = ImageBertConfig()
    outputs = {field.name for field in dataclasses.fields(ImageBertForPreTrainingOutput)}
    arguments = inspect.signature(ImageBertForPreTraining.forward).parameters
    for task in PRETRAINING_TASKS:
        assert getattr(config, task.loss_weight_field) == (1.0 if task.in_paper else 0.0), task.name
        assert task.loss_output in outputs, task.name
        assert set(task.label_keys) <= set(arguments), task.name
        assert task.position_key is None or task.position_key in arguments, task.name
        assert (task.position_key is None) == (task.positions_over is None), task.name
        assert task.positions_over in (None, "text", "regions"), task.name
        assert task.label_values in (None, "binary") or isinstance(getattr(config, task.label_values), int)


def test_retrieval_loss_spec_parses_weighted_sums():
    config = ImageBertConfig(retrieval_loss="binary + 0.5*ce+2e-1*triplet")
    assert config.retrieval_loss_weights == {"binary": 1.0, "ce": 0.5, "triplet": 0.2}


@pytest.mark.parametrize("name", ["imagebert-base", "imagebert-tiny"])
def test_shipped_model_sizes_load(name):
    config = ImageBertConfig.from_json_file(os.path.join(REPO, "configuration", "models", f"{name}.json"))
    assert config.max_sequence_length == config.max_text_length + config.max_regions


# ---------------------------------------------------------------------------------------------------- save / load / Hub


def test_save_load_gives_identical_outputs(tester, tmp_path):
    model = _seeded(ImageBertForPreTraining, tester.config())
    inputs = tester.inputs()
    model.save_pretrained(tmp_path)
    loaded = ImageBertForPreTraining.from_pretrained(tmp_path).eval()
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    with torch.no_grad():
        expected, actual = model(**inputs), loaded(**inputs)
    # Same weights bit for bit; the CPU matmul kernels may still differ in the last bit with memory alignment.
    torch.testing.assert_close(actual.itm_logits, expected.itm_logits, rtol=0, atol=1e-6)
    assert loaded.mlm_head.decoder.weight is loaded.imagebert.embeddings.word_embeddings.weight


def test_buffers_are_right_after_from_pretrained(tester, tmp_path):
    config = tester.config(use_global_image_feature=True, global_image_feature_dim=8)
    _seeded(ImageBertModel, config).save_pretrained(tmp_path)
    loaded = ImageBertModel.from_pretrained(tmp_path)
    embeddings = loaded.embeddings
    assert torch.equal(embeddings.position_ids[0], torch.arange(config.max_position_embeddings))
    assert torch.equal(embeddings.whole_image_location, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))


def test_saved_folder_serves_all_three_auto_classes(tester, tmp_path):
    from transformers import AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification

    _seeded(ImageBertForPreTraining, tester.config()).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForPreTraining",
        "AutoModelForSequenceClassification",
        "AutoModelForZeroShotImageClassification",
    }
    # The model file's relative imports (kernels, losses, task table) are copied beside it.
    siblings = {"kernels_imagebert.py", "losses_imagebert.py", "tasks_imagebert.py"}
    assert {"modeling_imagebert.py", "configuration_imagebert.py", *siblings} <= set(os.listdir(tmp_path))
    assert isinstance(AutoModel.from_pretrained(tmp_path), ImageBertModel)
    assert isinstance(AutoModelForPreTraining.from_pretrained(tmp_path), ImageBertForPreTraining)
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(tmp_path), ImageBertForRetrieval)


def test_hub_style_folder_loads_in_fresh_process_without_package(tester, tmp_path):
    model = _seeded(ImageBertForPreTraining, tester.config())
    inputs = tester.inputs()
    folder = tmp_path / "hub_folder"
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = model(**inputs).itm_logits
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification
        io = torch.load({str(tmp_path / "io.pt")!r})
        pre = AutoModelForPreTraining.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(pre).__name__ == "ImageBertForPreTraining"
        with torch.no_grad():
            torch.testing.assert_close(pre(**io["inputs"]).itm_logits, io["expected"], rtol=0, atol=1e-6)
        base = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(base).__name__ == "ImageBertModel", type(base)
        retrieval = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(retrieval).__name__ == "ImageBertForRetrieval"
        with torch.no_grad():
            torch.testing.assert_close(retrieval(**io["inputs"]).logits, io["expected"], rtol=0, atol=1e-6)
        print("OK")
        """
    )
    result = run_without_package(script, tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_retrieval_model_is_initialised_from_the_itm_head(tester, tmp_path):
    pretraining = _seeded(ImageBertForPreTraining, tester.config())
    pretraining.save_pretrained(tmp_path)
    retrieval = ImageBertForRetrieval.from_pretrained(tmp_path).eval()
    inputs = tester.inputs()
    with torch.no_grad():
        torch.testing.assert_close(retrieval.score(**inputs), pretraining.score(**inputs), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- padding & attention


def test_eager_and_sdpa_agree_with_padding(tester):
    inputs = tester.inputs(padded=True)
    eager = _seeded(ImageBertModel, tester.config(), seed=1)
    eager.set_attn_implementation("eager")
    sdpa = _seeded(ImageBertModel, tester.config(), seed=1)
    sdpa.set_attn_implementation("sdpa")
    with torch.no_grad():
        a, b = eager(**inputs), sdpa(**inputs)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_row_in_padded_batch_equals_row_alone(tester, attn_implementation):
    inputs = tester.inputs(padded=True)
    model = _seeded(ImageBertModel, tester.config())
    model.set_attn_implementation(attn_implementation)
    with torch.no_grad():
        batched = model(**inputs)
        for row in range(tester.batch_size):
            text_len = int(inputs["attention_mask"][row].sum())
            num_regions = int(inputs["region_attention_mask"][row].sum())
            alone = model(
                input_ids=inputs["input_ids"][row : row + 1, :text_len],
                region_features=inputs["region_features"][row : row + 1, :num_regions],
                region_locations=inputs["region_locations"][row : row + 1, :num_regions],
            )
            torch.testing.assert_close(
                batched.text_hidden_state[row, :text_len], alone.text_hidden_state[0], rtol=0, atol=1e-5
            )
            torch.testing.assert_close(
                batched.region_hidden_state[row, :num_regions],
                alone.region_hidden_state[0],
                rtol=0,
                atol=1e-5,
            )
            torch.testing.assert_close(batched.pooler_output[row], alone.pooler_output[0], rtol=0, atol=1e-5)


def test_region_order_does_not_change_text_outputs(tester):
    inputs = tester.inputs(padded=False)
    model = _seeded(ImageBertModel, tester.config())
    permutation = torch.randperm(tester.num_regions)
    shuffled = dict(inputs)
    for name in ("region_features", "region_locations", "region_attention_mask"):
        shuffled[name] = inputs[name][:, permutation]
    with torch.no_grad():
        a, b = model(**inputs), model(**shuffled)
    torch.testing.assert_close(a.text_hidden_state, b.text_hidden_state, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        a.region_hidden_state[:, permutation], b.region_hidden_state, rtol=0, atol=1e-5
    )


def test_encoder_runs_on_text_alone_and_on_regions_alone(tester):
    inputs = tester.inputs(padded=False)
    model = _seeded(ImageBertModel, tester.config())
    with torch.no_grad():
        text_only = model(input_ids=inputs["input_ids"])
        regions_only = model(
            region_features=inputs["region_features"], region_locations=inputs["region_locations"]
        )
        zero_regions = model(
            input_ids=inputs["input_ids"],
            region_features=inputs["region_features"][:, :0],
            region_locations=inputs["region_locations"][:, :0],
        )
    assert text_only.region_hidden_state.shape[1] == 0
    assert regions_only.text_hidden_state.shape[1] == 0
    assert regions_only.region_hidden_state.shape[1] == tester.num_regions
    torch.testing.assert_close(zero_regions.last_hidden_state, text_only.last_hidden_state)


def test_global_image_token_sits_between_text_and_regions(tester):
    config = tester.config(use_global_image_feature=True, global_image_feature_dim=8)
    model = _seeded(ImageBertModel, config)
    inputs = tester.inputs(padded=False)
    inputs["global_image_features"] = torch.randn(tester.batch_size, 8)
    with torch.no_grad():
        out = model(**inputs)
    assert out.last_hidden_state.shape[1] == tester.text_length + 1 + tester.num_regions
    torch.testing.assert_close(out.global_image_hidden_state, out.last_hidden_state[:, tester.text_length])


def test_hidden_states_and_attentions_are_returned(tester):
    model = _seeded(ImageBertModel, tester.config())
    model.set_attn_implementation("eager")
    inputs = tester.inputs()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    length = tester.text_length + tester.num_regions
    assert len(out.hidden_states) == tester.config().num_hidden_layers + 1
    assert len(out.attentions) == tester.config().num_hidden_layers
    assert out.attentions[0].shape == (tester.batch_size, 4, length, length)
    # Padded keys get no attention.
    padded_keys = torch.cat([inputs["attention_mask"], inputs["region_attention_mask"]], 1) == 0
    assert (
        out.attentions[0].permute(0, 2, 3, 1)[padded_keys[:, None, :].expand(-1, length, -1)].abs().max() == 0
    )


# ---------------------------------------------------------------------------------------------------- embeddings


def test_region_embedding_follows_paper_formula_with_hand_computed_location(tester):
    config = tester.config()
    model = _seeded(ImageBertModel, config)
    emb = model.embeddings
    # A 100 x 50 px box at (10, 20) in a 200 x 100 image: c = (x1/W, y1/H, x2/W, y2/H, area/(W*H)).
    location = torch.tensor([[[10 / 200, 20 / 100, 110 / 200, 70 / 100, (100 * 50) / (200 * 100)]]])
    torch.testing.assert_close(location, torch.tensor([[[0.05, 0.2, 0.55, 0.7, 0.25]]]))
    feature = torch.randn(1, 1, config.visual_feature_dim)
    expected = F.layer_norm(
        F.linear(feature, emb.region_feature_projection.weight, emb.region_feature_projection.bias)
        + F.linear(location, emb.region_location_projection.weight, emb.region_location_projection.bias)
        + emb.token_type_embeddings.weight[1]
        + emb.position_embeddings.weight[config.region_position_id],
        (config.hidden_size,),
        emb.region_LayerNorm.weight,
        emb.region_LayerNorm.bias,
        config.layer_norm_eps,
    )
    with torch.no_grad():
        actual = emb(None, None, feature, location)
    torch.testing.assert_close(actual, expected)


def test_text_embedding_is_bert_embedding(tester):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings

    config = tester.config()
    model = _seeded(ImageBertModel, config)
    bert_emb = BertEmbeddings(
        BertConfig(
            **{
                k: getattr(config, k)
                for k in (
                    "vocab_size",
                    "hidden_size",
                    "max_position_embeddings",
                    "type_vocab_size",
                    "layer_norm_eps",
                    "pad_token_id",
                )
            }
        )
    )
    bert_emb.load_state_dict(
        {k: v for k, v in model.embeddings.state_dict().items() if not k.startswith(("region", "global"))},
        strict=False,
    )
    bert_emb.eval()
    ids = tester.inputs()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model.embeddings(ids, None, None, None), bert_emb(ids))


# ---------------------------------------------------------------------------------------------------- pre-training losses


def test_every_parameter_gets_a_gradient_from_the_full_loss(tester):
    # ITC on, so that the contrastive head (unused when it is off, the paper's default) is reached too.
    config = tester.config(use_global_image_feature=True, global_image_feature_dim=8, itc_loss_weight=1.0)
    model = ImageBertForPreTraining(config)
    model.train()
    inputs = tester.inputs()
    inputs["global_image_features"] = torch.randn(tester.batch_size, 8)
    out = model(**inputs, **tester.pretraining_labels(inputs))
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(getattr(out, f"{t}_loss") is not None for t in ("mlm", "moc", "mrfr", "itm", "itc"))


def test_total_loss_is_the_weighted_sum_of_task_losses(tester):
    config = tester.config(
        mlm_loss_weight=0.5, moc_loss_weight=2.0, mrfr_loss_weight=0.25, itm_loss_weight=3.0
    )
    model = _seeded(ImageBertForPreTraining, config)
    inputs = tester.inputs()
    out = model(**inputs, **tester.pretraining_labels(inputs))
    expected = 0.5 * out.mlm_loss + 2.0 * out.moc_loss + 0.25 * out.mrfr_loss + 3.0 * out.itm_loss
    torch.testing.assert_close(out.loss, expected)


def test_heads_project_only_labelled_positions(tester):
    model = _seeded(ImageBertForPreTraining, tester.config())
    inputs = tester.inputs()
    labels = tester.pretraining_labels(inputs)
    out = model(**inputs, **labels)
    matched = labels["itm_labels"].bool()
    assert out.mlm_logits.shape == (int(((labels["labels"] != -100) & matched[:, None]).sum()), 99)
    assert out.moc_logits.shape[0] == int(((labels["region_class_labels"] != -100) & matched[:, None]).sum())
    assert out.mrfr_predictions.shape[0] == int((labels["masked_regions"] & matched[:, None]).sum())


def test_mlm_loss_matches_cross_entropy_over_full_vocabulary_projection(tester):
    model = _seeded(ImageBertForPreTraining, tester.config())
    inputs = tester.inputs()
    labels = tester.pretraining_labels(inputs, itm_labels=torch.ones(tester.batch_size, dtype=torch.long))
    out = model(**inputs, labels=labels["labels"])
    full = model.mlm_head(model.imagebert(**inputs).text_hidden_state)  # every position, the slow way
    torch.testing.assert_close(
        out.mlm_loss, F.cross_entropy(full.reshape(-1, 99), labels["labels"].reshape(-1))
    )


def test_masked_losses_ignore_mismatched_pairs_exactly(tester):
    """Conditional masking: whatever labels a negative pair carries, the loss and its gradients do not change."""
    model = _seeded(ImageBertForPreTraining, tester.config())
    inputs = tester.inputs()
    labels = tester.pretraining_labels(inputs)
    negatives = labels["itm_labels"] == 0
    assert negatives.any()
    scrambled = {k: v.clone() for k, v in labels.items()}
    scrambled["labels"][negatives] = torch.where(
        inputs["attention_mask"][negatives].bool(), inputs["input_ids"][negatives], -100
    )
    scrambled["masked_regions"][negatives] = inputs["region_attention_mask"][negatives].bool()
    scrambled["region_class_labels"][negatives] = 3
    scrambled["region_feature_targets"][negatives] = 1e3

    def loss_and_grads(batch_labels):
        model.zero_grad()
        out = model(**inputs, **batch_labels)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    a, grads_a = loss_and_grads(labels)
    b, grads_b = loss_and_grads(scrambled)
    for name in ("loss", "mlm_loss", "moc_loss", "mrfr_loss", "itm_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=0)


def test_all_negative_batch_gives_zero_masked_losses_with_gradient_everywhere(tester):
    model = ImageBertForPreTraining(tester.config()).train()
    inputs = tester.inputs()
    labels = tester.pretraining_labels(inputs, itm_labels=torch.zeros(tester.batch_size, dtype=torch.long))
    out = model(**inputs, **labels)
    assert out.mlm_loss.item() == out.moc_loss.item() == out.mrfr_loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters()), "DDP needs every parameter in the graph"


def test_missing_task_labels_skip_that_task(tester):
    model = _seeded(ImageBertForPreTraining, tester.config())
    inputs = tester.inputs()
    labels = tester.pretraining_labels(inputs)
    out = model(**inputs, itm_labels=labels["itm_labels"])
    assert out.mlm_loss is None and out.moc_loss is None and out.mrfr_loss is None
    torch.testing.assert_close(out.loss, out.itm_loss)
    text_only = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels["labels"]
    )
    torch.testing.assert_close(text_only.loss, text_only.mlm_loss)
    assert model(**inputs).loss is None


def test_resize_token_embeddings_keeps_mlm_head_tied(tester):
    model = _seeded(ImageBertForPreTraining, tester.config())
    model.resize_token_embeddings(120)
    assert model.config.vocab_size == 120
    assert model.mlm_head.decoder.weight is model.imagebert.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.bias.shape == (120,)
    inputs = tester.inputs()
    inputs["input_ids"][0, 1] = 119
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[0, 1] = 119
    out = model(**inputs, labels=labels)
    assert out.mlm_logits.shape == (1, 120) and torch.isfinite(out.mlm_loss)


def test_activation_checkpointing_gives_the_same_gradients(tester):
    config = tester.config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    inputs = tester.inputs()
    labels = tester.pretraining_labels(inputs)
    grads = []
    for checkpointing in (False, True):
        model = _seeded(ImageBertForPreTraining, config).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model(**inputs, **labels).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- retrieval losses


def test_retrieval_losses_match_hand_computed_values():
    # Two groups of P = 3 candidates, the positive first in group 0 and second in group 1.
    logits = torch.tensor([2.0, 0.5, -1.0, 0.3, 1.0, 0.8])
    labels = torch.tensor([1.0, 0, 0, 0, 1, 0])
    losses = retrieval_losses(logits, labels, {"binary": 1, "ce": 1, "triplet": 1}, margin=0.2)

    import math

    def softplus(x):
        return math.log1p(math.exp(x))

    # binary: mean of -log sigmoid(s) for positives, -log(1 - sigmoid(s)) for negatives.
    binary = (
        softplus(-2.0) + softplus(0.5) + softplus(-1.0) + softplus(0.3) + softplus(-1.0) + softplus(0.8)
    ) / 6
    ce = (
        -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(0.5) + math.exp(-1.0)))
        - math.log(math.exp(1.0) / (math.exp(0.3) + math.exp(1.0) + math.exp(0.8)))
    ) / 2
    triplet = (max(0.0, 0.2 - 2.0 + 0.5) + max(0.0, 0.2 - 1.0 + 0.8)) / 2  # hardest negatives 0.5 and 0.8
    assert losses["binary"].item() == pytest.approx(binary, rel=1e-6)
    assert losses["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert losses["triplet"].item() == pytest.approx(triplet, rel=1e-6, abs=1e-7)


def test_retrieval_model_combines_losses_with_config_weights(tester):
    model = _seeded(ImageBertForRetrieval, tester.config(retrieval_loss="binary+0.5*ce+2*triplet"))
    tester.batch_size = 6
    inputs = tester.inputs()
    labels = torch.tensor([1.0, 0, 0, 1, 0, 0])
    out = model(**inputs, labels=labels)
    torch.testing.assert_close(out.loss, out.binary_loss + 0.5 * out.ce_loss + 2 * out.triplet_loss)
    expected = retrieval_losses(out.logits, labels, {"ce": 1}, 0.2)["ce"]
    torch.testing.assert_close(out.ce_loss, expected)


def test_retrieval_groups_need_one_positive_each():
    with pytest.raises(ValueError, match="exactly one positive"):
        retrieval_losses(torch.zeros(4), torch.tensor([1.0, 1, 0, 0]), {"ce": 1}, 0.2, num_candidates=2)
    with pytest.raises(ValueError, match="groups of P candidates"):
        retrieval_losses(torch.zeros(5), torch.tensor([1.0, 0, 1, 0, 0]), {"triplet": 1}, 0.2)


TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_KEYS = ("region_features", "region_locations", "region_attention_mask")


def _rows(inputs: dict, keys, rows) -> dict:
    return {key: value[rows] if key in keys else value for key, value in inputs.items()}


@pytest.mark.parametrize("single", ["image", "text"])
def test_one_side_of_batch_one_is_broadcast_and_scored_as_a_grid(tester, single):
    """One image against n texts (the zero-shot pipeline's call) or one text against n images: the single side is
    broadcast, `logits` are the n pairs' ITM logits as if the single side had been repeated, and
    `logits_per_image` (n_images, n_texts) / `logits_per_text` hold them as a grid."""
    model = _seeded(ImageBertForRetrieval, tester.config())
    inputs = tester.inputs()
    keys = IMAGE_KEYS if single == "image" else TEXT_KEYS
    repeated = _rows(inputs, keys, torch.zeros(tester.batch_size, dtype=torch.long))
    with torch.no_grad():
        grid = model(**_rows(inputs, keys, slice(0, 1)))
        paired = model(**repeated)
    torch.testing.assert_close(grid.logits, paired.logits)
    expected_shape = (1, tester.batch_size) if single == "image" else (tester.batch_size, 1)
    assert grid.logits_per_image.shape == expected_shape
    torch.testing.assert_close(grid.logits_per_image.reshape(-1), paired.logits)
    torch.testing.assert_close(grid.logits_per_text, grid.logits_per_image.T)
    assert paired.logits_per_image is None and paired.logits_per_text is None  # paired rows: today's output


@pytest.mark.parametrize("score", ["itc", "itm+itc"])
def test_zero_shot_score_adds_the_contrastive_logit_when_configured(tester, score):
    model = _seeded(ImageBertForRetrieval, tester.config(zero_shot_score=score))
    inputs = _rows(tester.inputs(), IMAGE_KEYS, slice(0, 1))
    with torch.no_grad():
        out = model(**inputs)
        text = model.get_text_features(*(inputs[key] for key in TEXT_KEYS)).pooler_output
        image = model.get_image_features(*(inputs[key] for key in IMAGE_KEYS)).pooler_output
    itc = model.itc_head.scale() * image @ text.T  # (1, B)
    expected = itc if score == "itc" else itc + out.logits[None]
    torch.testing.assert_close(out.logits_per_image, expected)
    # @strict wraps the validator's ValueError in its StrictDataclassClassValidationError (an Exception).
    with pytest.raises(Exception, match="zero_shot_score must be one of"):
        tester.config(zero_shot_score="cosine")


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda x: x.update(region_features=torch.randn(5, 6, 15)), "feature dimension 15"),
        (
            lambda x: x.update(
                region_features=torch.randn(5, 11, 16),
                region_locations=torch.rand(5, 11, 5),
                region_attention_mask=torch.ones(5, 11, dtype=torch.long),
            ),
            "more than config.max_regions",
        ),
        (
            lambda x: x.update(input_ids=x["input_ids"][:4], attention_mask=None, token_type_ids=None),
            "batch size",
        ),
        (lambda x: x["region_features"].__setitem__((1, 2, 3), float("nan")), "region_features contains NaN"),
        (
            lambda x: x["region_features"].__setitem__((0, 0, 0), float("inf")),
            "region_features contains NaN or Inf",
        ),
        (lambda x: x["region_locations"].__setitem__((0, 0, 2), 1.5), r"normalised to \[0, 1\]"),
        (lambda x: x["region_locations"].__setitem__((2, 1, 0), -0.1), r"normalised to \[0, 1\]"),
        (lambda x: x.update(region_locations=None), "region_locations"),
    ],
)
def test_bad_input_gets_a_clear_error(tester, corrupt, message):
    # Value checks (NaN, location range) run with config.check_inputs; shape checks always.
    model = _seeded(ImageBertModel, tester.config(check_inputs=True))
    inputs = tester.inputs()
    corrupt(inputs)
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_value_checks_are_off_by_default_so_forward_reads_nothing_back(tester):
    # Reading values on the host is a device synchronisation: the processor and collators check values instead.
    model = _seeded(ImageBertModel, tester.config())
    inputs = tester.inputs()
    inputs["region_locations"][0, 0, 2] = 1.5
    model(**inputs)  # no error: only config.check_inputs reads values
    model.config.check_inputs = True
    with pytest.raises(ValueError, match=r"normalised to \[0, 1\]"):
        model(**inputs)


# ---------------------------------------------------------------------------------------------------- BERT initialisation


def test_from_bert_pretrained_reproduces_bert_text_path(minilm_path):
    from transformers import BertModel, BertTokenizerFast

    bert = BertModel.from_pretrained(minilm_path).eval()
    model, info = ImageBertForPreTraining.from_bert_pretrained(
        minilm_path, visual_feature_dim=16, num_object_classes=5, max_regions=4, output_loading_info=True
    )
    model.eval()
    tokenizer = BertTokenizerFast.from_pretrained(minilm_path)
    batch = tokenizer(["a dog runs on the grass .", "two red cars"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = bert(**batch, output_hidden_states=True)
        actual = model.imagebert(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            output_hidden_states=True,
        )
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(
        actual.text_hidden_state[mask], expected.last_hidden_state[mask], rtol=1e-4, atol=1e-5
    )
    for ours, theirs in zip(actual.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)

    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert "imagebert.embeddings.word_embeddings.weight" in info["copied"]
    assert "imagebert.encoder.layer.5.output.dense.weight" in info["copied"]
    assert "imagebert.embeddings.region_feature_projection.weight" in info["newly_initialized"]
    assert "itm_head.weight" in info["newly_initialized"]
    # This checkpoint is a bare BertModel: its MLM transform is newly initialised, the decoder stays tied.
    assert "mlm_head.transform.dense.weight" in info["newly_initialized"]
    assert model.mlm_head.decoder.weight is model.imagebert.embeddings.word_embeddings.weight


def test_from_bert_pretrained_copies_an_mlm_head(tmp_path):
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    bert = BertForPreTraining(
        BertConfig(
            vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
        )
    )
    bert.save_pretrained(tmp_path)
    for model_class in (ImageBertModel, ImageBertForPreTraining, ImageBertForRetrieval):
        model, info = model_class.from_bert_pretrained(
            tmp_path, visual_feature_dim=8, output_loading_info=True
        )
        base = model if model_class is ImageBertModel else model.imagebert
        torch.testing.assert_close(
            base.encoder.layer[1].attention.self.query.weight,
            bert.bert.encoder.layer[1].attention.self.query.weight,
        )
    torch.testing.assert_close(model.imagebert.pooler.dense.weight, bert.bert.pooler.dense.weight)
    pre = ImageBertForPreTraining.from_bert_pretrained(tmp_path, visual_feature_dim=8)
    torch.testing.assert_close(
        pre.mlm_head.transform.dense.weight, bert.cls.predictions.transform.dense.weight
    )
    torch.testing.assert_close(pre.mlm_head.decoder.bias, bert.cls.predictions.bias)
    assert pre.mlm_head.decoder.weight is pre.imagebert.embeddings.word_embeddings.weight


def test_from_bert_pretrained_refuses_to_override_bert_architecture(minilm_path):
    with pytest.raises(ValueError, match="hidden_size"):
        ImageBertModel.from_bert_pretrained(minilm_path, hidden_size=768)


def test_from_bert_pretrained_can_keep_only_the_first_layers(minilm_path):
    from transformers import BertModel

    bert = BertModel.from_pretrained(minilm_path)
    model, info = ImageBertModel.from_bert_pretrained(
        minilm_path, num_hidden_layers=2, output_loading_info=True
    )
    assert len(model.encoder.layer) == 2
    torch.testing.assert_close(
        model.encoder.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight
    )
    assert any(key.startswith("encoder.layer.5.") for key in info["unused"])
    with pytest.raises(ValueError, match="exceeds the 6 layers"):
        ImageBertModel.from_bert_pretrained(minilm_path, num_hidden_layers=7)


def test_region_position_follows_a_smaller_position_table():
    # The dummy region position defaults to the last row of the position table: 511 for BERT's 512.
    assert ImageBertConfig().region_position_id == 511
    small = ImageBertConfig(max_position_embeddings=64)
    assert small.region_position_id == 63
    assert ImageBertConfig.from_dict(small.to_dict()).region_position_id == 63
    with pytest.raises(Exception, match="region_position_id must be in"):
        ImageBertConfig(max_position_embeddings=64, region_position_id=100)
