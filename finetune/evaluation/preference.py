"""Evaluating a preference run on held-out pairs (or unpaired completions), base against tuned:

- preference accuracy: how often a model gives the chosen answer a higher log-probability than
  the rejected one (its own preference, measurable for the base and the tuned model alike),
  overall and per task kind, with the mean margin (chosen minus rejected) and the mean
  log-probabilities of each side;
- reward accuracy: how often a model's implicit reward, its log-probability ratio to a reference,
  is higher for the chosen answer than for the rejected one: (c - c0) - (r - r0) > 0, as TRL's
  rewards/accuracies. Against the root base model of the run's chain for both sides (so a chained
  DPO run and its SFT parent are scored on one scale: both against the pretrained base), and the
  tuned model against its own base (the reference dpo, ipo and kto train against);
- for unpaired completions: the mean log-probability of the desirable and undesirable ones, and
  how often the tuned model moves a completion the way its label asks (up if desirable).

Held-out records of a preference dataset are generated for like SFT records, the chosen answer
(or a desirable completion) being the reference answer (`generation_record`).
"""
import collections

import numpy as np
import torch

from finetune.data.pairs import side_record
from finetune.training.objectives import answer_logps, preference_batch


def generation_record(record):
    """The SFT record to generate for and score against: the chosen answer of a pair, a desirable completion;
    None for an undesirable one (no right answer to compare with)."""
    if record["format"] == "preference":
        answer = record["chosen"]
    elif record["format"] == "unpaired":
        if not record["label"]:
            return None
        answer = record["completion"]
    else:
        return record
    return {**side_record(record, answer), "id": record["id"], **({"task": record["task"]} if "task" in record else {})}


@torch.no_grad()
def heldout_logps(model, examples, batch_size, pad_token_id):
    """Summed log-probabilities of every held-out example's two sequences (chosen and rejected, or the
    completion and kto's mismatched one), as two arrays."""
    first, second = [], []
    for start in range(0, len(examples), batch_size):
        batch = preference_batch(examples[start:start + batch_size], pad_token_id, examples.kind)
        batch = {name: value.to(model.device) for name, value in batch.items()}
        logps, _ = answer_logps(model, batch)
        chosen, rejected = logps.double().cpu().numpy().reshape(2, -1)
        first.append(chosen)
        second.append(rejected)
    return np.concatenate(first), np.concatenate(second)


def preference_metrics(chosen, rejected, tasks):
    """A model's own preference on held-out pairs: accuracy (overall and per task kind), margin, log-probabilities."""
    correct = chosen > rejected
    by_task = collections.defaultdict(list)
    for task, hit in zip(tasks, correct):
        if task is not None:
            by_task[task].append(hit)
    return {"preference_accuracy": float(correct.mean()), "mean_margin": float((chosen - rejected).mean()),
            "chosen_logp": float(chosen.mean()), "rejected_logp": float(rejected.mean()),
            "preference_accuracy_by_task": {task: float(np.mean(hits)) for task, hits in sorted(by_task.items())}}


def unpaired_metrics(logps, desirable):
    return {"desirable_logp": float(logps[desirable].mean()) if desirable.any() else None,
            "undesirable_logp": float(logps[~desirable].mean()) if (~desirable).any() else None}


def reward_figures(logps, reference):
    """How often, and by how much, a model's log-probability ratio to a reference favors the chosen answer."""
    (chosen, rejected), (reference_chosen, reference_rejected) = logps, reference
    rewards = (chosen - reference_chosen) - (rejected - reference_rejected)
    return {"reward_accuracy": float((rewards > 0).mean()), "reward_margin": float(rewards.mean())}


def compare(logps, examples, tasks):
    """eval.json's preference figures. logps: {model: (first, second) from heldout_logps} of the base and tuned
    models, and of the root base model of a chained run ("root"; else the base is the root). Per side: its own
    preference, and its rewards against the root base model (the base's only when it is not the root itself),
    so that a chain's runs compare on one scale; and the tuned model's rewards against its base, the reference
    of dpo, ipo and kto (TRL's rewards/accuracies)."""
    root = logps.get("root", logps["base"])
    if examples.kind == "unpaired":
        desirable = np.array([example["desirable"] for example in examples])
        sides = {side: unpaired_metrics(logps[side][0], desirable) for side in ("base", "tuned")}
        moved_up = logps["tuned"][0] > logps["base"][0]
        return sides, {"kind": "unpaired", "records": len(examples),
                       "reward_accuracy_vs_base": float((moved_up == desirable).mean())}
    sides = {side: preference_metrics(*logps[side], tasks) for side in ("base", "tuned")}
    sides["tuned"].update(reward_figures(logps["tuned"], root))
    sides["base"].update(reward_figures(logps["base"], root) if "root" in logps
                         else {"reward_accuracy": None, "reward_margin": None})
    against_base = reward_figures(logps["tuned"], logps["base"])
    return sides, {"kind": "preference", "pairs": len(examples),
                   "reward_accuracy_vs_base": against_base["reward_accuracy"],
                   "reward_margin_vs_base": against_base["reward_margin"]}
