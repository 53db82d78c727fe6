"""Train one run on tokenized shards: an adapter (LoRA, QLoRA, DoRA or AdaLoRA)
or every parameter (full). The seed recipe (load the base model, wrap it with
peft, optimize, save adapter and tokenizer) as one recipe you can read top to
bottom: setup, a step, logging, save. Pretraining the embedded tiny model is
a full run of this same recipe on plain text.

- Examples are read from memory-mapped shards a batch at a time (data/shards.py),
  so memory does not grow with the dataset.
- Batches hold records of similar length padded to their longest record, or,
  with packing, the records back to back in one row with position ids that
  restart per record (padding-free; pays off with flash-attention on GPU).
- The loss is the mean over every trained token of an optimizer step, so
  gradient accumulation and uneven batches weigh tokens equally.
- Checkpoints go to --checkpoint-dir every checkpoint_every steps; a rerun
  with the same settings and data resumes from the last one, a rerun with
  different ones starts over. A NaN/inf loss stops the run; no adapter is written.
- Datasets given with weights are mixed by them (data/mixing.py has the meaning);
  the summary counts the examples each one contributed.
- Runs on one device, or on several under `accelerate launch` (DDP or FSDP).
- A preference objective (dpo, ipo, simpo, orpo, kto) trains on preference or unpaired shards
  with the loss of training/objectives.py (imported only by such runs, so that it is code of
  those runs alone), against the reference's log-probabilities given with --reference.
- grpo samples completions of the records' prompts (--records) and learns from their rewards
  (training/grpo.py, training/rewards.py; imported only by grpo runs).

    python scripts/train.py --settings results/runs/r8/settings/train.json \
        --base-model results/base_models/tiny-llama --shards results/tokens/TOKENIZATION/*.arrow \
        --output-dir results/runs/r8/trained --metrics results/runs/r8/metrics.jsonl \
        --summary results/runs/r8/train_summary.json
"""
import argparse
import collections
import contextlib
import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from finetune.data.batches import pack_batch, pad_batch, real_tokens
from finetune.data.prompts import count_trained_tokens
from finetune.evaluation.loss import mean_token_loss
from finetune.files import save_pretrained_atomically, write_json
from finetune.settings import read_settings, run_conflicts
from finetune.training.checkpoints import save_checkpoint, trainable_state
from finetune.training.distributed import clip_gradients, saved_state
from finetune.training.log import TrainingLog, missing_trackers, start_trackers
from finetune.training.selection import note_evaluation, save_best_weights, stop_reason
from finetune.training.setup import setup
from finetune.training.summary import training_summary


# ---------------------------------------------------------------- one optimizer step


def make_batch(run, indices):
    examples = run.train_examples[indices]
    if run.train_examples.kind != "sft":  # preference pairs, or unpaired completions
        from finetune.training.objectives import preference_batch
        return preference_batch(examples, run.tokenizer.pad_token_id, run.train_examples.kind)
    return pack_batch(examples) if run.packing else pad_batch(examples, run.tokenizer.pad_token_id)


def step_totals(run, window):
    """What the step's loss is a mean over, summed over its micro-batches and processes: SFT's trained tokens;
    for preference objectives, pairs (or completions) and the chosen answers' trained tokens."""
    if run.train_examples.kind == "sft":
        counts = [sum(count_trained_tokens(b["labels"]) for b in window), 0]
    else:
        from finetune.training.objectives import trained_first_tokens
        objective = run.settings.objective
        counts = [sum(len(b["input_ids"]) // 2 for b in window),
                  sum(trained_first_tokens(b, objective) for b in window)]
    return run.accelerator.reduce(torch.tensor(counts, device=run.device), reduction="sum").tolist()


def micro_batch_loss(run, batch, totals):
    """This micro-batch's share of the step's mean loss, and its statistics (preference objectives, grpo)."""
    if run.settings.objective == "grpo":
        from finetune.training import grpo
        return grpo.micro_batch_loss(run, batch, totals)
    if run.train_examples.kind == "sft":
        return run.model(**batch, num_items_in_batch=totals[0], use_cache=False).loss, {}
    from finetune.training.objectives import objective_loss
    return objective_loss(run.model, batch, run.settings, run.train_examples.kind, *totals)


def train_step(run, step):
    """Forward and backward over one accumulation window, then the optimizer step. Returns (epoch,
    mean loss per trained token (per pair), trained tokens (pairs), tokens seen here, grad norm, stats)."""
    accelerator, processes, settings = run.accelerator, run.accelerator.num_processes, run.settings
    if settings.objective == "grpo":  # completions sampled and scored (every `iterations` steps)
        from finetune.training import grpo
        epoch, window, totals, rollout_stats = grpo.step_batches(run, step)
    else:
        window = [run.next_micro_batch() for _ in range(settings.grad_accum)]
        epoch, rollout_stats = window[-1][0], {}
        window = [make_batch(run, indices) for _, indices in window]
        totals = step_totals(run, window)
    step_loss, tokens_seen, stats = 0.0, 0, collections.Counter(rollout_stats)
    for i, batch in enumerate(window):
        batch = {k: v.to(run.device) for k, v in batch.items()}
        # DDP syncs gradients once per window; FSDP reduce-scatters every micro-batch, keeping only its shard.
        last = i == len(window) - 1
        sync = accelerator.no_sync(run.model) if not (last or run.sharded) else contextlib.nullcontext()
        with sync:
            # DDP and FSDP average gradients over processes, so scale the mean back up.
            loss, batch_stats = micro_batch_loss(run, batch, totals)
            loss = loss * processes
            accelerator.backward(loss)
        stats.update(batch_stats)
        step_loss += loss.item() / processes
        tokens_seen += real_tokens(batch)
    step_loss = accelerator.reduce(torch.tensor(step_loss, device=run.device), reduction="sum").item()
    if stats:  # every process's pairs
        names = sorted(stats)
        totals_here = torch.tensor([float(stats[name]) for name in names], device=run.device, dtype=torch.float64)
        stats = dict(zip(names, accelerator.reduce(totals_here, reduction="sum").tolist()))
    if not math.isfinite(step_loss):
        sys.exit(f"[{run.run_name}] loss is {step_loss} at step {step}: training diverged. Usual causes: "
                 f"learning rate too high (now {settings.learning_rate}), fp16 overflow (try bf16 or fp32), "
                 "bad data or a broken base model. No adapter was written.")
    grad_norm = clip_gradients(run.model, settings.max_grad_norm, accelerator, run.sharded)
    run.optimizer.step()
    if settings.method == "adalora":
        run.unwrapped.base_model.update_and_allocate(step)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return epoch, step_loss, totals[0], tokens_seen, float(grad_norm), stats


# ---------------------------------------------------------------- logging


def new_interval():
    """What the steps between two metrics rows add up: loss, trained tokens (pairs), tokens, objective stats."""
    return {"loss": 0.0, "trained": 0, "tokens": 0, "stats": collections.Counter()}


def metrics_row(run, step, epoch, interval, seconds):
    """One row of metrics.jsonl: the interval's loss per trained token (per pair for preference objectives),
    speed, the objective's statistics per pair (reward accuracy and margin, ...), and the held-out loss when due."""
    row = {"step": step, "epoch": round(epoch + 1, 2), "loss": interval["loss"] / max(interval["trained"], 1),
           "lr": run.scheduler.get_last_lr()[0], "grad_norm": interval["grad_norm"],
           "tokens_per_s": interval["tokens"] * run.accelerator.num_processes / seconds,
           "elapsed_s": run.progress.elapsed_before + time.perf_counter() - run.progress.started}
    if run.grpo:
        from finetune.training import grpo
        row.update(grpo.metrics(interval["stats"]))
    else:
        pairs = interval["stats"].pop("pairs", 0)
        row.update({name: total / max(pairs, 1) for name, total in sorted(interval["stats"].items())})
    eval_every = run.settings.eval_every
    if run.eval_examples and (step == run.total_steps or (eval_every and step % eval_every == 0)):
        run.model.eval()
        pad = run.tokenizer.pad_token_id
        if run.grpo:
            row["eval_reward"] = grpo.heldout_reward(run, step)
        elif run.eval_examples.kind == "sft":
            row["eval_loss"] = mean_token_loss(run.model, run.eval_examples, run.settings.batch_size, pad)[0]
        else:
            from finetune.training.objectives import heldout_objective_loss
            row["eval_loss"] = heldout_objective_loss(run.model, run.eval_examples, run.settings,
                                                      run.eval_examples.kind, run.settings.batch_size, pad)
        run.model.train()
    return row


def sample(run, step, log):
    """The answers to the sample prompts at this step, to samples.jsonl and the trackers."""
    from finetune.training.samples import answers_at
    if run.accelerator.is_main_process or run.sharded:  # a sharded model generates on every process together
        run.model.eval()
        rows = answers_at(run.unwrapped, run.tokenizer, *run.samples, step, run.settings.max_new_tokens,
                          run.settings.seed, synced_processes=run.sharded)
        run.model.train()
        if run.accelerator.is_main_process:
            run.progress.history["samples"] += rows
            log.record_samples(rows)
    run.accelerator.wait_for_everyone()


# ---------------------------------------------------------------- save


def select(run, step, eval_loss):
    """Note a held-out loss: keep the weights when they are the best so far (keep: best);
    why to stop now (early stopping), or None."""
    settings, progress = run.settings, run.progress
    min_delta = (settings.early_stopping or {}).get("min_delta", 0.0)
    if note_evaluation(progress.history["selection"], step, eval_loss, min_delta) and settings.keep == "best":
        main = run.accelerator.is_main_process
        if run.sharded:  # every process takes part in gathering
            progress.best_state = saved_state(run.model, adapter_only=settings.method != "full")
        elif main:  # a copy: on CPU the state would otherwise share memory with the weights training goes on with
            progress.best_state = {name: tensor.clone() for name, tensor in trainable_state(run.unwrapped).items()}
        if main and run.checkpoints:
            save_best_weights(run.checkpoints, progress.best_state)
    return stop_reason(progress.history["selection"], settings.early_stopping)


def prune(run, pruning, step, held_out):
    """Why the search's pruner stops this trial now, or None: asked on the first process, told to every one."""
    reason = [pruning.report(step, held_out) if pruning else None]
    if run.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(reason)
    return reason[0]


def save(run, args, tokens_seen, stopped_at, stop):
    """The adapter (for full: the model) and tokenizer, the run summary; then the checkpoints are no longer
    needed. Every process calls this: a sharded model's weights are gathered onto the first."""
    if run.settings.keep == "best":
        state = run.progress.best_state
    else:
        state = saved_state(run.model, adapter_only=run.settings.method != "full") if run.sharded else None
    contributed = run.accelerator.reduce(torch.tensor(run.progress.contributed, device=run.device), reduction="sum")
    if not run.accelerator.is_main_process:
        return
    # An added pad token's embedding row is zeros, rebuilt wherever the adapter loads: not saved with it.
    options = {} if run.settings.method == "full" else {"save_embedding_layers": False}
    if state is not None:
        options["state_dict"] = state
    save_pretrained_atomically(args.output_dir, run.unwrapped, run.tokenizer, **options)
    summary = training_summary(run, tokens_seen, stopped_at, stop, contributed.tolist())
    write_json(args.summary, summary)
    if run.checkpoints:
        shutil.rmtree(run.checkpoints, ignore_errors=True)
    run.say(f"{'model' if run.settings.method == 'full' else 'adapter'} written to {args.output_dir} "
             f"after {summary['wall_time_s']:.1f}s")


# ---------------------------------------------------------------- the loop


def train(args, settings):
    missing = missing_trackers(settings.trackers)
    if missing:
        sys.exit(f"[{args.run_name}] " + "; ".join(missing) + " (or leave it out of the run's trackers)")
    run = setup(args, settings)
    main, progress = run.accelerator.is_main_process, run.progress
    trackers = start_trackers(settings.trackers, args.run_name, settings.tracker_project, args.tensorboard_dir,
                              args.tracker_dir, dataclasses.asdict(settings)) if main else []
    log = TrainingLog(args.metrics, args.samples, trackers, enabled=main)
    log.replay(progress.history)  # a resumed run's rows so far
    bar = tqdm(total=run.total_steps, initial=progress.start_step, desc=args.run_name, disable=not main,
               mininterval=10, file=sys.stderr)
    pruning = None
    if args.study and main:  # a search trial that its study's pruner may stop
        from finetune.training.pruning import TrialPruning
        pruning = TrialPruning(args.study, args.trial, say=run.say)
    progress.started = interval_start = time.perf_counter()
    interval, tokens_seen = new_interval(), 0
    run.model.train()
    step, stop = progress.start_step, None
    for step in range(progress.start_step + 1, run.total_steps + 1):
        epoch, loss, trained, seen, interval["grad_norm"], stats = train_step(run, step)
        interval["loss"] += loss * trained
        interval["trained"] += trained
        interval["tokens"] += seen
        interval["stats"].update(stats)
        tokens_seen += seen
        bar.update(1)
        if step % settings.log_every == 0 or step == run.total_steps:
            row = metrics_row(run, step, epoch, interval, time.perf_counter() - interval_start)
            progress.history["metrics"].append(row)
            log.record(row)
            if main:
                bar.write(f"[{args.run_name}] " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            interval, interval_start = new_interval(), time.perf_counter()
            # keep: best and early stopping follow the held-out loss (for grpo: minus the held-out reward).
            held_out = row.get("eval_loss", -row["eval_reward"] if "eval_reward" in row else None)
            stop = select(run, step, held_out) if held_out is not None else None
            if args.study and held_out is not None and not stop:
                stop = prune(run, pruning, step, held_out)
            if stop:
                run.say(f"{stop}: stopping at step {step} of {run.total_steps}")
                break
        if run.samples[0] and (step % settings.sample_every == 0 or step == run.total_steps):
            sample(run, step, log)
        if run.grpo and settings.sample_every and step % settings.sample_every == 0 and main:
            progress.history["samples"] += run.grpo.rollout["examples"]  # a group of this step's, with its rewards
            log.record_samples(run.grpo.rollout["examples"])
        if run.checkpoints and settings.checkpoint_every and step % settings.checkpoint_every == 0 \
                and step < run.total_steps:
            save_checkpoint(run, step, progress.elapsed_before + time.perf_counter() - progress.started)
    bar.close()
    log.close()
    run.accelerator.wait_for_everyone()
    save(run, args, tokens_seen, step, stop)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--base-model", required=True, help="local path or Hub id")
    parser.add_argument("--shards", type=Path, nargs="+", required=True, help="Arrow shards from tokenize_data.py")
    parser.add_argument("--reference", type=Path, nargs="*", default=[],
                        help="dpo, ipo, kto: the reference's log-probabilities of each shard (reference_logps.py)")
    parser.add_argument("--records", type=Path, nargs="*", default=[],
                        help="grpo: the validated records of the shards' datasets (prompts and their answers)")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="where the adapter (for method full: the model) and the tokenizer go")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics.jsonl, one line per logging step")
    parser.add_argument("--summary", type=Path, required=True, help="train_summary.json")
    parser.add_argument("--samples", type=Path, default=None, help="samples.jsonl: answers to eval prompts over training")
    parser.add_argument("--tensorboard-dir", type=Path, default=None, help="TensorBoard events (tracker tensorboard)")
    parser.add_argument("--tracker-dir", type=Path, default=None,
                        help="the local MLflow file store and W&B offline runs go under it (training/log.py)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="resumable checkpoints (not an output)")
    parser.add_argument("--study", type=Path, default=None,
                        help="a search trial: its study's Optuna journal, which may prune it (finetune/search)")
    parser.add_argument("--trial", type=int, default=None, help="with --study: the trial's number in the study")
    parser.add_argument("--run-name", default="run")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "train")
    problems = run_conflicts(dataclasses.asdict(settings))
    if isinstance(settings.datasets, dict) and sorted(settings.datasets) != sorted(Path(s).stem for s in args.shards):
        problems.append(f"the weighted datasets {sorted(settings.datasets)} are not the shards' "
                        f"{sorted(Path(s).stem for s in args.shards)}")
    if problems:
        sys.exit(f"[{args.run_name}] {args.settings}: " + "; ".join(problems))
    if args.threads:
        torch.set_num_threads(args.threads)
    train(args, settings)


if __name__ == "__main__":
    main()
