"""Robustness and scale of the training stage, through its command line as the rule runs it."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import REPO, settings_args

TRAIN = [sys.executable, str(REPO / "scripts" / "train.py")]


def train_args(tiny_model, shards, out, *paths, tag=None, **settings):
    """train.py's arguments: `paths` (more path flags) and a settings file of `settings` over fp32,
    learning rate 5e-3 and log_every 10, written beside `out` (in settings/{tag or out's name})."""
    settings = {"precision": "fp32", "learning_rate": 5e-3, "log_every": 10, **settings}
    return ["--base-model", str(tiny_model), "--shards", *map(str, shards), "--output-dir", str(out / "trained"),
            "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"), "--run-name", "resume",
            "--threads", "1", *paths, *settings_args(out.parent / "settings" / (tag or out.name), "train", **settings)]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def final(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def kill_after_checkpoint(command, checkpoints, min_step, timeout=120):
    """Start training, kill -9 it once a checkpoint at min_step or later exists; return that step."""
    process = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = checkpoints / "last" / "progress.json"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and process.poll() is None:
            if progress.exists():
                step = json.loads(progress.read_text())["step"]
                if step >= min_step:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    return step
            time.sleep(0.005)
    finally:
        if process.poll() is None:
            process.kill()
    pytest.fail("training ended before it could be killed mid-run")


STEPS = {"max_steps": 300, "eval_every": 100}


def test_killed_run_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_model, shards):
    straight = tmp_path / "straight"
    subprocess.run(TRAIN + train_args(tiny_model, shards, straight, **STEPS), env=env(), check=True,
                   capture_output=True)

    resumed = tmp_path / "resumed"
    command = TRAIN + train_args(tiny_model, shards, resumed, "--checkpoint-dir", str(tmp_path / "checkpoints"),
                                 **STEPS, checkpoint_every=20)
    killed_at = kill_after_checkpoint(command, tmp_path / "checkpoints", min_step=60)
    assert not (resumed / "trained").exists(), "a killed run leaves no adapter"
    result = subprocess.run(command, env=env(), check=True, capture_output=True, text=True)
    assert f"resuming from the checkpoint at step {killed_at}" in result.stdout + result.stderr
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from_step"] == killed_at and summary["steps"] == 300

    assert abs(final(resumed)["loss"] - final(straight)["loss"]) < 1e-3
    assert abs(final(resumed)["eval_loss"] - final(straight)["eval_loss"]) < 1e-3
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(10, 301, 10)), "metrics before the kill are kept"
    assert not (tmp_path / "checkpoints").exists(), "checkpoints are removed once the adapter is written"


def test_changed_settings_do_not_resume_an_old_checkpoint(tmp_path, tiny_model, shards):
    out, checkpoints = tmp_path / "run", tmp_path / "checkpoints"
    paths, settings = ["--checkpoint-dir", str(checkpoints)], {**STEPS, "checkpoint_every": 20}
    kill_after_checkpoint(TRAIN + train_args(tiny_model, shards, out, *paths, **settings), checkpoints, min_step=20)
    changed = train_args(tiny_model, shards, out, *paths, tag="changed", **settings, learning_rate=1e-3)
    result = subprocess.run(TRAIN + changed, env=env(), check=True, capture_output=True, text=True)
    assert "is from other settings, data or number of processes: starting over" in result.stdout + result.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel_training_on_cpu(tmp_path, tiny_model, shards):
    """The path a run with gpus: 2 takes (accelerate launch, DDP), here on CPU with gloo."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), str(REPO / "scripts" / "train.py")]
    result = subprocess.run(launch + train_args(tiny_model, shards, out, max_steps=30, batch_size=4),
                            env={**env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "trained")
