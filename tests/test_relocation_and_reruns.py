"""Only stale stages rerun: a finished project that is moved or copied reruns
nothing, and each kind of edit (data, code, schema, a local base model's
weights) reruns exactly what depends on it. Checked with dry runs on copies of
a finished project, so the edits never touch the shared one."""
import itertools
import json
import re
import shutil

import pytest
import yaml

from conftest import REPO
from workflow import copy_project, copy_workflow, per_run_jobs, planned_jobs, run_settings, snakemake

pytestmark = pytest.mark.slow

TRAINING = ("train", "manifest")
DOWNSTREAM_OF_TRAINING = ("evaluate", "export", "merge", "report_run")
PRETRAINING = "pretrain[model=tiny-llama]"


def per_run(workdir, rules):
    return per_run_jobs(workdir, rules)


def append(path, text):
    path.write_text(path.read_text() + text)


@pytest.fixture
def project(finished, tmp_path):
    """A copy of the finished default project at another path."""
    return copy_project(finished, tmp_path / "elsewhere")


def test_a_copied_or_moved_project_reruns_nothing(project, tmp_path):
    assert planned_jobs(project) == []
    moved = tmp_path / "renamed" / "checkout"
    moved.parent.mkdir()
    shutil.move(project, moved)
    assert planned_jobs(moved) == []


def test_a_data_edit_after_the_copy_reruns_what_it_would_in_place(project):
    record = {"instruction": "What is the first word?", "input": "lemon kiwi", "output": "lemon"}
    append(project / "data/word_tasks.jsonl", json.dumps(record) + "\n")
    jobs = planned_jobs(project)
    tokenize = [j for j in jobs if j.startswith("tokenize[")]
    assert len(tokenize) == 1 and "dataset=word_tasks" in tokenize[0]
    assert jobs == sorted(["all", "validate[dataset=word_tasks]", "dataset_stats[dataset=word_tasks]", *tokenize,
                           *per_run(project, TRAINING + DOWNSTREAM_OF_TRAINING), "report_sweep",
                           "serving[model=tiny-llama]"])


def docs_examples():
    """(edit, what reruns) of each row of the examples table in docs/reruns.md."""
    table = (REPO / "docs" / "reruns.md").read_text().split("## Examples", 1)[1]
    rows = [line.strip().strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    return [(edit.strip(), reruns.strip()) for edit, reruns in rows[1:] if not set(edit) <= set("-")]


def set_key(path, dotted, text):
    """Set a dotted key (runs.lora-r16.r) of a YAML file to a YAML value."""
    document = yaml.safe_load(path.read_text())
    *parents, key = dotted.split(".")
    node = document
    for parent in parents:
        node = node.setdefault(parent, {})
    node[key] = yaml.safe_load(text)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


def perform(project, edit):
    """Make the edit a row of docs/reruns.md names (a config or schema key, a data file, a code file)."""
    target = re.search(r"`([^`]+)`", edit).group(1)
    if edit.endswith(("in the config", "in the schema")):
        file = "config/config.yaml" if edit.endswith("in the config") else "schemas/config.schema.yaml"
        set_key(project / file, *target.split(": ", 1))
    elif target.endswith(".jsonl"):
        record = {"instruction": "What is the first word?", "input": "List: lemon kiwi",
                  "output": "The first word is lemon."}
        append(project / target, json.dumps(record) + "\n")
    else:
        append(project / target, "\n# an edit\n")


def expected_jobs(project, reruns):
    """The jobs a row's 'what reruns' names: `rule` (or `stage.json`, a settings file) of a run, a
    dataset, a base model, or of every one of them; a rule without a scope is the rule's one job."""
    config = yaml.safe_load((project / "config/config.yaml").read_text())
    runs = run_settings(project)
    samplers = [run for run, settings in runs.items() if settings.get("sample_every") and config["eval"]["prompts"]]
    tokenizations = {dataset: sorted(shard.parent.name for shard in (project / "results/tokens").glob(f"*/{dataset}.arrow"))
                     for dataset in config["datasets"]}
    scopes = {"every run": ("run", list(runs)), "every run that samples": ("run", samplers),
              "every dataset": ("dataset", list(config["datasets"]))}
    scopes.update({name: ("run", [name]) for name in runs})
    scopes.update({name: ("dataset", [name]) for name in config["datasets"]})
    scopes.update({name: ("model", [name]) for name in config["base_models"]})
    jobs = set()
    for group in ([] if reruns == "nothing" else reruns.split("; ")):
        names, scope = re.findall(r"`([^`]+)`", group), group.split(" of ", 1)[1] if " of " in group else None
        kind, subjects = scopes[scope] if scope else (None, [None])
        for name, subject in itertools.product(names, subjects):
            if kind == "run" and name.endswith(".json"):
                jobs.add(f"run_settings[run={subject}]" if name == "settings.json"
                         else f"settings[subject=runs/{subject}, stage={name[:-5]}]")
            elif kind == "run":
                jobs.update(job for job in per_run_jobs(project, [name]) if f"[run={subject}" in job)
            elif kind == "dataset" and name == "tokenize":
                jobs.update(f"tokenize[tokenization={t}, dataset={subject}]" for t in tokenizations[subject])
            elif kind == "dataset":
                jobs.add(f"{name}[dataset={subject}]")
            elif kind == "model":
                jobs.add(f"settings[subject=pretrain/{subject}, stage={name[:-5]}]" if name.endswith(".json")
                         else f"{name}[model={subject}]")
            else:
                jobs.add(name)
    return sorted(jobs | {"all"}) if jobs else []


def test_each_rerun_example_in_the_docs_is_what_snakemake_plans(finished, tmp_path):
    """Every row of docs/reruns.md's examples: the edit on a copy of the finished default project
    plans exactly the jobs the row names (each edit undone before the next)."""
    examples = docs_examples()
    assert len(examples) >= 15
    project = copy_project(finished, tmp_path / "project")
    files = [project / "config/config.yaml", project / "schemas/config.schema.yaml"]
    for edit, reruns in examples:
        target = re.search(r"`([^`]+)`", edit).group(1)
        touched = files + ([project / target] if (project / target).is_file() else [])
        originals = {path: path.read_bytes() for path in touched}
        perform(project, edit)
        try:
            assert planned_jobs(project) == expected_jobs(project, reruns), edit
        finally:
            for path, content in originals.items():
                path.write_bytes(content)
    assert planned_jobs(project) == [], "every edit undone"


LOCAL_MODEL_CONFIG = """
base_models:
  local-tiny: {name_or_path: models/tiny}
datasets:
  word_tasks: {path: data/word_tasks.jsonl, format: alpaca}
eval: {num_samples: 2, max_new_tokens: 4}
run_defaults: {max_steps: 10, log_every: 5, max_length: 128, batch_size: 4, checkpoint_every: 0, target_modules: all-linear}
runs:
  r4: {r: 4, alpha: 8}
"""


@pytest.fixture(scope="module")
def local_model_project(tmp_path_factory, tiny_model):
    """A finished project whose base model is a local folder inside it (not built by the workflow)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("local") / "wf")
    shutil.copytree(tiny_model, workdir / "models" / "tiny")
    (workdir / "config" / "config.yaml").write_text(LOCAL_MODEL_CONFIG)
    snakemake(workdir, "--cores", "2")
    return workdir


def test_a_local_base_model_inside_the_project_moves_with_it(local_model_project, tmp_path):
    project = copy_project(local_model_project, tmp_path / "copy")
    assert planned_jobs(project) == []
    assert (project / "results/runs/r4/merged/model.safetensors").exists()


def test_replacing_a_local_base_models_weights_reruns_what_used_them(local_model_project, tmp_path):
    from safetensors.torch import load_file, save_file
    project = copy_project(local_model_project, tmp_path / "copy")
    weights = project / "models/tiny/model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 1.5
    save_file(tensors, weights, metadata={"format": "pt"})
    assert planned_jobs(project) == sorted(["all", "report_sweep", "train[run=r4]", "evaluate[run=r4]",
                                            "export[run=r4, published=adapter]", "merge[run=r4]",
                                            "export[run=r4, published=merged]", "report_run[run=r4]",
                                            "manifest[run=r4]", "serving[model=local-tiny]"])


def test_editing_a_local_base_models_tokenizer_retokenizes(local_model_project, tmp_path):
    project = copy_project(local_model_project, tmp_path / "copy")
    tokenizer_config = project / "models/tiny/tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["model_max_length"] = 4096
    tokenizer_config.write_text(json.dumps(settings))
    jobs = planned_jobs(project)
    assert [j for j in jobs if j.startswith("tokenize[")] and "train[run=r4]" in jobs
    assert "validate[dataset=word_tasks]" not in jobs


def sha256(path):
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_run_trained_again_from_its_manifest_gives_the_identical_adapter(local_model_project, tmp_path):
    import torch
    from safetensors.torch import load_file
    project = copy_project(local_model_project, tmp_path / "copy")
    manifest = json.loads((project / "results/runs/r4/manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["libraries"]["torch"] == torch.__version__
    assert manifest["device"]["type"] == "cpu" and manifest["workflow"] is None, "a copied workflow is no git checkout"
    assert manifest["base_model"]["files_sha256"]["config.json"] == sha256(project / "models/tiny/config.json")
    shard = manifest["shards"]["word_tasks"]
    assert shard["sha256"] == sha256(project / shard["file"])
    assert shard["sha256"][:16] in (project / "results/runs/r4/report.html").read_text()
    assert "## Reproducibility" in (project / "results/runs/r4/adapter/README.md").read_text()
    assert json.loads((project / "results/runs/r4/adapter/manifest.json").read_text()) == manifest

    config = yaml.safe_load((project / "config/config.yaml").read_text())
    config["runs"]["replay"] = manifest["settings"]
    (project / "config/config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert planned_jobs(project, "results/runs/replay/trained") == [
        "settings[subject=runs/replay, stage=train]", "train[run=replay]"], "same shards, same model"
    snakemake(project, "--cores", "2", "results/runs/replay/trained")
    train_settings = "results/runs/{}/settings/train.json"
    assert (project / train_settings.format("replay")).read_text() == (project / train_settings.format("r4")).read_text()
    original = load_file(project / "results/runs/r4/trained/adapter_model.safetensors")
    again = load_file(project / "results/runs/replay/trained/adapter_model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[name], again[name]) for name in original)
