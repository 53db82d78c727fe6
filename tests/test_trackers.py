"""Experiment trackers through accelerate: TensorBoard by default, MLflow with a
local file store, W&B offline; a tracker that is not installed stops the run
before it loads the model, with the pip command."""
import json

import pytest

import train
from conftest import settings_args
from finetune.settings import write_settings
from finetune.training import log as training_log

QUICK = dict(r=8, alpha=16, learning_rate=1e-2, max_steps=12, log_every=4, eval_every=8, precision="fp32")


def run_train(tmp_path, tiny_model, shards, *paths, settings=None, **values):
    """train.main with `paths` (more path flags) and QUICK updated with `values`; `settings`: the
    arguments of a settings file written otherwise."""
    out = tmp_path / "run"
    settings = settings or settings_args(tmp_path / "settings", "train", **{**QUICK, **values})
    train.main(["--base-model", str(tiny_model), "--shards", *map(str, shards), "--output-dir", str(out / "trained"),
                "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"),
                "--run-name", "tracked", *paths, *settings])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_mlflow_file_store_holds_the_losses_of_metrics_jsonl(tmp_path, tiny_model, shards, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = run_train(tmp_path, tiny_model, shards, "--tracker-dir", str(tmp_path / "trackers"),
                     "--tensorboard-dir", str(tmp_path / "tb"), trackers=["mlflow"], tracker_project="sweep-a")
    client = MlflowClient(tracking_uri=(tmp_path / "trackers" / "mlflow").resolve().as_uri())
    experiment = client.get_experiment_by_name("sweep-a")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["r"] == "8" and run.data.params["learning_rate"] == "0.01"
    logged = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert logged == [(row["step"], pytest.approx(row["loss"], rel=1e-6)) for row in rows]
    evals = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/loss")]
    assert evals == [(row["step"], pytest.approx(row["eval_loss"], rel=1e-6)) for row in rows if "eval_loss" in row]
    assert (tmp_path / "tb").is_dir() and not any((tmp_path / "tb").iterdir()), "tensorboard was not asked for"


def test_a_tracker_that_is_not_installed_stops_before_training_with_the_pip_command(tmp_path, tiny_model, shards,
                                                                                     monkeypatch):
    real_find_spec = training_log.importlib.util.find_spec
    monkeypatch.setattr(training_log.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    loaded = []
    monkeypatch.setattr(train, "setup", lambda *args: loaded.append(args))
    with pytest.raises(SystemExit) as stop:
        run_train(tmp_path, tiny_model, shards, trackers=["tensorboard", "wandb"])
    assert "tracker 'wandb' is not installed: pip install wandb" in str(stop.value)
    assert loaded == [] and not (tmp_path / "run").exists()


def test_unknown_trackers_are_refused_by_the_settings(tmp_path, tiny_model, shards):
    path = tmp_path / "neptune.json"  # written as it is: write_settings would refuse it itself
    path.write_text(json.dumps({**json.loads(write_settings(path, "train", **QUICK).read_text()),
                                "trackers": ["neptune"]}))
    with pytest.raises(SystemExit) as stop:
        run_train(tmp_path, tiny_model, shards, settings=["--settings", str(path)])
    assert str(stop.value) == (f"{path}: not the settings of train: "
                               "'trackers': 'neptune' is not one of ['tensorboard', 'mlflow', 'wandb']")


def test_wandb_runs_offline_into_the_tracker_folder(tmp_path, tiny_model, shards, monkeypatch, capfd):
    """Where wandb is installed (CI does not install it: this test then skips)."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    rows = run_train(tmp_path, tiny_model, shards, "--tracker-dir", str(tmp_path / "trackers"), trackers=["wandb"])
    [offline_run] = (tmp_path / "trackers" / "wandb").glob("offline-run-*")
    assert list(offline_run.glob("run-*.wandb"))[0].stat().st_size > 0
    printed = capfd.readouterr()
    assert f"train/loss {rows[-1]['loss']:.5g}" in " ".join((printed.out + printed.err).split())
