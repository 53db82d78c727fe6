"""Tokenize one file of normalized records into an Arrow shard for training.

Each row holds the record id, `input_ids`, and `labels` in which prompt tokens
are -100 (unless --train-on-inputs) and the trailing EOS is trained on. Rows
are written in batches to an Arrow IPC stream (readable with
`datasets.Dataset.from_file`), so memory stays bounded for large files.

    python scripts/tokenize_data.py --input results/data/foo.jsonl \
        --tokenizer results/base_models/tiny-llama --template auto --max-length 256 \
        --output results/tokens/KEY/foo.arrow --stats results/tokens/KEY/foo.stats.json
"""
import argparse
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from common import encode_record, load_tokenizer, resolve_template

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()),
    ("truncated", pa.bool_()),
])


def iter_records(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def tokenize_file(input_path, tokenizer, template, max_length, output_path, train_on_inputs=False, batch_size=1000):
    """Write the shard and return token-length stats."""
    template = resolve_template(tokenizer, template)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial")
    lengths, truncated_count, trained_tokens = [], 0, 0
    records = iter_records(input_path)
    with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
        while batch := list(itertools.islice(records, batch_size)):
            columns = {name: [] for name in SCHEMA.names}
            for record in batch:
                input_ids, labels, truncated = encode_record(record, tokenizer, template, max_length, train_on_inputs)
                for name, value in zip(SCHEMA.names, (record["id"], input_ids, labels, len(input_ids), truncated)):
                    columns[name].append(value)
                truncated_count += truncated
                trained_tokens += sum(label != -100 for label in labels)
            lengths += columns["length"]
            writer.write_batch(pa.record_batch(columns, schema=SCHEMA))
    os.replace(partial, output_path)
    percentiles = np.percentile(lengths, [50, 90, 99]).tolist() if lengths else [0, 0, 0]
    return {
        "records": len(lengths),
        "template": template,
        "max_length": max_length,
        "tokens": int(sum(lengths)),
        "trained_tokens": int(trained_tokens),
        "truncated": truncated_count,
        "length_p50": percentiles[0], "length_p90": percentiles[1], "length_p99": percentiles[2],
        "length_max": max(lengths, default=0),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="normalized records from validate_data.py")
    parser.add_argument("--tokenizer", required=True, help="local path or Hub id of the base model")
    parser.add_argument("--template", choices=("auto", "alpaca", "chat"), default="auto")
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--train-on-inputs", action="store_true")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    stats = tokenize_file(args.input, tokenizer, args.template, args.max_length, args.output, args.train_on_inputs)
    args.stats.write_text(json.dumps(stats, indent=2) + "\n")
    print(f"{args.input}: {stats['records']} records, {stats['tokens']} tokens, {stats['truncated']} truncated")


if __name__ == "__main__":
    main()
