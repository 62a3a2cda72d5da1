"""A two-machine accelerate launch on one host: `accelerate launch --num_machines 2 --machine_rank {0,1}
--main_process_ip 127.0.0.1 --num_processes 2` (one gloo process per "machine", on the CPU) runs
examples/run_pretrain.py, stops after a checkpoint, resumes, and ends with exactly the weights of an uninterrupted
two-machine run. Slow (three runs of two processes): set IMAGEBERT_SLOW=1."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_pretrain import _assert_same_weights, _tiny_recipe

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "run_pretrain.py"
SLOW = pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_machines(recipe_path: Path, out: Path, *extra: str) -> None:
    """Starts machine ranks 0 and 1 of one run (one process each), waits for both, fails with their output."""
    port = _free_port()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    machines = []
    for rank in (0, 1):
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
            "--num_processes", "2", "--rdzv_backend", "static", "--mixed_precision", "no", "--dynamo_backend", "no",
            str(SCRIPT), "--recipe", str(recipe_path), "--output_dir", str(out), "--no_progress", *extra,
        ]  # fmt: skip
        machines.append(
            subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    try:
        for machine in machines:
            outputs.append(machine.communicate(timeout=300)[0])
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
                machine.wait()
    for rank, (machine, output) in enumerate(zip(machines, outputs, strict=True)):
        assert machine.returncode == 0, f"machine {rank} exited {machine.returncode}:\n{output[-4000:]}"


@SLOW
def test_two_machine_launch_stops_resumes_and_equals_the_uninterrupted_run(tmp_path, minilm_path):
    recipe = _tiny_recipe(minilm_path, stages=1, steps=4)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    _launch_two_machines(path, straight)
    _launch_two_machines(path, parts, "--max_steps_this_run", "2")
    checkpoint = parts / "checkpoint-1-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert not (parts / "final").exists()
    _launch_two_machines(path, parts, "--resume_from_checkpoint", "latest")
    _assert_same_weights(straight / "final", parts / "final", atol=0)
