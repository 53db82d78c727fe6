"""Train one run on tokenized shards: an adapter (LoRA, QLoRA, DoRA or AdaLoRA)
or every parameter (full). The seed recipe (load the base model, wrap it with
peft, optimize, save adapter and tokenizer) as one recipe you can read top to
bottom: setup, a step, logging, save. Pretraining the embedded tiny model is
a full run of this same recipe on plain text.

- Examples are read from memory-mapped shards a batch at a time (shards.py),
  so memory does not grow with the dataset.
- Batches hold records of similar length padded to their longest record, or,
  with packing, the records back to back in one row with position ids that
  restart per record (padding-free; pays off with flash-attention on GPU).
- The loss is the mean over every trained token of an optimizer step, so
  gradient accumulation and uneven batches weigh tokens equally.
- Checkpoints go to --checkpoint-dir every --checkpoint-every steps; a rerun
  with the same settings and data resumes from the last one, a rerun with
  different ones starts over. A NaN/inf loss stops the run; no adapter is written.
- --weights mixes the shards' datasets by weight (mixing.py has the meaning);
  the summary counts the examples each one contributed.
- Runs on one device, or on several under `accelerate launch` (DDP).

    python scripts/train.py --base-model results/base_models/tiny-llama \
        --shards results/tokens/TOKENIZATION/*.arrow --output-dir results/runs/r8/trained \
        --metrics results/runs/r8/metrics.jsonl --summary results/runs/r8/train_summary.json \
        --method lora --r 8 --alpha 16 --target-modules q_proj v_proj --max-steps 200
"""
import argparse
import contextlib
import math
import resource
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env, set_seed
from peft import get_peft_model
from tqdm import tqdm
from transformers import get_scheduler

from adapters import load_model, peft_config
from batches import mean_token_loss, micro_batch_indices, pack_batch, pad_batch, real_tokens
from checkpoints import fingerprint, load_checkpoint, save_checkpoint, trainable_state
from distributed import saved_state, shard_model
from environment import device_description, library_versions
from mixing import describe_mix, source_of_positions
from models import resolve_precision
from outputs import save_pretrained_atomically, write_json
from preflight import check_architecture, hardware_problems, quantization_of
from prompts import ADDED_PAD, count_trained_tokens, load_tokenizer
from selection import load_best_weights, new_record, note_evaluation, save_best_weights, stop_reason
from settings import add_settings, check_settings, run_conflicts
from shards import read_shards
from training_log import TrainingLog, missing_trackers, start_trackers
from training_samples import answers_at, prepare_samples

# ---------------------------------------------------------------- setup


def setup_device(args):
    """The accelerator, device and resolved precision, or exit naming why this hardware cannot run the run."""
    # The state must know about ACCELERATE_USE_CPU before anything else initializes it (DDP on CPU).
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    precision = resolve_precision(args.precision, device)
    problems = hardware_problems(args, device, precision)
    if problems:
        sys.exit(f"[{args.run_name}] cannot train on {device.type}: " + "; ".join(problems))
    return Accelerator(mixed_precision="no" if precision == "fp32" else precision), device, precision


def setup_data(args, num_processes):
    """Train and held-out examples, and the number of optimizer steps they make."""
    train_examples = read_shards(args.shards, "train")
    eval_examples = read_shards(args.shards, "eval")
    if not train_examples:
        sys.exit(f"[{args.run_name}] no training records in {', '.join(map(str, args.shards))}")
    if not eval_examples and (args.keep == "best" or args.early_stopping):
        sys.exit(f"[{args.run_name}] keep best and early stopping compare held-out losses, but the shards hold no "
                 "held-out records (raise eval.fraction, or give a dataset with split: eval)")
    for path, size, weight in zip(args.shards, train_examples.sizes, args.weights or []):
        if size == 0:
            sys.exit(f"[{args.run_name}] {path} has no training records, but its dataset has weight {weight}")
    micro_batches_per_epoch = len(train_examples) // args.batch_size // num_processes
    steps_per_epoch = max(micro_batches_per_epoch // args.grad_accum, 1)
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)
    return train_examples, eval_examples, steps_per_epoch, total_steps


def setup_model(args, precision, accelerator, total_steps, empty=False):
    """The base model with a fresh adapter (every parameter trainable for full), and its tokenizer.
    empty: build it without weights (a sharded run's other processes receive theirs)."""
    tokenizer = load_tokenizer(args.base_model, args.chat_template, args.trust_remote_code)
    model = load_model(args, precision, accelerator, tokenizer, empty)
    if args.gradient_checkpointing and quantization_of(args) == "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.method != "full":
            model.enable_input_require_grads()
    if args.method == "full":
        return model, tokenizer
    return get_peft_model(model, peft_config(args, total_steps)), tokenizer


def make_optimizer(args, parameters):
    if args.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)
    import bitsandbytes as bnb
    optimizer_class = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                       "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[args.optimizer]
    return optimizer_class(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)


def setup(args):
    """Everything the loop needs, resumed from a matching checkpoint when there is one."""
    accelerator, device, precision = setup_device(args)
    check_architecture(args)
    packing = args.packing == "on" or (args.packing == "auto" and args.attn_implementation == "flash_attention_2")
    set_seed(args.seed)
    train_examples, eval_examples, steps_per_epoch, total_steps = setup_data(args, accelerator.num_processes)
    sharded = args.distributed == "fsdp" and accelerator.num_processes > 1
    # A quantized base is quantized as it loads, on every process; otherwise only the first reads the weights.
    first_reads = sharded and quantization_of(args) == "none"
    model, tokenizer = setup_model(args, precision, accelerator, total_steps,
                                   empty=first_reads and not accelerator.is_main_process)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if sharded:
        shard_model(model, precision, device, weights_on_first_process_only=first_reads)
    optimizer = make_optimizer(args, [p for p in model.parameters() if p.requires_grad])
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=round(args.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    run = SimpleNamespace(
        args=args, accelerator=accelerator, device=device, precision=precision, packing=packing, sharded=sharded,
        train_examples=train_examples, eval_examples=eval_examples, total_steps=total_steps, tokenizer=tokenizer,
        trainable=trainable, total=total, model=model, unwrapped=model, optimizer=optimizer, scheduler=scheduler,
        start_step=0, elapsed_before=0.0, history={"metrics": [], "samples": [], "selection": new_record()},
        best_state=None, source_of=source_of_positions(train_examples.sizes),
        contributed=np.zeros(len(args.shards), dtype=np.int64),
        samples=prepare_samples(args.prompts if args.sample_every else None, args.template, tokenizer),
        checkpoints=Path(args.checkpoint_dir) if args.checkpoint_dir else None, fingerprint=None)
    say(run, f"{args.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
             f"{len(train_examples)} train / {len(eval_examples)} eval records; {total_steps} steps "
             f"({steps_per_epoch} per epoch); {precision}, {model.config._attn_implementation} attention, "
             f"{'packed' if packing else 'length-grouped'} batches, {accelerator.num_processes} process(es)"
             f"{', FSDP' if sharded else ''}")
    # Without weights each dataset's share is its share of the data.
    run.mix = describe_mix([Path(path).stem for path in args.shards], train_examples.sizes,
                           args.weights or train_examples.sizes)
    if args.weights:
        say(run, "mix per epoch: " + ", ".join(f"{name} {spec['per_epoch']} of {spec['train_records']}"
                                               for name, spec in run.mix.items()))
    if run.checkpoints:
        run.fingerprint = fingerprint(args)
        run.start_step, history, run.elapsed_before = load_checkpoint(run.checkpoints, run, lambda m: say(run, m))
        run.history = {**run.history, **(history or {})}
        if args.keep == "best" and accelerator.is_main_process:
            run.best_state = load_best_weights(run.checkpoints)
    if not sharded:
        run.model, run.optimizer = accelerator.prepare(model, optimizer)
        run.unwrapped = accelerator.unwrap_model(run.model)
    mix = (train_examples.sizes, args.weights) if args.weights else None
    run.batches = micro_batch_indices(train_examples.lengths, args.batch_size, args.seed,
                                      accelerator.process_index, accelerator.num_processes, mix)
    for _ in range(run.start_step * args.grad_accum):
        next_micro_batch(run)
    return run


# ---------------------------------------------------------------- one optimizer step


def next_micro_batch(run):
    """(epoch, record indices) of this process's next micro-batch, counted to the sources it comes from."""
    epoch, indices = next(run.batches)
    run.contributed += np.bincount(run.source_of[indices], minlength=len(run.contributed))
    return epoch, indices


def make_batch(run, indices):
    examples = run.train_examples[indices]
    return pack_batch(examples) if run.packing else pad_batch(examples, run.tokenizer.pad_token_id)


def train_step(run, step):
    """Forward and backward over one accumulation window, then the optimizer step.
    Returns (epoch, mean loss per trained token, trained tokens, tokens seen here, grad norm)."""
    accelerator, processes = run.accelerator, run.accelerator.num_processes
    window = [next_micro_batch(run) for _ in range(run.args.grad_accum)]
    epoch = window[-1][0]
    window = [make_batch(run, indices) for _, indices in window]
    step_tokens = torch.tensor(sum(count_trained_tokens(b["labels"]) for b in window), device=run.device)
    step_tokens = accelerator.reduce(step_tokens, reduction="sum").item()
    step_loss, tokens_seen = 0.0, 0
    for i, batch in enumerate(window):
        batch = {k: v.to(run.device) for k, v in batch.items()}
        # DDP syncs gradients once per window; FSDP reduce-scatters every micro-batch, keeping only its shard.
        last = i == len(window) - 1
        sync = accelerator.no_sync(run.model) if not (last or run.sharded) else contextlib.nullcontext()
        with sync:
            # DDP and FSDP average gradients over processes, so scale the per-token mean back up.
            loss = run.model(**batch, num_items_in_batch=step_tokens, use_cache=False).loss * processes
            accelerator.backward(loss)
        step_loss += loss.item() / processes
        tokens_seen += real_tokens(batch)
    step_loss = accelerator.reduce(torch.tensor(step_loss, device=run.device), reduction="sum").item()
    if not math.isfinite(step_loss):
        sys.exit(f"[{run.args.run_name}] loss is {step_loss} at step {step}: training diverged. Usual causes: "
                 f"learning rate too high (now {run.args.learning_rate}), fp16 overflow (try bf16 or fp32), "
                 "bad data or a broken base model. No adapter was written.")
    grad_norm = clip_gradients(run)
    run.optimizer.step()
    if run.args.method == "adalora":
        run.unwrapped.base_model.update_and_allocate(step)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return epoch, step_loss, step_tokens, tokens_seen, float(grad_norm)


def clip_gradients(run):
    """Clip to max_grad_norm; the norm (of the whole gradient, also when it is sharded)."""
    if not run.sharded:
        return run.accelerator.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
    norm = torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad],
                                          run.args.max_grad_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---------------------------------------------------------------- logging


def say(run, message):
    run.accelerator.print(f"[{run.args.run_name}] {message}", flush=True)


def metrics_row(run, step, epoch, interval, seconds):
    """One row of metrics.jsonl: the interval's loss per trained token, speed, and the held-out loss when due."""
    row = {"step": step, "epoch": round(epoch + 1, 2), "loss": interval["loss"] / max(interval["trained"], 1),
           "lr": run.scheduler.get_last_lr()[0], "grad_norm": interval["grad_norm"],
           "tokens_per_s": interval["tokens"] * run.accelerator.num_processes / seconds,
           "elapsed_s": run.elapsed_before + time.perf_counter() - run.started}
    eval_every = run.args.eval_every
    if run.eval_examples and (step == run.total_steps or (eval_every and step % eval_every == 0)):
        run.model.eval()
        row["eval_loss"] = mean_token_loss(run.model, run.eval_examples, run.args.batch_size,
                                           run.tokenizer.pad_token_id)[0]
        run.model.train()
    return row


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- save


def save(run, tokens_seen, stopped_at, stop, contributed, state=None):
    """The adapter and tokenizer, the run summary; then the checkpoints are no longer needed.
    `state`: the weights to save instead of the model's own (the best ones, or a sharded model's, gathered)."""
    args, processes = run.args, run.accelerator.num_processes
    session_time = time.perf_counter() - run.started
    wall_time = run.elapsed_before + session_time
    # An added pad token's embedding row is zeros, rebuilt wherever the adapter loads: not saved with it.
    options = {} if args.method == "full" else {"save_embedding_layers": False}
    if state is not None:
        options["state_dict"] = state
    output_dir = save_pretrained_atomically(args.output_dir, run.unwrapped, run.tokenizer, **options)
    write_json(args.summary, {
        "run": args.run_name, "method": args.method, "trainable_parameters": run.trainable,
        "total_parameters": run.total, "train_records": len(run.train_examples),
        "eval_records": len(run.eval_examples), "steps": run.total_steps, "resumed_from_step": run.start_step,
        "quantization": quantization_of(args), "trust_remote_code": args.trust_remote_code,
        "added_pad_token": run.tokenizer.pad_token == ADDED_PAD,
        "precision": run.precision, "attn_implementation": run.unwrapped.config._attn_implementation, "packing": run.packing,
        "processes": processes, "distributed": args.distributed if processes > 1 else "none", "wall_time_s": wall_time, "peak_memory_mb": peak_memory_mb(run.device),
        "session_time_s": session_time, "session_tokens": tokens_seen * processes,
        "session_tokens_per_s": tokens_seen * processes / session_time,
        "kept": args.keep, **{k: v for k, v in run.history["selection"].items() if k.startswith("best_")},
        "stopped_at_step": stopped_at, "stop_reason": stop or "max_steps",
        "environment": {"libraries": library_versions(), "device": device_description(run.device, processes)},
        "sources": {name: {**spec, "examples_trained": int(count)}
                    for (name, spec), count in zip(run.mix.items(), contributed)},
    })
    if run.checkpoints:
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    say(run, f"{'model' if args.method == 'full' else 'adapter'} written to {output_dir} after {wall_time:.1f}s")


def select(run, step, eval_loss):
    """Note a held-out loss: keep the weights when they are the best so far (keep: best);
    why to stop now (early stopping), or None."""
    args = run.args
    min_delta = (args.early_stopping or {}).get("min_delta", 0.0)
    if note_evaluation(run.history["selection"], step, eval_loss, min_delta) and args.keep == "best":
        main = run.accelerator.is_main_process
        if run.sharded:  # every process takes part in gathering
            run.best_state = saved_state(run.model, adapter_only=args.method != "full")
        elif main:  # a copy: on CPU the state would otherwise share memory with the weights training goes on with
            run.best_state = {name: tensor.clone() for name, tensor in trainable_state(run.unwrapped).items()}
        if main and run.checkpoints:
            save_best_weights(run.checkpoints, run.best_state)
    return stop_reason(run.history["selection"], args.early_stopping)


# ---------------------------------------------------------------- the loop


def train(args):
    missing = missing_trackers(args.trackers)
    if missing:
        sys.exit(f"[{args.run_name}] " + "; ".join(missing) + " (or leave it out of the run's trackers)")
    run = setup(args)
    main = run.accelerator.is_main_process
    trackers = start_trackers(args.trackers, args.run_name, args.tracker_project, args.tensorboard_dir,
                              args.tracker_dir, vars(args)) if main else []
    log = TrainingLog(args.metrics, args.samples, trackers, enabled=main)
    for row in run.history["metrics"]:
        log.record(row)
    for step in sorted({row["step"] for row in run.history["samples"]}):
        log.record_samples([row for row in run.history["samples"] if row["step"] == step])
    progress = tqdm(total=run.total_steps, initial=run.start_step, desc=args.run_name, disable=not main,
                    mininterval=10, file=sys.stderr)
    run.started = interval_start = time.perf_counter()
    interval, tokens_seen = {"loss": 0.0, "trained": 0, "tokens": 0}, 0
    run.model.train()
    step, stop = run.start_step, None
    for step in range(run.start_step + 1, run.total_steps + 1):
        epoch, loss, trained, seen, interval["grad_norm"] = train_step(run, step)
        interval["loss"] += loss * trained
        interval["trained"] += trained
        interval["tokens"] += seen
        tokens_seen += seen
        progress.update(1)
        if step % args.log_every == 0 or step == run.total_steps:
            row = metrics_row(run, step, epoch, interval, time.perf_counter() - interval_start)
            run.history["metrics"].append(row)
            log.record(row)
            if main:
                progress.write(f"[{args.run_name}] " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            interval, interval_start = {"loss": 0.0, "trained": 0, "tokens": 0}, time.perf_counter()
            stop = select(run, step, row["eval_loss"]) if "eval_loss" in row else None
            if stop:
                say(run, f"{stop}: stopping at step {step} of {run.total_steps}")
                break
        if run.samples[0] and (step % args.sample_every == 0 or step == run.total_steps):
            if main or run.sharded:  # a sharded model generates on every process together
                run.model.eval()
                rows = answers_at(run.unwrapped, run.tokenizer, *run.samples, step, args.max_new_tokens, args.seed,
                                  synced_processes=run.sharded)
                run.model.train()
                if main:
                    run.history["samples"] += rows
                    log.record_samples(rows)
            run.accelerator.wait_for_everyone()
        if run.checkpoints and args.checkpoint_every and step % args.checkpoint_every == 0 and step < run.total_steps:
            save_checkpoint(run.checkpoints, run, step, run.history,
                            run.elapsed_before + time.perf_counter() - run.started)
    progress.close()
    log.close()
    run.accelerator.wait_for_everyone()
    if args.keep == "best":
        state = run.best_state
    else:
        state = saved_state(run.model, adapter_only=args.method != "full") if run.sharded else None
    contributed = run.accelerator.reduce(torch.tensor(run.contributed, device=run.device), reduction="sum")
    if main:
        save(run, tokens_seen, step, stop, contributed.tolist(), state)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True, help="local path or Hub id")
    parser.add_argument("--shards", type=Path, nargs="+", required=True, help="Arrow shards from tokenize_data.py")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="where the adapter (for method full: the model) and the tokenizer go")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics.jsonl, one line per logging step")
    parser.add_argument("--summary", type=Path, required=True, help="train_summary.json")
    parser.add_argument("--samples", type=Path, default=None, help="samples.jsonl: answers to eval prompts over training")
    parser.add_argument("--tensorboard-dir", type=Path, default=None, help="TensorBoard events (tracker tensorboard)")
    parser.add_argument("--tracker-dir", type=Path, default=None,
                        help="the local MLflow file store and W&B offline runs go under it (training_log.py)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="resumable checkpoints (not an output)")
    parser.add_argument("--weights", type=float, nargs="+", default=None,
                        help="one per shard: its dataset's share of each epoch's training examples (mixing.py); "
                             "default: every example once per epoch")
    parser.add_argument("--run-name", default="run")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    add_settings(parser, "train")
    args = check_settings(parser.parse_args(argv), "train")
    problems = run_conflicts(vars(args))
    if args.weights and (len(args.weights) != len(args.shards) or min(args.weights) <= 0):
        problems.append(f"--weights needs one positive weight per shard ({len(args.shards)}), got {args.weights}")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
