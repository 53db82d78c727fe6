"""Time a DPO step of this workflow (scripts/train.py, objective dpo) against TRL's DPOTrainer on the same
machine, model, pairs and batch; the reference's log-probabilities precomputed, and scored in every step.

    python bench/dpo_bench.py --wait-idle                    # CPU, fp32: what BENCHMARKS.md records
    python bench/dpo_bench.py --device cuda --precision bf16 # the same on a GPU: written, but run on CPU only
    python bench/dpo_bench.py --quick                        # tiny model, 4 steps, 1 round: a smoke test

Both sides: the same Llama (finetune.tiny_model, random weights, vocabulary padded to --vocab rows), the
same pairs (data/preference_train.jsonl; TRL tokenizes the same chat messages itself, and the report counts
the pairs whose tokens are ours), LoRA r 16 alpha 32 dropout 0 all-linear, batch 16 pairs, constant learning
rate, no gradient checkpointing, seed 0, --threads threads. Each measurement runs in a process of its own;
--repeats rounds of them all, each side's fastest round counting. Timed: the median step after --warmup, and
the one-off reference pass (ours: reference_logps.py's pass and file; TRL: its precompute pass); not model
loading nor TRL's dataset preparation. Reference in every step: TRL with precompute_ref_log_probs=False;
ours (the workflow always caches) is train.py with its loss wrapped to score the batch with the frozen base.
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports transformers (in the functions below)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
SIDES = ["ours-reference", "ours-cached", "ours-in-step", "trl-precomputed", "trl-in-step"]
BATCH, LORA = 16, dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


def build_inputs(args, work):
    """The base model (vocabulary padded to args.vocab rows); the pairs validated and tokenized into a shard."""
    from transformers import AutoModelForCausalLM

    from finetune.data.tokenization import tokenize_file
    from finetune.data.tokenizer import load_tokenizer
    from finetune.data.validation import validate_file
    from finetune.tiny_model import build_tiny_model
    model_dir = build_tiny_model([REPO / "data" / "pretrain_corpus.jsonl"], work / "model", hidden_size=args.hidden,
                                 num_layers=args.layers)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(max(args.vocab, model.config.vocab_size), mean_resizing=False)
    model.save_pretrained(model_dir)
    lines = (REPO / "data" / "preference_train.jsonl").read_text().splitlines()[:args.pairs]
    (work / "raw.jsonl").write_text("\n".join(lines) + "\n")
    validate_file(work / "raw.jsonl", work / "pairs.jsonl", work / "rejected.jsonl")
    tokenize_file(work / "pairs.jsonl", load_tokenizer(model_dir), "auto", args.max_length, work / "pairs.arrow",
                  split="train")


def count_tokens(counts, batch):
    counts["padded"] += batch["input_ids"].numel()
    counts["real"] += int(batch["attention_mask"].sum())


def per_step(ends, warmup):
    """The median step after the warm-up (another process on the machine can delay a few), and every step's."""
    seconds = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    return {"step_s": statistics.median(seconds), "steps_s": [round(s, 3) for s in seconds]}


def ours_reference(args, work):
    """scripts/reference_logps.py's pass over the shard and writing its file (the model loaded before the clock)."""
    import pyarrow as pa
    import reference_logps

    from finetune.settings import read_settings, write_settings
    path = write_settings(work / "reference.json", "reference_logps", precision=args.precision, batch_size=BATCH)
    model, tokenizer = reference_logps.load_reference(work / "model", read_settings(path, "reference_logps"),
                                                      args.device)
    table = pa.ipc.open_stream(pa.OSFile(str(work / "pairs.arrow"))).read_all()
    start = time.perf_counter()
    columns = reference_logps.reference_logps(model, table, "preference", BATCH, tokenizer.pad_token_id)
    reference_logps.write_reference(work / "reference.arrow", table, columns)
    return {"reference_s": time.perf_counter() - start}


def score_reference_in_every_step():
    """Wrap the loss so that the frozen base (adapter disabled) scores the batch first with the reference pass's
    answer_logps, its values replacing the cached ones."""
    import torch

    from finetune.training import objectives
    loss_against_cache = objectives.objective_loss

    def objective_loss(model, batch, *rest):
        with torch.no_grad(), model.disable_adapter():
            reference, _ = objectives.answer_logps(model, batch)
        batch["ref_logps"], batch["ref_rejected_logps"] = reference.double().chunk(2)
        return loss_against_cache(model, batch, *rest)
    objectives.objective_loss = objective_loss


def ours(args, work, in_step):
    """scripts/train.py's main() on the shard and its reference file, a metrics row per step."""
    import train

    from finetune.settings import write_settings
    if in_step:
        score_reference_in_every_step()
    counts, make_batch = collections.Counter(), train.make_batch

    def counted_batch(run, indices):
        batch = make_batch(run, indices)
        count_tokens(counts, batch)
        return batch
    train.make_batch = counted_batch
    out = work / ("ours-in-step" if in_step else "ours-cached")
    settings = write_settings(out / "train.json", "train", objective="dpo", beta=0.1, **LORA, batch_size=BATCH,
                              learning_rate=args.lr, lr_scheduler="constant_with_warmup", warmup_ratio=0,
                              max_steps=args.steps, log_every=1, checkpoint_every=0, seed=0, precision=args.precision)
    train.main(["--settings", str(settings), "--base-model", str(work / "model"), "--shards", str(work / "pairs.arrow"),
                "--reference", str(work / "reference.arrow"), "--output-dir", str(out / "trained"),
                "--metrics", str(out / "metrics.jsonl"), "--summary", str(out / "summary.json"),
                "--threads", str(args.threads)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {**per_step([row["elapsed_s"] for row in rows], args.warmup), "first_loss": rows[0]["loss"],
            **{f"{k}_per_step": v / args.steps for k, v in counts.items()}}


def trl_dataset(work):
    """The same pairs in TRL's conversational format: the user turn the workflow renders, each answer a turn."""
    import datasets

    from finetune.data.prompts import as_messages
    rows = []
    for record in map(json.loads, (work / "pairs.jsonl").read_text().splitlines()):
        user, chosen = as_messages({**record, "output": record["chosen"]})
        rows.append({"id": record["id"], "prompt": [user], "chosen": [chosen],
                     "rejected": [{**chosen, "content": record["rejected"]}]})
    return datasets.Dataset.from_list(rows)


def same_tokens(dataset, work):
    """For how many pairs TRL's tokens are our shard's: both sequences, and the trained (completion) tokens."""
    from finetune.data.shards import read_shards
    ours_by_id = {e["id"]: e for e in read_shards([work / "pairs.arrow"], "train")}
    same = 0
    for row in dataset:
        e = ours_by_id[row["id"]]
        trained = [token for token, label in zip(e["input_ids"], e["labels"]) if label != -100]
        same += (row["prompt_ids"] + row["chosen_ids"] == e["input_ids"] and row["chosen_ids"] == trained
                 and row["prompt_ids"] + row["rejected_ids"] == e["rejected_input_ids"])
    return f"{same}/{len(dataset)}"


def trl(args, work, precompute):
    """trl.DPOTrainer on the same base model, LoRA, pairs and batch."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from finetune.data.tokenizer import load_tokenizer

    class Timed(DPOTrainer):
        """Clocks the precompute pass; counts the tokens of the training batches."""
        precompute_s, ends, counts = None, [], collections.Counter()

        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            dataset = super()._precompute_ref_logps(*a, **k)
            self.precompute_s = time.perf_counter() - start
            return dataset

        def training_step(self, model, inputs, *a, **k):
            count_tokens(self.counts, inputs)
            return super().training_step(model, inputs, *a, **k)

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            Timed.ends.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(
        work / "model", dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    config = DPOConfig(output_dir=str(work / "trl-out"), per_device_train_batch_size=BATCH, learning_rate=args.lr,
                       lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps, logging_steps=1,
                       save_strategy="no", report_to=[], seed=0, use_cpu=args.device == "cpu",
                       bf16=args.precision == "bf16", gradient_checkpointing=False, dataloader_num_workers=0,
                       disable_tqdm=True, loss_type=["sigmoid"], beta=0.1, max_length=args.max_length,
                       precompute_ref_log_probs=precompute)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = Timed(model=model, args=config, train_dataset=trl_dataset(work), peft_config=lora,
                    processing_class=load_tokenizer(work / "model"), callbacks=[Clock()])
    identical = same_tokens(trainer.train_dataset, work)
    trainer.train()
    return {**per_step(Timed.ends, args.warmup), "reference_s": trainer.precompute_s, "same_tokens": identical,
            "first_loss": next(row["loss"] for row in trainer.state.log_history if "loss" in row),
            **{f"{k}_per_step": v / args.steps for k, v in Timed.counts.items()}}


def worker(side, args, work):
    import torch
    torch.set_num_threads(args.threads)
    if side == "ours-reference":
        return ours_reference(args, work)
    if side.startswith("ours"):
        return ours(args, work, in_step=side == "ours-in-step")
    return trl(args, work, precompute=side == "trl-precomputed")


def busy_cpus(seconds=2.0):
    """The share of the CPUs' time spent busy over the next `seconds` (/proc/stat), this script asleep."""
    def times():
        return [int(field) for field in open("/proc/stat").readline().split()[1:]]
    before = times()
    time.sleep(seconds)
    delta = [b - a for a, b in zip(before, times())]
    return 1 - (delta[3] + delta[4]) / sum(delta)  # idle and iowait


def run_side(side, args, work):
    """One measurement in a process of its own (this script with --worker); its result. With --wait-idle it
    starts once the CPUs are 90% idle, so that another process's work is not counted."""
    while args.wait_idle and busy_cpus() > 0.1:
        time.sleep(5)
    options = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
               if name not in ("worker", "workdir", "quick", "wait_idle")]
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    result = subprocess.run([sys.executable, __file__, "--worker", side, "--workdir", str(work), *options],
                            capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{side} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.split("RESULT ", 1)[1])


def best_of(rounds):
    """Per side, its fastest step and reference pass over the rounds (another process on the machine slows a
    round, never speeds it up); the rest from the first round."""
    return {side: {**rounds[0][side], **{key: min(r[side][key] for r in rounds)
                                         for key in ("step_s", "reference_s") if rounds[0][side].get(key)}}
            for side in SIDES}


def machine(args):
    from importlib.metadata import version
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, {args.threads} threads; " + ", ".join(
        f"{name} {version(name)}" for name in ("torch", "transformers", "peft", "trl"))


def report(args, rounds, load):
    best = best_of(rounds)
    o, t, steps_per_epoch = best["ours-cached"], best["trl-precomputed"], args.pairs // BATCH
    ours_pass, trl_pass = best["ours-reference"]["reference_s"], t["reference_s"]
    rows = [("(1) step, reference precomputed", o["step_s"], t["step_s"]),
            (f"(2) one-off reference pass over the {args.pairs} pairs", ours_pass, trl_pass),
            (f"(1) + (2) / {steps_per_epoch} (one epoch's steps)", o["step_s"] + ours_pass / steps_per_epoch,
             t["step_s"] + trl_pass / steps_per_epoch),
            ("(3) step, reference scored inside every step", best["ours-in-step"]["step_s"],
             best["trl-in-step"]["step_s"])]
    print(f"\nDPO, LoRA r16 all-linear, batch {BATCH} pairs, {args.steps} steps of which {args.warmup} warm-up, Llama "
          f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.device} {args.precision}; "
          f"{machine(args)}; load average {load[0]:.2f} before, {load[1]:.2f} after")
    print("| DPO | this workflow | TRL DPOTrainer | TRL / ours |\n|---|---|---|---|")
    for name, mine, theirs in rows:
        print(f"| {name} | {mine:.3f} s | {theirs:.3f} s | {theirs / mine:.2f}x |")
    print("| tokens per step: padded (non-pad) | " + " | ".join(
        f"{r['padded_per_step']:.0f} ({r['real_per_step']:.0f})" for r in (o, t)) + " | |")
    print("| first step's loss, reference precomputed / in the step (ln 2 = 0.6931) | " + " | ".join(
        f"{best[cached]['first_loss']:.4f} / {best[in_step]['first_loss']:.4f}"
        for cached, in_step in (("ours-cached", "ours-in-step"), ("trl-precomputed", "trl-in-step"))) + " | |")
    print(f"TRL's tokens are ours for {t['same_tokens']} pairs. Each round (s): " + "; ".join(
        f"{side} " + " ".join(f"{r[side].get('step_s') or r[side]['reference_s']:.3f}" for r in rounds)
        for side in SIDES))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1024, help="training pairs (from data/preference_train.jsonl)")
    parser.add_argument("--steps", type=int, default=35, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192, help="rows of the embeddings and the LM head")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every side; each side's fastest counts")
    parser.add_argument("--wait-idle", action="store_true", help="start each measurement on idle CPUs (shared machine)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 64 pairs, 4 steps, 1 round: a smoke test")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.steps, args.warmup, args.hidden, args.layers, args.vocab = 64, 4, 1, 64, 2, 1024
        args.repeats = 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args, work)))
        return
    load_before = os.getloadavg()[0]
    build_inputs(args, work)
    rounds = [{side: run_side(side, args, work) for side in SIDES} for _ in range(args.repeats)]
    (work / "results.json").write_text(json.dumps(rounds, indent=2))
    report(args, rounds, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
