"""Benchmark the tokenize stage against a plain `datasets.map` tokenization of
the same records, in one run, and measure the stage's peak memory on a large
file.

    python bench/tokenize_bench.py --records 200000 --rss-records 1000000

Both sides format the same alpaca prompt, mask the prompt in the labels,
append EOS and truncate to max_length; both may use every core (the fast
tokenizer's own threads). The baseline is what a hand-written script does:
`load_dataset("json")` then `.map(batched=True)` into a fresh cache.
"""
import os

os.environ["TOKENIZERS_PARALLELISM"] = "true"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from finetune.data.prompts import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, IGNORE_INDEX  # noqa: E402
from finetune.data.tokenization import tokenize_file  # noqa: E402
from finetune.data.tokenizer import load_tokenizer  # noqa: E402
from finetune.data.validation import validate_file  # noqa: E402
from finetune.settings import write_settings  # noqa: E402
from finetune.tiny_model import build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

CORPUS = REPO / "data" / "pretrain_corpus.jsonl"
WORDS = [word for line in CORPUS.read_text().splitlines() for word in json.loads(line)["text"].split()]
MAX_LENGTH = 1024


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def synthetic_record(rng):
    """Alpaca-like lengths: most records 50-300 tokens, a long tail to past max_length."""
    long_tail = rng.random() < 0.05
    return {
        "instruction": words(rng, rng.randint(5, 25)),
        "input": words(rng, rng.randint(0, 60)) if rng.random() < 0.4 else "",
        "output": words(rng, rng.randint(150, 700) if long_tail else rng.randint(10, 120)),
    }


def write_synthetic(path, count, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(count):
            f.write(json.dumps(synthetic_record(rng)) + "\n")


def prompt_of(record):
    template = ALPACA_PROMPT_WITH_INPUT if record["input"] else ALPACA_PROMPT
    return template.format(instruction=record["instruction"], input=record["input"])


def seed_recipe(batch, tokenizer):
    """The seed text's tokenize_function: whole prompt+answer, padded to max_length, no label mask."""
    texts = [prompt_of({"instruction": i, "input": x}) + o
             for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])]
    return tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding="max_length")


def per_record_masked(record, tokenizer):
    """The classic hand-written LoRA script (alpaca-lora style): tokenize the
    full text, then the prompt alone to find how many tokens to mask."""
    prompt = prompt_of(record)
    full = tokenizer(prompt + record["output"], truncation=True, max_length=MAX_LENGTH)["input_ids"]
    if len(full) < MAX_LENGTH:
        full = full + [tokenizer.eos_token_id]
    prompt_length = len(tokenizer(prompt, truncation=True, max_length=MAX_LENGTH)["input_ids"])
    return {"input_ids": full, "labels": [IGNORE_INDEX] * prompt_length + full[prompt_length:]}


def batched_masked(batch, tokenizer):
    """A tuned batched version: prompt and answer tokenized once each, in batches."""
    prompts = [prompt_of({"instruction": i, "input": x}) for i, x in zip(batch["instruction"], batch["input"])]
    prompt_ids = tokenizer(prompts)["input_ids"]
    answer_ids = tokenizer(batch["output"], add_special_tokens=False)["input_ids"]
    input_ids, labels = [], []
    for p, a in zip(prompt_ids, answer_ids):
        input_ids.append((p + a + [tokenizer.eos_token_id])[:MAX_LENGTH])
        labels.append(([IGNORE_INDEX] * len(p) + a + [tokenizer.eos_token_id])[:MAX_LENGTH])
    return {"input_ids": input_ids, "labels": labels}


def baseline(raw_path, tokenizer, cache_dir, function, batched):
    """load_dataset("json") + map into a fresh cache; seconds for both and for map alone."""
    import datasets
    start = time.perf_counter()
    dataset = datasets.load_dataset("json", data_files=str(raw_path), split="train", cache_dir=str(cache_dir))
    loaded = time.perf_counter()
    dataset.map(function, fn_kwargs={"tokenizer": tokenizer}, batched=batched, remove_columns=dataset.column_names)
    done = time.perf_counter()
    return done - start, done - loaded


def peak_rss_of_stage(records_path, model_dir, out_dir):
    """Peak RSS (MiB) of the tokenize stage's CLI, as Snakemake runs it (with its settings file)."""
    settings = write_settings(out_dir / "tokenize_data.json", "tokenize_data", template="alpaca",
                              max_length=MAX_LENGTH)
    command = [sys.executable, str(REPO / "scripts" / "tokenize_data.py"), "--input", str(records_path),
               "--settings", str(settings), "--tokenizer", str(model_dir),
               "--output", str(out_dir / "big.arrow"), "--stats", str(out_dir / "big.stats.json")]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--rss-records", type=int, default=1_000_000, help="0 skips the memory run")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="tokenize-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    model_dir = build_tiny_model([CORPUS], work / "tiny", vocab_size=1024)
    tokenizer = load_tokenizer(model_dir)
    raw, normalized = work / "raw.jsonl", work / "records.jsonl"
    write_synthetic(raw, args.records)
    start = time.perf_counter()
    validate_file(raw, normalized, work / "rejected.jsonl")
    validate_s = time.perf_counter() - start

    start = time.perf_counter()
    stats = tokenize_file(normalized, tokenizer, "alpaca", MAX_LENGTH, work / "ours.arrow")
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    tokenize_file(normalized, tokenizer, "chat", MAX_LENGTH, work / "ours-chat.arrow")
    ours_chat_s = time.perf_counter() - start
    seed_s, _ = baseline(raw, tokenizer, work / "cache-seed", seed_recipe, batched=True)
    plain_s, _ = baseline(raw, tokenizer, work / "cache-plain", per_record_masked, batched=False)
    tuned_s, tuned_map_s = baseline(raw, tokenizer, work / "cache-tuned", batched_masked, batched=True)

    n = args.records
    rows = [
        ("this stage (alpaca template)", ours_s),
        ("this stage (chat template)", ours_chat_s),
        ("(a) seed recipe: map(batched=True), padding='max_length', no label mask", seed_s),
        ("(b) plain map, per record, prompt tokenized again for the mask (alpaca-lora style)", plain_s),
        ("(c) tuned map(batched=True), prompt and answer tokenized once each", tuned_s),
        ("(c) without load_dataset (JSON already in Arrow)", tuned_map_s),
    ]
    print(f"\n{n} records, {stats['tokens']} tokens (p50 {stats['length_p50']:.0f}, p99 {stats['length_p99']:.0f}, "
          f"max {stats['length_max']}), {stats['too_long']} over {MAX_LENGTH}; machine: {platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print("| tokenization | seconds | records/s | this stage (alpaca) is faster by |\n|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.1f} | {n / seconds:,.0f} | {seconds / ours_s:.2f}x |")
    print(f"(validation of the same file: {validate_s:.1f} s, {n / validate_s:,.0f} records/s)")

    if args.rss_records:
        big_raw, big = work / "big-raw.jsonl", work / "big.jsonl"
        write_synthetic(big_raw, args.rss_records, seed=1)
        validate_file(big_raw, big, work / "big-rejected.jsonl")
        rss_mb, seconds = peak_rss_of_stage(big, model_dir, work)
        print(f"\npeak RSS of the tokenize stage on {args.rss_records:,} records: {rss_mb:.0f} MiB "
              f"({seconds:.0f} s, {args.rss_records / seconds:,.0f} records/s)")


if __name__ == "__main__":
    main()
