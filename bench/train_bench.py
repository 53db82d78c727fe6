"""Benchmark the train stage against the training code a user would otherwise
write, in one run, on the same tiny model and the same data:

  (a) the seed recipe: Trainer + peft, every record padded to max_length;
  (b) Trainer + peft with dynamic padding and length-grouped batches;
  (c) TRL's SFTTrainer with packing, its default (best-fit, padding-free) and `wrapped`.

Each side runs in its own process (same LoRA r=8 on q/v, lr, batch 8, steps,
threads) and reports effective (non-pad) tokens/s of its training loop, peak
RSS and its loss curve.

    python bench/train_bench.py --records 2000 --steps 30 --threads 2
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

MAX_LENGTH = 1024
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
METHODS = ["this workflow", "(a) seed: Trainer, padding=max_length", "(b) Trainer, dynamic padding, group_by_length",
           "(c) TRL SFTTrainer packing (default, bfd)", "(c) TRL SFTTrainer packing wrapped"]


def prepare(work, records):
    """The tiny 4-layer model, synthetic records, and this workflow's shard of them."""
    from build_tiny_model import build_tiny_model
    from prompts import load_tokenizer
    from tokenize_bench import write_synthetic
    from tokenize_data import tokenize_file
    from validate_data import validate_file
    model = build_tiny_model([REPO / "data" / "tokenizer_corpus.txt"], work / "tiny", vocab_size=1024,
                             hidden_size=128, num_layers=4)
    write_synthetic(work / "raw.jsonl", records)
    validate_file(work / "raw.jsonl", work / "records.jsonl", work / "rejected.jsonl")
    tokenize_file(work / "records.jsonl", load_tokenizer(model), "alpaca", MAX_LENGTH, work / "shard.arrow",
                  split="train")
    return model


def trainer_arguments(args, out, **extra):
    return dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=args.steps, learning_rate=args.lr,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                seed=0, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, **extra)


class CountingCollator:
    """Counts the non-pad tokens each batch feeds the model."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, 0

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


def worker(method, args, work):
    import torch
    torch.set_num_threads(args.threads)
    if method == "this workflow":
        out = work / "ours"
        subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--base-model", str(work / "tiny"),
                        "--shards", str(work / "shard.arrow"), "--output-dir", str(out / "trained"),
                        "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"),
                        "--max-steps", str(args.steps), "--batch-size", "8", "--learning-rate", str(args.lr),
                        "--lr-scheduler", "constant_with_warmup", "--warmup-ratio", "0", "--log-every", "1",
                        "--precision", "fp32", "--threads", str(args.threads), "--seed", "0"],
                       check=True, capture_output=True)
        summary = json.loads((out / "summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        return {"tokens_per_s": summary["session_tokens_per_s"], "peak_rss_mb": rss, "losses": losses}

    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForLanguageModeling, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments)

    from prompts import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, load_tokenizer
    from shards import read_shards
    tokenizer = load_tokenizer(work / "tiny")
    records = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    prompts = [(ALPACA_PROMPT_WITH_INPUT if r["input"] else ALPACA_PROMPT).format(**r) for r in records]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(work / "tiny"), LoraConfig(**LORA))
    out = work / method.split(")")[0].strip("(")

    if method.startswith("(c)"):
        from trl import SFTConfig, SFTTrainer
        dataset = datasets.Dataset.from_list([{"prompt": p, "completion": r["output"]}
                                              for p, r in zip(prompts, records)])
        strategy = "wrapped" if "wrapped" in method else "bfd"
        config = SFTConfig(**trainer_arguments(args, out), max_length=MAX_LENGTH, packing=True,
                           packing_strategy=strategy)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainer.data_collator = CountingCollator(trainer.data_collator)
    else:
        if method.startswith("(a)"):
            texts = [p + r["output"] for p, r in zip(prompts, records)]
            encoded = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding="max_length")
            dataset = datasets.Dataset.from_dict(dict(encoded))
            collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
            extra = {}
        else:
            examples = read_shards([work / "shard.arrow"], "train")
            dataset = datasets.Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"],
                                                   "attention_mask": [1] * len(e["input_ids"])} for e in examples])
            collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
            extra = {"train_sampling_strategy": "group_by_length"}
        trainer = Trainer(model=model, args=TrainingArguments(**trainer_arguments(args, out, **extra)),
                          train_dataset=dataset, data_collator=CountingCollator(collator))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {"tokens_per_s": trainer.data_collator.tokens / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "losses": losses}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="train-bench-"))
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args, work)))
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.records)
    results = {}
    for method in METHODS:
        command = [sys.executable, __file__, "--worker", method, "--workdir", str(work), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--lr", str(args.lr)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(output.split("RESULT ", 1)[1])
    best = max(v["tokens_per_s"] for k, v in results.items() if k != "this workflow")
    seed = results[METHODS[1]]["tokens_per_s"]
    print(f"\n{args.records} synthetic records, {args.steps} steps of batch 8, LoRA r=8 q/v, tiny Llama (4 layers, "
          f"hidden 128), {args.threads} threads; {platform.machine()}, {os.cpu_count()} cores")
    print("| training | non-pad tokens/s | vs seed (a) | peak RSS MiB | first loss | mean loss, last 5 steps |")
    print("|---|---|---|---|---|---|")
    for method, r in results.items():
        last = sum(r["losses"][-5:]) / len(r["losses"][-5:])
        print(f"| {method} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / seed:.2f}x | {r['peak_rss_mb']:.0f} "
              f"| {r['losses'][0]:.3f} | {last:.3f} |")
    print(f"\nthis workflow / best baseline: {results['this workflow']['tokens_per_s'] / best:.2f}x")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
