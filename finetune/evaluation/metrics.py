"""Task metrics of generated answers against reference answers: exact match,
ROUGE-L F1 (rouge-score), BLEU and chrF (sacrebleu), overall and exact match
per task kind. All computed locally: the `evaluate` library would fetch metric
code from the Hub at run time."""
import collections
import re

METRICS = ("exact_match", "rouge_l", "bleu", "chrf")
# What evaluation/preference.py measures on held-out pairs (or unpaired completions), per side.
PREFERENCE_METRICS = ("preference_accuracy", "mean_margin", "chosen_logp", "rejected_logp", "reward_accuracy",
                      "reward_margin", "desirable_logp", "undesirable_logp")
# A reasoning model's answer may open with its reasoning (Qwen3 writes an empty block when not
# thinking): it is scored on what follows. generations.jsonl keeps the whole text.
REASONING = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)


def final_answer(prediction):
    return REASONING.sub("", prediction, count=1).strip()


def is_exact_match(prediction, reference):
    return final_answer(prediction) == reference.strip()


def task_metrics(predictions, references, tasks=None):
    """Metrics over the pairs that have a reference; with `tasks` (one label or None
    per pair), also exact match per task kind."""
    tasks = tasks or [None] * len(references)
    triples = [(final_answer(p), r.strip(), t) for p, r, t in zip(predictions, references, tasks) if r.strip()]
    if not triples:
        return {**dict.fromkeys(METRICS), "exact_match_by_task": {}}
    import sacrebleu
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    predicted, expected = [p for p, _, _ in triples], [r for _, r, _ in triples]
    by_task = collections.defaultdict(list)
    for p, r, t in triples:
        if t is not None:
            by_task[t].append(is_exact_match(p, r))
    return {
        "exact_match": sum(is_exact_match(p, r) for p, r, _ in triples) / len(triples),
        "rouge_l": sum(scorer.score(r, p)["rougeL"].fmeasure for p, r, _ in triples) / len(triples),
        "bleu": sacrebleu.corpus_bleu(predicted, [expected]).score,
        "chrf": sacrebleu.corpus_chrf(predicted, [expected]).score,
        "exact_match_by_task": {t: sum(hits) / len(hits) for t, hits in sorted(by_task.items())},
    }
