"""Tokenized examples into model inputs: the order of micro-batches (shuffled,
grouped by length, split over processes, the same on every rerun), and padded
or packed batches (never padded to max_length)."""
import random

import torch

from finetune.data.mixing import epoch_examples, epoch_shares
from finetune.data.prompts import IGNORE_INDEX


def length_grouped_batches(lengths, batch_size, seed, pool=None):
    """Shuffled batches of similar-length records: little padding, still random order.
    pool: the example positions to batch (an epoch of a weighted mix); default all of them."""
    rng = random.Random(seed)
    order = list(range(len(lengths))) if pool is None else [int(i) for i in pool]
    rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def micro_batch_indices(lengths, batch_size, seed, process_index, num_processes, mix=None):
    """Endless (epoch, record indices) of this process's micro-batches, the same on every rerun.
    mix: (sizes, weights) of the sources laid end to end, to weight each epoch (mixing.py)."""
    epoch = 0
    while True:
        pool = None
        if mix:
            sizes, weights = mix
            pool = epoch_examples(sizes, epoch_shares(sizes, weights), seed, epoch)
        batches = length_grouped_batches(lengths, batch_size, seed + epoch, pool)
        per_process = len(batches) // num_processes
        for indices in batches[process_index::num_processes][:per_process]:
            yield epoch, indices
        epoch += 1


def pad_batch(examples, pad_token_id):
    """Right-padded tensors of one batch: padding to the longest record, never to max_length."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_batch(examples):
    """All examples back to back in one row, position ids restarting per example.
    Attention then stays within each example (flash-attention varlen on GPU,
    a block-diagonal mask otherwise; transformers derives both from the position
    ids when there is no attention mask and no KV cache), and no token is padding."""
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        input_ids += example["input_ids"]
        # The first token of an example is never a target: it would be predicted from the previous example.
        labels += [IGNORE_INDEX] + example["labels"][1:]
        position_ids += range(len(example["input_ids"]))
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([position_ids])}


def real_tokens(batch):
    """Tokens in a batch that are not padding."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
