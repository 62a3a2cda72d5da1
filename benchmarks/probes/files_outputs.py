"""Probes of the shared core I/O guarantees (issue 25): outputs that are symlinks, FIFOs or device nodes; two runs
claiming one folder; weights files with code, truncated, empty or foreign; a full disk, a file size limit and a
read-only output; FIFOs and /dev/zero where a file is read; a YAML alias bomb and a huge value in a recipe.

The cases that could block or fill memory run as subprocesses with a deadline (`Probes.command`): a hang is tallied
as such instead of stopping the run. Special files and symlink targets are guarded (`Probes.guard`). The full-disk
and read-only cases mount a small tmpfs when the process may (root); otherwise those cases are left out, saying so.
"""

from __future__ import annotations

import os
import pickle
import runpy
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from .harness import HANDLED, ROOT, Probes, tokenizer_path

PYTHON = sys.executable
# The demo recipe at its smallest (a tiny model, 16 toy images, one step per stage).
_TINY_RUN = [
    "--set", f"model.config={ROOT / 'configuration' / 'models' / 'imagebert-tiny.json'}",
    "--set", "model.bert_checkpoint=null", "--set", "stages.0.init=config",
    "--set", "stages.0.datasets.0.toy_world.num_images=16", "--set", "stages.1.datasets.0.toy_world.num_images=16",
    "--set", "stages.0.max_steps=1", "--set", "stages.1.max_steps=1", "--batch_size", "4", "--num_threads", "1",
]  # fmt: skip
# Runs the script argv[1] as __main__ with the rest of argv (under `_python`'s memory cap).
_SCRIPT = "import runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/imagebert-probe-pwned",))


def _python(code: str, *args: str, memory_gib: float | None = 6) -> list[str]:
    """argv of a fresh interpreter running `code` (with an address-space cap, so /dev/zero cannot take the host)."""
    if memory_gib is not None:
        cap = int(memory_gib * (1 << 30))
        code = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n" + code
    return [PYTHON, "-c", code, *args]


def _mount_tmpfs(folder: Path, options: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


def probe_files_outputs(p: Probes, work: Path) -> None:
    import torch
    from transformers import BertTokenizerFast

    from modeling_imagebert import ImageBertConfig, ImageBertForRetrieval
    from modeling_imagebert.atomic import atomic_write_text, claim_folder
    from modeling_imagebert.cli import run_cli
    from modeling_imagebert.processing_imagebert import ImageBertProcessor

    p.entry = "files and outputs"
    base = work / "files_outputs"
    base.mkdir()
    char_device = (
        (lambda path: os.mknod(path, 0o600 | 0o020000, os.makedev(1, 3))) if os.geteuid() == 0 else None
    )

    # ---------------------------------------------------------------- outputs that are symlinks or special files
    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    torch.manual_seed(0)
    model = ImageBertForRetrieval(config).eval()
    model_dir = base / "model"
    model.save_pretrained(model_dir)
    processor = ImageBertProcessor(
        BertTokenizerFast.from_pretrained(tokenizer_path()),
        max_regions=config.max_regions,
        max_text_length=config.max_text_length,
    )
    processor.save_pretrained(model_dir)
    evaluate_main = runpy.run_path(str(ROOT / "examples" / "evaluate_retrieval.py"), run_name="probe")["main"]

    def evaluate(*argv: str) -> int:
        return run_cli(evaluate_main, ["--model", str(model_dir), "--toy", "--no_progress", *argv])

    stdout_link = base / "stdout.json"
    stdout_link.symlink_to("/dev/stdout")
    with p.guard("--output_json through a symlink to /dev/stdout", stdout_link):
        p.cli(
            "--output_json through a symlink to /dev/stdout",
            lambda: evaluate("--output_json", str(stdout_link)),
            "stdout.json",
            "symlink",
        )
    fifo_out = base / "out.fifo"
    os.mkfifo(fifo_out)
    with p.guard("--output_json a FIFO", fifo_out):
        p.cli("--output_json a FIFO", lambda: evaluate("--output_json", str(fifo_out)), "out.fifo", "FIFO")
    kept = base / "kept.json"
    kept.write_text("theirs")
    kept_link = base / "kept-link.json"
    kept_link.symlink_to(kept)
    with p.guard("--output_json a symlink to a user's file", kept, kept_link):
        p.cli(
            "--output_json a symlink to a user's file",
            lambda: evaluate("--output_json", str(kept_link)),
            "kept-link.json",
            "symlink",
        )
    plot_target = base / "plot.png"
    (char_device or os.mkfifo)(plot_target)
    with p.guard("--recall_plot a device node", plot_target):
        p.cli(
            "--recall_plot a device node (a FIFO when not root)",
            lambda: evaluate("--candidates", "2", "--recall_plot", str(plot_target)),
            "plot.png",
            "refusing",
        )

    from modeling_imagebert.data.toy_world import make_toy_world
    from modeling_imagebert.retrieval.retriever import ImageBertRetriever

    split = make_toy_world(
        "retrieval",
        num_images=1,
        num_validation_images=1,
        num_test_images=4,
        seed=0,
        feature_dim=config.visual_feature_dim,
        num_classes=config.num_object_classes - 1,
    )["test"]
    retriever = ImageBertRetriever(model, processor, candidates=2).index(split)
    index_target = base / "index.safetensors"
    (char_device or os.mkfifo)(index_target)
    with p.guard("save_index to a device node", index_target):
        p.error(
            "save_index to a device node (a FIFO when not root)",
            lambda: retriever.save_index(index_target),
            "index.safetensors",
            "refusing",
        )
    index_link = base / "index-link.safetensors"
    index_link.symlink_to(kept)
    with p.guard("save_index to a symlink", index_link, kept):
        p.error("save_index to a symlink", lambda: retriever.save_index(index_link), "symlink")
    good_index = base / "good.safetensors"
    p.result(
        "save_index to a new path", lambda: retriever.save_index(good_index), lambda _: good_index.is_file()
    )

    # convert --output a symlink to a user's folder, with --overwrite: neither the link nor the folder changes.
    theirs = base / "their-folder"
    theirs.mkdir()
    (theirs / "data.txt").write_text("theirs")
    folder_link = base / "folder-link"
    folder_link.symlink_to(theirs)
    from fixtures_formats import make_detections, write_butd_tsv

    from modeling_imagebert.data.convert import main as convert_main

    tsv = write_butd_tsv(base / "f.tsv", [make_detections(str(i), 3, 8, seed=i) for i in range(3)])
    cc = base / "cc.tsv"
    cc.write_text("".join(f"caption {i}\thttp://u/{i}.jpg\n" for i in range(3)))

    def convert(*argv: str, captions: Path = cc, output: Path | None = None) -> int:
        args = ["butd-tsv", str(tsv), "--captions", str(captions), "--format", "cc", "--no-progress"]
        return convert_main([*args, "--output", str(output or base / "converted"), *argv])

    with p.guard("convert --output a symlink to a folder --overwrite", folder_link, theirs / "data.txt"):
        p.cli(
            "convert --output a symlink to a user's folder, --overwrite",
            lambda: convert("--overwrite", output=folder_link),
            "folder-link",
        )

    # ---------------------------------------------------------------- two runs claiming one folder
    claimed = base / "claimed"
    hold = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        Path(sys.argv[1]).mkdir()
        try:
            from modeling_imagebert.atomic import lock_folder
        except ImportError:  # code without folder locks: the probes below show what that lets through
            lock_folder = lambda folder: None
        lock_folder(sys.argv[1])  # what every claim of an output folder takes first
        print("claimed", flush=True)
        time.sleep(600)
        """
    )
    holder = subprocess.Popen(
        [PYTHON, "-c", hold, str(claimed)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        if holder.stdout.readline().strip() != "claimed":
            p.add("claim a folder another live run holds", "raw traceback", "the holder did not start")
        p.error(
            "claim a folder another live run holds",
            lambda: claim_folder(claimed, ".marker.json", {"kind": "probe"}, owner="the probe"),
            "in use by run pid",
            str(holder.pid),
        )
        run_pretrain_main = runpy.run_path(str(ROOT / "examples" / "run_pretrain.py"), run_name="probe")[
            "main"
        ]
        p.cli(
            "run_pretrain into a folder another live run holds",
            lambda: run_cli(
                run_pretrain_main,
                [
                    "--output_dir",
                    str(claimed),
                    "--no_progress",
                    "--no_eval",
                    *_TINY_RUN,
                    "--set",
                    f"model.tokenizer={tokenizer_path()}",
                ],
            ),
            "in use by run pid",
        )
        from modeling_imagebert.lait.__main__ import main as lait_main

        p.cli(
            "lait run into a folder another live run holds",
            lambda: lait_main(["run", "--input", str(tsv), "--output", str(claimed)]),
            "in use by run pid",
        )
    finally:
        holder.kill()
        holder.wait(timeout=30)
    p.result(
        "claim the folder of a killed run",
        lambda: claim_folder(claimed, ".marker.json", {"kind": "probe"}, owner="the probe"),
        lambda recorded: recorded is None and (claimed / ".marker.json").is_file(),
    )
    import modeling_imagebert.atomic as atomic

    getattr(atomic, "release_folder", lambda folder: None)(claimed)
    race = base / "race"
    go = base / "go"
    racer = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from modeling_imagebert.atomic import claim_folder
        from modeling_imagebert.cli import run_cli
        Path(f"{sys.argv[1]}.ready-{os.getpid()}").touch()
        while not Path(sys.argv[1]).exists():
            time.sleep(0.01)
        def main(argv):
            claim_folder(sys.argv[2], ".marker.json", {"kind": "probe"}, owner="the probe")
            time.sleep(3)
        sys.exit(run_cli(main, []))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [
        subprocess.Popen(
            [PYTHON, "-c", racer, str(go), str(race)], env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(base.glob("go.ready-*"))) < 2:
        time.sleep(0.05)
    go.touch()
    results = [(run.wait(timeout=240), run.communicate()[1]) for run in runs]
    codes = sorted(code for code, _ in results)
    losing = [err for code, err in results if code == 2]
    if codes == [0, 2] and "in use by run pid" in losing[0]:
        p.add("two runs claim one new folder at once", "clear one-line error", losing[0].strip())
    else:
        p.add("two runs claim one new folder at once", "silent wrong result", f"exit codes {codes}")

    # ---------------------------------------------------------------- weights-only loaders
    from modeling_imagebert.features.convert_checkpoints import read_state_dict
    from modeling_imagebert.features.global_features import GLOBAL_MODELS, _load_state_dict

    try:
        from modeling_imagebert.safe_loading import load_torch_file
    except ImportError:  # code before the shared wrapper: torch.load as the loaders called it

        def load_torch_file(path, what):
            return torch.load(path, map_location="cpu", weights_only=True)

    good = base / "good.pth"
    torch.save({"weight": torch.zeros(1000)}, good)
    weights = {
        "code": lambda path: torch.save({"w": torch.zeros(2), "x": _RunsCode()}, path),
        "raw pickle": lambda path: path.write_bytes(pickle.dumps(_RunsCode(), protocol=4)),
        "truncated": lambda path: path.write_bytes(good.read_bytes()[:300]),
        "zero bytes": lambda path: path.write_bytes(b""),
        "foreign (PNG)": lambda path: path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)),
    }
    spec = next(iter(GLOBAL_MODELS.values()))
    for kind, make in weights.items():
        path = base / f"weights-{kind.split()[0]}.pth"
        make(path)
        p.error(
            f"convert_checkpoints: {kind}", lambda path=path: read_state_dict(str(path), "milvlg"), path.name
        )
        p.error(f"--global-weights: {kind}", lambda path=path: _load_state_dict(path, spec), path.name)
        p.error(
            f"load_torch_file: {kind}", lambda path=path: load_torch_file(path, "a state dict"), path.name
        )
        folder = base / f"model-{kind.split()[0]}"
        shutil.copytree(model_dir, folder)
        (folder / "model.safetensors").unlink()
        shutil.copy(path, folder / "pytorch_model.bin")
        p.cli(
            f"evaluate --model with {kind} weights",
            lambda folder=folder: run_cli(evaluate_main, ["--model", str(folder), "--toy", "--no_progress"]),
            "pytorch_model.bin",
        )
    damaged = base / "damaged-index.safetensors"
    damaged.write_bytes(good_index.read_bytes()[:200])
    p.error(
        "load_index of a truncated index",
        lambda: ImageBertRetriever(model, processor).load_index(damaged),
        "damaged-index",
    )
    shutil.copytree(model_dir, base / "model-damaged")
    safetensors = base / "model-damaged" / "model.safetensors"
    safetensors.write_bytes(safetensors.read_bytes()[:100])
    p.cli(
        "evaluate --model with a truncated model.safetensors",
        lambda: run_cli(evaluate_main, ["--model", str(base / "model-damaged"), "--toy", "--no_progress"]),
        "model.safetensors",
    )
    p.result("no pickle ran code", lambda: not Path("/tmp/imagebert-probe-pwned").exists(), bool)

    # ---------------------------------------------------------------- full disk, size limit, read-only output
    sizelimit = textwrap.dedent(
        """
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
        from modeling_imagebert.data.convert import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    # 40 images x 10 regions x 256 floats: a dataset of about 200 KB, over the limits below.
    big = write_butd_tsv(base / "big.tsv", [make_detections(str(i), 10, 256, seed=i) for i in range(40)])
    big_cc = base / "big-cc.tsv"
    big_cc.write_text("".join(f"caption {i}\thttp://u/{i}.jpg\n" for i in range(40)))
    convert_args = [
        "butd-tsv",
        str(big),
        "--captions",
        str(big_cc),
        "--format",
        "cc",
        "--no-progress",
        "--output",
    ]
    p.command(
        "convert under ulimit -f (file size limit)",
        _python(sizelimit, *convert_args, str(base / "limited")),
        "file too large",
        timeout=300,
    )
    small = base / "small-disk"
    if _mount_tmpfs(small, "size=64k"):
        try:
            p.command(
                "convert onto a full disk (64 KiB tmpfs)",
                _python(
                    "import sys\nfrom modeling_imagebert.data.convert import main\nsys.exit(main(sys.argv[1:]))",
                    *convert_args,
                    str(small / "out"),
                ),
                "no space left on device",
                timeout=300,
            )
            try:
                (small / "filler").write_bytes(bytes(64 * 1024))  # whatever the convert left: fill it up
            except OSError:
                pass
            torch_code = "import sys, torch\nfrom modeling_imagebert.cli import run_cli\nsys.exit(run_cli(lambda a: torch.save(torch.zeros(100000), sys.argv[1]), []))"
            p.command(
                "torch.save onto a full disk", _python(torch_code, str(small / "w.pt")), "w.pt", timeout=300
            )
        finally:
            subprocess.run(["umount", str(small)], capture_output=True)
    else:
        p.add("full disk (tmpfs)", HANDLED, "left out: cannot mount a tmpfs here")
    read_only = base / "read-only"
    if _mount_tmpfs(read_only, "ro,size=64k"):
        try:
            p.cli(
                "convert into a read-only folder",
                lambda: convert(output=read_only / "out"),
                f"{read_only / 'out'}: read-only",
            )
            p.cli(
                "evaluate --output_json in a read-only folder",
                lambda: evaluate("--output_json", str(read_only / "r.json")),
                f"{read_only / 'r.json'}: read-only",
            )
        finally:
            subprocess.run(["umount", str(read_only)], capture_output=True)
    else:
        p.add("read-only output (tmpfs)", HANDLED, "left out: cannot mount a tmpfs here")

    # ---------------------------------------------------------------- FIFOs and /dev/zero as inputs
    fifo = base / "captions.fifo"
    os.mkfifo(fifo)
    p.command(
        "convert --captions a FIFO",
        _python(
            "import sys\nfrom modeling_imagebert.data.convert import main\nsys.exit(main(sys.argv[1:]))",
            "butd-tsv",
            str(tsv),
            "--captions",
            str(fifo),
            "--format",
            "cc",
            "--output",
            str(base / "c-fifo"),
        ),
        "captions.fifo",
        timeout=90,
    )
    p.command(
        "convert --captions /dev/zero",
        _python(
            "import sys\nfrom modeling_imagebert.data.convert import main\nsys.exit(main(sys.argv[1:]))",
            "butd-tsv",
            str(tsv),
            "--captions",
            "/dev/zero",
            "--format",
            "cc",
            "--output",
            str(base / "c-zero"),
        ),
        "/dev/zero",
        timeout=90,
    )
    recipe_fifo = base / "recipe.fifo"
    os.mkfifo(recipe_fifo)
    p.command(
        "run_pretrain --recipe a FIFO",
        _python(
            _SCRIPT,
            str(ROOT / "examples" / "run_pretrain.py"),
            "--recipe",
            str(recipe_fifo),
            "--output_dir",
            str(base / "r-fifo"),
        ),
        "recipe.fifo",
        timeout=90,
    )
    from feature_fixtures import save_tiny_detector, write_photos

    images = write_photos(base / "images")
    os.mkfifo(images / "blocked.jpg")
    (images / "zeros.jpg").symlink_to("/dev/zero")
    detector = save_tiny_detector(base / "detector")
    features_out = base / "features"

    def skipped_unreadable() -> bool:
        skipped = (features_out / "skipped.tsv").read_text()
        return "unreadable" in skipped and "blocked" in skipped and "zeros" in skipped

    p.command(
        "features: a FIFO and a link to /dev/zero in the image folder",
        _python(
            "import sys\nfrom modeling_imagebert.features.__main__ import main\nsys.exit(main(sys.argv[1:]))",
            str(images),
            "--output",
            str(features_out),
            "--detector",
            str(detector),
            "--no-progress",
            "--num-workers",
            "1",
        ),
        timeout=150,
        ok=skipped_unreadable,
    )
    labels = base / "labels.csv"
    labels.write_text("image,drop\nimages/blocked.jpg,1\nimages/zeros.jpg,0\n")
    p.command(
        "lait train-filter with a FIFO label image",
        _python(
            "import sys\nfrom modeling_imagebert.lait.__main__ import main\nsys.exit(main(sys.argv[1:]))",
            "train-filter",
            "--labels",
            str(labels),
            "--output",
            str(base / "filter.skops"),
        ),
        "blocked.jpg",
        timeout=90,
    )

    # ---------------------------------------------------------------- YAML alias bomb, huge values
    bomb = base / "bomb.yaml"
    bomb.write_text(
        "name: bomb\ndescription:\n  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(
            f"  - &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh", strict=True)
        )
        + "  - ["
        + ", ".join(["*h"] * 9)
        + "]\n"
    )
    p.command(
        "run_pretrain --recipe with a YAML alias bomb (1 KB)",
        _python(
            _SCRIPT,
            str(ROOT / "examples" / "run_pretrain.py"),
            "--recipe",
            str(bomb),
            "--output_dir",
            str(base / "bomb-out"),
            memory_gib=4,
        ),
        "bomb.yaml",
        "aliases",
        timeout=90,
    )
    lait_bomb = base / "bomb-lait.yaml"
    lait_bomb.write_text("images:\n  min_width: &w 400\n  min_height: *w\n")
    from modeling_imagebert.lait.config import load_config
    from modeling_imagebert.pretraining.recipes import load_recipe

    p.error("LAIT config with an alias", lambda: load_config(lait_bomb), "bomb-lait.yaml", "aliases")
    from modeling_imagebert.package_data import demo_recipe_path

    p.error("--set with an alias", lambda: load_recipe(demo_recipe_path(), ["name=&x 1"]), "aliases")
    huge = base / "huge.yaml"
    huge.write_text("name: huge\ntraining:\n  seed: " + "9" * 5_000_000 + "x\n")

    def huge_message() -> None:
        try:
            load_recipe(huge)
        except ValueError as error:
            if len(str(error)) > 400:
                raise RuntimeError(f"a {len(str(error))}-character message") from None
            raise

    p.error("a 5 MB value in a recipe error message", huge_message, "training.seed")
    atomic_write_text(base / "done.txt", "ok")
