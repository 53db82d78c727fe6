"""Grids of runs in the config (`sweeps:`): names, validation, runs that behave exactly like
hand-listed ones, and edits to a grid that touch only the runs they change."""
import json
import re

import pytest

from workflow import copy_workflow, dry_run_jobs, planned_jobs, snakemake

GRID = """
sweeps:
  lr-rank:
    base: {target_modules: all-linear, lr_scheduler: constant_with_warmup}
    grid: {r: [8, 16, 32], learning_rate: [1.0e-4, 2.0e-4]}
"""


@pytest.fixture
def workdir(tmp_path):
    return copy_workflow(tmp_path / "wf")


def configure(workdir, text):
    (workdir / "sweep.yaml").write_text(text)
    return ["--configfile", "sweep.yaml"]


def train_commands(workdir, *args):
    return {re.search(r"--run-name (\S+)", shell).group(1): shell
            for rule, _, shell in dry_run_jobs(workdir, *args) if rule == "train"}


def test_a_grid_expands_into_one_run_per_combination_named_after_its_values(workdir):
    commands = train_commands(workdir, *configure(workdir, GRID))
    swept = sorted(name for name in commands if name.startswith("lr-rank"))
    assert swept == sorted(f"lr-rank-r{r}-learning_rate{lr}" for r in (8, 16, 32) for lr in ("0.0001", "0.0002"))
    assert {"lora-r16", "full"} <= set(commands), "hand-listed runs stay"
    train = settings_of(workdir, ["lr-rank-r32-learning_rate0.0002"], ["train"])[
        ("lr-rank-r32-learning_rate0.0002", "train")]
    assert (train["r"], train["learning_rate"], train["lr_scheduler"]) == (32, 0.0002, "constant_with_warmup")


def test_an_expanded_run_is_exactly_the_hand_listed_run_with_the_same_settings(workdir):
    by_hand = GRID + ("runs:\n  by-hand: {target_modules: all-linear, lr_scheduler: constant_with_warmup, "
                      "r: 16, learning_rate: 1.0e-4}\n")
    commands = train_commands(workdir, *configure(workdir, by_hand))
    swept = commands["lr-rank-r16-learning_rate0.0001"].replace("lr-rank-r16-learning_rate0.0001", "NAME")
    assert swept == commands["by-hand"].replace("by-hand", "NAME")
    stages = ("train", "evaluate", "merge", "export")
    files = settings_of(workdir, ["lr-rank-r16-learning_rate0.0001", "by-hand"], stages)
    for stage in stages:
        assert files[("lr-rank-r16-learning_rate0.0001", stage)] == files[("by-hand", stage)], stage


def test_changing_one_grid_value_plans_only_the_runs_it_touches(workdir):
    """r: [4, 8] becomes [4, 16]: r4's commands are unchanged, and over a project whose outputs
    all exist only r16's jobs and the sweep report are planned."""
    args = ["--configfile", "sweep.yaml", "--replace-workflow-config"]
    default = (workdir / "config/config.yaml").read_text()
    (workdir / "sweep.yaml").write_text(without_runs(default) + "sweeps:\n  g: {grid: {r: [4, 8]}}\n")
    before = train_commands(workdir, *args)
    create_outputs(workdir, snakemake(workdir, "-n", *args).stdout)
    assert planned_jobs(workdir, *args) == []
    (workdir / "sweep.yaml").write_text(without_runs(default) + "sweeps:\n  g: {grid: {r: [4, 16]}}\n")
    after = train_commands(workdir, *args, "--forceall")
    assert sorted(before) == ["g-r4", "g-r8"] and sorted(after) == ["g-r16", "g-r4"]
    assert after["g-r4"] == before["g-r4"], "the run the edit does not touch keeps its exact command"
    assert planned_jobs(workdir, *args) == sorted([
        "all", "report_sweep", "train[run=g-r16]", "evaluate[run=g-r16]", "export[run=g-r16, published=adapter]",
        "merge[run=g-r16]", "export[run=g-r16, published=merged]", "report_run[run=g-r16]", "manifest[run=g-r16]",
        "run_settings[run=g-r16]", "serving[model=tiny-llama]",
        *(f"settings[subject=runs/g-r16, stage={stage}]" for stage in ("train", "evaluate", "merge", "export"))])


def settings_of(workdir, runs, stages):
    """{(run, stage): its settings file} as the workflow writes them (the jobs run here, in one
    Snakemake call: they are local and quick)."""
    paths = {(run, stage): f"results/runs/{run}/settings/{stage}.json" for run in runs for stage in stages}
    snakemake(workdir, *paths.values(), "--cores", "1", "--configfile", "sweep.yaml")
    return {key: json.loads((workdir / path).read_text()) for key, path in paths.items()}


def without_runs(config_text):
    """The default config without its hand-listed runs."""
    import yaml
    config = yaml.safe_load(config_text)
    config.pop("runs")
    return yaml.safe_dump(config)


def create_outputs(workdir, dry_run):
    """Every output the dry run lists, created in job order (folders as folders), so that all is up to date."""
    paths = [p.strip() for line in re.findall(r"^\s+output: (.*)$", dry_run, flags=re.M) for p in line.split(",")]
    for path in paths:
        target = workdir / path
        if re.search(r"(base_models/[^/]+|/trained|/tensorboard|/adapter|/model|/merged|/merged_weights|/init)$", path):
            target.mkdir(parents=True, exist_ok=True)
            (target / "placeholder").write_text("x")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("x")
