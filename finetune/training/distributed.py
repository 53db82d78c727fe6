"""How a training run spans processes (one per GPU, on one node or several).

- `ddp`: every process holds the whole model; accelerate wraps it in
  DistributedDataParallel, which averages the gradients.
- `fsdp`: torch's FSDP2 (`fully_shard`) splits every parameter, gradient and
  optimizer state over the processes, one decoder layer at a time, so a model
  that does not fit one GPU trains on several. The parameters of a layer are
  gathered just for its forward and backward; gradients are reduce-scattered
  (averaged, as DDP does). Checkpoints are written sharded (each process writes
  its own part, torch.distributed.checkpoint) and saving gathers only what is
  saved: the adapter, or for method full the whole model, on the first process.

accelerate starts the processes and sets up the process group for both (gloo on
CPU, NCCL on GPUs). FSDP2 is applied with torch's own `fully_shard`, not
accelerate's FSDP plugin: accelerate 1.15 only turns FSDP on for GPU-type
process groups, and this way the CPU test runs the same code as a GPU cluster.
"""
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from finetune.models import DTYPES


def transformers_model(model):
    """The transformers model itself, also when peft wraps it."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shard_model(model, precision, device, weights_on_first_process_only=False):
    """FSDP2 over each decoder layer, then over the rest (embeddings, final norm, head).
    Under bf16/fp16 the gathered parameters are cast to that dtype for compute and the
    gradients reduced in fp32; the sharded trainable weights stay fp32 masters.

    weights_on_first_process_only: only the first process read the weights; the others
    built the model on the meta device. Each then receives its shards from the first, so
    a node holds the whole model in memory once, not once per GPU."""
    base = transformers_model(model)
    layers = set(getattr(base, "_no_split_modules", None) or [])  # its decoder layer classes
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no decoder layer classes (_no_split_modules): "
                         "FSDP cannot tell where to split it; use distributed ddp")
    first = dist.get_rank() == 0
    full_state = model.state_dict() if weights_on_first_process_only and first else {}
    compute = None if precision == "fp32" else DTYPES[precision]
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32 if compute else None)
    for module in base.modules():
        if type(module).__name__ in layers:
            fully_shard(module, mp_policy=policy)
    fully_shard(base, mp_policy=policy)
    if weights_on_first_process_only:
        if not first:
            model.to_empty(device=device)
        set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=True))
        for buffer in model.buffers():  # rotary frequencies and the like, not in the state dict
            dist.broadcast(buffer, src=0)
    return model


def saved_state(model, adapter_only):
    """The state to save, gathered whole onto the first process's CPU (the others get {}).
    Every process must call this. For an adapter only the trainable weights are gathered."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=adapter_only)
    return get_model_state_dict(model, options=options)


def sharded_training_state(model, optimizer):
    """Trainable weights and optimizer state, each process holding its own shard (for torch.distributed.checkpoint)."""
    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def restore_sharded_training_state(model, optimizer, state):
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def clip_gradients(model, max_norm, accelerator, sharded):
    """Clip to max_norm; the norm of the whole gradient (also when it is sharded)."""
    if not sharded:
        return accelerator.clip_grad_norm_(model.parameters(), max_norm)
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
