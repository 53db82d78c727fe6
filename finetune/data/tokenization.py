"""Tokenizing one file of normalized records into an Arrow shard (shards.py has the format).

Each row holds the record id, its split ('train' or 'eval', by a stable hash of the record
unless the dataset is all one split), `input_ids`, and `labels` in which prompt tokens are
IGNORE_INDEX (unless train_on_inputs) and the trailing EOS is trained on. Records longer than
max_length are truncated or dropped (too_long); both are counted.

Preference and unpaired records (preference tuning) make rows of their own (pairs.py).

Records are read, tokenized (one batched fast-tokenizer call per batch, on all cores) and
written batch by batch to an Arrow IPC stream; memory stays bounded for any file size.
"""
import itertools

import numpy as np
import pyarrow as pa

from finetune.data.pairs import SCHEMAS, answers, encode_answers, pair_columns, side_record
from finetune.data.prompts import count_trained_tokens, encode_batch, format_segments, resolve_template
from finetune.data.shards import SHARD_SCHEMA
from finetune.files import atomic_path, read_jsonl


def in_eval_split(record_id, fraction):
    """Stable split by a hash of the record's content, not its position: adding
    records never moves existing ones between train and eval."""
    return int(record_id[:8], 16) / 0x100000000 < fraction


def split_of(record_id, split, fraction):
    if split != "auto":
        return split
    return "eval" if in_eval_split(record_id, fraction) else "train"


def write_batch(writer, batch, encoded, counts, max_length, too_long, split, fraction):
    """Append one batch of encoded records to the shard; return their untruncated lengths."""
    columns = {name: [] for name in SHARD_SCHEMA.names}
    for record, (input_ids, labels) in zip(batch, encoded):
        if len(input_ids) > max_length:
            counts["too_long"] += 1
            if too_long == "drop":
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        record_split = split_of(record["id"], split, fraction)
        for name, value in zip(SHARD_SCHEMA.names, (record["id"], record_split, input_ids, labels, len(input_ids))):
            columns[name].append(value)
        counts[record_split] += 1
        counts["records"] += 1
        counts["tokens"] += len(input_ids)
        counts["trained_tokens"] += count_trained_tokens(np.asarray(labels))
    writer.write_batch(pa.record_batch(columns, schema=SHARD_SCHEMA))
    return np.array([len(ids) for ids, _ in encoded], dtype=np.int32)


class RecordError(Exception):
    """A record the prompt template cannot format, named by its file and line."""


def encode_or_explain(batch, tokenizer, template, train_on_inputs, source):
    """The batch encoded, or RecordError naming the first record that cannot be (file:line: why)."""
    try:
        if batch[0]["format"] in SCHEMAS:
            return encode_answers(batch, tokenizer, template)
        return encode_batch(batch, tokenizer, template, train_on_inputs)
    except ValueError as error:
        if str(error).startswith("line "):  # a preference pair whose prompt renders two ways
            raise RecordError(f"{source}:{str(error).removeprefix('line ')}") from None
        for record in batch:
            sides = [side_record(record, answer) for answer in answers(record)] if record["format"] in SCHEMAS \
                else [record]
            try:
                for side in sides:
                    format_segments(side, tokenizer, template)
            except ValueError as exc:
                raise RecordError(f"{source}:{record.get('line', '?')}: {exc}") from None
        raise


def write_records(writer, batch, encoded, counts, max_length, too_long, split, fraction):
    """Append a batch of encoded records of any format to the shard; return their untruncated lengths."""
    if batch[0]["format"] not in SCHEMAS:
        return write_batch(writer, batch, encoded, counts, max_length, too_long, split, fraction)
    splits = [split_of(record["id"], split, fraction) for record in batch]
    writer.write_batch(pair_columns(batch, encoded, splits, counts, max_length, too_long))
    return np.array([max(len(ids) for ids, _ in sides) for sides in encoded], dtype=np.int32)


def first_format(path):
    """The format of a file of normalized records (validation makes every record of a file one format)."""
    first = next(read_jsonl(path), None)
    return first["format"] if first else "alpaca"


def tokenize_file(input_path, tokenizer, template, max_length, output_path, train_on_inputs=False,
                  too_long="truncate", split="auto", fraction=0.1, batch_size=1000, source=None):
    """Write the shard and return its stats (counts and token-length percentiles).
    `source` names the original data file in errors (default: input_path)."""
    template = resolve_template(tokenizer, template)
    batch_lengths = []
    counts = {"records": 0, "too_long": 0, "truncated": 0, "dropped_too_long": 0, "tokens": 0, "trained_tokens": 0,
              "train": 0, "eval": 0}
    record_format = first_format(input_path)
    if record_format in SCHEMAS:
        counts["no_answer_left"] = 0
    records = read_jsonl(input_path)
    with atomic_path(output_path) as partial:
        schema = SCHEMAS.get(record_format, SHARD_SCHEMA)
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            while batch := list(itertools.islice(records, batch_size)):
                encoded = encode_or_explain(batch, tokenizer, template, train_on_inputs, source or input_path)
                batch_lengths.append(write_records(writer, batch, encoded, counts, max_length, too_long, split,
                                                   fraction))
        if counts["records"] == 0 and counts.get("no_answer_left"):
            raise RecordError(f"{source or input_path}: every record lost an answer to truncation at max_length "
                              f"{max_length} ({counts['no_answer_left']} records); raise max_length")
    lengths = np.concatenate(batch_lengths) if batch_lengths else np.zeros(0, dtype=np.int32)
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).tolist() if len(lengths) else (0, 0, 0)
    return {**counts, "format": record_format, "template": template, "max_length": max_length, "too_long_policy": too_long,
            "length_p50": p50, "length_p90": p90, "length_p99": p99, "length_max": int(lengths.max(initial=0))}
