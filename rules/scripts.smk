# How each stage script is run by its rule: its path, the project modules it imports
# (its code inputs, derived from the imports so they cannot go stale), the
# flags that pass it its settings (declared once, in the config schema), and
# the interpreter that runs it.
import ast
import functools
import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

SCRIPTS_DIR = Path(workflow.basedir) / "scripts"

# Jobs call `python` and `accelerate`: make them this environment's, also when
# Snakemake was started as .venv/bin/snakemake without activating the venv.
# (--sdm conda puts the rule's environment in front of it inside the job.)
_interpreter_bin = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _interpreter_bin:
    os.environ.update(PATH=os.pathsep.join([_interpreter_bin, os.environ.get("PATH", "")]))


def _load_settings_module():
    spec = importlib.util.spec_from_file_location("workflow_settings", SCRIPTS_DIR / "settings.py")
    settings_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(settings_module)
    return settings_module


SETTINGS = _load_settings_module()


def script(name):
    """A stage script, as a path relative to the working directory."""
    return os.path.relpath(SCRIPTS_DIR / f"{name}.py")


@functools.cache
def _direct_imports(name):
    """Project modules that scripts/{name}.py names in an import statement (anywhere in it)."""
    imported = set()
    for node in ast.walk(ast.parse((SCRIPTS_DIR / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    return {module for module in imported if (SCRIPTS_DIR / f"{module}.py").is_file()}


@functools.cache
def imported_modules(name):
    """The project modules (scripts/*.py) a script imports, directly or through each other."""
    found, pending = set(), [name]
    while pending:
        for imported in _direct_imports(pending.pop()) - found - {name}:
            found.add(imported)
            pending.append(imported)
    return [script(imported) for imported in sorted(found)]


def record_schemas():
    return sorted(os.path.relpath(p) for p in (Path(workflow.basedir) / "schemas" / "records").glob("*.schema.json"))


def script_flags(name, run=None, model=None, dataset=None):
    """The flags that pass a script its settings from the config: those of a run (a
    settings dict), of its base model (or `model`), of a dataset, and the global
    eval and model_card sections. A section the rule does not give is an error."""
    sections = {"eval": config["eval"], "model_card": config["model_card"]}
    if run is not None:
        sections.update(run=run, hub=run.get("hub", {}))
        model = run["base_model"]
    if model is not None:
        sections.update(base_model=config["base_models"][model],
                        build_tiny=config["base_models"][model].get("build_tiny", {}))
    if dataset is not None:
        sections["dataset"] = config["datasets"][dataset]
    return SETTINGS.command_line_flags(name, **sections)


def card_flags(run_name, kind):
    """Model card inputs that are not files: base model, settings, license, where it will be published."""
    run = RUNS[run_name]
    flags = [f"--base-model {shlex.quote(base_model_path(run['base_model']))}",
             f"--settings {shlex.quote(json.dumps(run, sort_keys=True))}", script_flags("model_card", run=run)]
    if (run.get("hub") or {}).get("what") == kind:
        flags.append(f"--repo-id {shlex.quote(run['hub']['repo_id'])}")
    return " ".join(flags)


def train_launcher(gpus, nodes=1):
    """How the training script starts: one process per GPU (scripts/launch.py: python, or
    accelerate for several); a run over several nodes starts one launcher per node (srun)."""
    launcher = f"python {script('launch')} --processes {gpus} --nodes {nodes} --"
    if nodes > 1:
        launcher = f"srun --nodes {nodes} --ntasks-per-node 1 --kill-on-bad-exit=1 {launcher}"
    return launcher


def training_resources(run, name):
    """A training job's resources. On one node: `gpu` GPUs (bounded by --resources gpu=N).
    Over several nodes (SLURM): that many nodes with `gpus` each (gres is per node), one task
    per node, and the job's own srun (the mpi resource) instead of the executor's."""
    nodes, gpus = run["nodes"], run["gpus"]
    if nodes == 1:
        return {"gpu": gpus}.get(name)
    return {"nodes": nodes, "gres": f"gpu:{gpus}", "tasks": nodes, "tasks_per_gpu": 0, "mpi": "srun"}.get(name)
