"""Issue 25, the shared core I/O guarantees: the one writer never replaces a symlink or special file, a claimed
output folder is locked for its run, every weights-only loader fails with one line naming the file, a full disk or
read-only output is one line naming the path, an input that is not a regular file never blocks nor fills memory,
and a YAML alias bomb in a recipe is refused at once.

The cases that would hang or fill memory on code without these guarantees run in a subprocess with a deadline and
an address-space limit, so a regression fails the test instead of stopping the suite."""

import errno
import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from modeling_imagebert import atomic
from modeling_imagebert.atomic import (
    UnsafeRemovalError,
    atomic_write_bytes,
    atomic_write_text,
    claim_folder,
    replace_folder,
    temporary_sibling,
)
from modeling_imagebert.cli import run_cli

LOCK_NAME = ".lock-modeling_imagebert"

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _python(code: str, *, timeout: float = 180, memory_gib: float | None = None, **kwargs):
    """`code` run by a fresh interpreter (with an address-space cap when `memory_gib`), killed at `timeout`."""
    if memory_gib is not None:
        cap = int(memory_gib * (1 << 30))
        code = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n" + code
    return subprocess.run(
        [sys.executable, "-c", code],
        env=ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------
# Group 4: the writer refuses symlinks and special files
# ---------------------------------------------------------------------------------------------------------------


def test_atomic_writes_never_replace_a_symlink_or_special_file(tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("keep me")
    targets = {
        "link to stdout": (
            tmp_path / "stdout.json",
            lambda p: p.symlink_to("/dev/stdout"),
            "symlink to /dev/stdout",
        ),
        "link to a file": (tmp_path / "linked.json", lambda p: p.symlink_to(elsewhere), "symlink"),
        "fifo": (tmp_path / "fifo.json", lambda p: os.mkfifo(p), "FIFO"),
        # We run as root in CI; elsewhere a FIFO stands in for a device node.
        "device": (
            tmp_path / "null.png",
            lambda p: os.mknod(p, 0o600 | 0o020000, os.makedev(1, 3)) if os.geteuid() == 0 else os.mkfifo(p),
            "device" if os.geteuid() == 0 else "FIFO",
        ),
    }
    for name, (path, make, words) in targets.items():
        make(path)
        before = os.lstat(path)
        for write, data in ((atomic_write_text, "{}"), (atomic_write_bytes, b"png")):
            with pytest.raises(UnsafeRemovalError) as caught:
                write(path, data)
            message = str(caught.value)
            assert str(path) in message and words in message and "refusing to replace" in message, name
            assert len(message.splitlines()) == 1
        after = os.lstat(path)
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino), name
    assert elsewhere.read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no temporaries left behind

    # Folders: a symlink to a folder is never replaced (nor what it points to), nor a file by a folder.
    real = tmp_path / "real"
    real.mkdir()
    (real / "x").write_text("x")
    link = tmp_path / "linked-folder"
    link.symlink_to(real)
    staged = temporary_sibling(link)
    with pytest.raises(UnsafeRemovalError, match="symlink"):
        replace_folder(staged, link)
    assert link.is_symlink() and (real / "x").read_text() == "x"
    built = tmp_path / "built"
    built.mkdir()
    with pytest.raises(UnsafeRemovalError, match="symlink"):
        atomic.move_into_place(built, link)
    # A regular file and a new path still work.
    atomic_write_text(tmp_path / "plain.json", "{}")
    atomic_write_text(tmp_path / "plain.json", "[]")
    assert (tmp_path / "plain.json").read_text() == "[]"


# ---------------------------------------------------------------------------------------------------------------
# Group 3: a claimed folder is locked for its run
# ---------------------------------------------------------------------------------------------------------------

_CLAIM = """
import sys, time
from pathlib import Path
from modeling_imagebert.atomic import claim_folder
import os
go = Path(sys.argv[1])
Path(f"{go}.ready-{os.getpid()}").touch()  # imported: wait for the other run, then claim at the same moment
while not go.exists():
    time.sleep(0.01)
try:
    claim_folder(sys.argv[2], ".marker.json", {"kind": "probe"}, owner="the test")
except Exception as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
print("claimed", flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_two_runs_claiming_one_new_folder_at_once_one_wins_and_a_dead_holders_folder_is_free(tmp_path):
    go, folder = tmp_path / "go", tmp_path / "out"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _CLAIM, str(go), str(folder), "600"],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 150  # both interpreters imported the package and wait for "go"
        while time.monotonic() < deadline and len(list(tmp_path.glob("go.ready-*"))) < 2:
            time.sleep(0.05)
        go.touch()
        while time.monotonic() < deadline and all(run.poll() is None for run in runs):
            time.sleep(0.05)
        losers = [run for run in runs if run.poll() is not None]
        assert len(losers) == 1, "both runs are still running: neither was refused"
        loser, winner = losers[0], next(run for run in runs if run is not losers[0])
        error = loser.communicate()[1]
        assert loser.returncode == 2, error
        assert (
            len(error.strip().splitlines()) == 1 and f"is in use by run pid {winner.pid} on host" in error
        ), error
        assert winner.stdout.readline().strip() == "claimed"
        assert json.loads((folder / ".marker.json").read_text()) == {"kind": "probe"}

        # A third claim while the winner runs is refused too; once it is killed (SIGKILL: nothing cleans up) the
        # folder is free to resume at once.
        with pytest.raises(UnsafeRemovalError, match=f"is in use by run pid {winner.pid}"):
            claim_folder(folder, ".marker.json", {"kind": "probe"}, owner="the test")
        winner.send_signal(signal.SIGKILL)
        winner.wait(timeout=30)
        assert claim_folder(folder, ".marker.json", {"kind": "probe"}, owner="the test") == {"kind": "probe"}
        assert (folder / LOCK_NAME).is_file()
    finally:
        for run in runs:
            run.kill()
            run.wait(timeout=30)
        if hasattr(atomic, "release_folder"):
            atomic.release_folder(folder)


def _load_run_pretrain():
    spec = importlib.util.spec_from_file_location("run_pretrain_core", ROOT / "examples" / "run_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_pretrain_into_a_folder_another_live_run_holds_stops_at_once(tmp_path, minilm_path):
    folder = tmp_path / "out"
    go = tmp_path / "go"
    go.touch()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom modeling_imagebert.atomic import lock_folder\nfrom pathlib import Path\n"
            "Path(sys.argv[1]).mkdir()\nlock_folder(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)",
            str(folder),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        run_pretrain = _load_run_pretrain()
        argv = [
            "--output_dir",
            str(folder),
            "--no_progress",
            "--no_eval",
            "--set",
            f"model.tokenizer={minilm_path}",
        ]
        with pytest.raises(FileExistsError) as caught:
            run_pretrain.main(argv)
        message = str(caught.value)
        assert f"is in use by run pid {holder.pid}" in message and len(message.splitlines()) == 1
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------------------
# Group 8: weights-only loaders, one line naming the file
# ---------------------------------------------------------------------------------------------------------------


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/imagebert-robustness-pwned",))


def test_every_weights_only_loader_names_the_file_in_one_line(tmp_path):
    from transformers import BertConfig, BertModel

    from modeling_imagebert.features.convert_checkpoints import ConversionError, read_state_dict
    from modeling_imagebert.features.global_features import GLOBAL_MODELS, _load_state_dict

    evil = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode()}, evil)
    good = tmp_path / "good.pth"
    torch.save({"weight": torch.zeros(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:300])
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    raw_pickle = tmp_path / "raw.pkl.bin"
    raw_pickle.write_bytes(pickle.dumps(_RunsCode(), protocol=4))

    def one_line(error: BaseException, path: Path) -> str:
        message = str(error)
        assert str(path) in message and len(message.splitlines()) == 1, message
        assert "weights_only=False" not in message, message  # not torch's advice to turn the protection off
        return message

    for path in (evil, truncated, empty, raw_pickle):
        with pytest.raises(ConversionError) as caught:
            read_state_dict(str(path), "milvlg")
        one_line(caught.value, path)
        with pytest.raises(ValueError) as caught:
            _load_state_dict(path, next(iter(GLOBAL_MODELS.values())))
        one_line(caught.value, path)

    # The shared wrapper itself (new in issue 25), which every loader goes through.
    from modeling_imagebert.safe_loading import (
        WeightsFileError,
        load_safetensors_file,
        load_torch_file,
        loading_weights,
    )

    for path in (evil, truncated, empty, raw_pickle):
        with pytest.raises(WeightsFileError) as caught:
            load_torch_file(path, "a state dict")
        one_line(caught.value, path)
    with pytest.raises(WeightsFileError) as caught:
        load_torch_file(evil, "a state dict")
    assert "holds Python objects" in str(caught.value) and "nothing run" in str(caught.value)
    assert not Path("/tmp/imagebert-robustness-pwned").exists()

    bad_safetensors = tmp_path / "index.safetensors"
    bad_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsFileError) as caught:
        load_safetensors_file(bad_safetensors, "an index written by save_index")
    one_line(caught.value, bad_safetensors)

    # A model folder loaded by from_pretrained: the weights file inside it is named.
    folder = tmp_path / "model"
    BertModel(
        BertConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=20
        )
    ).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(evil.read_bytes())
    with pytest.raises(WeightsFileError) as caught, loading_weights(folder, "a model folder"):
        BertModel.from_pretrained(folder)
    one_line(caught.value, folder / "pytorch_model.bin")


# ---------------------------------------------------------------------------------------------------------------
# Group 8: full disk, size limit and read-only outputs, one line naming the path
# ---------------------------------------------------------------------------------------------------------------


def test_full_disk_and_file_size_limit_give_one_line_naming_the_path(tmp_path, capsys):
    # torch.save and the atomic writer under `ulimit -f` (SIGXFSZ ignored, so the write fails with EFBIG).
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        import torch
        from modeling_imagebert.atomic import atomic_write_bytes
        from modeling_imagebert.cli import run_cli
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
        what = sys.argv[1]
        def main(argv):
            if what == "torch":
                torch.save(torch.zeros(100000), {str(tmp_path / "weights.pt")!r})
            else:
                atomic_write_bytes({str(tmp_path / "results.json")!r}, bytes(200000))
        sys.exit(run_cli(main, []))
        """
    )
    for what, name in (("torch", "weights.pt"), ("atomic", "results.json")):
        result = subprocess.run(
            [sys.executable, "-c", code, what], env=ENV, capture_output=True, text=True, timeout=300
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert str(tmp_path / name) in lines[0] and (
            "file too large" in lines[0] or "could not be written" in lines[0]
        )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    # ENOSPC / EROFS wrapped by a library (datasets' DatasetGenerationError, a RuntimeError): the cause, one line.
    class DatasetGenerationError(Exception):
        pass

    def full(argv):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data-00000.arrow"))
        except OSError as error:
            raise DatasetGenerationError("An error occurred while generating the dataset") from error

    def read_only(argv):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out"))

    assert run_cli(full, []) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "data-00000.arrow: no space left on device" in line, line
    assert run_cli(read_only, []) == 2
    line = capsys.readouterr().err.strip()
    assert "out: read-only file system" in line and len(line.splitlines()) == 1, line
    # A bug stays a traceback.
    with pytest.raises(RuntimeError):
        run_cli(lambda argv: (_ for _ in ()).throw(RuntimeError("a bug")), [])


# ---------------------------------------------------------------------------------------------------------------
# Group 1: inputs that are not regular files
# ---------------------------------------------------------------------------------------------------------------


def test_a_fifo_or_dev_zero_as_an_input_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    labels = tmp_path / "labels.csv"
    labels.write_text("image,drop\nfifo.jpg,1\nfifo.jpg,0\n")
    code = textwrap.dedent(
        f"""
        import json
        from modeling_imagebert.features.images import decode_image, read_image_size
        from modeling_imagebert.data.importers.text_files import read_lines
        from modeling_imagebert.data.importers.karpathy import read_karpathy_captions
        from modeling_imagebert.pretraining.recipes import load_recipe
        from modeling_imagebert.lait.filter_training import train_image_filter
        out = {{}}
        for name in ({str(fifo)!r}, "/dev/zero"):
            decoded = decode_image(name)
            out[name] = [decoded.reason, decoded.message, read_image_size(name)]
        for label, call in (
            ("read_lines", lambda: read_lines({str(fifo)!r})),
            ("karpathy", lambda: list(read_karpathy_captions("/dev/zero", split="test"))),
            ("recipe", lambda: load_recipe({str(fifo)!r})),
            ("train-filter", lambda: train_image_filter({str(labels)!r}, {str(tmp_path / "filter.skops")!r})),
        ):
            try:
                call()
                out[label] = "no error"
            except Exception as error:
                out[label] = str(error)
        print(json.dumps(out))
        """
    )
    result = _python(code, timeout=180, memory_gib=6)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out[str(fifo)][0] == "unreadable" and "FIFO" in out[str(fifo)][1] and out[str(fifo)][2] is None
    assert out["/dev/zero"][0] == "unreadable" and "character device" in out["/dev/zero"][1]
    for label in ("read_lines", "recipe", "train-filter"):
        assert str(fifo) in out[label] and "FIFO" in out[label], (label, out[label])
    assert "/dev/zero" in out["karpathy"] and "character device" in out["karpathy"]


# ---------------------------------------------------------------------------------------------------------------
# Group 1: YAML alias bomb, bounded repr in messages
# ---------------------------------------------------------------------------------------------------------------

# Eight levels of nine aliases, all inside `description:`: 9**9 strings once expanded, in about 450 bytes.
_BOMB = (
    "name: bomb\ndescription:\n  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(
        f"  - &{level} [{', '.join([f'*{below}'] * 9)}]\n"
        for below, level in zip("abcdefg", "bcdefgh", strict=True)
    )
    + "  - ["
    + ", ".join(["*h"] * 9)
    + "]\n"
)


def test_a_yaml_alias_bomb_recipe_is_refused_in_a_moment(tmp_path):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(_BOMB)
    assert len(_BOMB) < 1024
    config = tmp_path / "bomb-lait.yaml"
    config.write_text("images:\n  min_width: &w 400\n  min_height: *w\n")
    code = textwrap.dedent(
        f"""
        import time
        from modeling_imagebert.pretraining.recipes import load_recipe
        from modeling_imagebert.lait.config import load_config
        for call in (lambda: load_recipe({str(recipe)!r}), lambda: load_config({str(config)!r})):
            start = time.perf_counter()
            try:
                call()
                print("no error")
            except Exception as error:
                print(f"{{time.perf_counter() - start:.3f}}\\t{{type(error).__name__}}\\t{{error}}")
        """
    )
    result = _python(code, timeout=120, memory_gib=4)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    for line, path in zip(lines, (recipe, config), strict=True):
        seconds, _type, message = line.split("\t")
        assert float(seconds) < 2, line
        assert str(path) in message and "line " in message and "aliases" in message, line


def test_error_messages_quote_a_huge_value_briefly(tmp_path):
    from modeling_imagebert.pretraining.recipes import RecipeError, load_recipe

    recipe = tmp_path / "huge.yaml"
    recipe.write_text("name: huge\ntraining:\n  seed: " + "9" * 5_000_000 + "x\n")
    start = time.perf_counter()
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    assert time.perf_counter() - start < 10
    assert len(str(caught.value)) < 400 and "training.seed" in str(caught.value)

    from modeling_imagebert.cli import short_repr

    assert len(short_repr("x" * 10_000_000)) <= 120
    assert short_repr("plain") == "'plain'"


def test_an_integer_too_long_to_print_is_one_line_naming_the_file(tmp_path):
    """Python refuses to print an int of more than 4,300 digits: YAML's int constructor raised it with no file named,
    and `short_repr` of a parsed 4,000-digit value raised it again inside the error message."""
    from modeling_imagebert.cli import short_repr
    from modeling_imagebert.lait.config import ConfigError, load_config
    from modeling_imagebert.pretraining.recipes import RecipeError, load_recipe

    recipe = tmp_path / "digits.yaml"
    recipe.write_text("name: digits\ntraining:\n  seed: " + "9" * 5_000 + "\n")
    with pytest.raises(RecipeError, match=r"digits\.yaml: a value cannot be read"):
        load_recipe(recipe)
    config = tmp_path / "lait.yaml"
    config.write_text("images:\n  max_redirects: " + "9" * 4_000 + "\n")
    with pytest.raises(ConfigError, match=r"images\.max_redirects: <an integer of \d+ bits>") as caught:
        load_config(config)
    assert len(str(caught.value)) < 200
    assert short_repr(10**5_000) == f"<an integer of {(10**5_000).bit_length()} bits>"


def test_a_fifo_as_the_features_list_file_or_a_webdataset_shard_never_blocks(tmp_path):
    """The features CLI's list file and webdataset shards were opened as they are: a FIFO blocked the listing."""
    fifo_list, fifo_shard = tmp_path / "images.txt", tmp_path / "00000.tar"
    os.mkfifo(fifo_list)
    os.mkfifo(fifo_shard)
    code = textwrap.dedent(
        f"""
        import json
        from modeling_imagebert.features.sources import ImageSourceError, list_file, list_webdataset
        out = {{}}
        try:
            list_file({str(fifo_list)!r})
            out["list"] = "no error"
        except ImageSourceError as error:
            out["list"] = str(error)
        import io, tarfile
        with tarfile.open({str(tmp_path / "00001.tar")!r}, "w") as archive:
            member = tarfile.TarInfo("a.jpg")
            member.size = 3
            archive.addfile(member, io.BytesIO(b"abc"))
        refs = list_webdataset([{str(fifo_shard)!r}, {str(tmp_path / "00001.tar")!r}])
        out["shard"] = [list(ref.problem) if ref.problem else None for ref in refs]
        print(json.dumps(out))
        """
    )
    result = _python(code, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert str(fifo_list) in out["list"] and "FIFO" in out["list"], out
    assert len(out["shard"]) == 2 and out["shard"][1] is None, out  # the good shard's image is listed
    assert out["shard"][0][0] == "unreadable" and "FIFO" in out["shard"][0][1], out


def test_a_full_disk_under_safetensors_is_one_line_naming_the_file(tmp_path):
    """safetensors' Rust writer reports ENOSPC only in its message ("... (os error 28)"): a full disk while
    accelerate saved a checkpoint ended run_pretrain with a traceback and exit 1 (seen on a 30 MB tmpfs)."""
    from safetensors import SafetensorError

    from modeling_imagebert.cli import environment_problem

    def save_file(filename):  # the frame safetensors.torch.save_file raises from, with its `filename`
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    target = tmp_path / "checkpoint-2-1" / "model.safetensors"
    try:
        save_file(str(target))
    except SafetensorError as error:
        line = environment_problem(error)
    assert line is not None and line.startswith(f"{target}: no space left on device"), line
    assert len(line.splitlines()) == 1
