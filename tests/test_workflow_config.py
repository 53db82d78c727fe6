"""The DAG and config checks: fast dry runs on a copy of the workflow."""
import pytest
import yaml

from workflow import copy_workflow, planned_jobs, snakemake


@pytest.fixture
def workdir(tmp_path):
    return copy_workflow(tmp_path / "wf")


def write_config(workdir, text):
    (workdir / "override.yaml").write_text(text)
    return ["--configfile", "override.yaml"]


def test_lint_is_clean(workdir):
    result = snakemake(workdir, "--lint")
    assert "Congratulations, your workflow is in a good condition!" in result.stdout + result.stderr


def test_rules_are_formatted_as_snakefmt_writes_them():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO
    snakefmt = shutil.which("snakefmt", path=str(Path(sys.executable).parent))
    if snakefmt is None:
        pytest.skip("snakefmt is not installed (pip install -r requirements-test.txt)")
    result = subprocess.run([snakefmt, "--check", "Snakefile", "rules"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_dag_has_one_training_job_per_run_and_shared_shards(workdir):
    jobs = planned_jobs(workdir)
    runs = yaml.safe_load((workdir / "config" / "config.yaml").read_text())["runs"]
    assert sorted(runs) == ["full", "lora-r16"]
    assert [j for j in jobs if j.startswith("train[")] == sorted(f"train[run={r}]" for r in runs)
    tokenize = [j for j in jobs if j.startswith("tokenize[")]
    assert len(tokenize) == 2, "both runs share one tokenization of each task dataset"
    for rule, count in [("validate", 3), ("dataset_stats", 3), ("evaluate", 2), ("report_run", 2), ("export", 3)]:
        assert sum(j.startswith(f"{rule}[") for j in jobs) == count, rule
    assert "export[run=lora-r16, published=merged]" in jobs, "the merged model is published with its card too"
    assert [j for j in jobs if j.startswith("merge[")] == ["merge[run=lora-r16]"], "a full run has nothing to merge"
    for job in ("build_tiny_model[model=tiny-llama]", "tokenize_corpus[model=tiny-llama]", "pretrain[model=tiny-llama]"):
        assert job in jobs


@pytest.mark.parametrize("override, message", [
    ("runs:\n  lora-r16:\n    rank: 8\n", "'rank' was unexpected"),
    ("runs:\n  lora-r16:\n    r: eight\n", "'eight' is not of type 'integer'"),
    ("runs:\n  lora-r16:\n    target_modules: q_proj\n", "target_modules"),
    ("runs:\n  lora-r16:\n    base_model: llama-9000\n", "run 'lora-r16': unknown base model 'llama-9000'"),
    ("runs:\n  lora-r16:\n    datasets: [nope]\n", "run 'lora-r16': unknown dataset 'nope'"),
    ("eval:\n  fraction: 2\n", "fraction"),
    ("runs:\n  full:\n    merge: true\n", "run 'full': merge does not apply to method full"),
    ("runs:\n  full:\n    hub: {repo_id: me/x, what: adapter}\n", "run 'full': hub.what 'adapter' does not fit method full"),
    ("base_models:\n  tiny-llama:\n    build_tiny:\n      pretrain: {method: lora}\n",
     "base model 'tiny-llama': pretraining is always method full"),
    ("base_models:\n  tiny-llama:\n    build_tiny:\n      corpus: nope\n",
     "base model 'tiny-llama': build_tiny.corpus 'nope' is not a dataset"),
    ("runs:\n  full:\n    quantization: 4bit\n", "run 'full': method full trains every weight and cannot load the base "
                                                 "quantized (quantization 4bit)"),
    ("runs:\n  lora-r16:\n    method: qlora\n    quantization: 8bit\n", "run 'lora-r16': qlora is LoRA on a 4bit base"),
    ("runs:\n  lora-r16:\n    quantization: 2bit\n", "'2bit' is not one of ['none', '4bit', '8bit']"),
    ("runs:\n  lora-r16:\n    method: adalora\n    distributed: fsdp\n",
     "run 'lora-r16': AdaLoRA reallocates ranks from whole adapter matrices, which FSDP splits"),
    ("runs:\n  lora-r16:\n    quantization: 8bit\n    distributed: fsdp\n", "FSDP cannot split bitsandbytes' int8"),
    ("runs:\n  lora-r16:\n    nodes: 2\n", "run 'lora-r16': nodes 2 spans GPU nodes of a SLURM cluster: set gpus"),
    ("runs:\n  lora-r16:\n    distributed: zero3\n", "'zero3' is not one of ['ddp', 'fsdp']"),
    ("runs:\n  lora-r16:\n    datasets: {word_tasks: 0}\n",
     "run 'lora-r16': datasets: the weight of 'word_tasks' must be a number > 0, got 0"),
    ("runs:\n  lora-r16:\n    datasets: {word_tasks: 1, poems: 1}\n", "run 'lora-r16': unknown dataset 'poems'"),
    ("sweeps:\n  lr-rank: {grid: {r: [8], learning_rate: [1.0e-4]}}\nruns:\n  lr-rank-r8-learning_rate0.0001: {}\n",
     "sweep 'lr-rank': its run 'lr-rank-r8-learning_rate0.0001' ({'r': 8, 'learning_rate': 0.0001}) collides "
     "with a run listed under runs"),
    ("sweeps:\n  s: {grid: {rank: [8, 16]}}\n", "sweep 's': grid key 'rank' is not a run setting"),
    ("sweeps:\n  s: {grid: {}}\n", "sweep 's': grid is empty"),
    ("sweeps:\n  s: {grid: {r: []}}\n", "sweep 's': grid key 'r' has no values"),
    ("sweeps:\n  s: {base: {r: 8}, grid: {r: [4]}}\n", "sweep 's': 'r' is set in both base and grid"),
    ("sweeps:\n  s: {base: {rank: 8}, grid: {r: [4]}}\n", "sweep 's': base key 'rank' is not a run setting"),
    ("sweeps:\n  s: {grid: {r: [0, 8]}}\n", "0 is less than the minimum of 1"),
    ("base_models:\n  llama: {name_or_path: meta-llama/Llama-3.2-1B-Instruct}\nruns:\n  lora-r16:\n"
     "    base_model: llama\n", "base model 'llama': meta-llama/Llama-3.2-1B-Instruct is not in the local Hugging Face "
     "cache, and the Hub cannot be reached offline (HF_HUB_OFFLINE is set). Download it where there is a network"),
])
def test_bad_config_fails_before_any_job_and_names_the_key(workdir, override, message):
    result = snakemake(workdir, "-n", *write_config(workdir, override), check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_training_jobs_declare_their_gpus(workdir):
    args = write_config(workdir, "run_defaults:\n  gpus: 1\n")
    result = snakemake(workdir, "-n", "--cores", "2", "--resources", "gpu=2", *args)
    train_blocks = [b for b in result.stdout.split("rule ") if b.startswith("train:")]
    assert len(train_blocks) == 2 and all("gpu=1" in b for b in train_blocks)
    assert "gpu=0" in next(b for b in result.stdout.split("rule ") if b.startswith("pretrain:")), \
        "pretraining has its own gpus setting"


def test_runs_that_change_max_length_get_their_own_shards(workdir):
    jobs = planned_jobs(workdir, *write_config(workdir, "runs:\n  lora-r16:\n    max_length: 64\n"))
    assert sum(j.startswith("tokenize[") for j in jobs) == 4


@pytest.mark.parametrize("example", ["llama-3.2-1b-sweep.yaml"])
def test_example_configs_are_valid_on_their_own(workdir, example):
    """Online (its Hub model is not in this machine's cache: offline it stops, see the bad-config table)."""
    jobs = planned_jobs(workdir, "--configfile", f"config/{example}", "--replace-workflow-config",
                        env={"HF_HUB_OFFLINE": "0"})
    runs = yaml.safe_load((workdir / "config" / example).read_text())["runs"]
    assert sorted(j for j in jobs if j.startswith("train[")) == sorted(f"train[run={r}]" for r in runs)
    assert not any(j.startswith("build_tiny_model") for j in jobs)


def test_bad_data_stops_the_workflow_at_validation_with_file_line_and_field(workdir):
    data = workdir / "data" / "number_tasks.jsonl"
    lines = data.read_text().splitlines()
    lines[4] = '{"instruction": "Double the number.", "input": "4", "output": null}'
    data.write_text("\n".join(lines) + "\n")
    result = snakemake(workdir, "--cores", "1", "results/data/number_tasks.jsonl", check=False)
    assert result.returncode != 0
    assert "data/number_tasks.jsonl:5: field 'output': expected string, got null" in result.stdout + result.stderr
    assert not list((workdir / "results" / "data").glob("number_tasks.*")), "no output of its validation"


def test_missing_data_file_is_named_before_any_job_runs(workdir):
    (workdir / "data" / "word_tasks.jsonl").unlink()
    result = snakemake(workdir, "--cores", "1", check=False)
    assert result.returncode != 0
    assert "Missing input files" in result.stderr and "data/word_tasks.jsonl" in result.stderr
    assert not (workdir / "results").exists()


def test_quarantine_mode_keeps_going_and_reports_rejects(workdir):
    data = workdir / "data" / "number_tasks.jsonl"
    data.write_text(data.read_text() + '{"instruction": "Double the number.", "output": 4}\n')
    args = write_config(workdir, "datasets:\n  number_tasks:\n    on_error: skip\n")
    snakemake(workdir, "--cores", "1", "results/data/number_tasks.validation.json", *args)
    stats = yaml.safe_load((workdir / "results/data/number_tasks.validation.json").read_text())
    assert stats["rejected"] == 1 and stats["rejected_by_reason"] == {"wrong_type": 1} and stats["records"] == 850
    assert "expected string, got integer" in (workdir / "results/data/number_tasks.rejected.jsonl").read_text()


def test_changing_the_template_makes_new_shards_not_reused_ones(workdir):
    before = {j for j in planned_jobs(workdir) if j.startswith("tokenize[")}
    args = write_config(workdir, "base_models:\n  tiny-llama:\n    template: alpaca\n")
    after = {j for j in planned_jobs(workdir, *args) if j.startswith("tokenize[")}
    assert len(after) == 2 and not before & after


def test_configured_upload_without_a_token_fails_before_any_job(workdir, tmp_path):
    args = write_config(workdir, "runs:\n  lora-r16:\n    hub: {repo_id: me/lora-r16}\n")
    no_token = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "empty-hf-home")}
    result = snakemake(workdir, "-n", *args, check=False, env=no_token)
    assert result.returncode != 0
    assert "run(s) lora-r16 upload to the Hugging Face Hub, but no token is available" in result.stdout + result.stderr
    assert not (workdir / "results").exists()
    jobs = planned_jobs(workdir, *args, env={"HF_TOKEN": "hf_x" * 8})
    assert "upload[run=lora-r16]" in jobs and "upload[run=full]" not in jobs


def test_merge_false_skips_the_merge(workdir):
    assert "merge[run=lora-r16]" in planned_jobs(workdir)
    jobs = planned_jobs(workdir, *write_config(workdir, "runs:\n  lora-r16:\n    merge: false\n"))
    assert "merge[run=lora-r16]" not in jobs and "export[run=lora-r16, published=adapter]" in jobs


def test_uploading_a_merged_model_needs_the_merge(workdir):
    override = "runs:\n  lora-r16:\n    merge: false\n    hub: {repo_id: me/x, what: merged}\n"
    result = snakemake(workdir, "-n", *write_config(workdir, override), check=False, env={"HF_TOKEN": "hf_x" * 8})
    assert result.returncode != 0
    assert "run 'lora-r16': hub.what is 'merged' but merge is false" in result.stdout + result.stderr
