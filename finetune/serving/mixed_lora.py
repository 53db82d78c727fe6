"""Many LoRA adapters in one batch at the cost of one. peft's mixed batches (adapter_names=) run each
layer's LoRA once per adapter in the batch, on that adapter's rows; here every adapter's A and B of a
layer are stacked once at load time (ranks padded with zeros, the scaling folded into B, row 0 the
base: zeros), and each forward gathers every row's own pair and applies them in two batched matrix
products, however many adapters the batch holds (the S-LoRA / Punica idea, in plain torch). The base
layers run with peft's adapters switched off; the same numbers as peft's own path (tests/test_serve.py)."""
import contextlib

import torch


def stack_adapters(peft_model, names):
    """{LoRA layer: (A [n+1, r, in], B [n+1, out, r])} for adapters `names` (row i+1: names[i]); None where a
    LoRA layer is not a plain linear one (embeddings, expert weights): peft's own mixed batches serve those."""
    from peft.tuners.lora import LoraLayer
    stacks = {}
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or not any(name in module.lora_A for name in names):
            continue
        if module.lora_embedding_A or not all(isinstance(module.lora_A[n], torch.nn.Linear)
                                              for n in names if n in module.lora_A):
            return None
        present = [n for n in names if n in module.lora_A]
        rank = max(module.lora_A[n].weight.shape[0] for n in present)
        weight = module.lora_A[present[0]].weight
        inputs, outputs = weight.shape[1], module.lora_B[present[0]].weight.shape[0]
        a = weight.new_zeros(len(names) + 1, rank, inputs)
        b = weight.new_zeros(len(names) + 1, outputs, rank)
        for row, name in enumerate(names, start=1):
            if name in present:
                r = module.lora_A[name].weight.shape[0]
                a[row, :r] = module.lora_A[name].weight.detach()
                b[row, :, :r] = module.lora_B[name].weight.detach() * module.scaling[name]
        stacks[module] = (a, b)
    return stacks


@contextlib.contextmanager
def mixed_adapters(peft_model, stacks, rows):
    """Forwards of peft_model inside apply row i's adapter rows[i] (0: none) from the stacks."""
    index = torch.as_tensor(rows, device=next(iter(stacks.values()))[0].device) if stacks else None

    def add_delta(module, args, output):
        a, b = stacks[module]
        x = args[0].to(a.dtype)
        delta = (x @ a[index].transpose(1, 2)) @ b[index].transpose(1, 2)
        return output + delta.to(output.dtype)
    handles = [module.register_forward_hook(add_delta) for module in stacks]
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        for handle in handles:
            handle.remove()
