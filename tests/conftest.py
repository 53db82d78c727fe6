import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from build_tiny_model import build_tiny_model  # noqa: E402
from validate_data import validate_file  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny Llama model built offline the way the workflow builds its default (random weights: the
    workflow then pretrains it; the stage tests need no skill, only the same code path)."""
    return build_tiny_model([REPO / "data" / "pretrain_corpus.jsonl"], tmp_path_factory.mktemp("model") / "tiny",
                            vocab_size=512, hidden_size=64, num_layers=2, initializer_range=0.1)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from prompts import load_tokenizer
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

    from tokenize_data import tokenize_file
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
                "--run-name", "test-run", "--r", "8", "--alpha", "16", "--learning-rate", "1e-2",
                "--max-steps", str(TRAIN_STEPS), "--log-every", "10", "--eval-every", "30", "--precision", "fp32"])
    return out


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """The shipped default workflow, run to completion with Snakemake on a copy (slow tests only)."""
    from workflow import copy_workflow, snakemake
    workdir = copy_workflow(tmp_path_factory.mktemp("e2e") / "wf")
    snakemake(workdir, "--cores", "2")
    return workdir
