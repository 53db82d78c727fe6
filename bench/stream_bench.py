"""Benchmark how training reads its shards as datasets grow: peak RSS and time to the
first optimizer step of `scripts/train.py` (tiny model, LoRA, 1 step), with the
examples streamed from the memory-mapped shards (this workflow) against the
previous reader that turned every example into Python lists up front (the
baseline, patched in for the same run).

Synthetic shards of N records (token ids uniform over the vocabulary, lengths
20-275, about 147 tokens a record, split 10% eval), written in the shard format.

    python bench/stream_bench.py --records 100000 300000 1000000 --baseline-max 300000
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from finetune.data.shards import SHARD_SCHEMA  # noqa: E402
from finetune.settings import write_settings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# Runs train.py in a child process (scripts/ on its PYTHONPATH): with baseline, read_shards (which
# training's setup calls) is the old list-building reader.
CHILD = r"""
import json, resource, sys, time
started = time.perf_counter()
import train
from finetune.data import shards
from finetune.training import setup
if sys.argv[1] == "baseline":
    def read_lists(paths, split):
        examples, sizes = [], []
        for path in paths:
            with shards.pa.memory_map(str(path)) as source:
                table = shards.pa.ipc.open_stream(source).read_all()
            table = table.filter(shards.pa.compute.equal(table["split"], split))
            examples += [{"id": i, "input_ids": x, "labels": y} for i, x, y in
                         zip(table["id"].to_pylist(), table["input_ids"].to_pylist(), table["labels"].to_pylist())]
            sizes.append(len(table))
        return Lists(examples, sizes)

    class Lists(list):
        def __init__(self, examples, sizes):
            super().__init__(examples)
            self.sizes = sizes  # examples of each shard, end to end

        def __getitem__(self, key):
            if isinstance(key, list):
                return [list.__getitem__(self, i) for i in key]
            return list.__getitem__(self, key)

        @property
        def lengths(self):
            return [len(e["input_ids"]) for e in self]

    setup.read_shards = read_lists
first_step = {}
original = train.train_step
def timed(run, step):
    result = original(run, step)
    first_step.setdefault("s", time.perf_counter() - started)
    return result
train.train_step = timed
train.main(sys.argv[2:])
print(json.dumps({"first_step_s": first_step["s"], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_shard(path, records, vocab, seed=0):
    rng = np.random.default_rng(seed)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, SHARD_SCHEMA) as writer:
        for start in range(0, records, 10_000):
            n = min(10_000, records - start)
            lengths = rng.integers(20, 276, n).astype(np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = rng.integers(3, vocab, offsets[-1]).astype(np.int32)
            labels = values.copy()
            labels[offsets[:-1]] = -100
            ids = pa.array([f"{start + i:016x}" for i in range(n)])
            split = pa.array(np.where(rng.random(n) < 0.1, "eval", "train"))
            writer.write_batch(pa.record_batch([
                ids, split, pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(labels)), pa.array(lengths)], schema=SHARD_SCHEMA))
    return int(records)


def measure(model, shard, work, baseline):
    out = work / ("baseline" if baseline else "stream")
    settings = write_settings(work / "train-settings.json", "train", max_steps=1, batch_size=8, checkpoint_every=0,
                              eval_every=0)
    command = [sys.executable, "-c", CHILD, "baseline" if baseline else "stream", "--settings", str(settings),
               "--base-model", str(model), "--shards", str(shard), "--output-dir", str(out / "trained"),
               "--metrics", str(out / "m.jsonl"), "--summary", str(out / "s.json"), "--threads", "2"]
    scripts = os.pathsep.join(filter(None, [str(REPO / "scripts"), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(command, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": scripts})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--baseline-max", type=int, default=300_000, help="largest size the list reader is run at")
    args = parser.parse_args()
    from finetune.tiny_model import build_tiny_model
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model([REPO / "data" / "word_tasks.jsonl"], work / "model", vocab_size=1024)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print("| records | shard | streamed: first step | streamed: peak RSS | lists: first step | lists: peak RSS |")
        print("|---|---|---|---|---|---|")
        for records in args.records:
            shard = work / f"{records}.arrow"
            write_shard(shard, records, vocab)
            stream = measure(model, shard, work, baseline=False)
            row = [f"{records:,}", f"{shard.stat().st_size / 2**20:,.0f} MiB",
                   f"{stream['first_step_s']:.1f} s", f"{stream['peak_rss_mib']:,.0f} MiB"]
            if records <= args.baseline_max:
                lists = measure(model, shard, work, baseline=True)
                row += [f"{lists['first_step_s']:.1f} s ({lists['first_step_s'] / stream['first_step_s']:.1f}x)",
                        f"{lists['peak_rss_mib']:,.0f} MiB ({lists['peak_rss_mib'] / stream['peak_rss_mib']:.1f}x)"]
            else:
                row += ["not run", "not run"]
            print("| " + " | ".join(row) + " |", flush=True)
            shard.unlink()


if __name__ == "__main__":
    main()
