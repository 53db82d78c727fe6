"""Time a GRPO step of this workflow (scripts/train.py, objective grpo) against TRL's GRPOTrainer on the same
machine, model, prompts and batch, split into generation (sampling and scoring) and optimization (forward,
backward, optimizer step). bench/grpo_quality.py compares what the two learn.

    python bench/grpo_bench.py --wait-idle --model PROJECT/results/runs/sft-short/merged_weights  # CPU fp32
    python bench/grpo_bench.py --wait-idle                    # a random tiny Llama instead (rewards all 0)
    python bench/grpo_bench.py --quick                 # tiny model, 16 prompts, 3 steps, 1 round, 1 thread: smoke test

Speed, both sides: the same model; the same prompts (data/word_tasks.jsonl and number_tasks.jsonl validated;
TRL gets each record's turns before the answer as chat messages, or the alpaca prompt as text, and the report
counts the prompts TRL tokenizes as we do), the same 8 prompts in each step (TRL's dataset laid out in the
order of our length-grouped micro-batches, unshuffled); 8 completions of at most 16 tokens per prompt,
temperature 1, no top-k, reward exact match of the record's answer; LoRA r 16 alpha 32 dropout 0 all-linear,
loss dapo, beta 0, constant learning rate, fp32, seed 0, --threads threads. TRL's configuration is made from
our settings file (trl_config). Each side runs in a process of its own; --repeats rounds of all, each side's
fastest round counting. Timed: the median step after --warmup (step end to step end) and the generation within
it (ours: grpo.rollout; TRL: _generate_and_score_completions); optimization is the rest. Third side: ours with
each prompt's KV cache not shared by its group (each prompt repeated, as TRL does), to show what sharing gains.

"""
import argparse
import dataclasses
import itertools
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
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "bench")]
from dpo_bench import busy_cpus, machine  # noqa: E402  (standard library only)

SIDES = ["ours", "ours-unshared", "trl"]
PROMPTS, GENERATIONS = 8, 8  # prompts per step, completions per prompt
SPEED_SETTINGS = dict(objective="grpo", rewards=["exact_match"], num_generations=GENERATIONS, batch_size=PROMPTS,
                      max_completion_length=16, sampling_temperature=1.0, sampling_top_p=1.0, beta=0.0,
                      loss_type="dapo", r=16, alpha=32, dropout=0.0, target_modules="all-linear",
                      lr_scheduler="constant_with_warmup", warmup_ratio=0, log_every=1, checkpoint_every=0,
                      eval_every=0, sample_every=0, seed=0)


def build_inputs(args, work):
    """The model (unless --model; vocabulary padded to args.vocab rows), the task records validated and tokenized
    into one shard (all train), and the settings file both sides train with."""
    from finetune.data.tokenization import tokenize_file
    from finetune.data.tokenizer import load_tokenizer
    from finetune.data.validation import validate_file
    from finetune.settings import write_settings
    if not args.model:
        from transformers import AutoModelForCausalLM

        from finetune.tiny_model import build_tiny_model
        build_tiny_model([REPO / "data" / "pretrain_corpus.jsonl"], work / "model", hidden_size=args.hidden,
                         num_layers=args.layers)
        model = AutoModelForCausalLM.from_pretrained(work / "model")
        model.resize_token_embeddings(max(args.vocab, model.config.vocab_size), mean_resizing=False)
        model.save_pretrained(work / "model")
    words, numbers = ((REPO / "data" / f"{name}_tasks.jsonl").read_text().splitlines() for name in ("word", "number"))
    lines = words[:args.prompts - args.prompts // 3] + numbers[:args.prompts // 3]
    (work / "raw.jsonl").write_text("\n".join(lines) + "\n")
    validate_file(work / "raw.jsonl", work / "tasks.jsonl", work / "rejected.jsonl")
    tokenize_file(work / "tasks.jsonl", load_tokenizer(model_dir(args, work)), "auto", 256, work / "tasks.arrow",
                  split="train")
    write_settings(work / "train.json", "train", **SPEED_SETTINGS, max_steps=args.steps, learning_rate=args.lr,
                   precision=args.precision)


def model_dir(args, work):
    return Path(args.model) if args.model else work / "model"


class Timings:
    """Step ends, each step's generation time, and each generation's mean reward and completion length."""

    def __init__(self, device):
        self.device, self.ends, self.generation, self.rewards, self.lengths = device, [], [], [], []

    def now(self):
        if self.device == "cuda":
            import torch
            torch.cuda.synchronize()
        return time.perf_counter()

    def result(self, warmup):
        """Medians over the steps after the warm-up (another process on the machine can delay a few)."""
        steps = [b - a for a, b in zip(self.ends[warmup - 1:], self.ends[warmup:])]
        generation = self.generation[warmup:len(self.ends)]
        return {"step_s": statistics.median(steps), "generation_s": statistics.median(generation),
                "optimization_s": statistics.median(s - g for s, g in zip(steps, generation)),
                "steps_s": [round(s, 3) for s in steps], "reward": statistics.mean(self.rewards),
                "completion_length": statistics.mean(self.lengths)}


def unshared(sample_groups):
    """grpo.sample_groups with each prompt's KV cache not shared by its group: every prompt repeated
    num_generations times and each copy sampled once (as TRL and num_return_sequences do); the same tokens."""
    def sample(model, tokenizer, prompts, settings, *rest, **options):
        repeated = [ids for ids in prompts for _ in range(settings.num_generations)]
        return sample_groups(model, tokenizer, repeated, dataclasses.replace(settings, num_generations=1), *rest,
                             **options)
    return sample


def ours(args, work, shared):
    """scripts/train.py's main() on the shard and its records, its rollouts and steps clocked."""
    import train

    from finetune.training import grpo
    timings, rollout, train_step = Timings(args.device), grpo.rollout, train.train_step

    def timed_rollout(run, step):
        start = timings.now()
        result = rollout(run, step)
        timings.generation.append(timings.now() - start)
        stats = result["stats"]
        timings.rewards.append(stats["reward"] / stats["completions"])
        timings.lengths.append(stats["completion_length"] / stats["completions"])
        return result

    def timed_step(run, step):
        result = train_step(run, step)
        timings.ends.append(timings.now())
        return result
    grpo.rollout, train.train_step = timed_rollout, timed_step
    if not shared:
        grpo.sample_groups = unshared(grpo.sample_groups)
    out = work / ("ours" if shared else "ours-unshared")
    train.main(["--settings", str(work / "train.json"), "--base-model", str(model_dir(args, work)),
                "--shards", str(work / "tasks.arrow"), "--records", str(work / "tasks.jsonl"),
                "--output-dir", str(out / "trained"), "--metrics", str(out / "metrics.jsonl"),
                "--summary", str(out / "summary.json"), "--threads", str(args.threads)])
    return timings.result(args.warmup)


def exact_match(completions, answer, **kwargs):
    """TRL's reward: 1 where the completion is the record's answer, as rewards.exact_match (and evaluation)
    score it; a conversational completion is a list holding the assistant's message."""
    from finetune.evaluation.metrics import is_exact_match
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(bool(a.strip()) and is_exact_match(t, a)) for t, a in zip(texts, answer)]


def trl_prompt(record, tokenizer, template):
    """A record's prompt for TRL: with a chat template the turns before the answer (TRL renders them with the
    generation prompt), else the alpaca prompt as text."""
    from finetune.data.prompts import as_messages, format_segments
    if template == "chat":
        return as_messages(record)[:-1]
    segments = format_segments(record, tokenizer, template)
    return "".join(text for text, _ in segments[:max(i for i, (_, target) in enumerate(segments) if target)])


def same_prompt_tokens(trainer, records, template):
    """For how many (distinct) prompts TRL's tokens are those our rollout samples from (grpo.prompt_of)."""
    from finetune.training.grpo import prompt_of
    tokenizer, unique = trainer.processing_class, list({r["id"]: r for r in records}.values())
    theirs = trainer._tokenize_prompts([trl_prompt(r, tokenizer, template) for r in unique])[0]
    return f"{sum(list(t) == prompt_of(r, tokenizer, template).ids for t, r in zip(theirs, unique))}/{len(unique)}"


def trl_config(s, out, device, shuffle):
    """GRPOTrainer's configuration from our train settings `s`. Per-device batch = prompts x generations and
    steps_per_generation = gradient accumulation: each optimizer step generates for batch_size prompts."""
    import torch
    from trl import GRPOConfig

    from finetune.models import resolve_precision
    return GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=s.batch_size * s.num_generations,
        gradient_accumulation_steps=s.grad_accum, num_generations=s.num_generations,
        max_completion_length=s.max_completion_length, temperature=s.sampling_temperature, top_p=s.sampling_top_p,
        top_k=0, num_iterations=s.iterations, epsilon=s.epsilon, epsilon_high=s.epsilon_high or s.epsilon,
        loss_type=s.loss_type, scale_rewards=s.scale_rewards, beta=s.beta or 0.0, learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler, warmup_steps=round(s.warmup_ratio * s.max_steps), max_steps=s.max_steps,
        weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm, optim="adamw_torch", seed=s.seed,
        bf16=resolve_precision(s.precision, torch.device(device)) == "bf16", use_cpu=device == "cpu",
        disable_dropout=True, gradient_checkpointing=s.gradient_checkpointing, shuffle_dataset=shuffle,
        report_to=[], logging_strategy="no", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)


def trl_trainer(settings, base, records, out, device, shuffle, trainer_class=None, callbacks=()):
    """GRPOTrainer (or a subclass) on the base model with a fresh adapter of the settings' LoRA (dropout off, as
    train.py turns it off for grpo), on the records' prompts; .same_tokens counts those tokenized as ours."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    from finetune.data.prompts import resolve_template
    from finetune.data.tokenizer import load_tokenizer
    from finetune.evaluation.generation import reference_answer
    from finetune.models import load_base_model
    tokenizer = load_tokenizer(base, settings.chat_template)
    template, config = resolve_template(tokenizer, settings.template), trl_config(settings, out, device, shuffle)
    rows = [{"prompt": trl_prompt(r, tokenizer, template), "answer": reference_answer(r)} for r in records]
    model = load_base_model(base, dtype=torch.bfloat16 if config.bf16 else torch.float32, tokenizer=tokenizer)
    lora = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=0.0, bias=settings.bias,
                      target_modules=settings.target_modules, use_rslora=settings.use_rslora, task_type="CAUSAL_LM")
    trainer = (trainer_class or GRPOTrainer)(
        model=model, reward_funcs=[exact_match], args=config, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer, peft_config=lora, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics dict, printed with disable_tqdm
    trainer.same_tokens = same_prompt_tokens(trainer, records, template)
    return trainer


def step_records(work, steps):
    """The records of our run's first `steps` micro-batches, in order (train.py's length-grouped batches, seed 0)."""
    from finetune.data.batches import micro_batch_indices
    from finetune.data.shards import read_shards
    from finetune.files import read_jsonl
    by_id = {r["id"]: r for r in read_jsonl(work / "tasks.jsonl")}
    examples = read_shards([work / "tasks.arrow"], "train")
    ids, batches = examples.record_ids(), micro_batch_indices(examples.lengths, PROMPTS, 0, 0, 1)
    return [by_id[ids[i]] for _, indices in itertools.islice(batches, steps) for i in indices]


def trl(args, work):
    """GRPOTrainer on the same model, prompts (in our steps' order) and settings; its steps clocked."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from finetune.settings import read_settings
    timings = Timings(args.device)

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            start = timings.now()
            output = super()._generate_and_score_completions(inputs)
            timings.generation.append(timings.now() - start)
            timings.rewards.append(self._metrics["train"]["reward"][-1])
            timings.lengths.append(self._metrics["train"]["completions/mean_length"][-1])
            return output

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            timings.ends.append(timings.now())

    trainer = trl_trainer(read_settings(work / "train.json", "train"), model_dir(args, work),
                          step_records(work, args.steps), work / "trl-out", args.device, shuffle=False,
                          trainer_class=Timed, callbacks=[Clock()])
    trainer.train()
    return {**timings.result(args.warmup), "same_tokens": trainer.same_tokens}


def run_side(side, args, work):
    """One measurement in a process of its own (this script with --worker); its result. With --wait-idle it
    starts once the CPUs are 90% idle, so that another process's work is not counted."""
    while args.wait_idle and busy_cpus() > 0.1:
        time.sleep(5)
    options = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items() if value is not None
               and name not in ("worker", "workdir", "quick", "wait_idle")]
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    result = subprocess.run([sys.executable, __file__, "--worker", side, "--workdir", str(work), *options],
                            capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{side} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.split("RESULT ", 1)[1])


def report(args, rounds, load):
    """Each side's fastest round (another process on the machine slows a round, never speeds it up)."""
    best = {side: min((r[side] for r in rounds), key=lambda figures: figures["step_s"]) for side in SIDES}
    o, u, t = best["ours"], best["ours-unshared"], best["trl"]
    model = args.model or f"tiny Llama (random weights) hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
    print(f"\nGRPO, LoRA r16 all-linear, {PROMPTS} prompts x {GENERATIONS} completions of <= 16 tokens a step, loss "
          f"dapo, beta 0, {args.steps} steps of which {args.warmup} warm-up; {model}; {args.device} {args.precision}; "
          f"{machine(args)}; load average {load[0]:.2f} before, {load[1]:.2f} after")
    print("| GRPO step (median) | this workflow | TRL GRPOTrainer | TRL / ours | ours, KV cache not shared |\n"
          "|---|---|---|---|---|")
    for name, key in (("generation: sampling and scoring", "generation_s"),
                      ("optimization: forward, backward, optimizer step", "optimization_s"), ("step", "step_s")):
        print(f"| {name} | {o[key]:.3f} s | {t[key]:.3f} s | {t[key] / o[key]:.2f}x | {u[key]:.3f} s |")
    print("| mean reward (exact match) / completion tokens | " + " | ".join(
        f"{r['reward']:.3f} / {r['completion_length']:.1f}" for r in (o, t)) + f" | | {u['reward']:.3f} / "
          f"{u['completion_length']:.1f} |")
    print(f"TRL's prompt tokens are ours for {t['same_tokens']} prompts. Without sharing the prompts' KV cache our "
          f"generation takes {u['generation_s'] / o['generation_s']:.2f}x as long. Each round's step (s): "
          + "; ".join(f"{side} " + " ".join(f"{r[side]['step_s']:.3f}" for r in rounds) for side in SIDES))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the model to train (a trained one, e.g. a project's "
                                        "results/runs/sft-short/merged_weights; default: a tiny random Llama)")
    parser.add_argument("--prompts", type=int, default=96, help="task records (2/3 word tasks, 1/3 number tasks)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (at least 1)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192, help="rows of the embeddings and the LM head")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every side; each side's fastest counts")
    parser.add_argument("--wait-idle", action="store_true", help="start each measurement on idle CPUs (shared machine)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 16 prompts, 3 steps, "
                                                             "1 round, 1 thread")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.steps, args.warmup, args.hidden, args.layers, args.vocab = 16, 3, 1, 64, 2, 1024
        args.repeats, args.threads = 1, 1  # one thread: two would stall on a shared 2-core machine
    if not 1 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 1 and below --steps")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        result = trl(args, work) if args.worker == "trl" else ours(args, work, shared=args.worker == "ours")
        print("RESULT " + json.dumps(result))
        return
    load_before = os.getloadavg()[0]
    work.mkdir(parents=True, exist_ok=True)
    build_inputs(args, work)
    rounds = [{side: run_side(side, args, work) for side in SIDES} for _ in range(args.repeats)]
    (work / "results.json").write_text(json.dumps(rounds, indent=2))
    report(args, rounds, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
