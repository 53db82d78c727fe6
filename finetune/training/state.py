"""The state of a training run, as typed objects: what setup makes once (`Training`), and
what the loop advances (`Progress`: the part a checkpoint carries besides the weights)."""
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from accelerate import Accelerator

from finetune.data.shards import ShardExamples
from finetune.training.selection import new_record


def new_history():
    """Rows so far (metrics.jsonl, samples.jsonl) and the record of held-out losses (selection.py)."""
    return {"metrics": [], "samples": [], "selection": new_record()}


@dataclasses.dataclass
class Progress:
    start_step: int = 0  # the step a resumed run starts after
    elapsed_before: float = 0.0  # seconds trained before this session (resumed runs)
    history: dict = dataclasses.field(default_factory=new_history)
    best_state: dict | None = None  # the weights of the lowest held-out loss so far (keep: best)
    contributed: np.ndarray | None = None  # examples each dataset gave to the steps trained so far
    started: float = 0.0  # time.perf_counter() when this session's loop began


@dataclasses.dataclass
class Training:
    run_name: str
    settings: Any  # the train stage's settings (finetune.settings: TrainSettings)
    accelerator: Accelerator
    device: torch.device
    precision: str  # fp32, bf16 or fp16, resolved for this device
    packing: bool
    sharded: bool  # FSDP over several processes
    tokenizer: Any
    model: torch.nn.Module  # as the loop calls it (wrapped by DDP, or sharded)
    unwrapped: torch.nn.Module  # the peft (or transformers) model itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_examples: ShardExamples
    eval_examples: ShardExamples
    total_steps: int
    trainable_parameters: int
    total_parameters: int
    mix: dict  # per dataset: weight, training records, examples per epoch (data/mixing.py)
    source_of: np.ndarray  # the dataset of each training example
    samples: tuple  # the prompts answered during training, prepared (training/samples.py), or ([], [])
    checkpoints: Path | None
    fingerprint: str | None = None  # of what this run learns (training/checkpoints.py)
    batches: Iterator | None = None  # (epoch, example positions) of each micro-batch
    progress: Progress = dataclasses.field(default_factory=Progress)
    grpo: Any = None  # objective grpo: prompts, rewards and the last rollout (training/grpo.py: GrpoState)

    def say(self, message):
        self.accelerator.print(f"[{self.run_name}] {message}", flush=True)

    def next_micro_batch(self):
        """(epoch, record indices) of this process's next micro-batch, counted to the datasets they come from."""
        epoch, indices = next(self.batches)
        self.progress.contributed += np.bincount(self.source_of[indices], minlength=len(self.progress.contributed))
        return epoch, indices
