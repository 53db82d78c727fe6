"""A run's manifest: everything needed to tell what produced its weights and to train them
again (scripts/manifest.py writes it; the run page and the model cards show its summary rows).

- library versions and the device, as the training job recorded them;
- the workflow's git commit (and whether its tracked files had edits), when
  the workflow is a git checkout;
- the SHA-256 of every tokenized shard the run trained on, and of the base
  model's config.json and weights index; for each weights file its size and
  the SHA-256 of its safetensors header (tensor names, shapes, dtypes and
  offsets: hashing the contents of a 100 GB model would take minutes); for a
  Hub model, the revision it was read at when it is in the local cache;
- the seed and the run's fully resolved settings, as they could be pasted
  under `runs:` to train the same run again.
"""
import hashlib
import os
import struct
import subprocess
from pathlib import Path

from finetune.environment import library_versions

MODEL_DESCRIPTION = ("config.json", "generation_config.json", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_header_sha256(path):
    """SHA-256 of a safetensors file's header: which tensors it holds, and how."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return hashlib.sha256(f.read(size)).hexdigest()


def git_commit(folder):
    """{commit, dirty} of the git checkout the workflow lives in, or None when it is none."""
    def git(*args):
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
    return {"commit": head.stdout.strip(), "dirty": dirty}


def hub_snapshot(model_id):
    """The local cache's snapshot folder of a Hub model, or None (nothing is downloaded)."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model_id, local_files_only=True, allow_patterns=list(MODEL_DESCRIPTION)))
    except Exception:  # not in the cache, or no such repository: nothing to describe
        return None


def describe_base_model(path_or_id):
    """Hashes of the base model's description files and the headers of its weights."""
    folder, description = Path(path_or_id), {"name_or_path": str(path_or_id)}
    if not folder.is_dir():
        folder = hub_snapshot(str(path_or_id))
        if folder is None:
            return {**description, "resolved": False}
        description["hub_revision"] = folder.name
    description["files_sha256"] = {name: file_sha256(folder / name) for name in MODEL_DESCRIPTION
                                   if (folder / name).is_file()}
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    description["weights"] = {
        file.name: {"bytes": file.stat().st_size,
                    **({"header_sha256": safetensors_header_sha256(file)} if file.suffix == ".safetensors" else {})}
        for file in weights}
    return description


def chain_of(settings, parent):
    """The models a chained run descends from, oldest first: its root base model and the runs before it, each
    with its method, objective and the hash of its trained weights' manifest; [] for a run on a base model."""
    if not parent:
        return []
    before = parent.get("chain") or [{"base_model": parent["settings"]["base_model"]}]
    return [*before, {"run": parent["run"], "method": parent["settings"].get("method"),
                      "objective": parent["settings"].get("objective", "sft")}]


def build_manifest(run_name, settings, summary, shards, base_model, workflow_dir, parent=None):
    """parent: the manifest of the run this run starts from (base_model {run: NAME}), if any."""
    environment = summary.get("environment", {})
    libraries = {**environment.get("libraries", {}), "snakemake": library_versions()["snakemake"]}
    return {
        "run": run_name,
        "seed": settings.get("seed"),
        "libraries": libraries,
        "device": environment.get("device"),
        "workflow": git_commit(workflow_dir),
        "shards": {Path(shard).stem: {"file": os.path.relpath(shard), "bytes": Path(shard).stat().st_size,
                                      "sha256": file_sha256(shard)} for shard in shards},
        "base_model": describe_base_model(base_model),
        "chain": chain_of(settings, parent),
        "settings": settings,
        "trained": {key: summary.get(key) for key in ("steps", "stopped_at_step", "stop_reason", "processes",
                                                      "precision", "wall_time_s")},
    }


def summary_rows(manifest):
    """(what, value) pairs of a manifest for the run page and the model card: short hashes."""
    device = manifest.get("device") or {}
    where = (f"{device.get('count')} x {device.get('name')}" if device.get("type") == "cuda"
             else f"CPU ({device.get('name') or 'unknown'})") + f", {device.get('processes', 1)} process(es)"
    workflow = manifest.get("workflow")
    commit = (workflow["commit"][:12] + (" (with uncommitted edits)" if workflow["dirty"] else "")
              if workflow else "not a git checkout")
    base = manifest["base_model"]
    rows = [("seed", manifest["seed"]), ("device", where if device else "unknown"),
            ("libraries", ", ".join(f"{name} {version}" for name, version in manifest["libraries"].items() if version)),
            ("workflow commit", commit),
            ("base model", base["name_or_path"] + (f" @ {base['hub_revision'][:12]}" if "hub_revision" in base else ""))]
    if manifest.get("chain"):
        rows.append(("trained after", " -> ".join(describe_link(link) for link in manifest["chain"])))
    rows += [(f"base model {name}", f"sha256 {digest[:16]}") for name, digest in base.get("files_sha256", {}).items()]
    rows += [(f"shard {name}", f"sha256 {shard['sha256'][:16]}") for name, shard in manifest["shards"].items()]
    return rows


def describe_link(link):
    """One model of a chain, as the reports show it: the base model, or a run with its method and objective."""
    if "run" not in link:
        return f"base model {link['base_model']}"
    return f"run {link['run']} ({link['method']}, {link['objective']})"
