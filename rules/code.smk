# The code a job runs, as its inputs: the stage script and the modules of the workflow's
# package (finetune/) it imports, directly or through each other, read from the import
# statements so that the list cannot go stale. Editing a module reruns exactly the jobs
# that run it. Uses nothing of the other rule files.
import ast
import functools
import os
from pathlib import Path

SOURCE_DIR = Path(workflow.basedir)
PACKAGE = "finetune"
# Imported only by runs that answer prompts during training (sample_every): not code of the others.
SAMPLING = ("finetune.training.samples",)
# Imported only by runs with a preference objective (dpo, ipo, simpo, orpo, kto).
PREFERENCE = ("finetune.training.objectives",)
# Imported only by runs with objective grpo.
GRPO = ("finetune.training.grpo", "finetune.training.rewards")
# Imported only when eval.harness names lm-evaluation-harness tasks.
HARNESS = ("finetune.evaluation.harness",)
# Imported only by the trials of a search that prunes.
PRUNING = ("finetune.training.pruning",)


def script(name):
    """A stage script, as a path relative to the working directory."""
    return os.path.relpath(SOURCE_DIR / "scripts" / f"{name}.py")


def module_file(module):
    """The file of a package module (a package's __init__.py), or None when it is no module of the package."""
    path = SOURCE_DIR.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def imported_files(file):
    """The package files that `file` names in an import statement (anywhere in it), with the
    __init__.py of each package on the way (it runs on import)."""
    names = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    files = set()
    for name in names:
        parts = name.split(".")
        if parts[0] == PACKAGE:
            files.update(filter(None, (module_file(".".join(parts[: i + 1])) for i in range(len(parts)))))
    return frozenset(files)


@functools.cache
def code_of(name, leave_out=()):
    """The package files scripts/{name}.py runs, as paths relative to the working directory.
    leave_out: modules the job does not run (and what only they import)."""
    left_out = {module_file(module) for module in leave_out}
    found, pending = set(), [SOURCE_DIR / "scripts" / f"{name}.py"]
    while pending:
        for file in imported_files(pending.pop()) - found - left_out:
            found.add(file)
            pending.append(file)
    return sorted(os.path.relpath(file) for file in found)
