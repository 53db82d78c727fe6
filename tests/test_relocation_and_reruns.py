"""Only stale stages rerun: a finished project that is moved or copied reruns
nothing, and each kind of edit (data, code, schema, a local base model's
weights) reruns exactly what depends on it. Checked with dry runs on copies of
a finished project, so the edits never touch the shared one."""
import json
import shutil

import pytest
import yaml

from workflow import copy_project, copy_workflow, per_run_jobs, planned_jobs, snakemake

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
                           *per_run(project, TRAINING + DOWNSTREAM_OF_TRAINING), "report_sweep"])


def test_editing_evaluation_only_code_reruns_evaluation_not_training(project):
    append(project / "scripts/metrics.py", "\n# an edit to the task metrics, which only evaluation uses\n")
    assert planned_jobs(project) == sorted(["all", "report_sweep", *per_run(project, DOWNSTREAM_OF_TRAINING)])


def test_editing_code_that_training_imports_retrains(project):
    append(project / "scripts/checkpoints.py", "\n# an edit to checkpointing\n")
    assert planned_jobs(project) == sorted(
        ["all", "report_sweep", PRETRAINING, *per_run(project, TRAINING + DOWNSTREAM_OF_TRAINING)]), \
        "pretraining runs the training script too"


def test_editing_code_no_rule_depends_on_reruns_nothing(project):
    append(project / "scripts/gpu_pool.py", "\n# the GPU pool assigns devices; it changes no result\n")
    append(project / "scripts/make_example_data.py", "\n# regenerates data/ by hand\n")
    assert planned_jobs(project) == []


def test_schema_help_edits_rerun_nothing_and_default_edits_rerun_their_stage(project):
    schema_path = project / "schemas/config.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    schema["$defs"]["run"]["properties"]["weight_decay"]["description"] = "reworded help"
    schema_path.write_text(yaml.safe_dump(schema, sort_keys=False))
    assert planned_jobs(project) == []
    schema["$defs"]["run"]["properties"]["weight_decay"]["default"] = 0.01
    schema_path.write_text(yaml.safe_dump(schema, sort_keys=False))
    assert planned_jobs(project) == sorted(
        ["all", "report_sweep", PRETRAINING, *per_run(project, TRAINING + DOWNSTREAM_OF_TRAINING)])


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
                                            "report_run[run=r4]", "manifest[run=r4]"])


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
    assert planned_jobs(project, "results/runs/replay/trained") == ["train[run=replay]"], "same shards, same model"
    snakemake(project, "--cores", "2", "results/runs/replay/trained")
    original = load_file(project / "results/runs/r4/trained/adapter_model.safetensors")
    again = load_file(project / "results/runs/replay/trained/adapter_model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[name], again[name]) for name in original)
