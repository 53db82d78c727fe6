"""The rules layer's contract, checked with dry runs on a copy of the workflow:
each setting is declared once (the schema) and reaches its stage through the stage's
settings file; each rule's code inputs are exactly the package modules its script
runs; the rule files depend on each other one way; jobs run this environment's
Python however Snakemake was started."""
import concurrent.futures
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from workflow import copy_workflow, dry_run_jobs, snakemake

from finetune import settings

STAGES = settings.stages()
SETTINGS_RULES = ("settings", "run_settings", "serving")  # they print JSON (over several lines): no script


@pytest.fixture
def workdir(tmp_path):
    return copy_workflow(tmp_path / "wf")


def test_every_stage_reads_its_settings_and_every_setting_has_help():
    assert {"train", "evaluate", "tokenize_data", "validate_data", "merge", "export", "upload"} <= set(STAGES)
    for stage in STAGES:
        source = (REPO / "scripts" / f"{stage}.py").read_text()
        assert f'read_settings(args.settings, "{stage}")' in source, f"scripts/{stage}.py does not read its settings"
        fields = {field.name for field in settings.settings_class(stage).__dataclass_fields__.values()}
        assert fields == set(settings.declared(stage)), stage
        for name, (_, spec) in settings.declared(stage).items():
            assert spec.get("description"), f"{name} has no help"


RUN = {"method": "dora", "r": 4, "alpha": 8, "target_modules": "all-linear", "use_rslora": True,
       "gradient_checkpointing": False, "learning_rate": 3e-4, "epochs": 2, "packing": "off", "seed": 7,
       "datasets": {"a": 0.7, "b": 0.3}, "early_stopping": {"patience": 2}}


@pytest.mark.parametrize("sections, stage", [
    ({"run": RUN, "base_model": {"chat_template": "{{ 'it''s' }} \"q\" $HOME"}, "eval": {}}, "train"),
    ({"run": {**RUN, "target_modules": ["q_proj", "o_proj"], "sample_every": 5},
      "base_model": {"template": "alpaca"}, "eval": {"prompts": ["Add 2 and 3."], "max_new_tokens": 4}}, "train"),
    ({"eval": {"prompts": ["Add 2 and 3.", {"messages": [{"role": "user", "content": "hi 'there'"}]}],
               "temperature": 0.5, "num_samples": 3}, "base_model": {"template": "chat"}}, "evaluate"),
])
def test_a_share_written_as_the_rules_write_it_reads_back_typed(tmp_path, sections, stage):
    """What the settings rule writes (the stage's share, defaults filled in) is what the stage reads:
    every given value, every other setting at its declared default, numbers declared as floats as floats."""
    path = tmp_path / f"{stage}.json"
    path.write_text(json.dumps(settings.share(stage, **sections), indent=1))
    read = settings.read_settings(path, stage)
    declared = settings.declared(stage)
    for name, (section, spec) in declared.items():
        expected = sections[section].get(name, spec.get("default"))
        assert getattr(read, name) == expected, name
        if spec.get("type") == "number" and expected is not None:  # a number without a default may be unset
            assert isinstance(getattr(read, name), float), name
    with pytest.raises(dataclasses.FrozenInstanceError):
        read.seed = 99


@pytest.mark.parametrize("change, message", [
    ({"r": 0}, "'r': 0 is less than the minimum of 1"),
    ({"rank": 8}, "'rank' is not a setting of train"),
    ({"method": "lorax"}, "'method': 'lorax' is not one of"),
])
def test_a_bad_settings_file_is_refused_naming_the_file_and_setting(tmp_path, change, message):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**settings.share("train", run={}, base_model={}, eval={}), **change}))
    with pytest.raises(SystemExit, match=re.escape(f"{path}: not the settings of train: ") + ".*" + re.escape(message)):
        settings.read_settings(path, "train")
    missing = settings.share("train", run={}, base_model={}, eval={})
    del missing["seed"]
    path.write_text(json.dumps(missing))
    with pytest.raises(SystemExit, match="'seed' is missing"):
        settings.read_settings(path, "train")


def add_dummy_setting(workdir):
    schema_path = workdir / "schemas" / "config.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    schema["$defs"]["run"]["properties"]["dummy_setting"] = {
        "type": "integer", "minimum": 0, "default": 7, "description": "a setting added in one place",
        "x-script": ["train"]}
    schema_path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return schema_path


def test_a_setting_added_once_in_the_schema_reaches_the_stage(workdir):
    """One schema entry, nothing else edited: the config accepts the setting, its default fills
    in, the train stage's settings file holds it and reads it as a typed field; no other stage's."""
    schema = add_dummy_setting(workdir)
    (workdir / "dummy.yaml").write_text("runs:\n  lora-r16:\n    dummy_setting: 3\n")
    files = [f"results/runs/{run}/settings/{stage}.json" for run in ("lora-r16", "full")
             for stage in ("train", "evaluate")]
    snakemake(workdir, *files, "--cores", "1", "--configfile", "dummy.yaml")
    for run, expected in [("lora-r16", 3), ("full", 7)]:
        path = workdir / f"results/runs/{run}/settings/train.json"
        assert settings.read_settings(path, "train", schema_file=schema).dummy_setting == expected
        assert "dummy_setting" not in json.loads((workdir / f"results/runs/{run}/settings/evaluate.json").read_text())
    (workdir / "dummy.yaml").write_text("runs:\n  lora-r16:\n    dummy_setting: -1\n")
    result = snakemake(workdir, "-n", "--configfile", "dummy.yaml", check=False)
    assert result.returncode != 0 and "-1 is less than the minimum of 0" in result.stdout + result.stderr


def test_each_stage_script_takes_its_settings_only_from_its_file(workdir):
    """No job passes a setting on the command line: every flag of every job is a path, a name or a
    resource (threads, GPUs, processes), never a declared setting."""
    names = {f"--{name.replace('_', '-')}" for stage in STAGES for name in settings.declared(stage)}
    for rule, _, shell in dry_run_jobs(workdir):
        if rule in SETTINGS_RULES:
            continue
        flags = {word for word in shlex.split(shell) if word.startswith("--")}
        assert not flags & names, f"rule {rule} passes settings as flags: {flags & names}"


def runtime_imports(module, scripts_dir):
    """The package files loaded once `module` (a stage script, or a package module) is imported, as
    'finetune/...' paths."""
    code = (f"import importlib, sys, os; importlib.import_module({module!r})\n"
            "for m in list(sys.modules.values()):\n"
            "    f = getattr(m, '__file__', None) or ''\n"
            "    if m.__name__.split('.')[0] == 'finetune': print(m.__name__.replace('.', '/') + "
            "('/__init__.py' if f.endswith('__init__.py') else '.py'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(scripts_dir)})
    return set(result.stdout.split())


def test_each_rule_declares_exactly_the_code_its_script_runs(workdir):
    """A job's code inputs are its script and the package modules that script imports; the code that
    answers prompts during training is an input of the training jobs of runs that sample, only, and the
    preference objectives (and their evaluation) of the runs that optimize one (config/preference.yaml)."""
    jobs = {}
    for rule, inputs, shell in dry_run_jobs(workdir, "--configfile", "config/preference.yaml"):
        if rule in SETTINGS_RULES:
            continue
        scripts = [word for word in shlex.split(shell) if word.startswith("scripts/") and word.endswith(".py")]
        if scripts:
            name = re.search(r"--run-name (\S+)", shell)
            jobs[(rule, name.group(1) if name else None)] = (inputs, scripts)
    modules = sorted({Path(script).stem for _, scripts in jobs.values() for script in scripts})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        imports = dict(zip(modules, pool.map(lambda m: runtime_imports(m, workdir / "scripts"), modules)))
    sampling = runtime_imports("finetune.training.samples", workdir / "scripts")
    lazy = {"train": runtime_imports("finetune.training.objectives", workdir / "scripts"),
            "evaluate": runtime_imports("finetune.evaluation.preference", workdir / "scripts")}
    preference_runs = {"dpo", "dpo-no-sft", "orpo"}
    evaluated = {run for rule, run in jobs if rule == "evaluate"}
    for (rule, run), (inputs, scripts) in jobs.items():
        declared = {path for path in inputs if path.startswith(("scripts/", "finetune/"))}
        expected = set(scripts).union(*(imports[Path(script).stem] for script in scripts))
        if rule == "train" and run not in preference_runs:  # both default runs answer eval.prompts every 200 steps
            expected |= sampling
        if run in preference_runs and rule in lazy:
            expected |= lazy[rule]
        assert declared == expected, f"rule {rule} ({run}): declares {sorted(declared)}, runs {sorted(expected)}"
    assert {"train", "pretrain", "evaluate", "tokenize", "validate", "merge", "build_tiny_model",
            "reference_logps"} <= {r for r, _ in jobs}
    assert preference_runs <= evaluated
    (pretrain_inputs, _), (train_inputs, _) = jobs[("pretrain", "pretrain-tiny-llama")], jobs[("train", "lora-r16")]
    assert "finetune/evaluation/metrics.py" not in train_inputs, "evaluation-only code is not a training input"
    assert "finetune/evaluation/generation.py" in train_inputs, "a run that samples generates"
    assert "finetune/evaluation/generation.py" not in pretrain_inputs, "pretraining never samples"


def test_rule_files_depend_on_each_other_one_way():
    """Each rule file uses only names (functions, values, rules) defined in itself or in the files
    the Snakefile includes before it, so none depends on one included after it."""
    order = re.findall(r'^include: "(rules/\w+\.smk)"', (REPO / "Snakefile").read_text(), flags=re.M)
    assert sorted(order) == sorted(str(p.relative_to(REPO)) for p in (REPO / "rules").glob("*.smk"))
    names, rule_names = {}, {}
    for file in order:
        text = (REPO / file).read_text()
        names[file] = set(re.findall(r"^def (\w+)|^(\w+) =", text, flags=re.M) and
                          [a or b for a, b in re.findall(r"^def (\w+)|^(\w+) =", text, flags=re.M)])
        rule_names[file] = set(re.findall(r"^(?:rule |use rule \w+ as )(\w+)", text, flags=re.M))
    for position, file in enumerate(order):
        code = re.sub(r"#.*|\"[^\"\n]*\"", "", (REPO / file).read_text())
        used, used_rules = set(re.findall(r"\b\w+\b", code)), set(re.findall(r"\brules\.(\w+)", code))
        for later in order[position + 1:]:
            assert not used & names[later], f"{file} uses {sorted(used & names[later])} of {later}"
            assert not used_rules & rule_names[later], f"{file} uses rules {sorted(used_rules & rule_names[later])} of {later}"


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


def test_the_settings_reference_is_generated_from_the_schema():
    from finetune.settings_reference import reference
    assert (REPO / "docs" / "settings.md").read_text() == reference(), \
        "docs/settings.md is stale: python -m finetune.settings_reference > docs/settings.md"
    for stage in STAGES:
        for name in settings.declared(stage):
            assert f"| `{name}` |" in reference()
