"""Does this workflow's GRPO learn what TRL's GRPOTrainer learns? Train GRPOTrainer as a finished project's grpo
run was trained (config/grpo.yaml: the same base, sft-short's merged model, with a fresh adapter; the same training
records, settings and steps), score its greedy exact match on the held-out records as scripts/evaluate.py scores
them, and print it beside sft-short's and the grpo run's (their eval.json). With --seeds N, both sides train with
the project's seed and the next N - 1 (ours through scripts/train.py), and the table has their means and ranges.

    python bench/grpo_quality.py --project PROJECT --seeds 3 --output grpo_quality.json
    python bench/grpo_quality.py --project PROJECT --quick   # 2 steps, 16 held-out records: a smoke test
"""
import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "bench")]
from grpo_bench import trl_trainer  # noqa: E402


def project_inputs(project):
    """The grpo run's base (sft-short's merged model), shards (as its manifest names them, else the project's
    only tokenization) and their records."""
    runs = project / "results" / "runs"
    base = next((p for p in (runs / "sft-short" / "merged_weights", runs / "sft-short" / "merged") if p.is_dir()), None)
    manifest = runs / "grpo" / "manifest.json"
    if manifest.exists():
        shards = [project / spec["file"] for spec in json.loads(manifest.read_text())["shards"].values()]
    else:
        folders = {p.parent for p in (project / "results" / "tokens").glob("*/*.arrow")}
        shards = sorted(folders.pop().glob("*.arrow")) if len(folders) == 1 else []
    if base is None or not shards:
        sys.exit(f"{project}: no results/runs/sft-short/merged_weights, or no shards of the grpo run")
    return base, shards, [project / "results" / "data" / f"{shard.stem}.jsonl" for shard in shards]


def heldout_exact_match(base, trained, settings, shards, records):
    """Greedy exact match on the held-out records, scored as scripts/evaluate.py scores the tuned side."""
    import evaluate
    import torch

    from finetune.data.prompts import resolve_template, stop_token_ids
    from finetune.data.shards import read_shards
    from finetune.data.tokenizer import load_tokenizer
    from finetune.evaluation.generation import (encode_prompt, generate, heldout_records, prompt_records,
                                                reference_answer)
    from finetune.evaluation.metrics import task_metrics
    from finetune.models import DTYPES, resolve_precision
    tokenizer = load_tokenizer(trained)
    template = resolve_template(tokenizer, settings.template)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heldout = heldout_records(records, read_shards(shards, "eval").record_ids(), settings.num_samples)
    asked = prompt_records(settings.prompts) + heldout  # batched together, as evaluate.py batches them
    _, model, context = evaluate.models_to_compare(base, trained, tokenizer, DTYPES[resolve_precision("auto", device)],
                                                   device)[1]  # the tuned side
    with context():
        outputs = generate(model, tokenizer, [encode_prompt(r, tokenizer, template)[0] for r in asked],
                           max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                           temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                           stop_ids=stop_token_ids(tokenizer, template))[len(asked) - len(heldout):]
    scores = task_metrics(outputs, [reference_answer(r) for r in heldout], [r.get("task") for r in heldout])
    return {"exact_match": scores["exact_match"], "by_task": scores["exact_match_by_task"], "records": len(heldout)}


def quality(args):
    """Train GRPOTrainer as the project's grpo run was trained (its settings, base model and training records);
    its held-out exact match beside sft-short's and ours (their eval.json)."""
    import torch

    from finetune.data.shards import read_shards
    from finetune.files import read_jsonl
    from finetune.settings import read_settings
    torch.set_num_threads(args.threads)
    runs, work = args.project / "results" / "runs", args.workdir or Path(tempfile.mkdtemp(prefix="grpo-quality-"))
    train_settings = read_settings(runs / "grpo" / "settings" / "train.json", "train")
    eval_settings = read_settings(runs / "grpo" / "settings" / "evaluate.json", "evaluate")
    if args.quick:
        train_settings = dataclasses.replace(train_settings, max_steps=2)
        eval_settings = dataclasses.replace(eval_settings, num_samples=16)
    base, shards, records = project_inputs(args.project)
    if train_settings.rewards != ["exact_match"] or train_settings.dynamic_sampling or train_settings.method != "lora":
        print(f"note: TRL trains LoRA with the reward exact_match alone, no dynamic sampling; the grpo run: method "
              f"{train_settings.method}, rewards {train_settings.rewards}, dynamic_sampling "
              f"{train_settings.dynamic_sampling}", file=sys.stderr)
    by_id = {r["id"]: r for path in records for r in read_jsonl(path)}
    trl_rows, ours_rows = [], []
    for seed in range(args.seeds):
        settings = dataclasses.replace(train_settings, seed=train_settings.seed + seed)
        trainer = trl_trainer(settings, base, [by_id[i] for i in read_shards(shards, "train").record_ids()],
                              work / f"trl-out-{seed}", "cuda" if torch.cuda.is_available() else "cpu", shuffle=True)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        trainer.save_model(str(work / f"trl-trained-{seed}"))
        trl_rows.append({**heldout_exact_match(base, work / f"trl-trained-{seed}", eval_settings, shards, records),
                         "train_wall_s": wall})
        if seed:  # seed 0 is the project's own grpo run
            ours_rows.append(ours_with_seed(settings, base, shards, records, work / f"ours-{seed}", eval_settings))
    quality_report(args, runs, trl_rows, ours_rows, train_settings, trainer.same_tokens)


def ours_with_seed(settings, base, shards, records, out, eval_settings):
    """The project's grpo run trained again (scripts/train.py) with another seed; its held-out exact match."""
    from finetune.settings import write_settings
    values = {name: value for name, value in dataclasses.asdict(settings).items()}
    write_settings(out / "train.json", "train", **values)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--settings", str(out / "train.json"),
                    "--base-model", str(base), "--shards", *map(str, shards), "--records", *map(str, records),
                    "--output-dir", str(out / "trained"), "--metrics", str(out / "metrics.jsonl"),
                    "--summary", str(out / "summary.json"), "--run-name", out.name], check=True,
                   capture_output=True)
    wall = time.perf_counter() - start
    return {**heldout_exact_match(base, out / "trained", eval_settings, shards, records), "train_wall_s": wall}


def mean_row(rows):
    """The mean over seeds of exact match (overall and per task) and wall time; the seeds' range overall."""
    tasks = rows[0]["by_task"]
    return {"exact_match": statistics.mean(r["exact_match"] for r in rows), "records": rows[0]["records"],
            "by_task": {t: statistics.mean(r["by_task"][t] for r in rows) for t in tasks},
            "train_wall_s": statistics.mean(r["train_wall_s"] for r in rows),
            "range": (min(r["exact_match"] for r in rows), max(r["exact_match"] for r in rows)), "seeds": len(rows)}


def quality_report(args, runs, trl_rows, ours_rows, settings, same_tokens):
    def recorded(run):
        result = json.loads((runs / run / "eval.json").read_text())
        return {"exact_match": result["tuned"]["exact_match"], "by_task": result["tuned"]["exact_match_by_task"],
                "records": result["generated_for"],
                "train_wall_s": json.loads((runs / run / "train_summary.json").read_text())["wall_time_s"]}
    table = {"sft-short": recorded("sft-short"), "grpo, this workflow": mean_row([recorded("grpo")] + ours_rows),
             "grpo, TRL": mean_row(trl_rows)}
    tasks = sorted({task for row in table.values() for task in row["by_task"]})
    print(f"\nHeld-out exact match (greedy) in {args.project}; TRL GRPOTrainer trained {settings.max_steps} steps of "
          f"{settings.batch_size} prompts x {settings.num_generations} completions, lr {settings.learning_rate} "
          f"{settings.lr_scheduler}, loss {settings.loss_type}, beta {settings.beta}; its prompt tokens are ours for "
          f"{same_tokens} training prompts; mean over {args.seeds} seed(s), their range in brackets{'; --quick: not comparable' if args.quick else ''}")
    print("| run | held-out records | exact match | " + " | ".join(tasks) + " | training wall time |\n"
          + "|---" * (len(tasks) + 4) + "|")
    for run, row in table.items():
        spread = f" ({row['range'][0]:.3f}-{row['range'][1]:.3f})" if row.get("seeds", 1) > 1 else ""
        print(f"| {run} | {row['records']} | {row['exact_match']:.3f}{spread} | " + " | ".join(
            f"{row['by_task'][t]:.3f}" if t in row["by_task"] else "-" for t in tasks)
            + f" | {row['train_wall_s']:.0f} s |")
    if args.output:
        Path(args.output).write_text(json.dumps(table, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a project that ran config/grpo.yaml")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds per side (the project's seed and the next ones); means are reported")
    parser.add_argument("--output", type=Path, help="the table as JSON")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 steps, 16 held-out records: a smoke test")
    parser.add_argument("--workdir", type=Path, default=None)
    quality(parser.parse_args())


if __name__ == "__main__":
    main()
