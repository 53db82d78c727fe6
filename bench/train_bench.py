"""Benchmark the train stage against the training code a user would otherwise
write, in one run, on the same tiny model and the same data:

  (a) the seed recipe: Trainer + peft, every record padded to max_length;
  (b) Trainer + peft with dynamic padding and length-grouped batches;
  (c) TRL's SFTTrainer with packing, its default (best-fit, padding-free) and `wrapped`.

Each side runs in its own process (same LoRA r=8 on q/v, lr, batch 8, steps,
threads) and reports effective (non-pad) tokens/s of its training loop, peak
memory (RSS on CPU, allocated GPU memory on a GPU) and its loss curve; on a GPU
also MFU, counted as 6 * parameters * tokens/s over the GPU's bf16 peak.

    python bench/train_bench.py --records 2000 --steps 30 --threads 2          # CPU, tiny model
    python bench/train_bench.py --gpu --size 1b --records 4000 --steps 60      # GPU: ~1B Llama, LoRA, bf16

GPU mode: a ~1B Llama-shaped model (random init, built offline), LoRA r=16 on
every linear layer, bf16, batch 8; flash-attention 2 (and this workflow's
padding-free packing) where flash-attn is installed, sdpa otherwise. TRL's side
runs where trl is installed. `--gpu --size tiny` runs the same code at a tiny
size (the test does it on CPU with --device cpu).
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

MAX_LENGTH = 1024
SIZES = {  # build_tiny_model's shape arguments
    "tiny": dict(vocab_size=1024, hidden_size=128, num_layers=4),
    "1b": dict(vocab_size=8192, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632),
}


def lora_settings(args):
    if args.gpu:
        return dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    return dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def attention(args):
    """flash_attention_2 on a GPU where flash-attn is installed, else sdpa."""
    import importlib.util
    return "flash_attention_2" if args.gpu and args.device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


METHODS = ["this workflow", "(a) seed: Trainer, padding=max_length", "(b) Trainer, dynamic padding, group_by_length",
           "(c) TRL SFTTrainer packing (default, bfd)", "(c) TRL SFTTrainer packing wrapped"]


def prepare(work, records, size):
    """The model (random init, of the given size), synthetic records, and this workflow's shard of them."""
    from finetune.data.tokenization import tokenize_file
    from finetune.data.tokenizer import load_tokenizer
    from finetune.data.validation import validate_file
    from finetune.tiny_model import build_tiny_model
    from tokenize_bench import write_synthetic  # bench/, this script's folder
    model = build_tiny_model([REPO / "data" / "pretrain_corpus.jsonl"], work / "tiny", **SIZES[size])
    write_synthetic(work / "raw.jsonl", records)
    validate_file(work / "raw.jsonl", work / "records.jsonl", work / "rejected.jsonl")
    tokenize_file(work / "records.jsonl", load_tokenizer(model), "alpaca", MAX_LENGTH, work / "shard.arrow",
                  split="train")
    return model


def trainer_arguments(args, out, **extra):
    precision = {"bf16": True} if args.gpu else {}
    return dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=args.steps, learning_rate=args.lr,
                lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[],
                seed=0, use_cpu=args.device == "cpu", dataloader_num_workers=0, disable_tqdm=True, **precision,
                **extra)


def peak_memory_mb(device):
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    return run_workflow(args, work) if method == "this workflow" else run_trainer(method, args, work)


def run_workflow(args, work):
    """This workflow's training stage, as its rule runs it (a subprocess with a settings file)."""
    from finetune.settings import write_settings
    out = work / "ours"
    settings = write_settings(work / "ours-train.json", "train", max_steps=args.steps, batch_size=8,
                              learning_rate=args.lr, lr_scheduler="constant_with_warmup", warmup_ratio=0,
                              log_every=1, seed=0, **our_model_settings(args))
    subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--settings", str(settings),
                    "--base-model", str(work / "tiny"), "--shards", str(work / "shard.arrow"),
                    "--output-dir", str(out / "trained"), "--metrics", str(out / "metrics.jsonl"),
                    "--summary", str(out / "summary.json"), "--threads", str(args.threads)],
                   check=True, capture_output=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"} if args.gpu
                   and args.device == "cuda" else None)
    summary = json.loads((out / "summary.json").read_text())
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    memory = summary["peak_memory_mb"] if args.device == "cuda" else (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    return {"tokens_per_s": summary["session_tokens_per_s"], "peak_memory_mb": memory, "losses": losses}


def run_trainer(method, args, work):
    """A baseline: the Trainer recipe, (a) padded to max_length, (b) our shards, (c) TRL's SFTTrainer packing."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, DataCollatorForLanguageModeling, DataCollatorForSeq2Seq,
                              Trainer, TrainingArguments)

    from finetune.data.prompts import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
    from finetune.data.shards import read_shards
    from finetune.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(work / "tiny")
    records = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    prompts = [(ALPACA_PROMPT_WITH_INPUT if r["input"] else ALPACA_PROMPT).format(**r) for r in records]
    dtype = torch.bfloat16 if args.gpu else torch.float32
    base = AutoModelForCausalLM.from_pretrained(work / "tiny", dtype=dtype, attn_implementation=attention(args))
    model = get_peft_model(base, LoraConfig(**lora_settings(args)))
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
    return {"tokens_per_s": trainer.data_collator.tokens / seconds, "peak_memory_mb": peak_memory_mb(args.device),
            "losses": losses}


def our_model_settings(args):
    if not args.gpu:
        return dict(precision="fp32")
    return dict(precision="bf16", attn_implementation=attention(args), r=16, alpha=32, target_modules="all-linear")


def parameter_count(model_dir):
    """Parameters of the base model (N in MFU = 6 N tokens/s / peak), counted without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def methods_here():
    """Every side, less TRL's where trl is not installed."""
    import importlib.util
    return [m for m in METHODS if not m.startswith("(c)") or importlib.util.find_spec("trl")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gpu", action="store_true", help="GPU mode: bf16, LoRA r=16 on every linear layer")
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size (1b: ~1.1B parameters)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda in GPU mode, cpu otherwise (--gpu --device cpu tests GPU mode's code)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak, for MFU (H100/H200 SXM: 989)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="train-bench-"))
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args, work)))
        return
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.records, args.size)
    results = {}
    for method in methods_here():
        command = [sys.executable, __file__, "--worker", method, "--workdir", str(work), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--lr", str(args.lr), "--size", args.size,
                   "--device", args.device, *(["--gpu"] if args.gpu else [])]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(output.split("RESULT ", 1)[1])
    report(args, results, parameter_count(work / "tiny"))
    (work / "results.json").write_text(json.dumps(results, indent=2))


def report(args, results, parameters):
    best = max(v["tokens_per_s"] for k, v in results.items() if k != "this workflow")
    seed = results[METHODS[1]]["tokens_per_s"]
    setup = (f"LoRA r=16 all-linear, bf16, {attention(args)}" if args.gpu else "LoRA r=8 q/v, fp32")
    print(f"\n{args.records} synthetic records, {args.steps} steps of batch 8, {setup}, Llama-shaped "
          f"{parameters / 1e6:,.1f}M parameters ({args.size}); {args.device}, {platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} threads")
    mfu = args.device == "cuda"
    memory = "peak GPU memory MiB" if args.device == "cuda" else "peak RSS MiB"
    print(f"| training | non-pad tokens/s | vs seed (a) |{' MFU |' if mfu else ''} {memory} | first loss "
          "| mean loss, last 5 steps |")
    print("|---|---|---|" + ("---|" if mfu else "") + "---|---|---|")
    for method, r in results.items():
        last = sum(r["losses"][-5:]) / len(r["losses"][-5:])
        utilization = f" {6 * parameters * r['tokens_per_s'] / (args.peak_tflops * 1e12):.1%} |" if mfu else ""
        print(f"| {method} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / seed:.2f}x |{utilization} "
              f"{r['peak_memory_mb']:,.0f} | {r['losses'][0]:.3f} | {last:.3f} |")
    print(f"\nthis workflow / best baseline: {results['this workflow']['tokens_per_s'] / best:.2f}x")
    if len(results) < len(METHODS):
        print("(TRL's side left out: trl is not installed)")


if __name__ == "__main__":
    main()
