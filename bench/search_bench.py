"""Does a search beat a grid with the same number of runs? On the example data and the embedded tiny model,
one Snakemake project trains a 12-run grid over learning rate, LoRA rank r and alpha (3 x 2 x 2 values at the
ends and middle of the ranges) and a 12-trial search over the same ranges (TPE, 3 rounds of 4) for each
sampler seed, and prints the best held-out loss of each: overall, and after each round of 4 runs (the grid's
runs in its order, learning rate ascending), and the median over all runs.

    python bench/search_bench.py --seeds 0 1 2 --output search_bench.json   # 300 steps per run
    python bench/search_bench.py --steps 20 --quick                         # 4 grid runs, 4 trials: a smoke test

The project is a copy of the workflow in a temporary folder (--keep to keep it); the base model is built and
pretrained as the default config does. Every run trains --steps steps with the default run settings otherwise.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PARTS = ["Snakefile", "rules", "scripts", "finetune", "schemas", "config", "data", "envs", "profiles", "pyproject.toml"]
GRID = {"learning_rate": [0.0005, 0.002, 0.008], "r": [8, 32], "alpha": [16, 64]}
SPACE = {"learning_rate": {"type": "float", "low": 0.0005, "high": 0.008, "log": True},
         "r": {"type": "int", "low": 8, "high": 32, "log": True},
         "alpha": {"type": "float", "low": 16, "high": 64, "log": True}}


def search_name(seed):
    return "tpe" if seed == 0 else f"tpe-seed{seed}"


def project_config(steps, quick, seeds):
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["run_defaults"].update(max_steps=steps, eval_every=0, sample_every=0, merge=False)
    config["eval"].update(num_samples=0, prompts=[])
    grid = {key: values[:2] if quick else values for key, values in GRID.items()}
    if quick:
        grid["alpha"] = grid["alpha"][:1]
    config["runs"] = {}
    config["sweeps"] = {"grid": {"grid": grid}}
    trials = 4 if quick else 12
    config["search"] = {search_name(seed): {"space": SPACE, "objective": {"metric": "loss", "direction": "minimize"},
                                            "trials": trials, "parallel": 4 if not quick else 2, "seed": seed}
                        for seed in seeds}
    return config


def run_project(folder, config):
    for part in PARTS:  # over a kept project of an earlier call: its results stay, the code is this checkout's
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, folder / part, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, folder / part)
    (folder / "config" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2"], cwd=folder, check=True,
                   env={"HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    return time.perf_counter() - started


def results(folder, config):
    """{grid: [(run, settings, loss)] in grid order, searches: {search: [(run, settings, loss or None, state)] by
    number}}."""
    from finetune.sweeps import grid_runs
    grid = []
    for name, values in grid_runs("grid", config["sweeps"]["grid"]):
        loss = json.loads((folder / "results" / "runs" / name / "eval.json").read_text())["tuned"]["loss"]
        grid.append((name, values, loss))
    searches = {}
    for search in config["search"]:
        told = sorted((folder / "results/search" / search).glob("told-*.json"), key=lambda p: int(p.stem[5:]))[-1]
        searches[search] = [(t["run"], t["params"], t["value"], t["state"]) for t in json.loads(told.read_text())["trials"]]
    return {"grid": grid, "searches": searches}


def best_after_each_round(losses, per_round):
    best, found = float("inf"), []
    for start in range(0, len(losses), per_round):
        best = min([best] + [loss for loss in losses[start:start + per_round] if loss is not None])
        found.append(best)
    return found


def median(values):
    values = sorted(values)
    return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2


def report(found, per_round, seconds):
    grid = [loss for _, _, loss in found["grid"]]
    header = f"{'':30s} {'best loss':>10s} {'median':>8s}   best after each round of {per_round}"
    lines = [header, f"{f'grid ({len(grid)} runs)':30s} {min(grid):10.4f} {median(grid):8.4f}   "
             + " ".join(f"{b:.4f}" for b in best_after_each_round(grid, per_round))]
    best_grid = min(found["grid"], key=lambda row: row[2])
    bests = []
    for search, trials in found["searches"].items():
        losses = [loss if state == "COMPLETE" else None for _, _, loss, state in trials]
        done = [loss for loss in losses if loss is not None]
        best = min((row for row in trials if row[3] == "COMPLETE"), key=lambda row: row[2])
        bests.append(best[2])
        lines.append(f"{f'{search} ({len(trials)} trials)':30s} {min(done):10.4f} {median(done):8.4f}   "
                     + " ".join(f"{b:.4f}" for b in best_after_each_round(losses, per_round))
                     + f"   best: {best[0]} {json.dumps(best[1])}")
    lines += [f"best grid run: {best_grid[0]} {best_grid[1]}",
              "search/grid best loss ratio per seed: " + " ".join(f"{b / best_grid[2]:.4f}" for b in bests)
              + " (below 1: the search found better)",
              f"wall time of the project's Snakemake run on this machine: {seconds:.0f} s"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one search per sampler seed")
    parser.add_argument("--quick", action="store_true", help="4 grid runs and 4 trials in 2 rounds: a smoke test")
    parser.add_argument("--keep", type=Path, default=None, help="make the project here and keep it")
    parser.add_argument("--output", type=Path, default=None, help="also write the results here (JSON)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    config = project_config(args.steps, args.quick, args.seeds)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch) / "project"
        folder.mkdir(parents=True, exist_ok=True)
        seconds = run_project(folder, config)
        found = results(folder, config)
    per_round = next(iter(config["search"].values()))["parallel"]
    print(report(found, per_round, seconds))
    if args.output:
        args.output.write_text(json.dumps({"steps": args.steps, "seconds": seconds, **found}, indent=1) + "\n")


if __name__ == "__main__":
    main()
