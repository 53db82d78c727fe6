"""Train one LoRA adapter on tokenized shards: the seed recipe (load base model,
wrap it with peft, optimize, save the adapter and tokenizer), as one loop you
can read top to bottom.

Batches are length-grouped and padded to their longest record only. The loss
is the mean over every trained token of an optimizer step, so gradient
accumulation and uneven batches weigh tokens equally. Runs on one device, or
several under `accelerate launch`.

    python scripts/train.py --base-model results/base_models/tiny-llama \
        --shards results/tokens/KEY/*.arrow --adapter-dir results/runs/r8/adapter \
        --metrics results/runs/r8/metrics.jsonl --summary results/runs/r8/train_summary.json \
        --r 8 --alpha 16 --target-modules q_proj v_proj --max-steps 200
"""
import argparse
import contextlib
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from transformers import get_scheduler

from common import (DTYPES, load_base_model, load_tokenizer, pad_batch, read_shards, resolve_precision,
                    save_pretrained_atomically)


def length_grouped_batches(lengths, batch_size, seed):
    """Shuffled batches of similar-length records: little padding, still random order."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 64
    batches = []
    for start in range(0, len(order), window):
        group = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def epoch_batches(examples, batch_size, seed, epoch, process_index, num_processes):
    lengths = [len(e["input_ids"]) for e in examples]
    batches = length_grouped_batches(lengths, batch_size, seed + epoch)
    per_process = len(batches) // num_processes
    return batches[process_index::num_processes][:per_process]


def count_trained_tokens(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def evaluate_loss(model, examples, batch_size, pad_token_id, device):
    """Mean loss per trained token over the examples."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in pad_batch(examples[start:start + batch_size], pad_token_id).items()}
        tokens = count_trained_tokens(batch)
        total_loss += model(**batch, num_items_in_batch=tokens).loss.item() * tokens
        total_tokens += tokens
    model.train()
    return total_loss / max(total_tokens, 1)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_lora_model(model, args):
    target_modules = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=target_modules,
        bias=args.bias,
        use_rslora=args.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def train(args):
    precision = resolve_precision(args.precision, PartialState().device)
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision)
    set_seed(args.seed)
    log = accelerator.print

    tokenizer = load_tokenizer(args.base_model, args.chat_template)
    model = load_base_model(args.base_model, dtype=DTYPES[precision])
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = build_lora_model(model, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"[{args.run_name}] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")

    train_examples = read_shards(args.shards, "train")
    eval_examples = read_shards(args.shards, "eval")
    if not train_examples:
        sys.exit(f"[{args.run_name}] no training records in {', '.join(map(str, args.shards))}")
    micro_batches_per_epoch = len(train_examples) // args.batch_size // accelerator.num_processes
    steps_per_epoch = max(micro_batches_per_epoch // args.grad_accum, 1)
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    log(f"[{args.run_name}] {len(train_examples)} train / {len(eval_examples)} eval records, "
        f"{total_steps} steps ({steps_per_epoch} per epoch), precision {precision}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=round(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    def micro_batches():
        epoch = 0
        while True:
            for indices in epoch_batches(train_examples, args.batch_size, args.seed, epoch,
                                         accelerator.process_index, accelerator.num_processes):
                yield epoch, pad_batch([train_examples[i] for i in indices], tokenizer.pad_token_id)
            epoch += 1

    batches = micro_batches()
    metrics = open(args.metrics, "w") if accelerator.is_main_process else None
    start = interval_start = time.perf_counter()
    interval_loss, interval_trained, interval_tokens = 0.0, 0, 0
    model.train()
    for step in range(1, total_steps + 1):
        window = [next(batches) for _ in range(args.grad_accum)]
        epoch = window[-1][0]
        step_tokens = torch.tensor(sum(count_trained_tokens(b) for _, b in window), device=device)
        step_tokens = accelerator.reduce(step_tokens, reduction="sum").item()
        step_loss = 0.0
        for i, (_, batch) in enumerate(window):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = accelerator.no_sync(model) if i < len(window) - 1 else contextlib.nullcontext()
            with sync:
                # DDP averages gradients over processes, so scale the per-token mean back up.
                loss = model(**batch, num_items_in_batch=step_tokens).loss * accelerator.num_processes
                accelerator.backward(loss)
            step_loss += loss.item() / accelerator.num_processes
            interval_tokens += int(batch["attention_mask"].sum())
        step_loss = accelerator.reduce(torch.tensor(step_loss, device=device), reduction="sum").item()
        if not math.isfinite(step_loss):
            sys.exit(f"[{args.run_name}] loss is {step_loss} at step {step}: training diverged. Usual causes: "
                     f"learning rate too high (now {args.learning_rate}), fp16 overflow (try bf16 or fp32). "
                     "No adapter was written.")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        interval_loss += step_loss * step_tokens
        interval_trained += step_tokens

        if step % args.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            row = {
                "step": step,
                "epoch": round(epoch + 1, 2),
                "loss": interval_loss / max(interval_trained, 1),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": interval_tokens * accelerator.num_processes / (now - interval_start),
                "elapsed_s": now - start,
            }
            if eval_examples and (step == total_steps or (args.eval_every and step % args.eval_every == 0)):
                row["eval_loss"] = evaluate_loss(model, eval_examples, args.batch_size, tokenizer.pad_token_id, device)
            log(f"[{args.run_name}] " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items()))
            if metrics:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            interval_loss, interval_trained, interval_tokens = 0.0, 0, 0
            interval_start = time.perf_counter()
    wall_time = time.perf_counter() - start

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        metrics.close()
        adapter_dir = save_pretrained_atomically(args.adapter_dir, accelerator.unwrap_model(model), tokenizer)
        summary = {
            "run": args.run_name,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "train_records": len(train_examples),
            "eval_records": len(eval_examples),
            "steps": total_steps,
            "precision": precision,
            "processes": accelerator.num_processes,
            "wall_time_s": wall_time,
            "peak_memory_mb": peak_memory_mb(device),
        }
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
        log(f"[{args.run_name}] adapter written to {adapter_dir} after {wall_time:.1f}s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--base-model", required=True, help="local path or Hub id")
    io.add_argument("--shards", type=Path, nargs="+", required=True, help="Arrow shards from tokenize_data.py")
    io.add_argument("--adapter-dir", type=Path, required=True)
    io.add_argument("--metrics", type=Path, required=True, help="metrics.jsonl, one line per logging step")
    io.add_argument("--summary", type=Path, required=True, help="train_summary.json")
    io.add_argument("--run-name", default="run")
    io.add_argument("--chat-template", default=None, help="a Jinja chat template replacing the tokenizer's own "
                                                          "(saved with the adapter)")
    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=8)
    lora.add_argument("--alpha", type=float, default=16)
    lora.add_argument("--dropout", type=float, default=0.05)
    lora.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"], help="module names, or all-linear")
    lora.add_argument("--bias", choices=("none", "all", "lora_only"), default="none")
    lora.add_argument("--use-rslora", action="store_true")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--learning-rate", type=float, default=2e-4)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--lr-scheduler", choices=("cosine", "linear", "constant_with_warmup"), default="cosine")
    opt.add_argument("--warmup-ratio", type=float, default=0.03)
    opt.add_argument("--max-grad-norm", type=float, default=1.0)
    opt.add_argument("--epochs", type=float, default=1.0)
    opt.add_argument("--max-steps", type=int, default=0, help="overrides --epochs when > 0")
    opt.add_argument("--batch-size", type=int, default=8, help="per device")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    opt.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--eval-every", type=int, default=0, help="optimizer steps between eval losses (0: at the end)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
