"""Training over several processes on CPU (gloo), as a run with gpus > 1 or nodes > 1 takes it:
FSDP2 matches one process, resumes sharded checkpoints after kill -9, and saves the same
kind of adapter as DDP."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import REPO, settings_args
from finetune.launch import first_host, launch_command

TRAIN = str(REPO / "scripts" / "train.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(tiny_model, shards, out, *paths, **settings):
    """train.py's arguments: `paths` (more path flags) and a settings file of `settings` over fp32, learning rate
    5e-3, log_every 10 and dropout 0, written beside `out` (in settings/{out's name})."""
    settings = {"precision": "fp32", "learning_rate": 5e-3, "log_every": 10, "dropout": 0.0, **settings}
    return ["--base-model", str(tiny_model), "--shards", *map(str, shards), "--output-dir", str(out / "trained"),
            "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"), "--run-name", "dist",
            "--threads", "1", *paths, *settings_args(out.parent / "settings" / out.name, "train", **settings)]


def env(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", **extra}


def launch(processes, *args, timeout=300):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), TRAIN, *args]
    return subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


SAME_GLOBAL_BATCH = {"max_steps": 30, "batch_size": 4, "eval_every": 30, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model, shards):
    """One process accumulating 2 micro-batches: the same global batch as 2 processes with 1 each."""
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, TRAIN, *train_args(tiny_model, shards, out, **SAME_GLOBAL_BATCH, grad_accum=2)],
                   env=env(), check=True, capture_output=True)
    return out


def assert_same_learning(one, two):
    """Final train and held-out losses within 1% of each other, after real learning."""
    last_one, last_two = metrics(one)[-1], metrics(two)[-1]
    for key in ("loss", "eval_loss"):
        assert abs(last_two[key] - last_one[key]) / last_one[key] < 0.01, (key, last_one, last_two)
    assert metrics(two)[0]["loss"] > last_two["loss"] * 1.2, "it learned"


def test_fsdp_on_two_processes_learns_what_one_process_learns(tmp_path, tiny_model, single, shards):
    sharded = tmp_path / "fsdp"
    result = launch(2, *train_args(tiny_model, shards, sharded, **SAME_GLOBAL_BATCH, distributed="fsdp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), FSDP" in result.stdout + result.stderr
    assert_same_learning(single, sharded)
    summary = json.loads((sharded / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["distributed"] == "fsdp"

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapters = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "trained")
                for out in (single, sharded)]
    weights = [{k: v for k, v in a.state_dict().items() if "lora_" in k} for a in adapters]
    assert weights[0].keys() == weights[1].keys() and len(weights[0]) == 2 * 7 * 2
    for name in weights[0]:
        assert torch.allclose(weights[0][name], weights[1][name], atol=1e-3), name
    assert not torch.equal(adapters[1].merge_and_unload().model.layers[0].mlp.up_proj.weight,
                           base.model.layers[0].mlp.up_proj.weight)


def kill_all(process):
    """kill -9 a launcher and every process under it at once, as SLURM ends a job (torchrun
    starts its workers in sessions of their own, so killing its process group would miss them)."""
    tree = [process, *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            member.kill() if isinstance(member, psutil.Process) else member.send_signal(signal.SIGKILL)
    process.wait()
    psutil.wait_procs([m for m in tree if isinstance(m, psutil.Process)], timeout=30)


def kill_after_checkpoint(command, checkpoints, min_step, timeout=240):
    """Start a multi-process run, kill -9 all of its processes once a checkpoint at min_step or later exists."""
    process = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = checkpoints / "last" / "progress.json"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None:
            if progress.exists() and json.loads(progress.read_text())["step"] >= min_step:
                kill_all(process)
                return json.loads(progress.read_text())["step"]
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            kill_all(process)
    pytest.fail("training ended before it could be killed mid-run")


def test_killed_fsdp_run_resumes_from_its_sharded_checkpoint(tmp_path, tiny_model, shards):
    steps = {"max_steps": 80, "batch_size": 4, "eval_every": 80, "distributed": "fsdp"}
    straight = tmp_path / "straight"
    assert launch(2, *train_args(tiny_model, shards, straight, **steps)).returncode == 0

    resumed, checkpoints = tmp_path / "resumed", tmp_path / "checkpoints"
    args = train_args(tiny_model, shards, resumed, "--checkpoint-dir", str(checkpoints), **steps, checkpoint_every=10)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), TRAIN, *args]
    killed_at = kill_after_checkpoint(command, checkpoints, min_step=30)
    assert sorted(p.name for p in (checkpoints / "last").iterdir()) == [
        "progress.json", "rng-0.pt", "rng-1.pt", "sharded", "state.pt"]
    assert not (resumed / "trained").exists()
    result = launch(2, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from the checkpoint at step {killed_at}" in result.stdout + result.stderr
    assert abs(metrics(resumed)[-1]["eval_loss"] - metrics(straight)[-1]["eval_loss"]) < 1e-4
    assert abs(metrics(resumed)[-1]["loss"] - metrics(straight)[-1]["loss"]) < 1e-4
    assert not checkpoints.exists()


def test_two_nodes_meet_over_loopback_and_train_as_one_run(tmp_path, tiny_model, single, shards):
    """What srun starts on each node of a 2-node SLURM job: python -m finetune.launch, reading its node
    rank, the node list and the job id from SLURM's environment. Here both nodes are this
    machine (one process each), meeting at 127.0.0.1."""
    out = tmp_path / "two-nodes"
    command = [sys.executable, "-m", "finetune.launch", "--processes", "1", "--nodes", "2", "--", TRAIN,
               *train_args(tiny_model, shards, out, **SAME_GLOBAL_BATCH, distributed="fsdp")]
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_NNODES": "2",
             "MASTER_PORT": str(free_port())}
    nodes = [subprocess.Popen(command, env=env(**slurm, SLURM_NODEID=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "2 process(es), FSDP" in logs[0]
    assert_same_learning(single, out)
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "trained")


@pytest.mark.parametrize("method", [{"method": "dora", "gradient_checkpointing": True, "precision": "bf16"},
                                    {"method": "full"}, {"method": "qlora"}], ids=["dora", "full", "qlora"])
def test_every_method_trains_sharded_and_saves_what_ddp_saves(tmp_path, tiny_model, shards, method):
    """FSDP under each method, with samples (generated by both processes together) and checkpoints."""
    out = tmp_path / "run"
    args = train_args(tiny_model, shards, out, "--checkpoint-dir", str(tmp_path / "checkpoints"),
                      "--samples", str(out / "samples.jsonl"), max_steps=20, batch_size=4, distributed="fsdp",
                      checkpoint_every=10, sample_every=10, prompts=["What is the first word? List: a b"], **method)
    result = launch(2, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), FSDP" in result.stdout + result.stderr
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in samples] == [10, 20]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantization"] == ("4bit" if method["method"] == "qlora" else "none")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    if method["method"] == "full":
        tuned = AutoModelForCausalLM.from_pretrained(out / "trained")
        assert tuned.state_dict().keys() == base.state_dict().keys()
        assert not torch.equal(tuned.model.layers[1].mlp.down_proj.weight, base.model.layers[1].mlp.down_proj.weight)
    else:
        tuned = PeftModel.from_pretrained(base, out / "trained")
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in tuned.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(tuned(input_ids=torch.tensor([[1, 200, 300]])).logits).all()


@pytest.mark.parametrize("nodelist, host", [("gpu[003-005,010],cpu01", "gpu003"), ("node7", "node7"),
                                             ("a100-[12,14]", "a100-12"), ("127.0.0.1", "127.0.0.1")])
def test_the_meeting_host_is_the_first_of_the_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_every_node_of_a_job_derives_the_same_rendezvous_and_its_own_rank():
    slurm = {"SLURM_JOB_ID": "912345", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2"}
    commands = [launch_command(8, 2, ["train.py", "--x"], {**slurm, "SLURM_NODEID": str(rank)}) for rank in (0, 1)]
    options = [dict(zip(c[4:-2:2], c[5:-2:2])) for c in commands]
    assert [o["--machine_rank"] for o in options] == ["0", "1"]
    for o in options:
        assert o["--main_process_ip"] == "gpu01" and o["--num_processes"] == "16" and o["--num_machines"] == "2"
    assert options[0]["--main_process_port"] == options[1]["--main_process_port"]
    assert commands[0][-2:] == ["train.py", "--x"]
    assert launch_command(1, 1, ["train.py"], {}) == [sys.executable, "train.py"]


def test_a_multi_node_run_outside_slurm_says_how_to_submit_it():
    with pytest.raises(SystemExit, match="one launcher per node under SLURM.*SLURM_JOB_ID"):
        launch_command(4, 2, ["train.py"], {})
