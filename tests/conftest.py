"""Fixtures shared by the tests. The stage scripts (scripts/) are importable in tests
through pytest.ini's pythonpath; the shared code is the installed package (finetune)."""
import os
from pathlib import Path

import pytest

from finetune.data.validation import validate_file
from finetune.settings import write_settings
from finetune.tiny_model import build_tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def settings_args(folder, stage, **values):
    """["--settings", path] of a settings file for `stage` written in `folder`: the values over the
    declared defaults (the way the workflow writes a stage's share of the settings)."""
    return ["--settings", str(write_settings(Path(folder) / f"{stage}-settings.json", stage, **values))]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Llama model built offline the way the workflow builds its default (random weights: the
    workflow then pretrains it; the stage tests need no skill, only the same code path)."""
    return build_tiny_model([REPO / "data" / "pretrain_corpus.jsonl"], tmp_path_factory.mktemp("model") / "tiny",
                            vocab_size=512, hidden_size=64, num_layers=2, initializer_range=0.1)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from finetune.data.tokenizer import load_tokenizer
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def example_records(tmp_path_factory):
    """Normalized records of the shipped example data: the first 200 of each task file."""
    import json
    out = tmp_path_factory.mktemp("validated")
    records = []
    for name in ("word_tasks", "number_tasks"):
        validate_file(REPO / "data" / f"{name}.jsonl", out / f"{name}.jsonl", out / f"{name}.rejected.jsonl")
        records += [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()[:200]]
    return records


@pytest.fixture(scope="session")
def shards(tmp_path_factory, tiny_tokenizer, example_records):
    """The example data tokenized into two shards, as the tokenize rule writes them."""
    import json

    from finetune.data.tokenization import tokenize_file
    folder = tmp_path_factory.mktemp("shards")
    paths = []
    for name, part in [("words", example_records[:200]), ("numbers", example_records[200:])]:
        records = folder / f"{name}.jsonl"
        records.write_text("".join(json.dumps(r) + "\n" for r in part))
        tokenize_file(records, tiny_tokenizer, "auto", 128, folder / f"{name}.arrow")
        paths.append(folder / f"{name}.arrow")
    return paths


TRAIN_STEPS = 60


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model, shards):
    """A short LoRA run on the tiny model; returns its output folder."""
    import train
    out = tmp_path_factory.mktemp("run")
    train.main(["--base-model", str(tiny_model), "--shards", *map(str, shards), "--output-dir", str(out / "trained"),
                "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "train_summary.json"),
                "--run-name", "test-run",
                *settings_args(out, "train", r=8, alpha=16, learning_rate=1e-2, max_steps=TRAIN_STEPS, log_every=10,
                               eval_every=30, precision="fp32")])
    return out


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """The shipped default workflow, run to completion with Snakemake on a copy (slow tests only)."""
    from workflow import copy_workflow, snakemake
    workdir = copy_workflow(tmp_path_factory.mktemp("e2e") / "wf")
    result = snakemake(workdir, "--cores", "2")
    (workdir.parent / "snakemake-output.txt").write_text(result.stdout + result.stderr)  # beside, not in, the project
    return workdir


@pytest.fixture(scope="session")
def grpo_finished(finished, tmp_path_factory):
    """A copy of the finished default project with the GRPO example over it (config/grpo.yaml: runs sft-short
    and grpo chained on it), run to completion (slow tests only)."""
    from workflow import copy_project, snakemake
    project = copy_project(finished, tmp_path_factory.mktemp("grpo") / "wf")
    result = snakemake(project, "--cores", "2", "--configfile", "config/grpo.yaml", timeout=1800)
    (project.parent / "snakemake-output.txt").write_text(result.stdout + result.stderr)
    return project
