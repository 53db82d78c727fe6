"""GRPO (finetune/training/grpo.py) against an independent oracle and in the training loop:

- on one fixed batch of prompts, sampled completions, advantages and old (and reference) log-probabilities,
  the loss equals TRL 1.16's GRPOTrainer loss for every loss type, with and without the KL term;
- sampling with the prompt's KV cache shared by its group draws exactly the tokens plain sampling draws;
- advantages are group-normalized, and a constant reward gives zero advantages and leaves the weights alone;
- a run learns what its reward (a project function) asks for; a killed run resumes and matches an
  uninterrupted one; keep: best follows the held-out reward.
"""
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, settings_args
from finetune.settings import resolved, typed
from finetune.training.grpo import completion_logps, group_advantages, left_padded, policy_loss, sample_groups

TRAIN = [sys.executable, str(REPO / "scripts" / "train.py")]
TOLERANCE = 1e-5


def grpo_settings(**values):
    return typed("train", resolved("train", objective="grpo", **values))


@pytest.fixture(scope="module")
def rollout_batch(tiny_model, tiny_tokenizer):
    """Three prompts of different lengths, four sampled completions each, as the rollout makes them."""
    from finetune.models import load_base_model
    model = load_base_model(tiny_model, dtype=torch.float32, tokenizer=tiny_tokenizer).eval()
    prompts = [tiny_tokenizer(text).input_ids for text in
               ("Which word comes after velvet? List: apple silver velvet honey", "Say hi.", "Count the words: a b c")]
    settings = grpo_settings(num_generations=4, max_completion_length=10)
    prompt_ids, prompt_mask, completion_ids, completion_mask = sample_groups(
        model, tiny_tokenizer, prompts, settings, [tiny_tokenizer.eos_token_id], seed=5)
    return model, {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                   "completion_mask": completion_mask,
                   "attention_mask": torch.cat([prompt_mask, completion_mask], dim=1)}, prompts


def test_sharing_the_prompt_cache_samples_what_plain_sampling_samples(rollout_batch, tiny_tokenizer):
    model, batch, prompts = rollout_batch
    ids, mask = left_padded(prompts, tiny_tokenizer.pad_token_id, model.device)
    torch.manual_seed(5)
    plain = model.generate(input_ids=ids.repeat_interleave(4, 0), attention_mask=mask.repeat_interleave(4, 0),
                           max_new_tokens=10, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=[tiny_tokenizer.eos_token_id],
                           suppress_tokens=[tiny_tokenizer.pad_token_id])[:, ids.shape[1]:]
    plain = plain.masked_fill(batch["completion_mask"] == 0, tiny_tokenizer.pad_token_id)
    assert torch.equal(batch["completion_ids"], plain)
    assert len(set(map(tuple, batch["completion_ids"][:4].tolist()))) > 1, "a group's completions differ"


def nudged_copy(model):
    """The policy: the model with its weights moved a little, so that it differs from the sampling policy."""
    import copy
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return policy


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("dr_grpo", 0.0), ("dapo", 0.0), ("dapo", 0.05),
                                            ("grpo", 0.05)])
def test_the_loss_is_trls_grpo_trainer_loss(tmp_path, rollout_batch, tiny_tokenizer, loss_type, beta):
    """Same batch, advantages, old and reference log-probabilities: the same loss as GRPOTrainer._compute_loss."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    model, batch, _ = rollout_batch
    policy = nudged_copy(model)
    settings = grpo_settings(loss_type=loss_type, beta=beta, epsilon=0.1, epsilon_high=0.15,
                             max_completion_length=10, sampling_temperature=0.9)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.2, 0.0, 0.0, 0.3, 1.0], dtype=torch.float64)
    advantages, _ = group_advantages(rewards, 4, "group")
    with torch.no_grad():
        old = completion_logps(model, batch, 0.9)  # the sampling policy (iterations > 1)
        reference = completion_logps(nudged_copy(policy), batch, 0.9)
    mask = batch["completion_mask"].float()
    logps = completion_logps(policy, batch, 0.9)
    ours, _ = policy_loss(logps, old, reference, advantages.float(), mask, settings,
                          (len(mask), int(mask.sum())))

    config = GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=beta, epsilon=0.1, epsilon_high=0.15,
                        max_completion_length=10, temperature=0.9, num_generations=4, per_device_train_batch_size=4,
                        report_to=[], use_cpu=True, disable_dropout=True, logging_steps=1, bf16=False)
    trainer = GRPOTrainer(model=policy, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                          args=config, train_dataset=Dataset.from_list([{"prompt": "hi"}] * 4),
                          processing_class=tiny_tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    inputs = {"prompt_ids": batch["prompt_ids"], "prompt_mask": batch["prompt_mask"],
              "completion_ids": batch["completion_ids"], "completion_mask": batch["completion_mask"],
              "advantages": advantages.float(), "old_per_token_logps": old, "ref_per_token_logps": reference,
              "num_items_in_batch": mask.sum()}
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    assert float(ours) == pytest.approx(float(trl_loss), abs=TOLERANCE)
    assert abs(float(ours)) > 1e-3, "a loss that compares something"


def test_advantages_are_normalized_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    advantages, flat = group_advantages(rewards, 4, "group")
    assert advantages[:4].sum() == pytest.approx(0.0, abs=1e-9)
    assert advantages[0] == pytest.approx(0.75 / (0.5 + 1e-4), rel=1e-6)  # (1 - 0.25) / std (Bessel: 0.5)
    assert flat.tolist() == [False] * 4 + [True] * 4
    assert advantages[4:].abs().max() == 0
    unscaled, _ = group_advantages(rewards, 4, "none")
    assert unscaled[:4].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    by_step, _ = group_advantages(rewards, 4, "batch", step_std=2.0)
    assert by_step[:4].tolist() == pytest.approx([0.75 / 2.0001, -0.25 / 2.0001, -0.25 / 2.0001, -0.25 / 2.0001])


def grpo_args(tiny_model, shards, out, **settings):
    records = [shard.with_suffix(".jsonl") for shard in shards]
    settings = {"objective": "grpo", "precision": "fp32", "batch_size": 4, "num_generations": 4,
                "max_completion_length": 12, "log_every": 1, "learning_rate": 2e-2, "lr_scheduler": "constant_with_warmup",
                "reward_eval_prompts": 8, "target_modules": "all-linear", **settings}
    return ["--base-model", str(tiny_model), "--shards", *map(str, shards), "--records", *map(str, records),
            "--output-dir", str(out / "trained"), "--metrics", str(out / "metrics.jsonl"),
            "--summary", str(out / "summary.json"), "--samples", str(out / "samples.jsonl"), "--run-name", out.name,
            "--threads", "1", *settings_args(out.parent / "settings" / out.name, "train", **settings)]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "my_rewards.py").write_text(
        "def e_share(completions, **kwargs):\n"
        "    return [c.count('e') / max(len(c), 1) for c in completions]\n\n"
        "def constant(completions, **kwargs):\n"
        "    return [1.0] * len(completions)\n\n"
        "def broken(completions, **kwargs):\n"
        "    return [1.0 if 'e' in c else None for c in completions]\n")
    return folder / "my_rewards.py"


def test_a_constant_reward_leaves_the_weights_unchanged(tmp_path, tiny_model, shards, reward_file):
    import train
    out = tmp_path / "constant"
    train.main(grpo_args(tiny_model, shards, out, max_steps=3, rewards=[f"{reward_file}:constant"], weight_decay=0.0))
    metrics = rows(out)
    assert all(r["loss"] == 0 and r["grad_norm"] == 0 for r in metrics), metrics
    assert metrics[0]["zero_std_fraction"] == 1.0 and metrics[0]["reward"] == 1.0
    adapter = load_file(out / "trained" / "adapter_model.safetensors")
    assert all(not tensor.any() for name, tensor in adapter.items() if "lora_B" in name), "B stays zero: no change"


def test_a_run_learns_what_a_project_reward_asks_for(tmp_path, tiny_model, shards, reward_file):
    import train
    out = tmp_path / "learns"
    train.main(grpo_args(tiny_model, shards, out, max_steps=30, rewards=[f"{reward_file}:e_share"],
                         sample_every=10, eval_every=15))
    metrics = rows(out)
    first, last = [sum(r["reward"] for r in part) / 10 for part in (metrics[:10], metrics[-10:])]
    assert last > first + 0.015, (first, last)
    assert {"reward_std", f"reward/{reward_file}:e_share", "zero_std_fraction", "completion_length",
            "clip_ratio"} <= set(metrics[0])
    assert "eval_reward" in metrics[14] and "eval_reward" in metrics[-1]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [10] * 4 + [20] * 4 + [30] * 4
    assert all(s["kind"] == "rollout" and isinstance(s["reward"], float) for s in samples)


def test_a_reward_returning_a_non_number_stops_the_run_naming_it(tmp_path, tiny_model, shards, reward_file):
    out = tmp_path / "broken"
    result = subprocess.run(TRAIN + grpo_args(tiny_model, shards, out, max_steps=2,
                                              rewards=[f"{reward_file}:broken"]), capture_output=True, text=True)
    assert result.returncode != 0
    assert f"reward '{reward_file}:broken' returned None" in result.stderr
    assert re.search(r"at step \d+ on completion \d+ '", result.stderr), result.stderr[-500:]
    assert not (out / "trained").exists()


def test_a_killed_grpo_run_resumes_and_matches_an_uninterrupted_one(tmp_path, tiny_model, shards):
    """iterations 2 with checkpoints every 3 steps: the checkpoint at step 3 lies inside a rollout, which it keeps."""
    from test_train_resume_and_scale import env, kill_after_checkpoint
    steps = {"max_steps": 8, "checkpoint_every": 3, "iterations": 2, "rewards": [{"reward": "contains", "text": "e"}]}
    straight = tmp_path / "straight"
    subprocess.run(TRAIN + grpo_args(tiny_model, shards, straight, **steps), env=env(), check=True,
                   capture_output=True)
    resumed, checkpoints = tmp_path / "resumed", tmp_path / "checkpoints"
    command = TRAIN + grpo_args(tiny_model, shards, resumed, **steps) + ["--checkpoint-dir", str(checkpoints)]
    kill_after_checkpoint(command, checkpoints, min_step=3)
    subprocess.run(command, env=env(), check=True, capture_output=True)
    assert [r["loss"] for r in rows(resumed)] == pytest.approx([r["loss"] for r in rows(straight)], abs=1e-6)
    assert [r["reward"] for r in rows(resumed) if "reward" in r] == \
        pytest.approx([r["reward"] for r in rows(straight) if "reward" in r], abs=1e-9)
    a, b = (load_file(out / "trained" / "adapter_model.safetensors") for out in (straight, resumed))
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


# ---------------------------------------------------------------- in the workflow (dry runs)

CUSTOM = ("runs:\n  custom:\n    objective: grpo\n    rewards: [exact_match, {reward: my_rewards.py:brevity, weight: 0.5,"
          " limit: 8}]\n  plain:\n    objective: grpo\n")


@pytest.fixture(scope="module")
def grpo_workflow(tmp_path_factory):
    from workflow import copy_workflow
    workdir = copy_workflow(tmp_path_factory.mktemp("grpo_workflow") / "wf")
    (workdir / "my_rewards.py").write_text("def brevity(completions, completion_tokens, limit, **kwargs):\n"
                                           "    return [1.0 if n <= limit else 0.0 for n in completion_tokens]\n")
    (workdir / "grpo.yaml").write_text(CUSTOM)
    return workdir


def test_a_reward_file_is_an_input_of_exactly_the_runs_that_use_it(grpo_workflow):
    """Editing my_rewards.py reruns the run whose rewards name it, and no other: the file is an input of that
    training job alone; the GRPO code and the records are inputs of GRPO runs only."""
    from workflow import dry_run_jobs
    jobs = {shell.split("--run-name ")[1].split()[0]: inputs for rule, inputs, shell in
            dry_run_jobs(grpo_workflow, "--configfile", "grpo.yaml") if rule == "train"}
    assert "my_rewards.py" in jobs["custom"]
    assert all("my_rewards.py" not in inputs for run, inputs in jobs.items() if run != "custom")
    for run, inputs in jobs.items():
        grpo = run in ("custom", "plain")
        assert ("finetune/training/grpo.py" in inputs) == grpo, run
        assert ("results/data/word_tasks.jsonl" in inputs) == grpo, run
        assert "finetune/training/objectives.py" not in inputs, run


@pytest.mark.parametrize("rewards, message", [
    ("[exact_mach]", "reward 'exact_mach': not a built-in"),
    ("[missing.py:score]", "reward 'missing.py:score': no file missing.py in the project"),
    ("[{reward: regex}]", "reward 'regex' needs option 'pattern'"),
    ("[{reward: regex, pattern: '(unclosed'}]", "is not a regular expression"),
])
def test_a_broken_reward_stops_the_workflow_before_any_job(grpo_workflow, rewards, message):
    from workflow import snakemake
    (grpo_workflow / "broken.yaml").write_text(f"runs:\n  rl:\n    objective: grpo\n    rewards: {rewards}\n")
    result = snakemake(grpo_workflow, "-n", "--configfile", "broken.yaml", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "run 'rl'" in output and message in output, output[-2000:]
    assert not (grpo_workflow / "results").exists()


def test_beta_defaults_to_zero_for_grpo_and_stays_for_dpo():
    from finetune.config import check_before_defaults
    config = {"runs": {"rl": {"objective": "grpo"}, "pref": {"objective": "dpo"}, "set": {"objective": "grpo",
                                                                                          "beta": 0.04}}}
    check_before_defaults(config)
    assert config["runs"]["rl"]["beta"] == 0.0 and config["runs"]["set"]["beta"] == 0.04
    assert config["runs"]["pref"]["beta"] == 0.1
    assert grpo_settings().beta == 0.0 and typed("train", resolved("train", objective="dpo")).beta == 0.1


@pytest.mark.parametrize("distributed", ["fsdp"])  # DDP shares its code path, less the synced generation
def test_grpo_trains_on_two_processes(tmp_path, tiny_model, shards, distributed):
    """Each process samples the groups of its own prompts (under FSDP every process takes part in each generation
    step); the step's statistics and the held-out reward are over both; one adapter is written."""
    from test_distributed import launch
    out = tmp_path / distributed
    result = launch(2, *grpo_args(tiny_model, shards, out, max_steps=3, eval_every=3, batch_size=2,
                                  distributed=distributed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout + result.stderr
    last = rows(out)[-1]
    assert {"reward", "eval_reward", "completion_length"} <= set(last)
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    assert (out / "trained" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- prompts and rewards


def test_prompts_come_from_every_format_with_the_answer_evaluation_compares_with(tmp_path, tiny_tokenizer):
    """alpaca, chat, preference and unpaired records give the prompt evaluation generates for, and its answer."""
    from finetune.evaluation.generation import encode_prompt
    from finetune.training.grpo import read_prompts
    records = [
        {"id": "a", "format": "alpaca", "instruction": "Say hi.", "input": "", "output": "Hi.", "task": "greet"},
        {"id": "c", "format": "chat", "messages": [{"role": "user", "content": "Say hi."},
                                                   {"role": "assistant", "content": "Hi."}]},
        {"id": "p", "format": "preference", "instruction": "Say hi.", "input": "", "chosen": "Hi.",
         "rejected": "Bye.", "task": "greet"},
        {"id": "u", "format": "unpaired", "messages": [{"role": "user", "content": "Say hi."}], "completion": "Bye.",
         "label": False},
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = read_prompts([path], ["p", "a", "u", "c"], tiny_tokenizer, "chat")
    alpaca_ids = encode_prompt(records[0], tiny_tokenizer, "chat")[0]
    chat_ids = encode_prompt(records[1], tiny_tokenizer, "chat")[0]
    assert [p.ids for p in prompts] == [alpaca_ids, alpaca_ids, chat_ids, chat_ids]
    assert [p.reference for p in prompts] == ["Hi.", "Hi.", "", "Hi."], "an undesirable completion is no answer"
    assert [p.task for p in prompts] == ["greet", "greet", None, None]
    with pytest.raises(ValueError, match="1 records of the shards are not in"):
        read_prompts([path], ["a", "missing"], tiny_tokenizer, "chat")


def test_the_built_in_rewards():
    from finetune.training import rewards
    completions = ["<think>count</think> There are four words.", "There are four words", "four", ""]
    references = ["There are four words."] * 4
    batch = {"completions": completions, "references": references, "prompts": [""] * 4, "tasks": [None] * 4,
             "completion_tokens": [12, 5, 1, 0]}
    assert rewards.exact_match(**batch) == [1.0, 0.0, 0.0, 0.0]
    assert rewards.regex(**batch, pattern=r"^There are \w+ words\.?$") == [1.0, 1.0, 0.0, 0.0]
    assert rewards.contains(**batch) == [1.0, 0.0, 0.0, 0.0]
    assert rewards.contains(**batch, text="four") == [1.0, 1.0, 1.0, 0.0]
    assert rewards.length(**batch, limit=4) == [-2.0, -0.25, 0.0, 0.0]
    assert rewards.think_format(**batch) == [1.0, 0.0, 0.0, 0.0]
    loaded = rewards.load_rewards(["exact_match", {"reward": "contains", "text": "four", "weight": 0.5}])
    scores = rewards.score(loaded, batch, step=1)
    assert rewards.combined(loaded, scores) == [1.5, 0.5, 0.5, 0.0]
    twice = rewards.load_rewards([{"reward": "regex", "pattern": "four"}, {"reward": "regex", "pattern": "^$"}])
    assert rewards.score(twice, batch, step=1) == {"regex": [1.0, 1.0, 1.0, 0.0], "regex#2": [0.0, 0.0, 0.0, 1.0]}


def test_a_reward_that_raises_is_named_with_the_completion_it_fails_on():
    from finetune.training import rewards
    def picky(completions, **kwargs):
        return [1.0 / len(c) for c in completions]  # ZeroDivisionError on the empty one
    batch = {"completions": ["ab", "", "c"], "references": [""] * 3, "prompts": [""] * 3, "tasks": [None] * 3,
             "completion_tokens": [1, 0, 1]}
    with pytest.raises(SystemExit, match=r"reward 'picky' raised ZeroDivisionError: .* at step 7 on completion 1 ''"):
        rewards.score([("picky", 1.0, picky, {})], batch, step=7)
    with pytest.raises(SystemExit, match=r"returned str 'oops', not a list of 3 numbers at step 7"):
        rewards.score([("picky", 1.0, lambda **kw: "oops", {})], batch, step=7)


def test_keep_best_and_early_stopping_follow_the_held_out_reward(tmp_path, tiny_model, shards, reward_file):
    """The held-out reward is what selection compares (higher is better): the kept step is the best one's."""
    import train
    out = tmp_path / "best"
    train.main(grpo_args(tiny_model, shards, out, max_steps=6, eval_every=2, keep="best",
                         early_stopping={"patience": 5}, rewards=[f"{reward_file}:e_share"]))
    evaluations = {r["step"]: r["eval_reward"] for r in rows(out) if "eval_reward" in r}
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(evaluations) == [2, 4, 6]
    assert summary["best_step"] == max(evaluations, key=lambda step: (evaluations[step], -step))
    assert summary["kept"] == "best"


def test_a_sweep_over_grpo_settings_plans_one_grpo_run_per_value(grpo_workflow):
    from workflow import dry_run_jobs
    (grpo_workflow / "sweep.yaml").write_text(
        "sweeps:\n  rl:\n    base: {objective: grpo, rewards: [exact_match], max_steps: 5}\n"
        "    grid: {num_generations: [4, 8], loss_type: [dapo, dr_grpo]}\n")
    jobs = {shell.split("--run-name ")[1].split()[0]: inputs for rule, inputs, shell in
            dry_run_jobs(grpo_workflow, "--configfile", "sweep.yaml") if rule == "train"}
    swept = sorted(run for run in jobs if run.startswith("rl-"))
    assert swept == ["rl-num_generations4-loss_typedapo", "rl-num_generations4-loss_typedr_grpo",
                     "rl-num_generations8-loss_typedapo", "rl-num_generations8-loss_typedr_grpo"]
    assert all("finetune/training/grpo.py" in jobs[run] for run in swept)


@pytest.mark.parametrize("method, settings", [("qlora", {}), ("dora", {"beta": 0.04}), ("full", {"beta": 0.04})])
def test_every_method_trains_with_grpo_and_the_kl_term(tmp_path, tiny_model, shards, method, settings):
    """qlora samples from its 4-bit base, dora and full with the KL term to the base (full: a frozen copy; the
    adapters: the adapter switched off); the KL starts at 0 and the run writes what its method writes."""
    import train
    out = tmp_path / method
    train.main(grpo_args(tiny_model, shards, out, method=method, max_steps=3, iterations=1,
                         rewards=[{"reward": "contains", "text": "e"}],
                         learning_rate=1e-3 if method == "full" else 2e-2, **settings))
    metrics = rows(out)
    if "beta" in settings:
        assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-6) and metrics[-1]["kl"] > 0
    written = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (out / "trained" / written).exists()
