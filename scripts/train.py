"""Train one adapter (LoRA, QLoRA, DoRA or AdaLoRA) on tokenized shards: the
seed recipe (load the base model, wrap it with peft, optimize, save adapter and
tokenizer) as one loop you can read top to bottom.

- Batches hold records of similar length padded to their longest record, or,
  with packing, the records back to back in one row with position ids that
  restart per record (padding-free; pays off with flash-attention on GPU).
- The loss is the mean over every trained token of an optimizer step, so
  gradient accumulation and uneven batches weigh tokens equally.
- Checkpoints go to --checkpoint-dir every --checkpoint-every steps; a rerun
  with the same settings and data resumes from the last one, a rerun with
  different ones starts over. A NaN/inf loss stops the run; no adapter is written.
- Runs on one device, or on several under `accelerate launch` (DDP).

    python scripts/train.py --base-model results/base_models/tiny-llama \
        --shards results/tokens/KEY/*.arrow --adapter-dir results/runs/r8/adapter \
        --metrics results/runs/r8/metrics.jsonl --summary results/runs/r8/train_summary.json \
        --method lora --r 8 --alpha 16 --target-modules q_proj v_proj --max-steps 200
"""
import argparse
import contextlib
import importlib.util
import json
import math
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from peft import AdaLoraConfig, LoraConfig, get_peft_model, prepare_model_for_kbit_training
from tqdm import tqdm
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_scheduler

from checkpoints import fingerprint, load_checkpoint, save_checkpoint
from common import (DTYPES, IGNORE_INDEX, count_trained_tokens, load_base_model, load_tokenizer, mean_token_loss,
                    pad_batch, read_shards, resolve_precision, save_pretrained_atomically)

# ---------------------------------------------------------------- checks and setup

def hardware_problems(args, device, precision):
    """Why this run cannot train here, found before anything heavy is loaded."""
    problems = []
    cuda = device.type == "cuda"
    if args.attn_implementation == "flash_attention_2":
        if not cuda:
            problems.append("attn_implementation flash_attention_2 needs a CUDA GPU")
        elif importlib.util.find_spec("flash_attn") is None:
            problems.append("attn_implementation flash_attention_2 needs the flash-attn package (pip install flash-attn)")
    if precision == "fp16" and not cuda:
        problems.append("precision fp16 needs a CUDA GPU (use fp32 or bf16 on CPU)")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        problems.append("precision bf16 is not supported by this GPU (use fp16)")
    if args.optimizer.startswith("paged_") and not cuda:
        problems.append(f"optimizer {args.optimizer} pages optimizer state between GPU and CPU and needs a CUDA GPU")
    needs_bnb = args.method == "qlora" or args.optimizer != "adamw"
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"method {args.method} / optimizer {args.optimizer} needs bitsandbytes (pip install bitsandbytes)")
    return problems


def load_model(args, precision, accelerator):
    dtype = DTYPES[precision]
    if args.method != "qlora":
        return load_base_model(args.base_model, dtype=dtype, attn_implementation=args.attn_implementation)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        args.base_model, quantization_config=quantization, dtype=dtype, attn_implementation=args.attn_implementation,
        device_map={"": accelerator.device})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def adalora_schedule(total_steps):
    """AdaLoRA's warmup (tinit), final fine-tuning (tfinal) and reallocation interval,
    leaving a non-empty budget-allocation phase however short the run."""
    tinit = total_steps // 10
    tfinal = total_steps // 5
    if total_steps - tfinal - tinit < 1:
        tinit, tfinal = 0, max(total_steps - 1, 0) // 2
    return tinit, tfinal, max(1, (total_steps - tinit - tfinal) // 10)


def peft_config(args, total_steps):
    target_modules = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    common = dict(lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=target_modules, bias=args.bias,
                  use_rslora=args.use_rslora, task_type="CAUSAL_LM")
    if args.method == "adalora":
        tinit, tfinal, delta_t = adalora_schedule(total_steps)
        return AdaLoraConfig(target_r=args.r, init_r=args.adalora_init_r or math.ceil(1.5 * args.r), tinit=tinit,
                             tfinal=tfinal, deltaT=delta_t, total_step=total_steps, **common)
    return LoraConfig(r=args.r, use_dora=args.method == "dora", **common)


def make_optimizer(args, parameters):
    if args.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)
    import bitsandbytes as bnb
    optimizer_class = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                       "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[args.optimizer]
    return optimizer_class(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)


# ---------------------------------------------------------------- batches

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


def micro_batch_indices(lengths, batch_size, seed, process_index, num_processes):
    """Endless (epoch, record indices) of this process's micro-batches, the same on every rerun."""
    epoch = 0
    while True:
        batches = length_grouped_batches(lengths, batch_size, seed + epoch)
        per_process = len(batches) // num_processes
        for indices in batches[process_index::num_processes][:per_process]:
            yield epoch, indices
        epoch += 1


def pack_batch(examples):
    """All examples back to back in one row, position ids restarting per example.
    Attention then stays within each example (flash-attention varlen on GPU,
    a block-diagonal mask otherwise; transformers derives both from the position
    ids when there is no attention mask and no KV cache), and no token is padding."""
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        input_ids += example["input_ids"]
        # The first token of an example is never a target: it would be predicted from the previous example.
        labels += [IGNORE_INDEX] + example["labels"][1:]
        position_ids += range(len(example["input_ids"]))
    return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([position_ids])}


def real_tokens(batch):
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- training

def train(args):
    # The state must know about ACCELERATE_USE_CPU before anything else initializes it (DDP on CPU).
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    precision = resolve_precision(args.precision, device)
    problems = hardware_problems(args, device, precision)
    if problems:
        sys.exit(f"[{args.run_name}] cannot train on {device.type}: " + "; ".join(problems))
    accelerator = Accelerator(mixed_precision="no" if precision == "fp32" else precision)

    def log(message):
        accelerator.print(f"[{args.run_name}] {message}", flush=True)

    packing = args.packing == "on" or (args.packing == "auto" and args.attn_implementation == "flash_attention_2")
    set_seed(args.seed)

    train_examples = read_shards(args.shards, "train")
    eval_examples = read_shards(args.shards, "eval")
    if not train_examples:
        sys.exit(f"[{args.run_name}] no training records in {', '.join(map(str, args.shards))}")
    micro_batches_per_epoch = len(train_examples) // args.batch_size // accelerator.num_processes
    steps_per_epoch = max(micro_batches_per_epoch // args.grad_accum, 1)
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)

    tokenizer = load_tokenizer(args.base_model, args.chat_template)
    model = load_model(args, precision, accelerator)
    if args.gradient_checkpointing and args.method != "qlora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, peft_config(args, total_steps))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"{args.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
        f"{len(train_examples)} train / {len(eval_examples)} eval records; {total_steps} steps "
        f"({steps_per_epoch} per epoch); {precision}, {args.attn_implementation}, "
        f"{'packed' if packing else 'length-grouped'} batches, {accelerator.num_processes} process(es)")

    optimizer = make_optimizer(args, [p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=round(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    checkpoints = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    run_fingerprint = fingerprint(args) if checkpoints else None
    start_step, history, elapsed_before = 0, [], 0.0
    if checkpoints:
        start_step, history, elapsed_before = load_checkpoint(checkpoints, run_fingerprint, model, optimizer,
                                                              scheduler, log)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    lengths = [len(e["input_ids"]) for e in train_examples]
    batches = micro_batch_indices(lengths, args.batch_size, args.seed, accelerator.process_index,
                                  accelerator.num_processes)
    for _ in range(start_step * args.grad_accum):
        next(batches)

    def make_batch(indices):
        examples = [train_examples[i] for i in indices]
        return pack_batch(examples) if packing else pad_batch(examples, tokenizer.pad_token_id)

    main = accelerator.is_main_process
    if main:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
    metrics = open(args.metrics, "w") if main else None
    board = None
    if main and args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter
        board = SummaryWriter(args.tensorboard_dir)

    def record(row):
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        if board:
            for key, value in row.items():
                if key != "step":
                    board.add_scalar(f"train/{key}" if key != "eval_loss" else "eval/loss", value, row["step"])

    if main:
        for row in history:
            record(row)
    progress = tqdm(total=total_steps, initial=start_step, desc=args.run_name, disable=not main, mininterval=10,
                    file=sys.stderr)
    start = interval_start = time.perf_counter()
    interval_loss, interval_trained, interval_tokens, tokens_seen = 0.0, 0, 0, 0
    model.train()
    for step in range(start_step + 1, total_steps + 1):
        window = [next(batches) for _ in range(args.grad_accum)]
        epoch = window[-1][0]
        window = [make_batch(indices) for _, indices in window]
        step_tokens = torch.tensor(sum(count_trained_tokens(b) for b in window), device=device)
        step_tokens = accelerator.reduce(step_tokens, reduction="sum").item()
        step_loss = 0.0
        for i, batch in enumerate(window):
            batch = {k: v.to(device) for k, v in batch.items()}
            sync = accelerator.no_sync(model) if i < len(window) - 1 else contextlib.nullcontext()
            with sync:
                # DDP averages gradients over processes, so scale the per-token mean back up.
                loss = model(**batch, num_items_in_batch=step_tokens, use_cache=False).loss * accelerator.num_processes
                accelerator.backward(loss)
            step_loss += loss.item() / accelerator.num_processes
            batch_tokens = real_tokens(batch)
            interval_tokens += batch_tokens
            tokens_seen += batch_tokens
        step_loss = accelerator.reduce(torch.tensor(step_loss, device=device), reduction="sum").item()
        if not math.isfinite(step_loss):
            sys.exit(f"[{args.run_name}] loss is {step_loss} at step {step}: training diverged. Usual causes: "
                     f"learning rate too high (now {args.learning_rate}), fp16 overflow (try bf16 or fp32), "
                     "bad data or a broken base model. No adapter was written.")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        if args.method == "adalora":
            unwrapped.base_model.update_and_allocate(step)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        interval_loss += step_loss * step_tokens
        interval_trained += step_tokens
        progress.update(1)

        if step % args.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            row = {
                "step": step,
                "epoch": round(epoch + 1, 2),
                "loss": interval_loss / max(interval_trained, 1),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_s": interval_tokens * accelerator.num_processes / (now - interval_start),
                "elapsed_s": elapsed_before + now - start,
            }
            if eval_examples and (step == total_steps or (args.eval_every and step % args.eval_every == 0)):
                model.eval()
                row["eval_loss"] = mean_token_loss(model, eval_examples, args.batch_size, tokenizer.pad_token_id)[0]
                model.train()
            history.append(row)
            if main:
                record(row)
                progress.write(f"[{args.run_name}] " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            interval_loss, interval_trained, interval_tokens = 0.0, 0, 0
            interval_start = time.perf_counter()
        if checkpoints and args.checkpoint_every and step % args.checkpoint_every == 0 and step < total_steps:
            if main:
                save_checkpoint(checkpoints, unwrapped, optimizer, scheduler, step, run_fingerprint, history,
                                elapsed_before + time.perf_counter() - start)
            accelerator.wait_for_everyone()
    progress.close()
    session_time = time.perf_counter() - start
    wall_time = elapsed_before + session_time

    accelerator.wait_for_everyone()
    if main:
        metrics.close()
        if board:
            board.close()
        adapter_dir = save_pretrained_atomically(args.adapter_dir, unwrapped, tokenizer)
        summary = {
            "run": args.run_name, "method": args.method, "trainable_parameters": trainable,
            "total_parameters": total, "train_records": len(train_examples), "eval_records": len(eval_examples),
            "steps": total_steps, "resumed_from_step": start_step, "precision": precision,
            "attn_implementation": args.attn_implementation, "packing": packing,
            "processes": accelerator.num_processes, "wall_time_s": wall_time, "peak_memory_mb": peak_memory_mb(device),
            "session_time_s": session_time, "session_tokens": tokens_seen * accelerator.num_processes,
            "session_tokens_per_s": tokens_seen * accelerator.num_processes / session_time,
        }
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
        if checkpoints:
            shutil.rmtree(checkpoints, ignore_errors=True)
        log(f"adapter written to {adapter_dir} after {wall_time:.1f}s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--base-model", required=True, help="local path or Hub id")
    io.add_argument("--shards", type=Path, nargs="+", required=True, help="Arrow shards from tokenize_data.py")
    io.add_argument("--adapter-dir", type=Path, required=True)
    io.add_argument("--metrics", type=Path, required=True, help="metrics.jsonl, one line per logging step")
    io.add_argument("--summary", type=Path, required=True, help="train_summary.json")
    io.add_argument("--tensorboard-dir", type=Path, default=None)
    io.add_argument("--checkpoint-dir", type=Path, default=None, help="where resumable checkpoints go (not an output)")
    io.add_argument("--run-name", default="run")
    io.add_argument("--chat-template", default=None, help="a Jinja chat template replacing the tokenizer's own "
                                                          "(saved with the adapter)")
    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--method", choices=("lora", "qlora", "dora", "adalora"), default="lora")
    adapter.add_argument("--r", type=int, default=8, help="rank (AdaLoRA: the target average rank)")
    adapter.add_argument("--adalora-init-r", type=int, default=0, help="AdaLoRA's starting rank (0: 1.5 r)")
    adapter.add_argument("--alpha", type=float, default=16)
    adapter.add_argument("--dropout", type=float, default=0.05)
    adapter.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"], help="module names, or all-linear")
    adapter.add_argument("--bias", choices=("none", "all", "lora_only"), default="none")
    adapter.add_argument("--use-rslora", action="store_true")
    opt = parser.add_argument_group("optimization")
    opt.add_argument("--optimizer", choices=("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"),
                     default="adamw")
    opt.add_argument("--learning-rate", type=float, default=2e-4)
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--lr-scheduler", choices=("cosine", "linear", "constant_with_warmup"), default="cosine")
    opt.add_argument("--warmup-ratio", type=float, default=0.03)
    opt.add_argument("--max-grad-norm", type=float, default=1.0)
    opt.add_argument("--epochs", type=float, default=1.0)
    opt.add_argument("--max-steps", type=int, default=0, help="overrides --epochs when > 0")
    opt.add_argument("--batch-size", type=int, default=8, help="records per micro-batch and device")
    opt.add_argument("--grad-accum", type=int, default=1)
    opt.add_argument("--gradient-checkpointing", action="store_true")
    opt.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    opt.add_argument("--attn-implementation", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa")
    opt.add_argument("--packing", choices=("auto", "on", "off"), default="auto",
                     help="auto: padding-free packing with flash-attention, length-grouped padding otherwise")
    opt.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("run")
    run.add_argument("--eval-every", type=int, default=0, help="optimizer steps between eval losses (0: at the end)")
    run.add_argument("--log-every", type=int, default=10)
    run.add_argument("--checkpoint-every", type=int, default=0, help="optimizer steps between checkpoints (0: none)")
    run.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
