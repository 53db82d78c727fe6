"""Evaluate one adapter against its base model: held-out loss and perplexity of
both, side by side, task metrics of their generations, and the generations for
the configured prompts and a fixed sample of held-out records (base and tuned
beside the reference answer).

    python scripts/evaluate.py --base-model results/base_models/tiny-llama \
        --adapter-dir results/runs/r8/trained --shards results/tokens/TOKENIZATION/*.arrow \
        --records results/data/*.jsonl --eval-json results/runs/r8/eval.json \
        --generations results/runs/r8/generations.jsonl
"""
import argparse
import math
from pathlib import Path

import torch
from peft import PeftModel

from batches import mean_token_loss
from generation import encode_prompt, generate, heldout_records, prompt_records, reference_answer
from models import DTYPES, load_base_model, resolve_precision
from outputs import write_json, write_jsonl
from prompts import load_tokenizer, resolve_template
from settings import add_settings, check_settings
from shards import read_shards


def task_metrics(predictions, references):
    """Exact match, ROUGE-L F1 (rouge-score), BLEU and chrF (sacrebleu) of generations
    against reference answers; all computed locally (the `evaluate` library would
    fetch metric code from the Hub at run time)."""
    pairs = [(p.strip(), r.strip()) for p, r in zip(predictions, references) if r.strip()]
    if not pairs:
        return {"exact_match": None, "rouge_l": None, "bleu": None, "chrf": None}
    import sacrebleu
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    predicted, expected = [p for p, _ in pairs], [r for _, r in pairs]
    return {
        "exact_match": sum(p == r for p, r in pairs) / len(pairs),
        "rouge_l": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs) / len(pairs),
        "bleu": sacrebleu.corpus_bleu(predicted, [expected]).score,
        "chrf": sacrebleu.corpus_chrf(predicted, [expected]).score,
    }


def evaluate(args):
    tokenizer = load_tokenizer(args.adapter_dir)
    template = resolve_template(tokenizer, args.template)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[resolve_precision("auto", device)]
    model = PeftModel.from_pretrained(load_base_model(args.base_model, dtype=dtype), args.adapter_dir).to(device)
    model.eval()

    examples = read_shards(args.shards, "eval")
    if not examples:
        raise SystemExit(f"[{args.run_name}] no held-out records in {', '.join(map(str, args.shards))}")
    with model.disable_adapter():
        base_loss, tokens = mean_token_loss(model, examples, args.batch_size, tokenizer.pad_token_id)
    tuned_loss, _ = mean_token_loss(model, examples, args.batch_size, tokenizer.pad_token_id)

    records = [("prompt", r) for r in prompt_records(args.prompts)]
    sample = heldout_records(args.records, [e["id"] for e in examples], args.num_samples)
    records += [("heldout", r) for r in sample]
    prompts = [encode_prompt(r, tokenizer, template)[0] for _, r in records]
    settings = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    with model.disable_adapter():
        base_outputs = generate(model, tokenizer, prompts, **settings)
    tuned_outputs = generate(model, tokenizer, prompts, **settings)

    generations = [
        {"source": source, "id": record.get("id"), "prompt": tokenizer.decode(prompt),
         "reference": reference_answer(record), "base": base, "tuned": tuned}
        for (source, record), prompt, base, tuned in zip(records, prompts, base_outputs, tuned_outputs)
    ]
    heldout = [g for g in generations if g["source"] == "heldout"]
    references = [g["reference"] for g in heldout]
    result = {
        "run": args.run_name,
        "eval_records": len(examples),
        "eval_tokens": tokens,
        "generated_for": len(heldout),
        "template": template,
        "base": {"loss": base_loss, "perplexity": math.exp(base_loss),
                 **task_metrics([g["base"] for g in heldout], references)},
        "tuned": {"loss": tuned_loss, "perplexity": math.exp(tuned_loss),
                  **task_metrics([g["tuned"] for g in heldout], references)},
        "generation": {k: v for k, v in settings.items() if k != "batch_size"},
    }
    return result, generations


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True, help="local path or Hub id")
    parser.add_argument("--adapter-dir", type=Path, required=True, help="the trained adapter (with its tokenizer)")
    parser.add_argument("--shards", type=Path, nargs="+", required=True, help="Arrow shards from tokenize_data.py")
    parser.add_argument("--records", type=Path, nargs="+", required=True, help="normalized records (for references)")
    parser.add_argument("--eval-json", type=Path, required=True)
    parser.add_argument("--generations", type=Path, required=True)
    parser.add_argument("--run-name", default="run")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    add_settings(parser, "evaluate")
    return check_settings(parser.parse_args(argv), "evaluate")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result, generations = evaluate(args)
    write_jsonl(args.generations, generations)
    write_json(args.eval_json, result)
    print(f"[{args.run_name}] eval loss: base {result['base']['loss']:.4f} (ppl {result['base']['perplexity']:.1f}), "
          f"tuned {result['tuned']['loss']:.4f} (ppl {result['tuned']['perplexity']:.1f})")


if __name__ == "__main__":
    main()
