"""Resumable training checkpoints: the trainable weights, optimizer, scheduler,
RNG states and progress of a run, under a fingerprint of its settings and data,
so that a rerun resumes only what it would have learned anyway. Under FSDP the
weights and optimizer state are saved and restored sharded, each process its part."""
import dataclasses
import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from finetune.settings import declared, is_learned
from finetune.training.distributed import restore_sharded_training_state, sharded_training_state


def fingerprint(settings, base_model, shards):
    """Identity of what this run learns: the base model, every training setting that shapes
    learning (all but those the schema marks x-learned: false), and the exact shard contents."""
    specs = declared("train")
    learned = {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)
               if is_learned(specs.get(field.name, (None, {}))[1])}
    digest = hashlib.sha256(json.dumps({"base_model": str(base_model), **learned}, sort_keys=True).encode())
    for shard in shards:
        with open(shard, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def trainable_state(model):
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run, step, elapsed):
    """Write run.checkpoints/last from every process at once: the trainable weights and optimizer
    state (sharded under FSDP, each process its part), each process's RNG state, and
    progress.json last. It replaces the previous one only once complete, so a kill at
    any moment leaves the previous checkpoint or the new one."""
    accelerator, main = run.accelerator, run.accelerator.is_main_process
    last, partial = run.checkpoints / "last", run.checkpoints / "last.partial"
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if run.sharded:
        dcp.save(sharded_training_state(run.model, run.optimizer), checkpoint_id=partial / "sharded")
    elif main:
        save_file(trainable_state(run.unwrapped), partial / "trainable.safetensors")
        torch.save(run.optimizer.state_dict(), partial / "optimizer.pt")
    torch.save(rng_state(), partial / f"rng-{accelerator.process_index}.pt")
    if run.grpo is not None and run.grpo.rollout is not None:  # the completions the next steps may train on again
        torch.save(run.grpo.rollout, partial / f"rollout-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if main:
        allocator = getattr(run.unwrapped.base_model, "rankallocator", None)
        torch.save({"scheduler": run.scheduler.state_dict(),
                    "rankallocator": allocator.__dict__ if allocator is not None else None}, partial / "state.pt")
        (partial / "progress.json").write_text(json.dumps({"step": step, "fingerprint": run.fingerprint,
                                                           "processes": accelerator.num_processes,
                                                           "elapsed_s": elapsed, "history": run.progress.history}))
        shutil.rmtree(last, ignore_errors=True)
        os.replace(partial, last)
    accelerator.wait_for_everyone()


def load_checkpoint(run, log):
    """(step, history, elapsed) of a matching checkpoint in run.checkpoints after restoring its weights,
    optimizer, scheduler and RNG states, else (0, None, 0). Every process calls this, after the model
    is sharded and the optimizer made. `run` is the Training (state.py)."""
    folder = run.checkpoints
    progress_file = folder / "last" / "progress.json"
    if not progress_file.exists():
        return 0, None, 0.0
    progress = json.loads(progress_file.read_text())
    if progress["fingerprint"] != run.fingerprint or progress.get("processes", 1) != run.accelerator.num_processes:
        log(f"checkpoint in {folder} is from other settings, data or number of processes: starting over")
        run.accelerator.wait_for_everyone()
        if run.accelerator.is_main_process:
            shutil.rmtree(folder / "last")
        return 0, None, 0.0
    last = folder / "last"
    if run.sharded:
        state = sharded_training_state(run.model, run.optimizer)
        dcp.load(state, checkpoint_id=last / "sharded")
        restore_sharded_training_state(run.model, run.optimizer, state)
    else:
        trainable = load_file(last / "trainable.safetensors")
        with torch.no_grad():
            for name, parameter in run.unwrapped.named_parameters():
                if name in trainable:
                    parameter.copy_(trainable[name])
        run.optimizer.load_state_dict(torch.load(last / "optimizer.pt", weights_only=False))
    state = torch.load(last / "state.pt", weights_only=False)
    run.scheduler.load_state_dict(state["scheduler"])
    if state["rankallocator"] is not None:
        run.unwrapped.base_model.rankallocator.__dict__.update(state["rankallocator"])
    rng_file = last / f"rng-{run.accelerator.process_index}.pt"
    set_rng_state(torch.load(rng_file if rng_file.exists() else last / "rng-0.pt", weights_only=False))
    rollout_file = last / f"rollout-{run.accelerator.process_index}.pt"
    if run.grpo is not None and rollout_file.exists():
        run.grpo.rollout = torch.load(rollout_file, weights_only=False)
    log(f"resuming from the checkpoint at step {progress['step']}")
    return progress["step"], progress["history"], progress["elapsed_s"]
