"""The tokenized shard: one Arrow IPC stream per (tokenization, dataset file),
written by tokenize_data.py and read by training and evaluation.

Each row holds a record's content id, its split ('train' or 'eval'), its
token ids, its labels (IGNORE_INDEX where there is no loss) and its length.
`datasets.Dataset.from_file` reads a shard as it is.
"""
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()),
])


def read_shards(paths, split):
    """Tokenized examples of one split ('train' or 'eval') from shard files."""
    examples = []
    for path in paths:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        table = table.filter(pa.compute.equal(table["split"], split))
        examples += [{"id": record_id, "input_ids": input_ids, "labels": labels} for record_id, input_ids, labels
                     in zip(table["id"].to_pylist(), table["input_ids"].to_pylist(), table["labels"].to_pylist())]
    return examples
