"""The tokenized shard: one Arrow IPC stream per (tokenization, dataset file),
written by tokenize_data.py and read by training and evaluation.

Each row holds a record's content id, its split ('train' or 'eval'), its
token ids, its labels (IGNORE_INDEX where there is no loss) and its length;
a preference or unpaired shard holds a second sequence per row (data/pairs.py).
`datasets.Dataset.from_file` reads a shard as it is.
"""
import mmap

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

    RELEASE_EVERY = 256  # reads between dropping the maps' resident pages

    def __init__(self, paths, split):
        self.split = split
        self.maps, self.batches, self.reads = [], [], 0  # record batches whose buffers live in the maps
        file_of_batch = []
        for number, path in enumerate(paths):
            with open(path, "rb") as f:
                self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            self.batches += list(pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(self.maps[-1]))))
            file_of_batch += [number] * (len(self.batches) - len(file_of_batch))
        where = [np.flatnonzero(pa.compute.equal(b.column("split"), split).to_numpy(zero_copy_only=False))
                 for b in self.batches]
        # Examples of this split in each file: the files' examples lie end to end, in the order given.
        self.sizes = np.bincount(np.asarray(file_of_batch, dtype=int), weights=[len(rows) for rows in where],
                                 minlength=len(paths)).astype(int).tolist()
        self.batch_of = np.concatenate([np.full(len(rows), i) for i, rows in enumerate(where)] or [np.zeros(0, int)])
        self.row_of = np.concatenate(where or [np.zeros(0, int)])
        self.lengths = np.concatenate([b.column("length").to_numpy()[rows] for b, rows in zip(self.batches, where)]
                                      or [np.zeros(0, np.int32)])
        kinds = {shard_kind(batch.schema) for batch in self.batches}
        if len(kinds) > 1:
            raise ValueError(f"the shards {', '.join(map(str, paths))} mix record formats "
                             f"({', '.join(sorted(kinds))}); a run trains on one kind: SFT records, preference pairs "
                             "or unpaired completions")
        self.kind = kinds.pop() if kinds else "sft"
        self.sequences = [name for name in (self.batches[0].schema.names if self.batches else ["input_ids", "labels"])
                          if name.endswith("input_ids") or name.endswith("labels")]
        self.columns = [(b.column("id"), [(b.column(name).offsets.to_numpy(), b.column(name).values.to_numpy())
                                          for name in self.sequences],
                         b.column("desirable").to_numpy(zero_copy_only=False) if self.kind == "unpaired" else None)
                        for b in self.batches]
        self.reference = None

    def __len__(self):
        return len(self.row_of)

    def record_ids(self):
        return [self.columns[b][0][r].as_py() for b, r in zip(self.batch_of, self.row_of)]

    def example(self, position):
        ids, sequences, desirable = self.columns[self.batch_of[position]]
        row = self.row_of[position]
        example = {"id": ids[row].as_py()}
        for name, (offsets, values) in zip(self.sequences, sequences):
            example[name] = values[offsets[row]:offsets[row + 1]].tolist()
        if desirable is not None:
            example["desirable"] = bool(desirable[row])
        if self.reference is not None:
            example.update({name: float(values[position]) for name, values in self.reference.items()})
        return example

    def attach_reference(self, paths):
        """Add the reference model's log-probabilities (scripts/reference_logps.py: one file per shard, its rows
        in the shard's order) to every example, as ref_* fields; ValueError when they are not of these shards."""
        tables = [pa.ipc.open_stream(pa.OSFile(str(path))).read_all() for path in paths]
        names = [name for name in tables[0].column_names if name.endswith("logps")] if tables else []
        columns = {name: [] for name in ["id"] + names}
        for table in tables:
            rows = np.flatnonzero(pa.compute.equal(table.column("split"), self.split).to_numpy(zero_copy_only=False))
            for name in columns:
                columns[name].append(table.column(name).to_numpy(zero_copy_only=False)[rows])
        reference_ids = np.concatenate(columns.pop("id")) if tables else np.zeros(0)
        if list(reference_ids) != self.record_ids():
            raise ValueError(f"the reference log-probabilities {', '.join(map(str, paths))} are not of these shards' "
                             f"{self.split} records (another tokenization, or shards written since)")
        self.reference = {f"ref_{name}": np.concatenate(values) for name, values in columns.items()}

    def release_pages(self):
        """Drop the pages of the maps this process has touched: an epoch (or the held-out pass,
        whose rows lie all over the files) would otherwise leave whole shards resident. The
        pages stay in the page cache; reading them again costs no disk access."""
        for mapped in self.maps:
            mapped.madvise(mmap.MADV_DONTNEED)

    def __getitem__(self, key):
        self.reads += 1
        if self.reads % self.RELEASE_EVERY == 0:
            self.release_pages()
        if isinstance(key, slice):
            return [self.example(i) for i in range(len(self))[key]]
        if isinstance(key, (list, tuple, np.ndarray)):
            return [self.example(i) for i in key]
        return self.example(range(len(self))[key])

    def __iter__(self):
        return (self.example(i) for i in range(len(self)))


def shard_kind(schema):
    """What a shard holds: sft records, preference pairs, or unpaired completions (pairs.py)."""
    names = schema.names
    return "preference" if "rejected_input_ids" in names else "unpaired" if "kl_input_ids" in names else "sft"


def read_shards(paths, split):
    """Tokenized examples of one split ('train' or 'eval') from shard files (see ShardExamples)."""
    return ShardExamples(paths, split)
