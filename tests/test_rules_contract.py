"""The rules layer's contract, checked with dry runs on a copy of the workflow:
each setting is declared once (the schema) and reaches its script; each rule's
code inputs are exactly the project modules its scripts import; jobs run this
environment's Python however Snakemake was started."""
import concurrent.futures
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from workflow import copy_workflow, dry_run_jobs, snakemake

import settings

SCRIPTS_WITH_SETTINGS = sorted({script for declaration in settings.load_schema()["$defs"].values()
                                for spec in declaration.get("properties", {}).values()
                                for script in spec.get("x-script", [])})


@pytest.fixture
def workdir(tmp_path):
    return copy_workflow(tmp_path / "wf")


def test_every_declared_setting_has_help_and_a_script_that_takes_it(capsys):
    assert "train" in SCRIPTS_WITH_SETTINGS and "evaluate" in SCRIPTS_WITH_SETTINGS
    for script in SCRIPTS_WITH_SETTINGS:
        assert (REPO / "scripts" / f"{script}.py").is_file(), f"x-script names a missing script: {script}"
        with pytest.raises(SystemExit):
            __import__(script).parse_args(["--help"])
        parser_help = capsys.readouterr().out
        for name, (_, spec) in settings.script_settings(script).items():
            assert spec.get("description"), f"{name} has no help"
            assert f"--{name.replace('_', '-')}" in parser_help, f"{script}.py does not take {name}"


RUN = {"method": "dora", "r": 4, "alpha": 8.5, "target_modules": "all-linear", "use_rslora": True,
       "gradient_checkpointing": False, "learning_rate": 3e-4, "epochs": 2.5, "packing": "off", "seed": 7}


@pytest.mark.parametrize("sections, script", [
    ({"run": RUN, "base_model": {"chat_template": "{{ 'it''s' }} \"q\" $HOME"}, "eval": {}}, "train"),
    ({"run": {**RUN, "target_modules": ["q_proj", "o_proj"], "sample_every": 5},
      "base_model": {"template": "alpaca"}, "eval": {"prompts": ["Add 2 and 3."], "max_new_tokens": 4}}, "train"),
    ({"eval": {"prompts": ["Add 2 and 3.", {"messages": [{"role": "user", "content": "hi 'there'"}]}],
               "temperature": 0.5, "num_samples": 3}, "base_model": {"template": "chat"}}, "evaluate"),
])
def test_flags_round_trip_through_the_scripts_command_line(sections, script):
    """What the rules write on the command line is what the script parses: types,
    booleans both ways, lists, JSON and shell quoting."""
    module = __import__(script)
    required = {"train": ["--base-model", "m", "--shards", "s", "--output-dir", "o", "--metrics", "x",
                          "--summary", "y"],
                "evaluate": ["--base-model", "m", "--trained-dir", "a", "--shards", "s", "--records", "r",
                             "--eval-json", "e", "--generations", "g"]}[script]
    flags = settings.command_line_flags(script, **sections)
    args = module.parse_args(required + shlex.split(flags))
    for section in sections.values():
        for name, value in section.items():
            expected = [value] if name == "target_modules" and isinstance(value, str) else value
            assert getattr(args, name) == expected, name
    untouched = {name for name in settings.script_settings(script)
                 if all(name not in section for section in sections.values())}
    for name in untouched:
        assert getattr(args, name) == settings.script_settings(script)[name][1].get("default"), name


def test_out_of_range_values_are_refused_on_the_command_line_too():
    import train
    base = ["--base-model", "m", "--shards", "s", "--output-dir", "o", "--metrics", "x", "--summary", "y"]
    with pytest.raises(SystemExit, match=r"--r: 0 is less than the minimum of 1"):
        train.parse_args(base + ["--r", "0"])


def add_dummy_setting(workdir):
    schema_path = workdir / "schemas" / "config.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    schema["$defs"]["run"]["properties"]["dummy_setting"] = {
        "type": "integer", "minimum": 0, "default": 7, "description": "a setting added in one place",
        "x-script": ["train"]}
    schema_path.write_text(yaml.safe_dump(schema, sort_keys=False))


def test_a_setting_added_once_in_the_schema_reaches_the_script(workdir):
    """One schema entry, nothing else edited: the config accepts the setting, its
    default fills in, the rule passes it, and the script's command line parses it."""
    add_dummy_setting(workdir)
    (workdir / "dummy.yaml").write_text("runs:\n  lora-r16:\n    dummy_setting: 3\n")
    jobs = dry_run_jobs(workdir, "--configfile", "dummy.yaml")
    commands = {shell.split("--run-name ")[1].split()[0]: shell for rule, _, shell in jobs if rule == "train"}
    assert sorted(commands) == ["full", "lora-r16"]
    for run, expected in [("lora-r16", 3), ("full", 7)]:
        argv = shlex.split(commands[run].split("scripts/train.py", 1)[1].split(" > ")[0])
        parsed = subprocess.run(
            [sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import train; "
                                   "print(train.parse_args(sys.argv[1:]).dummy_setting)", *argv],
            cwd=workdir, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert parsed.returncode == 0, parsed.stderr
        assert parsed.stdout.strip() == str(expected)
    assert not any("--dummy-setting" in shell for rule, _, shell in jobs if rule not in ("train", "pretrain"))

    (workdir / "dummy.yaml").write_text("runs:\n  lora-r16:\n    dummy_setting: -1\n")
    result = snakemake(workdir, "-n", "--configfile", "dummy.yaml", check=False)
    assert result.returncode != 0 and "-1 is less than the minimum of 0" in result.stdout + result.stderr


def runtime_imports(workdir, script):
    """The project modules a script has loaded once imported, as paths relative to the project."""
    code = ("import sys, os; sys.path.insert(0, 'scripts'); import " + script + "\n"
            "for m in list(sys.modules.values()):\n"
            "    f = getattr(m, '__file__', None) or ''\n"
            "    if os.path.dirname(os.path.abspath(f)) == os.path.abspath('scripts'): print(os.path.relpath(f))")
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    return set(result.stdout.split())


def test_each_rule_declares_exactly_the_code_its_scripts_import(workdir):
    jobs = dry_run_jobs(workdir)
    # The wrappers that start a script (on which devices, in how many processes) change no result: not inputs.
    starters = {"scripts/gpu_pool.py", "scripts/launch.py"}
    ran = {}
    for rule, inputs, shell in jobs:
        ran.setdefault(rule, (inputs, {word for word in shlex.split(shell.replace("(", " ").replace(")", " "))
                                       if word.startswith("scripts/") and word.endswith(".py")
                                       and word not in starters}))
    scripts = sorted(set().union(*(run_scripts for _, run_scripts in ran.values())))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        imports = dict(zip(scripts, pool.map(lambda s: runtime_imports(workdir, Path(s).stem), scripts)))
    seen = set()
    for rule, (inputs, run_scripts) in ran.items():
        if not run_scripts:
            continue
        seen.add(rule)
        imported = set().union(*(imports[s] for s in run_scripts)) | run_scripts
        declared = {path for path in inputs if path.startswith("scripts/")}
        assert declared == imported, f"rule {rule}: declares {sorted(declared)}, runs {sorted(imported)}"
    assert {"train", "evaluate", "tokenize", "validate", "merge", "build_tiny_model"} <= seen
    train_code = ran["train"][0]
    assert "scripts/metrics.py" not in train_code, "evaluation-only code is not a training input"


def test_paths_in_the_dag_are_relative_to_the_project(workdir):
    for rule, inputs, shell in dry_run_jobs(workdir):
        assert str(workdir) not in shell and not any(os.path.isabs(path) for path in inputs), rule


def test_jobs_run_this_environments_python_without_an_activated_venv(workdir):
    """Started as .venv/bin/snakemake with the venv not on PATH: the jobs (which import
    pyarrow, jsonschema, torch) still run with the venv's interpreter."""
    console_script = Path(sys.executable).parent / "snakemake"
    command = [str(console_script)] if console_script.exists() else [sys.executable, "-m", "snakemake"]
    bare_path = "/usr/bin:/bin"
    result = subprocess.run(command + ["--cores", "2", "results/data/word_tasks.stats.json"], cwd=workdir,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PATH": bare_path, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stats = json.loads((workdir / "results/data/word_tasks.stats.json").read_text())
    assert stats["records"] == 2400 and len(stats["tokenized"]) == 1
