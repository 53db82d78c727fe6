"""Helpers for tests that run Snakemake on a copy of the workflow."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_PARTS = ["Snakefile", "rules", "scripts", "finetune", "schemas", "config", "data", "envs", "profiles",
                  "pyproject.toml"]
# Over the default config: the whole workflow in well under a minute, for tests of its mechanics, not its quality.
QUICK_CONFIG = ("base_models:\n  tiny-llama:\n    build_tiny:\n      pretrain: {max_steps: 20}\n"
                "run_defaults:\n  max_steps: 30\n  eval_every: 0\n  sample_every: 0\neval:\n  num_samples: 4\n")


def copy_workflow(dest):
    dest.mkdir(parents=True, exist_ok=True)
    for part in WORKFLOW_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / part)
    return dest


def snakemake(workdir, *args, check=True, timeout=600, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def planned_jobs(workdir, *args, env=None):
    """Sorted 'rule' or 'rule[wildcards]' names of the jobs a dry run would run."""
    output = snakemake(workdir, "-n", *args, env=env).stdout
    jobs, rule = [], None
    for line in output.splitlines():
        match = re.match(r"^(?:local)?rule (\w+):$", line)
        if match:
            if rule:
                jobs.append(rule)
            rule = match.group(1)
        elif rule and line.strip().startswith("wildcards:"):
            rule += "[" + line.split(":", 1)[1].strip() + "]"
        elif rule and not line.startswith(" "):
            jobs.append(rule)
            rule = None
    if rule:
        jobs.append(rule)
    return sorted(jobs)


def copy_project(source, dest):
    """A finished project copied the way users do it: `cp -a` (contents, metadata, timestamps)."""
    subprocess.run(["cp", "-a", str(source), str(dest)], check=True)
    return dest


def dry_run_jobs(workdir, *args, env=None):
    """[(rule, inputs, shell command)] of the jobs a dry run would run, from `snakemake -n -p`."""
    output = snakemake(workdir, "-n", "-p", *args, env=env).stdout
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        match = re.match(r"(?:local)?rule (\w+):", block)
        if not match:
            continue
        inputs = re.search(r"^\s+input: (.*)$", block, flags=re.M)
        shell = re.search(r"^Shell command: (.*)$", block, flags=re.M)
        jobs.append((match.group(1), inputs.group(1).split(", ") if inputs else [], shell.group(1) if shell else ""))
    return jobs


def run_settings(workdir):
    """{run: its settings as written in config/config.yaml, run_defaults included}."""
    import yaml
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    return {name: {**(config.get("run_defaults") or {}), **(run or {})} for name, run in config["runs"].items()}


def per_run_jobs(workdir, rules):
    """The job names of the given per-run rules for every configured run (merge only where it applies)."""
    jobs = []
    for run, settings in run_settings(workdir).items():
        full = settings.get("method") == "full"
        merges = not (full or settings.get("merge") is False)
        for rule in rules:
            if rule == "export":
                jobs.append(f"export[run={run}, published={'model' if full else 'adapter'}]")
                jobs += [f"export[run={run}, published=merged]"] if merges else []
            elif rule != "merge" or merges:
                jobs.append(f"{rule}[run={run}]")
    return jobs
