"""The mean loss per trained token over a set of examples: the held-out loss that
training logs (and selects weights by) and that evaluation reports for base and tuned."""
import torch

from finetune.data.batches import pad_batch
from finetune.data.prompts import IGNORE_INDEX, count_trained_tokens


def summed_token_loss(model, batch):
    """Sum of the cross-entropy over the trained tokens of a padded batch, computed from
    the logits: passing labels would let a model add terms of its own (AdaLoRA adds its
    orthogonality regularizer, and needs a trainable adapter to do so)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    trained = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(logits[trained].float(), targets[trained], reduction="sum")


@torch.no_grad()
def mean_token_loss(model, examples, batch_size, pad_token_id):
    """Mean loss per trained token over the examples, and the number of trained tokens."""
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in pad_batch(examples[start:start + batch_size], pad_token_id).items()}
        total_loss += summed_token_loss(model, batch).item()
        total_tokens += count_trained_tokens(batch["labels"])
    return total_loss / max(total_tokens, 1), total_tokens
