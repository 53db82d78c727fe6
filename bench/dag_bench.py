"""How fast Snakemake builds the DAG of a large sweep: `snakemake -n` on a
generated 100-run config (every job to do), and a no-op rerun (every output
present and up to date). With --grid the runs come from one `sweeps:` grid
(r x learning_rate x seed) instead of a hand-listed `runs:` block.

    python bench/dag_bench.py --runs 100 --repeats 3
    python bench/dag_bench.py --grid --runs 1000 --repeats 3
"""
import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PARTS = ["Snakefile", "rules", "scripts", "finetune", "schemas", "config", "data", "envs", "profiles", "pyproject.toml"]
# The rules' directory() outputs: base models, a tiny model's init, trained weights, TensorBoard events,
# merged weights and the published folders (adapter, merged, model).
DIRECTORY_OUTPUT = re.compile(r"(base_models/[^/]+|/init|/trained|/tensorboard|/merged_weights|/adapter|/merged"
                              r"|/model)$")


def sweep_config(runs):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    targets = [["q_proj", "v_proj"], "all-linear", ["q_proj", "k_proj", "v_proj", "o_proj"]]
    config["runs"] = {
        f"run{i:03d}": {"r": [4, 8, 16, 32][i % 4], "alpha": 2 * [4, 8, 16, 32][i % 4],
                        "target_modules": targets[i % 3], "learning_rate": [1e-3, 3e-3, 1e-2][(i // 4) % 3],
                        "seed": i // 12}
        for i in range(runs)}
    return config


def grid_config(runs):
    """A sweep of `runs` runs (a multiple of 100): 10 ranks x 10 learning rates x runs/100 seeds."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["runs"] = {}
    config["sweeps"] = {"grid": {"base": {"target_modules": "all-linear"}, "grid": {
        "r": [2, 4, 6, 8, 12, 16, 24, 32, 48, 64],
        "learning_rate": [1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2],
        "seed": list(range(max(runs // 100, 1)))}}}
    return config


def snakemake(workdir, *args):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if result.returncode:
        raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
    return time.perf_counter() - start, result.stdout


def create_outputs(workdir, dry_run):
    """Every output the dry run lists, created in job order, so the rerun has nothing to do."""
    paths = [p.strip() for line in re.findall(r"^\s+output: (.*)$", dry_run, flags=re.M) for p in line.split(",")]
    for path in paths:
        target = workdir / path
        if DIRECTORY_OUTPUT.search(path):
            target.mkdir(parents=True, exist_ok=True)
            (target / "placeholder").write_text("x")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("x")
    return len(paths)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", action="store_true", help="the runs from one sweeps: grid (runs: a multiple of 100)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dag-bench-"))
    for part in PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, workdir / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, workdir / part)
    config = grid_config(args.runs) if args.grid else sweep_config(args.runs)
    (workdir / "config" / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    config = ["--configfile", "config/sweep.yaml", "--replace-workflow-config"]

    plan_times, dry_run = [], ""
    for _ in range(args.repeats):
        seconds, dry_run = snakemake(workdir, "-n", *config)
        plan_times.append(seconds)
    jobs = len(re.findall(r"^(?:local)?rule \w+:$", dry_run, flags=re.M))
    files = create_outputs(workdir, dry_run)
    noop_times = []
    for _ in range(args.repeats):
        seconds, output = snakemake(workdir, "-n", *config)
        assert "Nothing to be done" in output, output[-2000:]
        noop_times.append(seconds)
    print(f"{args.runs} runs{' from a sweeps: grid' if args.grid else ''}, {jobs} jobs, {files} outputs; {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; median of {args.repeats}")
    print("| command | seconds |\n|---|---|")
    print(f"| `snakemake -n` (all {jobs} jobs to plan) | {statistics.median(plan_times):.2f} |")
    print(f"| `snakemake -n` no-op rerun (all outputs up to date) | {statistics.median(noop_times):.2f} |")
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
