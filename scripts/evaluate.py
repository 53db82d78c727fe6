"""Evaluate one trained run (an adapter or a fully fine-tuned model) against its
base model: held-out loss and perplexity of both, side by side, task metrics of
their generations (overall and per task kind), for a preference run its figures on
the held-out pairs (finetune/evaluation/preference.py), and the generations for the
configured prompts and a fixed sample of held-out records (base and tuned
beside the reference answer). With eval.harness, lm-evaluation-harness's tasks on
both models too (finetune/evaluation/harness.py).

    python scripts/evaluate.py --base-model results/base_models/tiny-llama --settings evaluate.json \
        --trained-dir results/runs/r8/trained --shards results/tokens/TOKENIZATION/*.arrow \
        --records results/data/*.jsonl --eval-json results/runs/r8/eval.json \
        --generations results/runs/r8/generations.jsonl
"""
import argparse
import contextlib
import math
from pathlib import Path

import torch

from finetune.data.prompts import resolve_template, stop_token_ids
from finetune.data.shards import read_shards
from finetune.data.tokenizer import load_tokenizer
from finetune.evaluation.generation import (encode_prompt, generate, heldout_records, prompt_records, question,
                                            reference_answer)
from finetune.evaluation.loss import mean_token_loss
from finetune.evaluation.metrics import task_metrics
from finetune.files import read_json, read_jsonl, write_json, write_jsonl
from finetune.models import DTYPES, load_adapter, load_base_model, resolve_precision
from finetune.settings import read_settings


def models_to_compare(base_model, trained_dir, tokenizer, dtype, device, trust_remote_code=False):
    """[(side, model, context)]: the base and the tuned model, each measured inside its
    context. An adapter is one model whose adapter is switched off for the base side;
    a full fine-tune is a second model."""
    options = dict(dtype=dtype, tokenizer=tokenizer, trust_remote_code=trust_remote_code)
    base = load_base_model(base_model, **options).to(device).eval()
    if (Path(trained_dir) / "adapter_config.json").exists():
        tuned = load_adapter(base, trained_dir).to(device).eval()
        return [("base", tuned, tuned.disable_adapter), ("tuned", tuned, contextlib.nullcontext)]
    tuned = load_base_model(trained_dir, **options).to(device).eval()
    return [("base", base, contextlib.nullcontext), ("tuned", tuned, contextlib.nullcontext)]


def evaluate(args, settings):
    """(eval.json's result, the generations) of the run in args.trained_dir against its base."""
    tokenizer = load_tokenizer(args.trained_dir, trust_remote_code=settings.trust_remote_code)
    template = resolve_template(tokenizer, settings.template)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[resolve_precision("auto", device)]
    examples = read_shards(args.shards, "eval")
    if not examples:
        raise SystemExit(f"[{args.run_name}] no held-out records in {', '.join(map(str, args.shards))}")
    records = [("prompt", r) for r in prompt_records(settings.prompts)]
    heldout = heldout_records(args.records, examples.record_ids(), settings.num_samples)
    if examples.kind != "sft":  # pairs: generate for the prompt, with the chosen answer as the reference
        from finetune.evaluation.preference import generation_record
        heldout = [record for record in map(generation_record, heldout) if record]
    records += [("heldout", r) for r in heldout]
    prompts = [encode_prompt(r, tokenizer, template)[0] for _, r in records]
    decoding = dict(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                    temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
                    stop_ids=stop_token_ids(tokenizer, template))
    harness, benchmarks, samples = None, {}, {}
    if settings.harness:  # lm-evaluation-harness's tasks too, on the models loaded here (evaluation/harness.py)
        from finetune.evaluation.harness import harness_options, heldout_rows, run_tasks
        harness, rows = harness_options(settings.harness), heldout_rows(records, prompts, tokenizer)

    losses, outputs, logps = {}, {}, {}
    for side, model, context in models_to_compare(args.base_model, args.trained_dir, tokenizer, dtype, device,
                                                  settings.trust_remote_code):
        with context():
            losses[side], tokens = mean_token_loss(model, examples, settings.batch_size, tokenizer.pad_token_id)
            outputs[side] = generate(model, tokenizer, prompts, **decoding)
            if examples.kind != "sft":
                from finetune.evaluation.preference import heldout_logps
                logps[side] = heldout_logps(model, examples, settings.batch_size, tokenizer.pad_token_id)
            if harness:
                benchmarks[side], samples = run_tasks(model, tokenizer, harness, rows, decoding)

    generations = [
        {"source": source, "id": record.get("id"), "task": record.get("task"), "question": question(record),
         "prompt": tokenizer.decode(prompt),
         "reference": reference_answer(record), "base": base, "tuned": tuned}
        for (source, record), prompt, base, tuned in zip(records, prompts, outputs["base"], outputs["tuned"])
    ]
    heldout = [g for g in generations if g["source"] == "heldout"]
    references, tasks = [g["reference"] for g in heldout], [g["task"] for g in heldout]
    result = {
        "run": args.run_name,
        "eval_records": len(examples),
        "eval_tokens": tokens,
        "generated_for": len(heldout),
        "template": template,
        **{side: {"loss": losses[side], "perplexity": math.exp(losses[side]),
                  **task_metrics([g[side] for g in heldout], references, tasks)} for side in ("base", "tuned")},
        "generation": {k: v for k, v in decoding.items() if k != "batch_size"},
    }
    if harness:
        from finetune.evaluation.harness import harness_section
        result["harness"] = harness_section(harness, benchmarks, samples)
    if logps and args.root_model:  # a chained run: score both sides against the root base model too
        from finetune.evaluation.preference import heldout_logps
        root = load_base_model(args.root_model[0], dtype=dtype, tokenizer=tokenizer,
                               trust_remote_code=settings.trust_remote_code).to(device).eval()
        logps["root"] = heldout_logps(root, examples, settings.batch_size, tokenizer.pad_token_id)
    if logps:
        from finetune.evaluation.preference import compare
        sides, result["preference"] = compare(logps, examples, task_of(args.records, examples.record_ids()))
        for side, figures in sides.items():
            result[side].update(figures)
    return result, generations


def task_of(record_files, ids):
    """The task kind (or None) of each record id, in the order given."""
    wanted, tasks = set(ids), {}
    for path in record_files:
        tasks.update((r["id"], r.get("task")) for r in read_jsonl(path) if r["id"] in wanted)
    return [tasks.get(record_id) for record_id in ids]


# In the trained folder of a search trial whose training failed (finetune/search/guard.py writes it).
FAILED_TRIAL = "trial_failed.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True, help="local path or Hub id")
    parser.add_argument("--settings", type=Path, required=True, help="this stage's settings (JSON)")
    parser.add_argument("--trained-dir", type=Path, required=True,
                        help="the trained adapter or full model, with its tokenizer")
    parser.add_argument("--shards", type=Path, nargs="+", required=True, help="Arrow shards from tokenize_data.py")
    parser.add_argument("--records", type=Path, nargs="+", required=True, help="normalized records (for references)")
    parser.add_argument("--root-model", nargs="*", default=[],
                        help="a chained run's root base model (base_model {run: NAME}), to score preferences against")
    parser.add_argument("--eval-json", type=Path, required=True)
    parser.add_argument("--generations", type=Path, required=True)
    parser.add_argument("--run-name", default="run")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = read_settings(args.settings, "evaluate")
    failed = args.trained_dir / FAILED_TRIAL
    if failed.exists():  # nothing to evaluate: the search tells its study the trial failed
        write_jsonl(args.generations, [])
        write_json(args.eval_json, {"run": args.run_name, "failed": read_json(failed)})
        print(f"[{args.run_name}] training failed: {read_json(failed)['error']}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    result, generations = evaluate(args, settings)
    write_jsonl(args.generations, generations)
    write_json(args.eval_json, result)
    print(f"[{args.run_name}] eval loss: base {result['base']['loss']:.4f} (ppl {result['base']['perplexity']:.1f}), "
          f"tuned {result['tuned']['loss']:.4f} (ppl {result['tuned']['perplexity']:.1f})")
    if "preference_accuracy" in result["tuned"]:
        print(f"[{args.run_name}] held-out preference accuracy: base {result['base']['preference_accuracy']:.3f}, "
              f"tuned {result['tuned']['preference_accuracy']:.3f}; reward accuracy against the root base model "
              f"{result['tuned']['reward_accuracy']:.3f}")


if __name__ == "__main__":
    main()
