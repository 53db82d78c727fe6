"""Evaluate one adapter against its base model: held-out loss and perplexity of
both, side by side, and generations for the configured prompts and a fixed
sample of held-out records (base and tuned beside the reference answer).

Prompts go through the same formatting as training (common.encode_prompt).
Generation is batched with left padding and seeded, so reports reproduce.

    python scripts/evaluate.py --base-model results/base_models/tiny-llama \
        --adapter-dir results/runs/r8/adapter --shards results/tokens/KEY/*.arrow \
        --records results/data/*.jsonl --eval-json results/runs/r8/eval.json \
        --generations results/runs/r8/generations.jsonl
"""
import argparse
import json
import math
from pathlib import Path

import torch
from peft import PeftModel

from common import (DTYPES, encode_prompt, load_base_model, load_tokenizer, mean_token_loss, read_shards,
                    reference_answer, resolve_precision, resolve_template)


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p, seed):
    """Completions of tokenized prompts, batched with left padding."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        torch.manual_seed(seed)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=top_p if temperature > 0 else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [o.strip() for o in outputs]


def heldout_records(record_files, heldout_ids, count):
    """The first `count` held-out records, in a stable order (by id)."""
    wanted, records = set(sorted(heldout_ids)[:count]), {}
    for path in record_files:
        with open(path, encoding="utf-8") as f:
            records.update((r["id"], r) for r in map(json.loads, f) if r["id"] in wanted)
    return [records[record_id] for record_id in sorted(records)]


def prompt_records(prompts):
    """Configured prompts as normalized records: a string is an instruction, a dict an alpaca or chat record."""
    records = []
    for prompt in prompts:
        if isinstance(prompt, str):
            prompt = {"instruction": prompt}
        if "messages" in prompt:
            messages = list(prompt["messages"])
            if messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            records.append({"format": "chat", "messages": messages})
        else:
            records.append({"format": "alpaca", "instruction": prompt["instruction"], "input": prompt.get("input", ""),
                            "output": prompt.get("output", "")})
    return records


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--adapter-dir", type=Path, required=True)
    parser.add_argument("--shards", type=Path, nargs="+", required=True)
    parser.add_argument("--records", type=Path, nargs="+", required=True, help="normalized records (for references)")
    parser.add_argument("--eval-json", type=Path, required=True)
    parser.add_argument("--generations", type=Path, required=True)
    parser.add_argument("--run-name", default="run")
    parser.add_argument("--template", choices=("auto", "alpaca", "chat"), default="auto")
    parser.add_argument("--prompts", type=json.loads, default=[], help="JSON list of prompts")
    parser.add_argument("--num-samples", type=int, default=8, help="held-out records to generate for")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result, generations = evaluate(args)
    args.generations.write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
    args.eval_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[{args.run_name}] eval loss: base {result['base']['loss']:.4f} (ppl {result['base']['perplexity']:.1f}), "
          f"tuned {result['tuned']['loss']:.4f} (ppl {result['tuned']['perplexity']:.1f})")


if __name__ == "__main__":
    main()
