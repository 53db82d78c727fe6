# The configuration, resolved and checked before any job is scheduled: sweeps expanded
# into runs, run_defaults merged, the config validated against the schema (which fills
# in the defaults), then what a schema cannot express (finetune/config.py); each search's
# space, and its trials at the corners of the space resolved as runs (finetune/search/runs.py).
# Defines SCHEMA, RUNS (every run's resolved settings), SWEEPS, SEARCHES and RAW_CONFIG (the
# config as given, which a search's trials are resolved from); uses nothing of the other
# rule files.
import copy
import os
import sys
from pathlib import Path

from snakemake.utils import update_config, validate

try:
    from finetune import config as workflow_config
    from finetune.search.runs import check_searches, check_trials
except ImportError as missing:
    raise ImportError(
        f"the workflow's package cannot be imported ({missing}); install it into this environment with "
        "`make install` or `pip install -e .` in the workflow folder"
    ) from None

SCHEMA = Path(workflow.basedir) / "schemas" / "config.schema.yaml"

# Jobs call `python` and `accelerate`: make them this environment's, also when
# Snakemake was started as .venv/bin/snakemake without activating the venv.
# (--sdm conda puts the rule's environment in front of it inside the job.)
_interpreter_bin = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _interpreter_bin:
    os.environ.update(PATH=os.pathsep.join([_interpreter_bin, os.environ.get("PATH", "")]))


def replace_the_config_in_cluster_jobs_too():
    """Snakemake (9.27) does not pass --replace-workflow-config on to the jobs it runs in a process
    of their own (those it submits to a cluster, and the local `run:` jobs that write settings
    files): they would see config/config.yaml merged into the config they were given, and compute
    other settings than the workflow that started them. Replace it there too."""
    if workflow.config_settings.replace_workflow_config:
        os.environ.update(FINETUNE_WORKFLOW_CONFIG_REPLACED="1")
    elif (workflow.remote_exec or workflow.subprocess_exec) and os.environ.get(
        "FINETUNE_WORKFLOW_CONFIG_REPLACED"
    ) == "1":
        config.clear()
        update_config(config, workflow.config_settings.overwrite_config)


def run_declarations():
    from finetune.settings import load_schema

    return load_schema(SCHEMA)["$defs"]["run"]["properties"]


def validated(some_config):
    validate(some_config, str(SCHEMA))


replace_the_config_in_cluster_jobs_too()
SWEEPS = workflow_config.expand_sweeps(config, list(run_declarations()))
check_searches(config, run_declarations())
RAW_CONFIG = copy.deepcopy(config)
workflow_config.merge_run_defaults(config)
workflow_config.check_before_defaults(config)
validate(config, str(SCHEMA))
workflow_config.resolve_runs(config)
workflow_config.check_base_models(config)
workflow_config.check_fused_experts(config)
workflow_config.check_hub_token(config)
workflow_config.check_harness(config)
check_trials(config, RAW_CONFIG, validated)
RUNS = config["runs"]
SEARCHES = config.get("search") or {}
