"""keep: best and early stopping, through train.py's command line as the rule runs it: the
chosen step, the stop step and its reason, the weights written, and the same decisions after
a kill -9 and a resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import train
from conftest import REPO
from finetune.training.selection import new_record, note_evaluation, stop_reason
from test_train_resume_and_scale import env, kill_after_checkpoint, train_args

TRAIN = [sys.executable, str(REPO / "scripts" / "train.py")]
# A constant learning rate: the first 10 steps are the same whatever max_steps is.
CONSTANT = {"lr_scheduler": "constant_with_warmup", "warmup_ratio": 0, "eval_every": 10}
# No held-out loss can improve on the first by more than 10: evaluations 2, 3, ... never count.
NEVER_BETTER = {"early_stopping": {"patience": 3, "min_delta": 10}}


def summary_of(out):
    return json.loads((out / "summary.json").read_text())


def adapter_of(out):
    return load_file(out / "trained" / "adapter_model.safetensors")


def test_an_evaluation_counts_as_improvement_only_below_the_best_by_more_than_min_delta():
    record = new_record()
    assert note_evaluation(record, 10, 2.0, 0.1)
    assert not note_evaluation(record, 20, 1.95, 0.1)
    assert stop_reason(record, {"patience": 2, "min_delta": 0.1}) is None
    assert note_evaluation(record, 30, 1.8, 0.1) and record["evaluations_without_improvement"] == 0
    assert not note_evaluation(record, 40, 1.9, 0.1) and not note_evaluation(record, 50, 1.85, 0.1)
    assert stop_reason(record, {"patience": 2}).startswith("early stopping: 2 evaluations without lowering the "
                                                          "best held-out loss (1.8000 at step 30)")
    assert stop_reason(record, None) is None


def test_early_stopping_stops_and_keep_best_writes_the_weights_of_the_best_evaluation(tmp_path, tiny_model, shards):
    stopped = tmp_path / "stopped"
    train.main(train_args(tiny_model, shards, stopped, max_steps=200, **CONSTANT, **NEVER_BETTER, keep="best"))
    summary = summary_of(stopped)
    assert (summary["best_step"], summary["stopped_at_step"], summary["kept"]) == (10, 40, "best")
    assert summary["stop_reason"].startswith("early stopping: 3 evaluations without lowering")
    rows = [json.loads(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40

    ten_steps = tmp_path / "ten"
    train.main(train_args(tiny_model, shards, ten_steps, max_steps=10, **CONSTANT))
    kept, reference = adapter_of(stopped), adapter_of(ten_steps)
    assert kept.keys() == reference.keys()
    for name in kept:
        assert (kept[name] - reference[name]).abs().max() < 1e-6, name

    last = tmp_path / "last"
    train.main(train_args(tiny_model, shards, last, max_steps=200, **CONSTANT, **NEVER_BETTER))
    assert summary_of(last)["kept"] == "last" and summary_of(last)["stopped_at_step"] == 40
    assert any((adapter_of(last)[name] - reference[name]).abs().max() > 1e-4 for name in reference)


def test_a_killed_run_resumes_to_the_same_best_step_stop_and_weights(tmp_path, tiny_model, shards):
    straight = tmp_path / "straight"
    settings = {"max_steps": 200, **CONSTANT, **NEVER_BETTER, "keep": "best"}
    train.main(train_args(tiny_model, shards, straight, **settings))
    resumed, checkpoints = tmp_path / "resumed", tmp_path / "checkpoints"
    command = TRAIN + train_args(tiny_model, shards, resumed, "--checkpoint-dir", str(checkpoints), **settings,
                                 checkpoint_every=5)
    killed_at = kill_after_checkpoint(command, checkpoints, min_step=20)
    assert 20 <= killed_at < 40 and (checkpoints / "best.safetensors").exists()
    result = subprocess.run(command, env=env(), check=True, capture_output=True, text=True)
    assert f"resuming from the checkpoint at step {killed_at}" in result.stdout + result.stderr
    for key in ("best_step", "best_eval_loss", "stopped_at_step", "stop_reason"):
        assert summary_of(resumed)[key] == summary_of(straight)[key], key
    for name, tensor in adapter_of(straight).items():
        assert (adapter_of(resumed)[name] - tensor).abs().max() < 1e-6, name


@pytest.mark.parametrize("settings, message", [
    ({"keep": "best", "eval_every": 0}, "keep compares held-out losses between evaluations: set eval_every"),
    ({"early_stopping": {"patience": 0}}, "'early_stopping': 0 is less than the minimum of 1"),
])
def test_selection_without_evaluations_is_refused(tmp_path, tiny_model, shards, settings, message):
    args = train_args(tiny_model, shards, tmp_path / "run", max_steps=5)
    path = Path(args[args.index("--settings") + 1])  # the given values as they are, unchecked
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    with pytest.raises(SystemExit) as stopped:
        train.main(args)
    assert str(path) in str(stopped.value.code) and message in str(stopped.value.code)
