"""The tokenized shard: one Arrow IPC stream per (tokenization, dataset file),
written by tokenize_data.py and read by training and evaluation.

Each row holds a record's content id, its split ('train' or 'eval'), its
token ids, its labels (IGNORE_INDEX where there is no loss) and its length.
`datasets.Dataset.from_file` reads a shard as it is.
"""
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

SHARD_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("split", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("length", pa.int32()),
])


class ShardExamples:
    """The examples of one split ('train' or 'eval') of some shard files, read through
    memory maps: only the row index, split and length columns are loaded; an example's
    tokens become Python lists when it is asked for (a batch at a time), so memory does
    not grow with the dataset. Indexing gives {"id", "input_ids", "labels"} dicts;
    a slice or a list of positions gives a list of them."""

    def __init__(self, paths, split):
        self.batches = []  # record batches whose buffers live in the memory maps
        for path in paths:
            with pa.memory_map(str(path)) as source:
                self.batches += list(pa.ipc.open_stream(source))
        where = [np.flatnonzero(pa.compute.equal(b.column("split"), split).to_numpy(zero_copy_only=False))
                 for b in self.batches]
        self.batch_of = np.concatenate([np.full(len(rows), i) for i, rows in enumerate(where)] or [np.zeros(0, int)])
        self.row_of = np.concatenate(where or [np.zeros(0, int)])
        self.lengths = np.concatenate([b.column("length").to_numpy()[rows] for b, rows in zip(self.batches, where)]
                                      or [np.zeros(0, np.int32)])
        self.columns = [(b.column("id"), *[(b.column(name).offsets.to_numpy(), b.column(name).values.to_numpy())
                                            for name in ("input_ids", "labels")]) for b in self.batches]

    def __len__(self):
        return len(self.row_of)

    def record_ids(self):
        return [self.columns[b][0][r].as_py() for b, r in zip(self.batch_of, self.row_of)]

    def example(self, position):
        ids, (id_offsets, id_values), (label_offsets, label_values) = self.columns[self.batch_of[position]]
        row = self.row_of[position]
        return {"id": ids[row].as_py(), "input_ids": id_values[id_offsets[row]:id_offsets[row + 1]].tolist(),
                "labels": label_values[label_offsets[row]:label_offsets[row + 1]].tolist()}

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self.example(i) for i in range(len(self))[key]]
        if isinstance(key, (list, tuple, np.ndarray)):
            return [self.example(i) for i in key]
        return self.example(range(len(self))[key])

    def __iter__(self):
        return (self.example(i) for i in range(len(self)))


def read_shards(paths, split):
    """Tokenized examples of one split ('train' or 'eval') from shard files (see ShardExamples)."""
    return ShardExamples(paths, split)
