"""Resumable training checkpoints: the trainable weights, optimizer, scheduler,
RNG states and progress of a run, under a fingerprint of its settings and data,
so that a rerun resumes only what it would have learned anyway."""
import hashlib
import json
import random
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from outputs import atomic_path
from settings import script_settings

# Training settings that do not change what is learned: a checkpoint written under other values still resumes.
NOT_LEARNED = {"checkpoint_every", "log_every", "eval_every", "sample_every", "prompts", "template", "max_new_tokens"}


def fingerprint(args):
    """Identity of what this run learns: the base model, every training setting
    that shapes learning, and the exact shard contents."""
    learned = {name: getattr(args, name) for name in script_settings("train") if name not in NOT_LEARNED}
    digest = hashlib.sha256(json.dumps({"base_model": str(args.base_model), **learned}, sort_keys=True).encode())
    for shard in args.shards:
        with open(shard, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def trainable_state(model):
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder, model, optimizer, scheduler, step, run_fingerprint, history, elapsed):
    with atomic_path(folder / "last") as partial:
        partial.mkdir()
        save_file(trainable_state(model), partial / "trainable.safetensors")
        allocator = getattr(model.base_model, "rankallocator", None)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rankallocator": allocator.__dict__ if allocator is not None else None,
                    "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                            "torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
                   partial / "state.pt")
        (partial / "progress.json").write_text(json.dumps({"step": step, "fingerprint": run_fingerprint,
                                                           "elapsed_s": elapsed, "history": history}))


def load_checkpoint(folder, run_fingerprint, model, optimizer, scheduler, log):
    """(step, history, elapsed) of a matching checkpoint after restoring it, else (0, None, 0)."""
    progress_file = folder / "last" / "progress.json"
    if not progress_file.exists():
        return 0, None, 0.0
    progress = json.loads(progress_file.read_text())
    if progress["fingerprint"] != run_fingerprint:
        log(f"checkpoint in {folder} is from other settings or data: starting over")
        shutil.rmtree(folder / "last")
        return 0, None, 0.0
    trainable = load_file(folder / "last" / "trainable.safetensors")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in trainable:
                parameter.copy_(trainable[name])
    state = torch.load(folder / "last" / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["rankallocator"] is not None:
        model.base_model.rankallocator.__dict__.update(state["rankallocator"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    log(f"resuming from the checkpoint at step {progress['step']}")
    return progress["step"], progress["history"], progress["elapsed_s"]
