"""The retrieval scripts end bad input with one line `error: ... ; ...` and exit 2; --debug shows the traceback."""

import runpy
import sys
from pathlib import Path

import pytest

from modeling_imagebert.cli import format_error, run_cli, split_debug_flag
from modeling_imagebert.data.schema import DataValidationError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configuration" / "models" / "imagebert-tiny.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, minilm_path):
    from tiny_checkpoint import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), minilm_path)


def run_script(name: str, argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    return exited.value.code


def error_lines(captured: str) -> list[str]:
    return [line for line in captured.splitlines() if line.strip()]


def test_evaluate_retrieval_names_a_dataset_folder_that_is_not_a_dataset(
    checkpoint, tmp_path, monkeypatch, capsys
):
    (tmp_path / "not_a_dataset").mkdir()
    code = run_script(
        "evaluate_retrieval.py",
        ["--model", str(checkpoint), "--dataset", str(tmp_path / "not_a_dataset")],
        monkeypatch,
    )
    err = error_lines(capsys.readouterr().err)
    assert code == 2
    assert (
        err[-1].startswith("error:")
        and "not_a_dataset" in err[-1]
        and "state.json" in err[-1]
        and " ; " in err[-1]
    )
    assert not any("Traceback" in line for line in err)


def test_evaluate_retrieval_with_debug_shows_the_traceback(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["evaluate_retrieval.py", "--model", str(checkpoint), "--dataset",
                                      str(tmp_path / "missing"), "--debug"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="missing"):
        runpy.run_path(str(ROOT / "examples" / "evaluate_retrieval.py"), run_name="__main__")


def test_evaluate_retrieval_names_a_missing_processor(tmp_path, checkpoint, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = run_script(
        "evaluate_retrieval.py", ["--model", str(checkpoint), "--processor", str(empty), "--toy"], monkeypatch
    )
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and err[-1].startswith(f"error: {empty}: cannot load an ImageBertProcessor")


def test_run_retrieval_names_a_missing_training_dataset(checkpoint, tmp_path, monkeypatch, capsys):
    argv = ["--model_name_or_path", str(checkpoint), "--train_dataset", str(tmp_path / "nowhere"), "--do_train",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    code = run_script("run_retrieval.py", argv, monkeypatch)
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and err[-1].startswith("error:") and "nowhere" in err[-1] and "does not exist" in err[-1]


def test_bare_debug_is_ours_but_the_trainers_debug_option_is_left_alone():
    assert split_debug_flag(["--x", "1", "--debug"]) == (["--x", "1"], True)
    assert split_debug_flag(["--debug", "underflow_overflow"]) == (["--debug", "underflow_overflow"], False)


def test_run_cli_prints_one_line_for_user_errors_and_lets_bugs_through(capsys):
    def bad_data(argv):
        raise DataValidationError("data.arrow: row 3, field 'region_boxes': x2 < x1\n  and more")

    assert run_cli(bad_data, []) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(
        "error: data.arrow: row 3, field 'region_boxes': x2 < x1; and more ; fix the named record"
    )

    def bug(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(bug, [])
    assert (
        format_error(FileExistsError("out: exists ; pass --overwrite"))
        == "error: out: exists ; pass --overwrite"
    )


@pytest.mark.parametrize("flag", ["--output_json", "--save_scores", "--cache_dir"])
def test_evaluate_retrieval_refuses_an_output_inside_its_model_folder(
    flag, tmp_path, minilm_path, monkeypatch, capsys
):
    """Issue 25: `--output_json MODEL/config.json` replaced the model's config with the metrics."""
    from tiny_checkpoint import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "model", minilm_path)
    config = model / "config.json"
    before = config.read_bytes()
    target = config if flag != "--cache_dir" else model / "cache"
    code = run_script("evaluate_retrieval.py", ["--model", str(model), "--toy", flag, str(target)], monkeypatch)
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and err[-1].startswith(f"error: {flag} {target}") and "the input --model" in err[-1], err
    assert config.read_bytes() == before and not (model / "cache").exists()
