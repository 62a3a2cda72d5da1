"""UNITER / VILLA checkpoints convert into ImageBERT exactly (`modeling_imagebert.pretraining.convert_uniter`).

A synthetic checkpoint with UNITER's key names and shapes (from its public code: `model/model.py`, `model/layer.py`,
`model/pretrain.py`), at a tiny size, converts with nothing unmapped, and the converted `ImageBertForPreTraining`
gives what UNITER's forward (`pretraining/uniter_reference.py`, restated from its code) gives on the same random
inputs: ITM probabilities, MLM logits, region-class logits and MRFR features, to 1e-5 in fp32. The real base shapes
map completely (on the meta device). Refusals: a pickle that would run code, a checkpoint of another model, a large
checkpoint passed as base, a tokenizer of another vocabulary, each with one line and no output folder.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertModel
from modeling_imagebert.pretraining.convert_uniter import (
    NEW_IN_IMAGEBERT,
    ConversionError,
    check_is_uniter,
    convert_uniter,
    fold_location_weight,
    infer_config,
    main,
    map_uniter_state_dict,
)
from modeling_imagebert.pretraining.uniter_reference import (
    check_parity,
    parity_inputs,
    uniter_box_location,
)
from modeling_imagebert.processing_imagebert import region_locations

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"hidden": 32, "layers": 2, "intermediate": 37, "feature_dim": 16, "labels": 8, "positions": 64}
TINY_HEADS = 4


def uniter_shapes(
    vocab: int,
    hidden: int,
    layers: int,
    intermediate: int,
    feature_dim: int,
    labels: int,
    positions: int = 512,
) -> dict[str, tuple[int, ...]]:
    """The state dict of UNITER's `UniterForPretraining(config, img_dim=feature_dim, img_label_dim=labels)`, name ->
    shape, in its registration order. `labels` counts the background class (1601 for VG). Its shared parameters
    appear under both names, as `nn.Module.state_dict` lists them: `cls.predictions.decoder.weight` (the word
    embeddings) and `feat_regress.weight` (`img_linear`'s weight)."""
    h, img = hidden, "uniter.img_embeddings"
    shapes = {
        "uniter.embeddings.word_embeddings.weight": (vocab, h),
        "uniter.embeddings.position_embeddings.weight": (positions, h),
        "uniter.embeddings.token_type_embeddings.weight": (2, h),
        "uniter.embeddings.LayerNorm.weight": (h,),
        "uniter.embeddings.LayerNorm.bias": (h,),
        f"{img}.img_linear.weight": (h, feature_dim),
        f"{img}.img_linear.bias": (h,),
        f"{img}.img_layer_norm.weight": (h,),
        f"{img}.img_layer_norm.bias": (h,),
        f"{img}.pos_layer_norm.weight": (h,),
        f"{img}.pos_layer_norm.bias": (h,),
        f"{img}.pos_linear.weight": (h, 7),
        f"{img}.pos_linear.bias": (h,),
        f"{img}.mask_embedding.weight": (2, feature_dim),
        f"{img}.LayerNorm.weight": (h,),
        f"{img}.LayerNorm.bias": (h,),
    }
    for i in range(layers):
        layer = f"uniter.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            shapes[f"{layer}.attention.self.{name}.weight"] = (h, h)
            shapes[f"{layer}.attention.self.{name}.bias"] = (h,)
        shapes.update(
            {
                f"{layer}.attention.output.dense.weight": (h, h),
                f"{layer}.attention.output.dense.bias": (h,),
                f"{layer}.attention.output.LayerNorm.weight": (h,),
                f"{layer}.attention.output.LayerNorm.bias": (h,),
                f"{layer}.intermediate.dense.weight": (intermediate, h),
                f"{layer}.intermediate.dense.bias": (intermediate,),
                f"{layer}.output.dense.weight": (h, intermediate),
                f"{layer}.output.dense.bias": (h,),
                f"{layer}.output.LayerNorm.weight": (h,),
                f"{layer}.output.LayerNorm.bias": (h,),
            }
        )
    shapes.update(
        {
            "uniter.pooler.dense.weight": (h, h),
            "uniter.pooler.dense.bias": (h,),
            "cls.predictions.bias": (vocab,),
            "cls.predictions.transform.dense.weight": (h, h),
            "cls.predictions.transform.dense.bias": (h,),
            "cls.predictions.transform.LayerNorm.weight": (h,),
            "cls.predictions.transform.LayerNorm.bias": (h,),
            "cls.predictions.decoder.weight": (vocab, h),
            "feat_regress.weight": (h, feature_dim),
            "feat_regress.bias": (feature_dim,),
            "feat_regress.net.0.weight": (h, h),
            "feat_regress.net.0.bias": (h,),
            "feat_regress.net.2.weight": (h,),
            "feat_regress.net.2.bias": (h,),
            "region_classifier.net.0.weight": (h, h),
            "region_classifier.net.0.bias": (h,),
            "region_classifier.net.2.weight": (h,),
            "region_classifier.net.2.bias": (h,),
            "region_classifier.net.3.weight": (labels, h),
            "region_classifier.net.3.bias": (labels,),
            "itm_output.weight": (2, h),
            "itm_output.bias": (2,),
        }
    )
    return shapes


# UNITER-base's non-layer tensors as its code builds them with config/uniter-base.json (vocab 28,996, hidden 768,
# intermediate 3072, 512 positions) and utils/const.py (IMG_DIM 2048, IMG_LABEL_DIM 1601), spelt out independently of
# `uniter_shapes`; each of its 12 layers has the 16 tensors of BERT's.
UNITER_BASE_OUTSIDE_LAYERS = {
    "uniter.embeddings.word_embeddings.weight": (28996, 768),
    "uniter.embeddings.position_embeddings.weight": (512, 768),
    "uniter.embeddings.token_type_embeddings.weight": (2, 768),
    "uniter.img_embeddings.img_linear.weight": (768, 2048),
    "uniter.img_embeddings.pos_linear.weight": (768, 7),
    "uniter.img_embeddings.mask_embedding.weight": (2, 2048),
    "cls.predictions.decoder.weight": (28996, 768),
    "cls.predictions.bias": (28996,),
    "feat_regress.weight": (768, 2048),
    "feat_regress.bias": (2048,),
    "region_classifier.net.3.weight": (1601, 768),
    "itm_output.weight": (2, 768),
}


def synthetic_uniter(vocab: int, seed: int = 0, **sizes) -> dict[str, torch.Tensor]:
    """A random UNITER state dict of the given sizes with its ties (decoder = word embeddings, MRFR weight =
    img_linear's) and LayerNorm weights away from 1 (so that a LayerNorm left out shows)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in uniter_shapes(vocab, **sizes).items():
        if name == "cls.predictions.decoder.weight":
            state[name] = state["uniter.embeddings.word_embeddings.weight"]
        elif name == "feat_regress.weight":
            state[name] = state["uniter.img_embeddings.img_linear.weight"]
        elif (
            "LayerNorm" in name
            or "layer_norm" in name
            or name.startswith(("feat_regress.net.2", "region_classifier.net.2"))
        ):
            base = 1.0 if name.endswith("weight") else 0.0
            state[name] = base + 0.2 * torch.randn(shape, generator=g)
        else:
            state[name] = 0.2 * torch.randn(shape, generator=g)
    return state


@pytest.fixture(scope="module")
def cased_tokenizer(tmp_path_factory) -> tuple[str, int]:
    """A tiny cased WordPiece tokenizer folder and its vocabulary size."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("tokenizer")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "A",
        "a",
        "Dog",
        "dog",
        "runs",
        "on",
        "the",
        "grass",
        ".",
    ]
    words += [f"w{i}" for i in range(50 - len(words))]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(words)}, do_lower_case=False).save_pretrained(
        folder
    )
    return str(folder), len(words)


def _save(state: dict, path: Path) -> Path:
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, cased_tokenizer) -> tuple[Path, dict]:
    _, vocab = cased_tokenizer
    state = synthetic_uniter(vocab, **TINY)
    return _save(state, tmp_path_factory.mktemp("uniter") / "uniter-tiny.pt"), state


def _convert(tiny_checkpoint, cased_tokenizer, out: Path, **kwargs):
    return convert_uniter(
        tiny_checkpoint[0], out, cased_tokenizer[0], num_attention_heads=TINY_HEADS, **kwargs
    )


# ----------------------------------------------------------------------------------------------------------------------
# Mapping
# ----------------------------------------------------------------------------------------------------------------------


def test_folding_the_7d_location_gives_uniters_product_on_real_looking_boxes():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 7, generator=g, dtype=torch.float64)
    width, height = 640.0, 480.0
    x1, y1 = (
        torch.rand(50, generator=g, dtype=torch.float64) * 600,
        torch.rand(50, generator=g, dtype=torch.float64) * 440,
    )
    x2 = x1 + 1 + torch.rand(50, generator=g, dtype=torch.float64) * (width - x1 - 1)
    y2 = y1 + 1 + torch.rand(50, generator=g, dtype=torch.float64) * (height - y1 - 1)
    boxes = torch.stack([x1, y1, x2, y2], dim=-1)
    ours = torch.from_numpy(region_locations(boxes.numpy(), width, height)).double()
    # Our fifth component is UNITER's seventh, (w/W)(h/H), and the first four are its first four.
    theirs = uniter_box_location(boxes, width, height)
    torch.testing.assert_close(ours[:, 4], theirs[:, 6], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours[:, :4], theirs[:, :4], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours @ fold_location_weight(weight).T, theirs @ weight.T, rtol=1e-5, atol=1e-6)


def test_the_synthetic_checkpoint_has_uniter_base_names_and_shapes_at_base_size():
    shapes = uniter_shapes(28996, hidden=768, layers=12, intermediate=3072, feature_dim=2048, labels=1601)
    for name, shape in UNITER_BASE_OUTSIDE_LAYERS.items():
        assert shapes[name] == shape, name
    assert len([k for k in shapes if k.startswith("uniter.encoder.layer.")]) == 12 * 16
    assert len(shapes) - 12 * 16 == 16 + 2 + 6 + 6 + 6 + 2  # embeddings, pooler, MLM, MRFR, MRC, ITM


def test_uniter_base_maps_onto_every_weight_of_the_converted_model():
    """At the real base sizes (meta tensors: no memory), every key maps and every weight of ours is filled."""
    shapes = uniter_shapes(28996, hidden=768, layers=12, intermediate=3072, feature_dim=2048, labels=1601)
    state = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    check_is_uniter(state, "uniter-base.pt")
    config, size = infer_config(state, "uniter-base.pt", size="base")
    assert size == "base"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.vocab_size) == (
        768,
        12,
        12,
        28996,
    )
    assert (config.num_object_classes, config.visual_feature_dim, config.region_embedding_type) == (
        1600,
        2048,
        "uniter",
    )
    mapped, report = map_uniter_state_dict(state)
    assert report.unmapped == []
    assert sorted(report.dropped) == [
        "cls.predictions.decoder.weight",
        "uniter.img_embeddings.mask_embedding.weight",
    ]
    with torch.device("meta"):
        model = ImageBertForPreTraining(config)
    own = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    assert set(own) - set(mapped) == {"mlm_head.decoder.weight", *NEW_IN_IMAGEBERT}
    assert {name: tuple(value.shape) for name, value in mapped.items()} == {
        name: own[name] for name in mapped
    }


def test_the_tiny_checkpoint_converts_with_nothing_unmapped_or_missing(
    tmp_path, tiny_checkpoint, cased_tokenizer
):
    out = tmp_path / "converted"
    report = _convert(tiny_checkpoint, cased_tokenizer, out)
    assert report.ok and report.unmapped == [] and report.missing == []
    assert report.new == list(NEW_IN_IMAGEBERT)
    assert set(report.transformed) == {
        "uniter.img_embeddings.pos_linear.weight",
        "feat_regress.weight",
        "region_classifier.net.3.weight",
        "region_classifier.net.3.bias",
        "itm_output.weight",
        "itm_output.bias",
    }
    files = {path.name for path in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "conversion_report.json",
        "processor_config.json",
    } <= files
    card = (out / "README.md").read_text()
    assert "ChenRocks/UNITER" in card and "VILLA" in card and "MIT" in card
    config = ImageBertConfig.from_pretrained(out)
    assert config.region_embedding_type == "uniter" and config.num_object_classes == TINY["labels"] - 1


# ----------------------------------------------------------------------------------------------------------------------
# Parity with UNITER's forward
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("itm_logit", ["probability", "rank"])
def test_the_converted_model_computes_uniters_outputs(tmp_path, tiny_checkpoint, cased_tokenizer, itm_logit):
    out = tmp_path / "converted"
    _convert(tiny_checkpoint, cased_tokenizer, out, itm_logit=itm_logit)
    model = ImageBertForPreTraining.from_pretrained(out).eval()
    inputs = parity_inputs(cased_tokenizer[1], TINY["feature_dim"], batch_size=5, max_regions=10, seed=1)
    differences = check_parity(tiny_checkpoint[1], model, inputs, itm_logit=itm_logit)
    assert set(differences) == {"itm", "mlm", "region_class", "mrfr"}
    assert max(differences.values()) < 1e-5, differences


def test_a_fine_tuned_retrieval_checkpoint_converts_partially_with_uniters_rank_score(
    tmp_path, cased_tokenizer
):
    """UNITER's `itm-flickr-*` checkpoints keep the encoder, `itm_output` and a `rank_output` (no pre-training heads):
    refused as incomplete, written with --allow-partial, and `--itm-logit rank` scores with `rank_output`."""
    state = synthetic_uniter(cased_tokenizer[1], seed=3, **TINY)
    state = {
        k: v for k, v in state.items() if not k.startswith(("cls.", "feat_regress.", "region_classifier."))
    }
    state["rank_output.weight"], state["rank_output.bias"] = torch.randn(1, TINY["hidden"]), torch.randn(1)
    path = _save(state, tmp_path / "itm-flickr-base.pt")
    with pytest.raises(ConversionError, match="incomplete conversion, nothing written"):
        convert_uniter(path, tmp_path / "refused", cased_tokenizer[0], num_attention_heads=TINY_HEADS)
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "converted"
    report = convert_uniter(
        path, out, cased_tokenizer[0], num_attention_heads=TINY_HEADS, itm_logit="rank", allow_partial=True
    )
    assert report.unmapped == [] and all(
        key.startswith(("mlm_head.", "mrfr_head.", "moc_head.")) for key in report.missing
    )
    model = ImageBertForPreTraining.from_pretrained(out).eval()
    inputs = parity_inputs(cased_tokenizer[1], TINY["feature_dim"], seed=2)
    differences = check_parity(state, model, inputs, itm_logit="rank")
    assert set(differences) == {"itm"} and differences["itm"] < 1e-5


def test_the_parity_check_sees_a_region_position_embedding(tmp_path, tiny_checkpoint, cased_tokenizer):
    """The check can fail: the paper's region embedding (dummy position, no extra LayerNorms) on the same weights
    gives other outputs."""
    out = tmp_path / "converted"
    _convert(tiny_checkpoint, cased_tokenizer, out)
    model = ImageBertForPreTraining.from_pretrained(out, region_embedding_type="imagebert").eval()
    inputs = parity_inputs(cased_tokenizer[1], TINY["feature_dim"], seed=1)
    assert check_parity(tiny_checkpoint[1], model, inputs)["mlm"] > 1e-2


# ----------------------------------------------------------------------------------------------------------------------
# Refusals: one line each, nothing written
# ----------------------------------------------------------------------------------------------------------------------


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def _cli(args: list[str], capsys) -> tuple[int, str]:
    status = main([str(a) for a in args])
    return status, capsys.readouterr().err


def test_a_pickle_that_would_run_code_is_refused_and_nothing_is_created(tmp_path, cased_tokenizer, capsys):
    path = tmp_path / "uniter-base.pt"
    buffer = io.BytesIO()
    torch.save({"uniter.embeddings.word_embeddings.weight": _RunsCode()}, buffer)
    path.write_bytes(buffer.getvalue())
    out = tmp_path / "out"
    status, err = _cli([path, out, "--tokenizer", cased_tokenizer[0]], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "refused" in err and "system" in err
    assert not out.exists()


def test_a_checkpoint_of_another_model_is_refused(tmp_path, cased_tokenizer, capsys):
    bert = {
        "bert.embeddings.word_embeddings.weight": torch.zeros(50, 32),
        "cls.predictions.bias": torch.zeros(50),
    }
    path = _save(bert, tmp_path / "bert.pt")
    out = tmp_path / "out"
    status, err = _cli([path, out, "--tokenizer", cased_tokenizer[0]], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "not a UNITER or VILLA checkpoint" in err and "bert" in err
    assert not out.exists()


def test_a_large_checkpoint_passed_as_base_is_refused(tmp_path, cased_tokenizer, capsys):
    """UNITER-large's full key set at its real shapes, each tensor a view of one element (a small file)."""
    shapes = uniter_shapes(28996, hidden=1024, layers=24, intermediate=4096, feature_dim=2048, labels=1601)
    large = {name: torch.zeros(1).expand(shape) for name, shape in shapes.items()}
    path = _save(large, tmp_path / "uniter-large.pt")
    assert path.stat().st_size < 2_000_000
    out = tmp_path / "out"
    status, err = _cli([path, out, "--tokenizer", cased_tokenizer[0], "--size", "base"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "UNITER-large checkpoint (hidden 1024, 24 layers), not base" in err
    assert not out.exists()


def test_a_tokenizer_of_another_vocabulary_is_refused(tmp_path, cased_tokenizer, capsys):
    state = synthetic_uniter(cased_tokenizer[1] + 3, **TINY)
    path = _save(state, tmp_path / "uniter.pt")
    out = tmp_path / "out"
    status, err = _cli(
        [path, out, "--tokenizer", cased_tokenizer[0], "--num-attention-heads", TINY_HEADS], capsys
    )
    assert status == 2 and err.count("\n") == 1
    assert f"{cased_tokenizer[1]} tokens, but" in err and "bert-base-cased" in err
    assert not out.exists()


def test_the_command_writes_the_folder_and_prints_the_report(tmp_path, tiny_checkpoint, cased_tokenizer):
    out = tmp_path / "converted"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_imagebert.pretraining.convert_uniter",
            str(tiny_checkpoint[0]),
            str(out),
            "--tokenizer",
            cased_tokenizer[0],
            "--num-attention-heads",
            str(TINY_HEADS),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "0 unmapped, 0 missing" in result.stdout and (out / "model.safetensors").is_file()
    with pytest.raises(ConversionError, match="already exists"):
        _convert(tiny_checkpoint, cased_tokenizer, out)


# ----------------------------------------------------------------------------------------------------------------------
# The config field
# ----------------------------------------------------------------------------------------------------------------------


def test_region_embedding_type_is_checked_with_one_clear_error():
    # @strict wraps the validator's ValueError in its StrictDataclassClassValidationError (an Exception).
    with pytest.raises(
        Exception, match=r"region_embedding_type must be one of \('imagebert', 'uniter'\), got 'vilbert'"
    ):
        ImageBertConfig(region_embedding_type="vilbert")


def test_uniters_layer_norms_exist_only_in_the_uniter_variant():
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 37}
    default = set(ImageBertModel(ImageBertConfig(**small)).state_dict())
    uniter = set(ImageBertModel(ImageBertConfig(**small, region_embedding_type="uniter")).state_dict())
    assert not any("region_feature_LayerNorm" in key or "region_location_LayerNorm" in key for key in default)
    assert uniter - default == {
        f"embeddings.region_{part}_LayerNorm.{p}"
        for part in ("feature", "location")
        for p in ("weight", "bias")
    }


def test_the_shipped_parity_tool_passes_on_a_converted_folder(
    tmp_path, tiny_checkpoint, cased_tokenizer, capsys
):
    import importlib.util

    out = tmp_path / "converted"
    _convert(tiny_checkpoint, cased_tokenizer, out)
    tool = Path(__file__).resolve().parent.parent / "tools" / "check_uniter_parity.py"
    spec = importlib.util.spec_from_file_location("check_uniter_parity", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._main([str(tiny_checkpoint[0]), str(out), "--seeds", "2", "--tolerance", "1e-5"])
    printed = capsys.readouterr().out
    assert "region_class" in printed and "ABOVE" not in printed
