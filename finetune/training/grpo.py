"""GRPO (group relative policy optimization), in the run's own training loop: reinforcement
learning with rewards computed from the completions (training/rewards.py).

Every `iterations` optimizer steps, each prompt of the step's micro-batches gets a group of
`num_generations` completions sampled from the current model (the adapter active, the prompt's
KV cache computed once and shared by its group). The rewards of a group make its advantages,
A_i = (r_i - mean(r)) / (std(r) + 1e-4) (scale_rewards group; batch: the std over the whole
step; none: no division, as Dr. GRPO). With rho_t = pi(o_t) / pi_old(o_t) the ratio of a
completion token's probability now and at sampling (1 when iterations is 1), the loss of a
token is

    -min(rho_t A, clip(rho_t, 1 - epsilon, 1 + epsilon_high) A) + beta rho_t KL_t,
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1   (to the run's base model; only with beta > 0)

(the KL estimate weighted by rho_t, whose gradient is then that of the reverse KL even off-policy, as
DeepSeek-V3.2 and TRL's use_bias_correction_kl do)

averaged per loss_type: grpo, the mean over completions of each completion's mean; dr_grpo,
the sum over tokens / (completions x max_completion_length); dapo, the sum over tokens / tokens.
Log-probabilities are taken at the sampling temperature, as TRL's GRPOTrainer does (TRL 1.16;
tests/test_grpo.py checks the loss against it). dynamic_sampling leaves out the groups whose
rewards are all equal (DAPO), which have no advantage to learn from.

Sampling draws from torch's random state, seeded by (seed, process) when the run starts and kept
by every checkpoint: a run resumed from a checkpoint samples what it would have; a checkpoint
between generations keeps the rollout too (training/checkpoints.py).
"""
import dataclasses

import torch
from transformers import GenerationConfig

from finetune.data.pairs import side_record
from finetune.evaluation.generation import encode_prompt, generate, model_stop_ids, reference_answer
from finetune.evaluation.preference import generation_record
from finetune.files import read_jsonl
from finetune.training import rewards as reward_functions


@dataclasses.dataclass
class Prompt:
    ids: list  # token ids, formatted as evaluation formats the record's generation prompt
    reference: str  # the record's answer ("" where it has none)
    task: str | None


def prompt_of(record, tokenizer, template):
    """A record of any format as the prompt its answer follows, and that answer."""
    if record["format"] in ("preference", "unpaired"):
        answer_record = generation_record(record)  # the chosen answer, a desirable completion
        if answer_record is None:
            answer_record = {**side_record(record, ""), "id": record["id"]}
        record = {**answer_record, "task": record.get("task")}
    ids, _ = encode_prompt(record, tokenizer, template)
    return Prompt(ids=ids, reference=reference_answer(record), task=record.get("task"))


def read_prompts(record_files, record_ids, tokenizer, template):
    """The prompt of each record id (in the order given) from the run's validated records."""
    wanted, records = set(record_ids), {}
    for path in record_files:
        records.update((r["id"], r) for r in read_jsonl(path) if r["id"] in wanted)
    missing = wanted - set(records)
    if missing:
        raise ValueError(f"{len(missing)} records of the shards are not in {', '.join(map(str, record_files))} "
                         f"(e.g. id {sorted(missing)[0]}); the records and the shards are of different data")
    return [prompt_of(records[record_id], tokenizer, template) for record_id in record_ids]


# ---------------------------------------------------------------- sampling


def left_padded(prompts, pad_token_id, device):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.no_grad()
def sample_groups(model, tokenizer, prompts, settings, stop_ids, seed=None, synced_processes=False):
    """num_generations sampled completions of each prompt ids list, as (prompt ids, prompt mask, completion ids,
    completion mask) with one row per completion, the group's rows together. The prompts' KV cache is computed
    once and repeated for their groups; the completion mask covers the tokens up to the first stop, included.
    Sampling draws from torch's random state (whose state a checkpoint keeps), or from `seed` leaving it alone."""
    group = settings.num_generations
    prompt_ids, prompt_mask = left_padded(prompts, tokenizer.pad_token_id, model.device)
    stops = model_stop_ids(model, stop_ids)
    seeded = seed is not None
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else [], enabled=seeded):
        if seeded:
            torch.manual_seed(seed)
        options = {}
        if prompt_ids.shape[1] > 1:  # the prompt but its last token, once per prompt; generate goes on from there
            positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
            output = model(input_ids=prompt_ids[:, :-1], attention_mask=prompt_mask[:, :-1],
                           position_ids=positions[:, :-1], use_cache=True)
            name = "cache" if "cache" in output.keys() else "past_key_values"  # renamed in transformers 5.x
            output[name].batch_repeat_interleave(group)
            options[name] = output[name]
        # A configuration of its own: the model's (a repetition penalty, top_k) would sample from another
        # distribution than the one the loss scores.
        sampling = GenerationConfig(
            max_new_tokens=settings.max_completion_length, do_sample=True, temperature=settings.sampling_temperature,
            top_p=settings.sampling_top_p, top_k=0, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops,
            suppress_tokens=[tokenizer.pad_token_id] if tokenizer.pad_token_id not in stops else None)
        generated = model.generate(
            input_ids=prompt_ids.repeat_interleave(group, 0), attention_mask=prompt_mask.repeat_interleave(group, 0),
            generation_config=sampling, synced_gpus=synced_processes, **options)
    completion_ids = generated[:, prompt_ids.shape[1]:]
    is_stop = torch.isin(completion_ids, torch.tensor(stops, device=completion_ids.device))
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), completion_ids.shape[1])
    completion_mask = (torch.arange(completion_ids.shape[1], device=completion_ids.device) <= first_stop[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    return prompt_ids.repeat_interleave(group, 0), prompt_mask.repeat_interleave(group, 0), completion_ids, completion_mask


def completion_logps(model, batch, temperature):
    """The log-probability of each completion token at the sampling temperature, (rows, completion tokens)."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    width = batch["completion_ids"].shape[1]
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)  # as sampling placed the left-padded rows
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], position_ids=positions, use_cache=False,
                   logits_to_keep=width + 1).logits[:, :-1].float() / temperature
    return logits.gather(2, batch["completion_ids"].unsqueeze(2)).squeeze(2) - logits.logsumexp(dim=2)


# ---------------------------------------------------------------- advantages and loss


def group_advantages(rewards, group, scale, step_std=None):
    """Each completion's reward against its group's mean, scaled by the group's std (or for scale batch the
    step's, step_std: every micro-batch and process); and which completions are in a group of equal rewards."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1).repeat_interleave(group)
    if scale == "batch":
        std = torch.full_like(rewards, rewards.std().item() if step_std is None else step_std)
    else:
        std = grouped.std(1).repeat_interleave(group)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    flat = torch.isclose(grouped.std(1), torch.zeros(1, dtype=rewards.dtype)).repeat_interleave(group)
    return advantages, flat


def policy_loss(logps, old_logps, ref_logps, advantages, mask, settings, totals):
    """The summed loss of a micro-batch's completion tokens, as its share of the step's loss, and its statistics
    as sums over the completions. totals: the step's completions and completion tokens (every micro-batch and
    process), which the loss type averages over."""
    ratio = torch.exp(logps - old_logps)
    advantages = advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - settings.epsilon, 1 + (settings.epsilon_high or settings.epsilon))
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    beta = settings.beta or 0.0
    if beta:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token = per_token + beta * kl * ratio  # weighted by the ratio: the unbiased reverse-KL gradient
    tokens = mask.sum(1).clamp(min=1)
    completions, all_tokens = max(totals[0], 1), max(totals[1], 1)  # dynamic sampling may leave none
    if settings.loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / tokens).sum() / completions
    elif settings.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (completions * settings.max_completion_length)
    else:  # dapo
        loss = (per_token * mask).sum() / all_tokens
    low = (ratio < 1 - settings.epsilon) & (advantages < 0)
    high = (ratio > 1 + (settings.epsilon_high or settings.epsilon)) & (advantages > 0)
    stats = {"clip_ratio": float((((low | high) * mask).sum(1) / tokens).sum())}
    if beta:
        stats["kl"] = float(((kl.detach() * mask).sum(1) / tokens).sum())
    return loss, stats


# ---------------------------------------------------------------- a step


@dataclasses.dataclass
class GrpoState:
    prompts: list  # of the training examples, in their order
    eval_prompts: list  # the held-out prompts scored at each evaluation
    stop_ids: list
    rewards: list  # (name, weight, function, options) of training/rewards.py
    reference: object = None  # method full with beta > 0: a frozen copy of the base model
    rollout: dict | None = None  # the batches sampled last, reused for `iterations` steps


def reward_inputs(tokenizer, prompts, completions, completion_tokens, group=1):
    """What reward functions are given about each completion: `group` completions of each prompt, in order."""
    texts = [tokenizer.decode(p.ids) for p in prompts]
    return {"completions": completions, "references": [p.reference for p in prompts for _ in range(group)],
            "prompts": [text for text in texts for _ in range(group)],
            "tasks": [p.task for p in prompts for _ in range(group)], "completion_tokens": completion_tokens}


def sample_micro_batch(run, step, indices):
    """One micro-batch's groups, scored: the tensors the loss needs, the rewards of each completion and
    the reward functions' inputs."""
    settings, state, model = run.settings, run.grpo, run.unwrapped
    prompts = [state.prompts[i] for i in indices]
    prompt_ids, prompt_mask, completion_ids, completion_mask = sample_groups(
        model, run.tokenizer, [p.ids for p in prompts], settings, state.stop_ids, synced_processes=run.sharded)
    texts = [text.strip() for text in run.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)]
    inputs = reward_inputs(run.tokenizer, prompts, texts, completion_mask.sum(1).tolist(), settings.num_generations)
    scores = reward_functions.score(state.rewards, inputs, step)
    batch = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "completion_mask": completion_mask,
             "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1)}
    return batch, torch.tensor(reward_functions.combined(state.rewards, scores), dtype=torch.float64), scores, inputs


@torch.no_grad()
def fixed_logps(run, batch):
    """Log-probabilities the loss compares with, taken once per rollout: the sampling policy's (iterations > 1)
    and the reference's (beta > 0: the base model, the adapter switched off)."""
    settings, model = run.settings, run.unwrapped
    if settings.iterations > 1:
        batch["old_logps"] = completion_logps(model, batch, settings.sampling_temperature)
    if settings.beta:
        if run.grpo.reference is not None:
            batch["ref_logps"] = completion_logps(run.grpo.reference, batch, settings.sampling_temperature)
        else:
            with model.disable_adapter():
                batch["ref_logps"] = completion_logps(model, batch, settings.sampling_temperature)


def rollout(run, step):
    """Sample and score the groups of the step's micro-batches; their advantages, the step's totals, the
    statistics of the rollout (sums over completions) and the first group as sample rows."""
    settings, group = run.settings, run.settings.num_generations
    window = [run.next_micro_batch() for _ in range(settings.grad_accum)]
    run.unwrapped.eval()
    sampled = [sample_micro_batch(run, step, indices) for _, indices in window]
    rewards = torch.cat([r for _, r, _, _ in sampled])
    step_std = run.accelerator.gather(rewards.to(run.device)).std().item() if settings.scale_rewards == "batch" else None
    batches, flats = [], []
    for batch, micro_rewards, _, _ in sampled:
        batch["advantages"], flat = group_advantages(micro_rewards, group, settings.scale_rewards, step_std)
        if settings.dynamic_sampling:  # groups whose rewards are all equal leave the step
            batch["completion_mask"] = batch["completion_mask"] * (~flat).long().unsqueeze(1)
        fixed_logps(run, batch)
        batches.append(batch)
        flats.append(flat)
    run.unwrapped.train()
    kept = [int((b["completion_mask"].sum(1) > 0).sum()) if settings.dynamic_sampling else len(b["completion_ids"])
            for b in batches]
    counts = torch.tensor([sum(kept), sum(int(b["completion_mask"].sum()) for b in batches)], device=run.device)
    first = sampled[0][3]
    examples = [{"step": step, "kind": "rollout", "prompt": first["prompts"][i], "reference": first["references"][i],
                 "answer": first["completions"][i], "reward": float(sampled[0][1][i]),
                 "scores": {name: values[i] for name, values in sampled[0][2].items()}} for i in range(group)]
    return {"epoch": window[-1][0], "batches": batches, "stats": rollout_stats(sampled, flats), "examples": examples,
            "totals": run.accelerator.reduce(counts, reduction="sum").tolist()}


def rollout_stats(sampled, flats):
    """The rollout's statistics as sums over its completions (metrics() makes them means and stds)."""
    rewards = torch.cat([r for _, r, _, _ in sampled])
    stats = {"completions": len(rewards), "reward": float(rewards.sum()), "reward_sq": float((rewards ** 2).sum()),
             "zero_std_fraction": float(sum(flat.sum() for flat in flats)),
             "completion_length": float(sum(sum(inputs["completion_tokens"]) for _, _, _, inputs in sampled))}
    for _, _, scores, _ in sampled:
        for name, values in scores.items():
            stats[f"reward/{name}"] = stats.get(f"reward/{name}", 0.0) + sum(values)
            stats[f"reward/{name}_sq"] = stats.get(f"reward/{name}_sq", 0.0) + sum(v * v for v in values)
    return stats


def step_batches(run, step):
    """(epoch, the micro-batches, the step's totals, the statistics of a new rollout) of this step: a new rollout
    every `iterations` steps, else the last one again."""
    state = run.grpo
    new = state.rollout is None or (step - 1) % run.settings.iterations == 0
    if new:
        state.rollout = rollout(run, step)
    rollout_stats = state.rollout["stats"] if new else {}
    return state.rollout["epoch"], state.rollout["batches"], state.rollout["totals"], rollout_stats


def micro_batch_loss(run, batch, totals):
    """This micro-batch's share of the step's loss, and its statistics (sums over its completions)."""
    logps = completion_logps(run.model, batch, run.settings.sampling_temperature)
    old_logps = batch.get("old_logps", logps.detach())
    loss, stats = policy_loss(logps, old_logps, batch.get("ref_logps"), batch["advantages"].to(logps),
                              batch["completion_mask"].to(logps), run.settings, totals)
    return loss, {"passes": len(logps), **stats}


def metrics(stats):
    """A metrics row's GRPO figures from the interval's sums: per completion sampled (rewards, their standard
    deviations, lengths, the fraction in groups of equal rewards) and per completion trained on (clip, KL)."""
    completions, passes = max(stats.pop("completions", 0), 1), max(stats.pop("passes", 0), 1)
    row = {}
    for name in sorted(stats):
        if name.endswith("_sq") or name in ("clip_ratio", "kl"):
            continue
        row[name] = stats[name] / completions
        if f"{name}_sq" in stats:
            row[f"{name}_std"] = max(stats[f"{name}_sq"] / completions - row[name] ** 2, 0.0) ** 0.5
    row.update({name: stats[name] / passes for name in ("clip_ratio", "kl") if name in stats})
    return row


@torch.no_grad()
def heldout_reward(run, step):
    """The mean reward of greedy completions of the held-out prompts (what keep: best and early stopping follow)."""
    settings, state = run.settings, run.grpo
    prompts = state.eval_prompts
    completions = generate(run.unwrapped, run.tokenizer, [p.ids for p in prompts],
                           max_new_tokens=settings.max_completion_length,
                           batch_size=settings.batch_size * settings.num_generations, temperature=0.0, top_p=1.0,
                           seed=settings.seed, stop_ids=state.stop_ids, synced_processes=run.sharded)
    inputs = reward_inputs(run.tokenizer, prompts, completions,
                           [len(run.tokenizer(c, add_special_tokens=False).input_ids) for c in completions])
    rewards = reward_functions.combined(state.rewards, reward_functions.score(state.rewards, inputs, step))
    return sum(rewards) / len(rewards)
