"""Preference objectives, in the run's own training loop: DPO, IPO, SimPO and ORPO on pairs of a
chosen and a rejected answer, KTO on unpaired completions labelled desirable or not. Each loss
is computed from the summed log-probability of every answer's tokens under the model being
trained (the policy) and, for dpo, ipo and kto, under the reference model (the run's base),
whose log-probabilities were computed once by scripts/reference_logps.py.

With c, r the policy's summed log-probabilities of the chosen and rejected answer, c0, r0 the
reference's, |c|, |r| their token counts, and s(x) = log sigmoid(x):

    dpo    -s(beta ((c - c0) - (r - r0)))
    ipo    ((c - c0) / |c| - (r - r0) / |r| - 1 / (2 beta))^2
    simpo  -s(beta (c / |c| - r / |r|) - gamma)
    orpo   nll(chosen) - lambda s(log odds(c / |c|) - log odds(r / |r|)),  odds(p) = e^p / (1 - e^p)
    kto    desirable: w_d (1 - sigmoid(beta (x - x0 - z))), undesirable: w_u (1 - sigmoid(beta (z - x + x0)))
           with z = max(0, mean over the micro-batch of (k - k0)), the policy's and reference's log-probabilities
           of mismatched completions (data/pairs.py), without gradient

as TRL 1.16 computes them (DPOTrainer loss_type sigmoid and ipo, CPOTrainer loss_type simpo with
cpo_alpha 0, ORPOTrainer, KTOTrainer; tests/test_objectives.py checks each). sft_weight adds the
mean loss per token of the chosen (desirable) answers, as TRL's loss_type [sigmoid, sft] does;
orpo's nll(chosen), as TRL's ORPOTrainer computes it, is the mean over every token of the chosen
sequence, its prompt included.

An optimizer step's loss is the mean over its pairs (or completions) and, for the token term, over
its chosen tokens, however many micro-batches and processes share them.
"""
import torch
import torch.nn.functional as F

from finetune.data.batches import pad_batch
from finetune.data.prompts import IGNORE_INDEX

NEEDS_REFERENCE = ("dpo", "ipo", "kto")
DATA_OF = {"sft": "sft", "dpo": "preference", "ipo": "preference", "simpo": "preference", "orpo": "preference",
           "kto": "unpaired"}


def second_sequence(kind):
    """The field prefix of a row's second sequence: the rejected answer of a pair, the KL completion of kto."""
    return "rejected_" if kind == "preference" else "kl_"


def preference_batch(examples, pad_token_id, kind):
    """One right-padded batch of every row's two sequences (first sequences, then second ones), with the
    reference's log-probabilities and kto's labels when the examples carry them."""
    prefix = second_sequence(kind)
    sequences = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    sequences += [{"input_ids": e[f"{prefix}input_ids"], "labels": e[f"{prefix}labels"]} for e in examples]
    batch = pad_batch(sequences, pad_token_id)
    for name in ("ref_logps", f"ref_{prefix}logps"):
        if name in examples[0]:
            batch[name] = torch.tensor([e[name] for e in examples], dtype=torch.float64)
    if kind == "unpaired":
        batch["desirable"] = torch.tensor([e["desirable"] for e in examples])
    return batch


def token_logps(model, batch):
    """The log-probability of every next token of every row (position t predicts token t + 1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits, targets = logits[:, :-1].float(), batch["input_ids"][:, 1:]
    return logits.gather(2, targets.unsqueeze(2)).squeeze(2) - logits.logsumexp(dim=2)


def answer_logps(model, batch, per_token=None):
    """Per row: the summed log-probability of its trained tokens, and their number."""
    per_token = token_logps(model, batch) if per_token is None else per_token
    trained = batch["labels"][:, 1:] != IGNORE_INDEX
    return (per_token * trained).sum(dim=1), trained.sum(dim=1)


def pair_terms(settings, logps, tokens, batch):
    """Per pair: the loss and the rewards of the chosen and rejected answers (for the reward metrics)."""
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    objective, beta = settings.objective, settings.beta
    if objective in ("simpo", "orpo"):
        chosen_mean, rejected_mean = chosen / chosen_tokens, rejected / rejected_tokens
        if objective == "simpo":
            loss = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - settings.simpo_gamma)
        else:
            log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
            loss = -settings.orpo_lambda * F.logsigmoid(log_odds)
        return loss, beta * chosen_mean.detach(), beta * rejected_mean.detach()
    chosen_ratio = chosen - batch["ref_logps"].to(chosen)
    rejected_ratio = rejected - batch["ref_rejected_logps"].to(rejected)
    if objective == "dpo":
        loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    else:  # ipo
        loss = (chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens - 1 / (2 * beta)) ** 2
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_terms(settings, logps, batch):
    """Per completion: the KTO loss and its reward; and the KL estimate of the micro-batch."""
    completion, mismatched = logps.chunk(2)
    kl = (mismatched.detach() - batch["ref_kl_logps"].to(mismatched)).mean().clamp(min=0)
    ratio = completion - batch["ref_logps"].to(completion)
    desirable = batch["desirable"].to(ratio.device)
    loss = torch.where(desirable, settings.desirable_weight * (1 - torch.sigmoid(settings.beta * (ratio - kl))),
                       settings.undesirable_weight * (1 - torch.sigmoid(settings.beta * (kl - ratio))))
    return loss, settings.beta * ratio.detach(), kl


def log1mexp(x):
    """log(1 - e^x) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def token_weight(settings):
    """The weight of the mean loss per token of the chosen answers: orpo's own term, or sft_weight."""
    return 1.0 if settings.objective == "orpo" else settings.sft_weight


def token_term_mask(batch, objective):
    """The tokens of the first sequences (chosen or desirable answers) that the token term of the loss averages
    over: their trained tokens; for orpo every token of the chosen sequence after the first, prompt included,
    as TRL's ORPOTrainer computes its loss on the chosen sequence."""
    rows = len(batch["input_ids"]) // 2
    if objective == "orpo":
        counted = batch["attention_mask"][:rows, 1:].bool()
    else:
        counted = batch["labels"][:rows, 1:] != IGNORE_INDEX
    if "desirable" in batch:
        counted = counted & batch["desirable"].to(counted.device).unsqueeze(1)
    return counted


def objective_loss(model, batch, settings, kind, rows, chosen_tokens):
    """This micro-batch's share of the step's loss, and its statistics as sums (metrics rows average them).
    rows, chosen_tokens: the step's pairs (or completions) and trained chosen (desirable) tokens, over every
    micro-batch and process."""
    per_token = token_logps(model, batch)
    logps, tokens = answer_logps(model, batch, per_token)
    first_logps = logps.chunk(2)[0]
    if kind == "unpaired":
        per_row, rewards, kl = kto_terms(settings, logps, batch)
        wanted = batch["desirable"].to(logps.device)
        stats = {"kl": float(kl) * len(per_row), "desirable_reward": float(rewards[wanted].sum()),
                 "undesirable_reward": float(rewards[~wanted].sum())}
    else:
        per_row, chosen_reward, rejected_reward = pair_terms(settings, logps, tokens, batch)
        stats = {"reward_accuracy": float((chosen_reward > rejected_reward).sum()),
                 "reward_margin": float((chosen_reward - rejected_reward).sum()),
                 "chosen_logp": float(first_logps.detach().sum()), "rejected_logp": float(logps.chunk(2)[1].detach().sum())}
    loss = per_row.sum() / rows
    weight = token_weight(settings)
    if weight:
        counted = token_term_mask(batch, settings.objective)
        nll_sum = -(per_token[:len(per_row)] * counted).sum()
        loss = loss + weight * nll_sum / max(chosen_tokens, 1)
        here = int(counted.sum())
        stats["nll"] = float(nll_sum.detach()) / max(here, 1) * len(per_row)  # metrics rows average it per row
    return loss, {"pairs": len(per_row), **stats}


def trained_first_tokens(batch, objective):
    """How many tokens of a preference batch the token term of the loss averages over (token_term_mask)."""
    return int(token_term_mask(batch, objective).sum())


@torch.no_grad()
def heldout_objective_loss(model, examples, settings, kind, batch_size, pad_token_id):
    """The objective's mean loss over held-out examples (what keep: best and early stopping compare)."""
    batches = [preference_batch(examples[start:start + batch_size], pad_token_id, kind)
               for start in range(0, len(examples), batch_size)]
    chosen_tokens = sum(trained_first_tokens(batch, settings.objective) for batch in batches)
    total = 0.0
    for batch in batches:
        batch = {name: value.to(model.device) for name, value in batch.items()}
        loss, _ = objective_loss(model, batch, settings, kind, len(examples), chosen_tokens)
        total += float(loss)
    return total
