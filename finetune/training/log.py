"""What a training run writes as it goes, on its main process only: a row of
metrics.jsonl per logging step, the answers to the sample prompts in
samples.jsonl, and both to the experiment trackers the run names, through
accelerate's tracker classes:

- tensorboard (the default): event files in --tensorboard-dir;
- mlflow: an MLflow run named after the run, in the experiment --tracker-project,
  stored in MLFLOW_TRACKING_URI when it is set (a server, sqlite:///...), else in the
  local file store {--tracker-dir}/mlflow (`MLFLOW_ALLOW_FILE_STORE=true mlflow ui
  --backend-store-uri results/trackers/mlflow`);
- wandb: a W&B run, offline unless WANDB_MODE says otherwise, in {--tracker-dir}/wandb
  (`wandb sync results/trackers/wandb/offline-run-*` uploads it later).

A tracker that is not installed stops the run before it loads the model, with the pip command.
"""
import contextlib
import fcntl
import importlib.util
import json
import os
from pathlib import Path

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def missing_trackers(names):
    """The trackers among `names` whose package is not installed, with the pip command for each."""
    missing = [name for name in names if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None]
    return [f"tracker '{name}' is not installed: pip install {TRACKER_PACKAGES[name]}" for name in missing]


@contextlib.contextmanager
def exclusive(folder):
    """One process at a time: jobs that start together would each create the same MLflow experiment."""
    if folder is None:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def hyperparameters(settings):
    """The run's settings as trackers take them: numbers, booleans and strings."""
    def plain(value):
        if value is None or isinstance(value, (list, dict, tuple)):
            return json.dumps(value, default=str)
        return str(value) if isinstance(value, Path) else value
    return {name: plain(value) for name, value in settings.items()}


def start_trackers(names, run_name, project, tensorboard_dir, tracker_dir, settings):
    """accelerate's trackers for `names`, started, with the run's settings as hyperparameters."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker
    if tensorboard_dir:  # an output of the rule, also when the run logs to other trackers only
        Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
    trackers = []
    for name in names:
        if name == "tensorboard" and tensorboard_dir:
            trackers.append(TensorBoardTracker("", tensorboard_dir))
        elif name == "mlflow":
            import mlflow
            if not os.environ.get("MLFLOW_TRACKING_URI") and tracker_dir:
                # MLflow 3 keeps the file store (no database to set up, nothing to serve) behind an opt-in.
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((Path(tracker_dir) / "mlflow").resolve().as_uri())
            trackers.append(MLflowTracker(experiment_name=project, run_name=run_name))
        elif name == "wandb":
            folder = Path(tracker_dir or ".").resolve()
            folder.mkdir(parents=True, exist_ok=True)
            trackers.append(WandBTracker(project, name=run_name, dir=str(folder),
                                         mode=os.environ.get("WANDB_MODE", "offline")))
    with exclusive(tracker_dir):
        for tracker in trackers:
            tracker.start()
            tracker.store_init_configuration(hyperparameters(settings))
    return trackers


def markdown_table(rows, keys):
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(cell(row[key]) for key in keys) + " |" for row in rows])


class TrainingLog:
    """metrics.jsonl, samples.jsonl and the trackers, written by the main process only."""

    def __init__(self, metrics_path, samples_path, trackers, enabled):
        self.file = self.samples = None
        self.trackers = trackers if enabled else []
        if not enabled:
            return
        Path(metrics_path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(metrics_path, "w")
        self.samples = open(samples_path, "w", encoding="utf-8") if samples_path else None

    def replay(self, history):
        """The rows a resumed run wrote before (its checkpoint's history), written again."""
        for row in history["metrics"]:
            self.record(row)
        for step in sorted({row["step"] for row in history["samples"]}):
            self.record_samples([row for row in history["samples"] if row["step"] == step])

    def record(self, row):
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        values = {(f"train/{key}" if key != "eval_loss" else "eval/loss"): value
                  for key, value in row.items() if key != "step"}
        for tracker in self.trackers:
            tracker.log(values, step=row["step"])

    def record_samples(self, rows):
        if self.samples is None or not rows:
            return
        self.samples.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.samples.flush()
        table = markdown_table(rows, ("prompt", "reference", "answer"))
        for tracker in self.trackers:
            if tracker.name != "mlflow":  # MLflow logs numbers only
                tracker.log({"samples": table}, step=rows[0]["step"])

    def close(self):
        for handle in (self.file, self.samples):
            if handle is not None:
                handle.close()
        for tracker in self.trackers:
            tracker.finish()
