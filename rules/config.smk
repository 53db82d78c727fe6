# The configuration: each run is run_defaults updated with its own keys, then
# everything is validated against schemas/config.schema.yaml (which also fills
# in the defaults), then the cross-references a schema cannot express are
# checked. All of this happens before any job is scheduled.
import os

from snakemake.utils import validate


def merge_run_defaults():
    defaults = config.get("run_defaults") or {}
    for run_name, run in (config.get("runs") or {}).items():
        config["runs"][run_name] = {**defaults, **(run or {})}


def check_references():
    names = {"base model": config["base_models"], "dataset": config["datasets"]}
    for run_name, run in config["runs"].items():
        if "base_model" not in run:
            if len(config["base_models"]) != 1:
                raise ValueError(f"run '{run_name}': set base_model (one of {', '.join(config['base_models'])})")
            run["base_model"] = next(iter(config["base_models"]))
        run.setdefault("datasets", list(config["datasets"]))
        for kind, value in [("base model", run["base_model"])] + [("dataset", d) for d in run["datasets"]]:
            if value not in names[kind]:
                raise ValueError(f"run '{run_name}': unknown {kind} '{value}' "
                                 f"(configured: {', '.join(names[kind])})")
        if run.get("hub") and run["hub"]["what"] == "merged" and not run["merge"]:
            raise ValueError(f"run '{run_name}': hub.what is 'merged' but merge is false")
    for model, spec in config["base_models"].items():
        path = os.path.expanduser(spec.get("name_or_path", ""))
        looks_local = os.path.isabs(path) or path.startswith(os.curdir)
        if looks_local and not os.path.isdir(path):
            raise ValueError(f"base model '{model}': name_or_path {path} is not a directory")


def check_hub_token():
    """Fail before any job when an upload is configured and no token could authorize it."""
    uploading = [name for name, run in config["runs"].items() if run.get("hub")]
    if not uploading:
        return
    from huggingface_hub import get_token

    if get_token() is None:
        raise ValueError(f"run(s) {', '.join(uploading)} upload to the Hugging Face Hub, but no token is available: "
                         "set HF_TOKEN or run `huggingface-cli login` (a token is never read from the config)")


merge_run_defaults()
validate(config, "../schemas/config.schema.yaml")
check_references()
check_hub_token()
RUNS = config["runs"]
