"""Helpers for tests that run Snakemake on a copy of the workflow."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_PARTS = ["Snakefile", "rules", "scripts", "schemas", "config", "data", "envs", "profiles"]


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
