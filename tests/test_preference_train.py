"""Preference objectives in the training loop: every method starts exactly at the reference (the DPO loss
of a fresh adapter is ln 2) and learns; a killed DPO run resumes; keep: best keeps the weights of the lowest
held-out preference loss; FSDP over two processes learns what one process learns."""
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, settings_args
from finetune.data.tokenization import tokenize_file
from finetune.data.validation import validate_file

TRAIN = [sys.executable, str(REPO / "scripts" / "train.py")]


@pytest.fixture(scope="session")
def preference_data(tmp_path_factory, tiny_model, tiny_tokenizer):
    """32 training and 64 held-out pairs of the example data as shards, with the tiny model's reference
    log-probabilities of them (unquantized, and as a 4bit base), as the workflow's rules write them."""
    import reference_logps
    folder = tmp_path_factory.mktemp("preference")
    shards, references = [], {"none": [], "4bit": []}
    for name, count in (("preference_train", 32), ("preference_eval", 64)):
        raw = folder / f"{name}.raw.jsonl"
        raw.write_text("\n".join((REPO / "data" / f"{name}.jsonl").read_text().splitlines()[:count]) + "\n")
        validate_file(raw, folder / f"{name}.jsonl", folder / f"{name}.rejected.jsonl")
        shard = folder / f"{name}.arrow"
        tokenize_file(folder / f"{name}.jsonl", tiny_tokenizer, "auto", 96, shard, split=name.split("_")[1])
        shards.append(shard)
        for quantization in references:
            output = folder / quantization / f"{name}.arrow"
            reference_logps.main(["--base-model", str(tiny_model), "--shard", str(shard), "--output", str(output),
                                  *settings_args(folder / quantization, "reference_logps", precision="fp32",
                                                 quantization=quantization)])
            references[quantization].append(output)
    return shards, references


def train_args(tiny_model, data, out, *paths, quantization="none", **settings):
    shards, references = data
    settings = {"precision": "fp32", "objective": "dpo", "learning_rate": 5e-3, "batch_size": 8, "log_every": 1,
                "target_modules": "all-linear", **settings}
    return ["--base-model", str(tiny_model), "--shards", *map(str, shards), "--reference",
            *map(str, references[quantization]), "--output-dir", str(out / "trained"), "--metrics",
            str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"), "--run-name", out.name, "--threads", "1",
            *paths, *settings_args(out.parent / "settings" / out.name, "train", **settings)]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "adalora", "full"])
def test_every_method_starts_at_the_reference_and_learns_to_prefer(tmp_path, tiny_model, preference_data, method):
    """The first step's loss is ln 2 for every method: the reference log-probabilities (a rule of their own)
    are exactly those of the model a fresh adapter (or a full run) starts from, quantized or not. Then the
    reward accuracy rises above chance."""
    import train
    quantization = "4bit" if method == "qlora" else "none"
    learning_rate = 5e-2 if method == "adalora" else 5e-3  # AdaLoRA grows its singular values from 0
    train.main(train_args(tiny_model, preference_data, tmp_path / method, quantization=quantization, method=method,
                          max_steps=24, learning_rate=learning_rate, dropout=0.0))
    metrics = rows(tmp_path / method)
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=2e-4), "step 1 is scored against its own base"
    assert metrics[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    late = metrics[-4:]
    assert sum(r["loss"] for r in late) / 4 < math.log(2) - 0.02, metrics
    assert sum(r["reward_accuracy"] for r in late) / 4 > 0.6, metrics
    assert "eval_loss" in metrics[-1]


def test_a_killed_dpo_run_resumes_and_matches_an_uninterrupted_one(tmp_path, tiny_model, preference_data):
    from test_train_resume_and_scale import env, kill_after_checkpoint
    steps = {"max_steps": 24, "eval_every": 12, "log_every": 4, "learning_rate": 5e-3}
    straight = tmp_path / "straight"
    subprocess.run(TRAIN + train_args(tiny_model, preference_data, straight, **steps), env=env(), check=True,
                   capture_output=True)
    resumed, checkpoints = tmp_path / "resumed", tmp_path / "checkpoints"
    command = TRAIN + train_args(tiny_model, preference_data, resumed, "--checkpoint-dir", str(checkpoints), **steps,
                                 checkpoint_every=4)
    killed_at = kill_after_checkpoint(command, checkpoints, min_step=8)
    assert not (resumed / "trained").exists()
    result = subprocess.run(command, env=env(), check=True, capture_output=True, text=True)
    assert f"resuming from the checkpoint at step {killed_at}" in result.stdout + result.stderr
    for key in ("loss", "eval_loss", "reward_accuracy"):
        assert rows(resumed)[-1][key] == pytest.approx(rows(straight)[-1][key], abs=1e-3), key


def test_keep_best_keeps_the_weights_of_the_lowest_heldout_preference_loss(tmp_path, tiny_model, preference_data):
    """keep: best and early stopping compare the objective's held-out loss (here dpo's), not an SFT loss."""
    import train
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.data.shards import read_shards
    from finetune.data.tokenizer import load_tokenizer
    from finetune.settings import read_settings
    from finetune.training.objectives import heldout_objective_loss
    out = tmp_path / "best"
    # A learning rate so high that the held-out loss turns up again: the best weights are not the last.
    train.main(train_args(tiny_model, preference_data, out, max_steps=40, eval_every=5, learning_rate=0.2,
                          keep="best", early_stopping={"patience": 3}))
    evaluations = [(r["step"], r["eval_loss"]) for r in rows(out) if "eval_loss" in r]
    best_step, best_loss = min(evaluations, key=lambda e: e[1])
    assert best_step < evaluations[-1][0], evaluations
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "trained").eval()
    shards, references = preference_data
    examples = read_shards(shards, "eval")
    examples.attach_reference(references["none"])
    settings = read_settings(out.parent / "settings" / "best" / "train-settings.json", "train")
    pad = load_tokenizer(tiny_model).pad_token_id
    assert heldout_objective_loss(model, examples, settings, "preference", 8, pad) == pytest.approx(best_loss,
                                                                                                   abs=1e-4)


def test_dpo_under_fsdp_on_two_processes_learns_what_one_process_learns(tmp_path, tiny_model, preference_data):
    from test_distributed import launch
    same_global_batch = {"max_steps": 16, "batch_size": 4, "eval_every": 16, "log_every": 4, "dropout": 0.0}
    single = tmp_path / "single"
    subprocess.run(TRAIN + train_args(tiny_model, preference_data, single, **same_global_batch, grad_accum=2),
                   check=True, capture_output=True)
    sharded = tmp_path / "fsdp"
    result = launch(2, *train_args(tiny_model, preference_data, sharded, **same_global_batch, distributed="fsdp"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), FSDP" in result.stdout + result.stderr
    for key in ("loss", "eval_loss", "reward_accuracy"):
        assert rows(sharded)[-1][key] == pytest.approx(rows(single)[-1][key], rel=0.01, abs=1e-3), key
