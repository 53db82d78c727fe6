"""Tokenizing preference records (a prompt with a chosen and a rejected answer) and unpaired
records (a prompt, one completion and a desirable/undesirable label, for kto) into shards.

Each answer is rendered as the SFT record with the same prompt would be (`format_segments`):
the same template, masking and EOS rules, so a run chained after SFT sees its prompts exactly
as SFT did. Only the answers are trained on (train_on_inputs does not apply).

- A preference row holds the chosen side in `input_ids`/`labels` (so the SFT readers, the
  held-out loss and generation, see the chosen answer) and the rejected side in
  `rejected_input_ids`/`rejected_labels`. Both sides must render the prompt to the same
  tokens: a pair whose prompt renders differently in its two halves is an error naming its line.
- An unpaired row holds its completion, its label (`desirable`), and a mismatched sequence
  for KTO's KL estimate: its prompt with the completion of the record before it in the same
  split of the same batch of records (cycled, as TRL cycles completions within a batch), in
  `kl_input_ids`/`kl_labels`. The mismatch is fixed here, so the reference model's
  log-probabilities of it can be computed once (scripts/reference_logps.py).
- A side longer than max_length is truncated (or, with too_long: drop, the record dropped); a
  record one of whose answers has no token left after truncation is dropped and counted
  (`no_answer_left`): it would teach nothing, or worse, compare an answer with an empty one.
"""
import numpy as np
import pyarrow as pa

from finetune.data.prompts import IGNORE_INDEX, count_trained_tokens, encode_batch

TOKENS = pa.list_(pa.int32())
PAIR_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string()), ("input_ids", TOKENS), ("labels", TOKENS),
                         ("rejected_input_ids", TOKENS), ("rejected_labels", TOKENS), ("length", pa.int32())])
UNPAIRED_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string()), ("input_ids", TOKENS), ("labels", TOKENS),
                             ("kl_input_ids", TOKENS), ("kl_labels", TOKENS), ("desirable", pa.bool_()),
                             ("length", pa.int32())])
SCHEMAS = {"preference": PAIR_SCHEMA, "unpaired": UNPAIRED_SCHEMA}


def answers(record):
    return [record["chosen"], record["rejected"]] if record["format"] == "preference" else [record["completion"]]


def side_record(record, answer):
    """The SFT record of one answer to a preference or unpaired record's prompt."""
    if "messages" in record:
        return {"format": "chat", "messages": record["messages"] + [{"role": "assistant", "content": answer}]}
    return {"format": "alpaca", "instruction": record["instruction"], "input": record.get("input", ""),
            "output": answer}


def prompt_length(labels):
    """Tokens before the first trained one."""
    trained = np.flatnonzero(np.asarray(labels) != IGNORE_INDEX)
    return int(trained[0]) if len(trained) else len(labels)


def encode_answers(batch, tokenizer, template):
    """[[(input_ids, labels) of each answer]] of the records; ValueError naming the line of a pair whose
    prompt renders differently in its two halves."""
    sides = [side_record(record, answer) for record in batch for answer in answers(record)]
    encoded = iter(encode_batch(sides, tokenizer, template))
    per_record = [[next(encoded) for _ in answers(record)] for record in batch]
    for record, encoded_sides in zip(batch, per_record):
        prompts = [ids[:prompt_length(labels)] for ids, labels in encoded_sides]
        if any(prompt != prompts[0] for prompt in prompts[1:]):
            raise ValueError(f"line {record.get('line', '?')}: the prompt renders to other tokens before the chosen "
                             "answer than before the rejected one (the chat template renders the prompt depending on "
                             "the answer); use template alpaca, or a chat template that does not")
    return per_record


def fit(input_ids, labels, max_length):
    """One side cut to max_length, and whether it still has a trained token."""
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels, count_trained_tokens(np.asarray(labels)) > 0


def kl_sides(records, encoded, splits):
    """Each unpaired record's prompt with the completion of the record before it in its split (cycled)."""
    kl = [None] * len(records)
    for split in set(splits):
        members = [i for i, s in enumerate(splits) if s == split]
        for position, i in enumerate(members):
            other = members[position - 1]
            (ids, labels), (other_ids, other_labels) = encoded[i][0], encoded[other][0]
            start, other_start = prompt_length(labels), prompt_length(other_labels)
            kl[i] = (ids[:start] + other_ids[other_start:], [IGNORE_INDEX] * start + other_labels[other_start:])
    return kl


def pair_columns(records, encoded, splits, counts, max_length, too_long):
    """The shard's columns of a batch of preference or unpaired records (see the module's doc)."""
    unpaired = records[0]["format"] == "unpaired"
    schema = UNPAIRED_SCHEMA if unpaired else PAIR_SCHEMA
    columns = {name: [] for name in schema.names}
    kl = kl_sides(records, encoded, splits) if unpaired else [None] * len(records)
    for record, sides, split, kl_side in zip(records, encoded, splits, kl):
        sides = sides + [kl_side] if unpaired else sides
        if any(len(ids) > max_length for ids, _ in sides[:2]):
            counts["too_long"] += 1
            if too_long == "drop":
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += 1
        fitted = [fit(ids, labels, max_length) for ids, labels in sides]
        if not all(kept for _, _, kept in fitted):
            counts["no_answer_left"] += 1
            continue
        (ids, labels, _), (other_ids, other_labels, _) = fitted
        values = [record["id"], split, ids, labels, other_ids, other_labels]
        values += [record["label"]] if unpaired else []
        for name, value in zip(schema.names, values + [max(len(ids), len(other_ids))]):
            columns[name].append(value)
        counts[split] += 1
        counts["records"] += 1
        counts["tokens"] += len(ids) + len(other_ids)
        counts["trained_tokens"] += count_trained_tokens(np.asarray(labels))
    return pa.record_batch(columns, schema=schema)
