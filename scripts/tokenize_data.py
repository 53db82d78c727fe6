"""Tokenize one file of normalized records into an Arrow shard for training.

Each row holds the record id, its split ('train' or 'eval'), `input_ids`, and
`labels` in which prompt tokens are -100 (unless --train-on-inputs) and the
trailing EOS is trained on. Records longer than --max-length are truncated or
dropped (--too-long); both are counted.

Records are read, tokenized (one batched fast-tokenizer call per batch, on all
cores) and written batch by batch to an Arrow IPC stream, which
`datasets.Dataset.from_file` reads; memory stays bounded for any file size.

    python scripts/tokenize_data.py --input results/data/foo.jsonl \
        --tokenizer results/base_models/tiny-llama --template auto --max-length 256 \
        --output results/tokens/KEY/foo.arrow --stats results/tokens/KEY/foo.stats.json
"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from common import encode_batch, in_eval_split, load_tokenizer, resolve_template  # noqa: E402

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()),
])


def iter_records(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def split_of(record_id, split, eval_fraction):
    if split != "auto":
        return split
    return "eval" if in_eval_split(record_id, eval_fraction) else "train"


def write_batch(writer, batch, encoded, counts, max_length, too_long, split, eval_fraction):
    """Append one batch of encoded records to the shard; return their untruncated lengths."""
    columns = {name: [] for name in SCHEMA.names}
    for record, (input_ids, labels) in zip(batch, encoded):
        if len(input_ids) > max_length:
            counts["too_long"] += 1
            if too_long == "drop":
                counts["dropped_too_long"] += 1
                continue
            counts["truncated"] += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        record_split = split_of(record["id"], split, eval_fraction)
        for name, value in zip(SCHEMA.names, (record["id"], record_split, input_ids, labels, len(input_ids))):
            columns[name].append(value)
        counts[record_split] += 1
        counts["records"] += 1
        counts["tokens"] += len(input_ids)
        counts["trained_tokens"] += len(labels) - labels.count(-100)
    writer.write_batch(pa.record_batch(columns, schema=SCHEMA))
    return np.array([len(ids) for ids, _ in encoded], dtype=np.int32)


def tokenize_file(input_path, tokenizer, template, max_length, output_path, train_on_inputs=False,
                  too_long="truncate", split="auto", eval_fraction=0.1, batch_size=1000):
    """Write the shard and return its stats (counts and token-length percentiles)."""
    template = resolve_template(tokenizer, template)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial")
    batch_lengths = []
    counts = {"records": 0, "too_long": 0, "truncated": 0, "dropped_too_long": 0, "tokens": 0, "trained_tokens": 0,
              "train": 0, "eval": 0}
    records = iter_records(input_path)
    try:
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            while batch := list(itertools.islice(records, batch_size)):
                encoded = encode_batch(batch, tokenizer, template, train_on_inputs)
                batch_lengths.append(write_batch(writer, batch, encoded, counts, max_length, too_long, split,
                                                 eval_fraction))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, output_path)
    lengths = np.concatenate(batch_lengths) if batch_lengths else np.zeros(0, dtype=np.int32)
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).tolist() if len(lengths) else (0, 0, 0)
    return {**counts, "template": template, "max_length": max_length, "too_long_policy": too_long,
            "length_p50": p50, "length_p90": p90, "length_p99": p99, "length_max": int(lengths.max(initial=0))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="normalized records from validate_data.py")
    parser.add_argument("--tokenizer", required=True, help="local path or Hub id of the base model")
    parser.add_argument("--chat-template", default=None, help="a Jinja chat template replacing the tokenizer's own")
    parser.add_argument("--template", choices=("auto", "alpaca", "chat"), default="auto")
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--too-long", choices=("truncate", "drop"), default="truncate")
    parser.add_argument("--train-on-inputs", action="store_true")
    parser.add_argument("--split", choices=("auto", "train", "eval"), default="auto",
                        help="auto: by a stable hash of each record, --eval-fraction of them held out")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer, args.chat_template)
    stats = tokenize_file(args.input, tokenizer, args.template, args.max_length, args.output, args.train_on_inputs,
                          args.too_long, args.split, args.eval_fraction)
    args.stats.write_text(json.dumps(stats, indent=2) + "\n")
    print(f"{args.input}: {stats['records']} records ({stats['train']} train, {stats['eval']} eval), "
          f"{stats['tokens']} tokens, {stats['too_long']} longer than {args.max_length} "
          f"({stats['truncated']} truncated, {stats['dropped_too_long']} dropped)")


if __name__ == "__main__":
    main()
