"""Grids of runs in the config (`sweeps:`): names, validation, runs that behave exactly like
hand-listed ones, and edits to a grid that touch only the runs they change."""
import re

import pytest

from workflow import QUICK_CONFIG, copy_workflow, dry_run_jobs, planned_jobs, snakemake

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
    assert "--r 32 " in commands["lr-rank-r32-learning_rate0.0002"]
    assert "--learning-rate 0.0002 " in commands["lr-rank-r32-learning_rate0.0002"]


def test_an_expanded_run_is_exactly_the_hand_listed_run_with_the_same_settings(workdir):
    by_hand = GRID + ("runs:\n  by-hand: {target_modules: all-linear, lr_scheduler: constant_with_warmup, "
                      "r: 16, learning_rate: 1.0e-4}\n")
    commands = train_commands(workdir, *configure(workdir, by_hand))
    swept = commands["lr-rank-r16-learning_rate0.0001"].replace("lr-rank-r16-learning_rate0.0001", "NAME")
    assert swept == commands["by-hand"].replace("by-hand", "NAME")


@pytest.mark.parametrize("text, message", [
    (GRID + "runs:\n  lr-rank-r8-learning_rate0.0001: {}\n",
     "sweep 'lr-rank': its run 'lr-rank-r8-learning_rate0.0001' ({'r': 8, 'learning_rate': 0.0001}) collides "
     "with a run listed under runs"),
    ("sweeps:\n  s: {grid: {rank: [8, 16]}}\n", "sweep 's': grid key 'rank' is not a run setting"),
    ("sweeps:\n  s: {grid: {}}\n", "sweep 's': grid is empty"),
    ("sweeps:\n  s: {grid: {r: []}}\n", "sweep 's': grid key 'r' has no values"),
    ("sweeps:\n  s: {base: {r: 8}, grid: {r: [4]}}\n", "sweep 's': 'r' is set in both base and grid"),
    ("sweeps:\n  s: {base: {rank: 8}, grid: {r: [4]}}\n", "sweep 's': base key 'rank' is not a run setting"),
    ("sweeps:\n  s: {grid: {r: [0, 8]}}\n", "0 is less than the minimum of 1"),
])
def test_a_bad_sweep_fails_before_any_job_and_names_the_key(workdir, text, message):
    result = snakemake(workdir, "-n", *configure(workdir, text), check=False)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (workdir / "results").exists()


@pytest.mark.slow
def test_changing_one_grid_value_reruns_only_the_runs_it_touches(workdir):
    """A finished grid of two runs; r: [4, 8] becomes [4, 16]: only r16's jobs and the sweep report are planned."""
    quick = QUICK_CONFIG.replace("  max_steps: 30\n", "  max_steps: 4\n  checkpoint_every: 0\n")
    args = ["--configfile", "sweep.yaml", "--replace-workflow-config"]
    default = (workdir / "config/config.yaml").read_text()
    (workdir / "sweep.yaml").write_text(merged_config(default, quick, "sweeps:\n  g: {grid: {r: [4, 8]}}\n"))
    snakemake(workdir, "--cores", "2", *args)
    assert planned_jobs(workdir, *args) == []
    assert "<h2>Metrics against each swept setting</h2>" in (workdir / "results/report/sweep.html").read_text()
    assert (workdir / "results/report/metrics_vs_swept.png").stat().st_size > 10_000
    (workdir / "sweep.yaml").write_text(merged_config(default, quick, "sweeps:\n  g: {grid: {r: [4, 16]}}\n"))
    jobs = planned_jobs(workdir, *args)
    assert jobs == sorted(["all", "report_sweep", "train[run=g-r16]", "evaluate[run=g-r16]",
                           "export[run=g-r16, published=adapter]", "merge[run=g-r16]", "report_run[run=g-r16]"])


def merged_config(default, *overrides):
    """The default config with the overrides' top-level keys deep-merged over it, and no hand-listed runs."""
    import yaml
    config = yaml.safe_load(default)
    for text in overrides:
        for key, value in yaml.safe_load(text).items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = deep_merge(config[key], value)
            else:
                config[key] = value
    config["runs"] = {}
    return yaml.safe_dump(config)


def deep_merge(base, over):
    merged = dict(base)
    for key, value in over.items():
        merged[key] = deep_merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged
