"""Overwrite flags delete only folders this package wrote; killed writes leave nothing behind the next run keeps."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures_formats import make_detections, write_butd_tsv, write_cc_tsv

from modeling_imagebert.atomic import (
    MARKER_NAME,
    TEMP_PREFIX,
    UnsafeRemovalError,
    atomic_folder,
    is_ours,
    read_marker,
    remove_ours,
    remove_stale_temporaries,
    temporary_sibling,
)
from modeling_imagebert.data.convert import main

F = 8
SLOW = pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")


def _inputs(folder: Path, num_images: int = 4, num_boxes: int = 3) -> tuple[Path, Path]:
    detections = [make_detections(str(i), num_boxes, F, seed=i) for i in range(num_images)]
    features = write_butd_tsv(folder / "features.tsv", detections)
    captions = write_cc_tsv(
        folder / "captions.tsv", [(f"caption {i}", f"http://u/{i}") for i in range(num_images)]
    )
    return features, captions


def _argv(features: Path, captions: Path, output: str | Path, *extra: str) -> list[str]:
    return ["butd-tsv", str(features), "--captions", str(captions), "--format", "cc", "--output", str(output),
            "--no-progress", *extra]  # fmt: skip


def test_overwrite_of_the_current_folder_is_refused_and_deletes_nothing(tmp_path, monkeypatch, capsys):
    features, captions = _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(_argv(features.name, captions.name, ".", "--overwrite")) == 2
    assert "current folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_overwrite_of_a_folder_holding_an_input_is_refused_even_if_marked(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    features, captions = _inputs(data)
    (data / MARKER_NAME).write_text('{"written_by": "someone"}')
    assert main(_argv(features, captions, data, "--overwrite")) == 2
    assert "holds the input" in capsys.readouterr().err
    assert features.is_file() and captions.is_file()


def test_overwrite_of_a_folder_without_our_marker_is_refused(tmp_path, capsys):
    features, captions = _inputs(tmp_path)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    assert main(_argv(features, captions, theirs, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "marker" in err and len(err.strip().splitlines()) == 1
    assert (theirs / "notes.txt").read_text() == "keep me"


def test_converted_output_carries_a_marker_and_overwrite_replaces_it(tmp_path):
    from modeling_imagebert.data.storage import load_dataset_from_disk

    features, captions = _inputs(tmp_path)
    out = tmp_path / "out"
    assert main(_argv(features, captions, out)) == 0
    marker = read_marker(out)
    assert marker["written_by"].endswith("convert") and marker["run_id"] and marker["created"]
    assert main(_argv(features, captions, out, "--overwrite")) == 0
    assert len(load_dataset_from_disk(out)) == 4 and is_ours(out)


def test_remove_ours_refuses_unmarked_folders_and_parents_of_the_current_folder(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    (plain / "inner").mkdir(parents=True)
    with pytest.raises(UnsafeRemovalError, match="marker"):
        remove_ours(plain)
    with atomic_folder(tmp_path / "ours") as temp:
        (temp / "x").write_text("1")
    monkeypatch.chdir(tmp_path / "ours")
    with pytest.raises(UnsafeRemovalError, match="current folder"):
        remove_ours(tmp_path / "ours")
    monkeypatch.chdir(tmp_path)
    remove_ours(tmp_path / "ours")
    assert not (tmp_path / "ours").exists() and plain.is_dir()


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temporary_sibling(target, "join")  # this live process
    stale = tmp_path / mine.name.replace(f".{os.getpid()}.", f".{dead.pid}.")
    stale.mkdir()
    other = (
        tmp_path / f"{TEMP_PREFIX}out-other.new.x.{dead.pid}.abc"
    )  # another target's name: not ours to judge
    other.mkdir()
    assert remove_stale_temporaries(target) == [stale]
    assert mine.is_dir() and other.is_dir() and not stale.exists()


def test_a_kill_between_the_two_renames_of_a_replace_restores_the_previous_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as temp:
        (temp / "v").write_text("1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # What a SIGKILL right after `os.rename(target, old / "folder")` in replace_folder leaves behind.
    probe = temporary_sibling(target, "old")
    probe.rmdir()
    old = tmp_path / probe.name.replace(f".{os.getpid()}.", f".{dead.pid}.")
    old.mkdir()
    os.rename(target, old / "folder")
    remove_stale_temporaries(target)
    assert (target / "v").read_text() == "1" and not old.exists()


def _kill_convert_at_random_moments(tmp_path: Path, kills: int, seed: int) -> list[str]:
    """Kills a convert subprocess `kills` times, each at a random moment after its work began (its first temporary
    folder appeared: before that it is only importing), then runs it to the end: no temporary may remain, and the
    output must equal a straight conversion's."""
    from modeling_imagebert.data.storage import load_dataset_from_disk

    features, captions = _inputs(tmp_path, num_images=150, num_boxes=36)
    out = tmp_path / "out"
    assert main([*_argv(features, captions, tmp_path / "straight"), "--num-shards", "3"]) == 0
    argv = [
        sys.executable,
        "-m",
        "modeling_imagebert.data.convert",
        *_argv(features, captions, out),
        "--num-shards",
        "3",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rng = random.Random(seed)
    for _ in range(kills):
        process = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith(f"{TEMP_PREFIX}out.") for p in tmp_path.iterdir()):
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if out.exists():  # the kill came after the final rename: the output must be complete and ours
            assert is_ours(out) and len(load_dataset_from_disk(out)) == 150
            break
    left_by_kills = [p.name for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]
    final = subprocess.run([*argv, "--overwrite"], env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    for name in left_by_kills:  # the next run says what it removed
        assert name in final.stderr
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX))
    assert leftovers == []
    got, want = load_dataset_from_disk(out), load_dataset_from_disk(tmp_path / "straight")
    assert got["caption"] == want["caption"] and got["region_features"] == want["region_features"]
    return left_by_kills


def test_convert_killed_at_a_random_moment_leaves_nothing_the_next_run_keeps(tmp_path):
    _kill_convert_at_random_moments(tmp_path, kills=1, seed=0)


@SLOW
def test_convert_killed_repeatedly_at_random_moments_leaves_nothing_the_next_run_keeps(tmp_path):
    assert _kill_convert_at_random_moments(tmp_path, kills=6, seed=1)  # some kill left temporaries to clean
