"""BUTD weight converters: every key of each public checkpoint layout (tests/butd_manifests/*.json) is mapped with
nothing missing or left over, synthetic checkpoints in exactly those layouts convert into folders that
`from_pretrained` loads bit-exact, and nothing but numpy arrays is ever unpickled."""

import collections
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_imagebert.features import BUTDConfig, BUTDDetector
from modeling_imagebert.features.convert_checkpoints import (
    REPORT_NAME,
    ConversionError,
    config_for,
    convert_checkpoint,
    load_numpy_pickle,
    main,
    map_tensors,
)

MANIFESTS = Path(__file__).parent / "butd_manifests"
FORMATS = ("lxmert", "detectron2", "milvlg")
FILE_NAMES = {
    "lxmert": "pytorch_model.bin",
    "detectron2": "faster_rcnn_from_caffe_attr.pkl",
    "milvlg": "bua.pth",
}


def manifest(format: str) -> dict:
    return json.loads((MANIFESTS / f"{format}.json").read_text())


def synthetic_tensors(format: str, with_optional: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the keys and shapes of a public layout (full size)."""
    layout = manifest(format)
    shapes = {**layout["keys"], **(layout["optional_keys"] if with_optional else {})}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            tensors[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            tensors[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            tensors[key] = torch.randn(shape, generator=generator)
    return tensors


def tiny_layout_tensors(format: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small detector's weights written back in a public layout (the inverse of each format's mapping), so the
    layout logic is exercised in a fraction of a second."""
    torch.manual_seed(seed)
    config = BUTDConfig(
        stem_out_channels=8,
        stage_depths=[1, 2, 1],
        res5_depth=2,
        res2_bottleneck_channels=4,
        res2_out_channels=16,
        rpn_hidden_channels=16,
        num_classes=11,
        num_attributes=6,
        attribute_embedding_dim=8,
        attribute_hidden_dim=8,
    )
    state = {key: value.clone() for key, value in BUTDDetector(config).state_dict().items()}
    for key in list(state):
        state[key] = (
            state[key] + torch.randn(state[key].shape) * 0.01
        )  # every tensor distinct, none trivially 0/1
    anchors = state.pop("proposal_generator.cell_anchors")
    if format == "lxmert":
        state["proposal_generator.anchor_generator.cell_anchors.0"] = anchors
        return state
    if format == "detectron2":
        return state
    predictor = "roi_heads.box_predictor."
    for name in ("weight", "bias"):
        cls = state.pop(f"{predictor}cls_score.{name}")
        state[f"{predictor}cls_score.{name}"] = torch.cat([cls[-1:], cls[:-1]])
        box = state.pop(f"{predictor}bbox_pred.{name}")
        state[f"{predictor}bbox_pred.{name}"] = torch.cat([torch.randn((4,) + box.shape[1:]), box])
        state[f"{predictor}attr_linear1.{name}"] = state.pop(f"{predictor}fc_attr.{name}")
        attr = state.pop(f"{predictor}attr_score.{name}")
        state[f"{predictor}attr_linear2.{name}"] = torch.cat([attr[-1:], attr[:-1]])
        logit = state.pop(f"proposal_generator.rpn_head.objectness_logits.{name}")
        background = torch.randn(logit.shape)
        state[f"proposal_generator.rpn_head.objectness_logits.{name}"] = torch.cat(
            [background, background + logit]
        )
    embed = state.pop(f"{predictor}cls_embedding.weight")
    state[f"{predictor}cls_embed.weight"] = torch.cat(
        [embed[-1:], embed[:-1], torch.randn(1, embed.shape[1])]
    )
    return state


def write_checkpoint(format: str, tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    """Write `tensors` in the container its format uses in the wild."""
    path = folder / FILE_NAMES[format]
    if format == "lxmert":
        torch.save(collections.OrderedDict(tensors), path)
    elif format == "milvlg":
        torch.save({"model": tensors, "iteration": 0}, path)
    else:
        with open(path, "wb") as handle:
            arrays = {key: value.numpy() for key, value in tensors.items()}
            pickle.dump(
                {"model": arrays, "__author__": "test", "matching_heuristics": False}, handle, protocol=2
            )
    return path


@pytest.mark.parametrize("format", FORMATS)
def test_every_key_of_each_public_layout_maps_with_nothing_missing_or_left_over(format):
    layout = manifest(format)
    shapes = {**layout["keys"], **layout["optional_keys"]}
    tensors = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    config = BUTDConfig(**config_for(format, tensors))
    assert (config.hidden_size, config.num_classes, config.num_attributes) == (2048, 1601, 401)
    assert list(config.stage_depths) == [3, 4, 23] and config.res5_depth == 3
    with torch.device("meta"):
        detector = BUTDDetector(config)
    target = {key: tuple(value.shape) for key, value in detector.state_dict().items()}
    converted, report = map_tensors(format, tensors, target)
    assert report.unmapped == []
    assert sorted(report.ignored) == sorted(k for k in shapes if k.endswith("num_batches_tracked"))
    derived = {"proposal_generator.cell_anchors"} if format != "lxmert" else set()
    assert set(target) - set(converted) == derived  # the anchors are derived from the config when not saved
    for key, value in converted.items():
        assert tuple(value.shape) == target[key], key


SLOW = pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")
CONVERSIONS = [pytest.param(format, "tiny", id=f"{format}-tiny") for format in FORMATS] + [
    pytest.param("milvlg", "full", id="milvlg-full"),
    pytest.param("lxmert", "full", id="lxmert-full", marks=SLOW),
    pytest.param("detectron2", "full", id="detectron2-full", marks=SLOW),
]


def expected_state(format: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the detector must hold after converting `tensors`, computed independently of the converter."""
    predictor = "roi_heads.box_predictor."
    expected = {key: value for key, value in tensors.items() if not key.endswith("num_batches_tracked")}
    if "proposal_generator.anchor_generator.cell_anchors.0" in expected:
        expected["proposal_generator.cell_anchors"] = expected.pop(
            "proposal_generator.anchor_generator.cell_anchors.0"
        )
    if format != "milvlg":
        return expected
    # Caffe order -> ours: background (class, box, no-attribute) first -> last / dropped; softmax RPN -> logit.
    expected = {key: value for key, value in expected.items() if not key.startswith(predictor)}
    for name in ("weight", "bias"):
        cls = tensors[f"{predictor}cls_score.{name}"]
        expected[f"{predictor}cls_score.{name}"] = torch.cat([cls[1:], cls[:1]])
        expected[f"{predictor}bbox_pred.{name}"] = tensors[f"{predictor}bbox_pred.{name}"][4:]
        expected[f"{predictor}fc_attr.{name}"] = tensors[f"{predictor}attr_linear1.{name}"]
        attr = tensors[f"{predictor}attr_linear2.{name}"]
        expected[f"{predictor}attr_score.{name}"] = torch.cat([attr[1:], attr[:1]])
        objectness = tensors[f"proposal_generator.rpn_head.objectness_logits.{name}"]
        half = objectness.shape[0] // 2
        expected[f"proposal_generator.rpn_head.objectness_logits.{name}"] = (
            objectness[half:] - objectness[:half]
        )
    embed = tensors[f"{predictor}cls_embed.weight"]
    expected[f"{predictor}cls_embedding.weight"] = torch.cat([embed[1:-1], embed[:1]])
    return expected


@pytest.mark.parametrize(("format", "size"), CONVERSIONS)
def test_converted_synthetic_checkpoint_loads_bit_exact(tmp_path, format, size):
    tensors = synthetic_tensors(format) if size == "full" else tiny_layout_tensors(format)
    source = write_checkpoint(format, tensors, tmp_path)
    report = convert_checkpoint(str(source), str(tmp_path / "butd"), format)
    assert report.ok and report.unmapped == [] and report.missing == []
    loaded = BUTDDetector.from_pretrained(tmp_path / "butd")
    state = loaded.state_dict()
    expected = expected_state(format, tensors)
    assert set(state) == set(expected) | (
        {"proposal_generator.cell_anchors"} if format != "lxmert" else set()
    )
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert loaded.config.anchor_style == ("caffe" if format == "milvlg" else "detectron2")
    assert loaded.config.box_size_offset == (1.0 if format == "milvlg" else 0.0)
    assert json.loads((tmp_path / "butd" / REPORT_NAME).read_text())["missing"] == []


def test_milvlg_softmax_rpn_becomes_an_equivalent_logit():
    # Caffe's objectness is softmax over (background, foreground) channel halves; the converted single logit must
    # give the same foreground probability through a sigmoid.
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(24, 8, 1, 1, generator=generator), torch.randn(24, generator=generator)
    hidden = torch.randn(1, 8, 3, 3, generator=generator)
    two_way = torch.nn.functional.conv2d(hidden, weight, bias).view(1, 2, 12, 3, 3).softmax(dim=1)[:, 1]
    tensors = {
        "proposal_generator.rpn_head.objectness_logits.weight": weight,
        "proposal_generator.rpn_head.objectness_logits.bias": bias,
    }
    target = {key: (12, 8, 1, 1) if key.endswith("weight") else (12,) for key in tensors}
    converted, _ = map_tensors("milvlg", tensors, target)
    logit = torch.nn.functional.conv2d(
        hidden,
        converted["proposal_generator.rpn_head.objectness_logits.weight"],
        converted["proposal_generator.rpn_head.objectness_logits.bias"],
    )
    torch.testing.assert_close(logit.sigmoid(), two_way)


def test_incomplete_checkpoint_is_refused_naming_the_missing_key(tmp_path):
    tensors = tiny_layout_tensors("detectron2", seed=2)
    del tensors["roi_heads.res5.1.conv2.norm.running_var"]
    tensors["roi_heads.box_predictor.mask_head.weight"] = torch.zeros(2)
    source = write_checkpoint("detectron2", tensors, tmp_path)
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(str(source), str(tmp_path / "butd"), "detectron2")
    assert "MISSING roi_heads.res5.1.conv2.norm.running_var" in str(error.value)
    assert "UNMAPPED roi_heads.box_predictor.mask_head.weight" in str(error.value)
    assert not (tmp_path / "butd").exists()
    assert [p.name for p in tmp_path.iterdir()] == [source.name]  # no staging folder left behind


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_reader_refuses_anything_but_numpy_arrays(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "x": _Boom()}))
    with pytest.raises(
        ConversionError, match=r"evil\.pkl: not a pickle of numpy arrays .*posix\.system|os\.system"
    ):
        load_numpy_pickle(str(path))
    fine = tmp_path / "fine.pkl"
    fine.write_bytes(pickle.dumps({"model": collections.OrderedDict(w=np.arange(3.0)), "n": [1, (2, "a")]}))
    assert load_numpy_pickle(str(fine))["model"]["w"].tolist() == [0.0, 1.0, 2.0]


def test_converter_never_overwrites_a_folder_it_did_not_create(tmp_path, capsys):
    tensors = tiny_layout_tensors("lxmert", seed=3)
    source = write_checkpoint("lxmert", tensors, tmp_path)
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["--format", "lxmert", str(source), str(foreign)]) == 1
    assert "not written by this converter" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"

    ours = tmp_path / "ours"
    assert main(["--format", "lxmert", str(source), str(ours)]) == 0
    assert "0 unmapped, 0 missing" in capsys.readouterr().out
    assert main(["--format", "lxmert", str(source), str(ours)]) == 1  # exists: needs --overwrite
    assert main(["--format", "lxmert", "--overwrite", str(source), str(ours)]) == 0
    # the weights, settings and report, and the detector's source files (it loads as remote code, see
    # test_processor_detector.py)
    assert sorted(p.name for p in ours.iterdir()) == sorted(
        [REPORT_NAME, "config.json", "model.safetensors", "preprocessor_config.json"]
        + ["configuration_butd.py", "modeling_butd.py", "image_processing_butd.py", "images.py"]
    )
    assert json.loads((ours / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_butd.BUTDConfig",
        "AutoModel": "modeling_butd.BUTDDetector",
    }


def test_unreadable_checkpoint_gives_a_one_line_error(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(
        ConversionError, match=r"weights\.pth: cannot read as a weights-only torch checkpoint"
    ):
        convert_checkpoint(str(bad), str(tmp_path / "out"), "milvlg")
