"""The preference objectives (finetune/training/objectives.py) against independent oracles:

- TRL 1.16's trainers (DPOTrainer sigmoid / ipo / + sft, CPOTrainer simpo, ORPOTrainer, KTOTrainer) compute
  the same loss on the same micro-batch, the reference log-probabilities passed in precomputed as the run
  passes them (scripts/reference_logps.py, attached to the shard's examples);
- at step 0 of an adapter run (a fresh LoRA, whose B matrices are zero) the policy is the reference, so dpo's
  loss is ln 2, ipo's (1 / 2 beta)^2 and kto's the mean of its weights over 2, whatever the data;
- a step's loss does not depend on how its pairs are split into micro-batches (gradient accumulation, several
  processes), and answer_logps agrees with the model's own cross-entropy.

The policy of the TRL comparisons is the tiny model with its weights nudged, so that it differs from the
reference (the unchanged tiny model) and every log-ratio is nonzero.
"""
import json
import math
import random
import types

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import reference_logps
from conftest import settings_args
from finetune.data.prompts import IGNORE_INDEX
from finetune.data.shards import read_shards
from finetune.data.tokenization import tokenize_file
from finetune.data.validation import validate_file
from finetune.settings import resolved, typed
from finetune.training.objectives import (answer_logps, heldout_objective_loss, objective_loss, pair_terms,
                                          preference_batch, trained_first_tokens)

TOLERANCE = 1e-5

# Pairs with prompts and answers of different lengths (so padding, and per-token averages, matter).
PAIRS = [
    {"instruction": "Which word comes after velvet?", "input": "List: apple silver velvet honey basket",
     "chosen": "After velvet comes honey.", "rejected": "After velvet comes silver.", "task": "word_after"},
    {"instruction": "How many words are there?", "input": "List: stone valley summer planet",
     "chosen": "There are four words.", "rejected": "There are seven words, if I count every one of them.",
     "task": "count_words"},
    {"instruction": "Say hi.", "input": "", "chosen": "Hi.", "rejected": "Hello there, how is your summer going?",
     "task": "greeting"},
    {"instruction": "What is the first word?", "input": "List: island tiger thunder red planet ocean lantern",
     "chosen": "The first word is island.", "rejected": "tiger", "task": "first_word"},
]
# Unpaired completions, more desirable than not (so the two weights matter differently).
UNPAIRED = [
    {"prompt": "Which word comes after velvet? List: apple silver velvet honey", "completion": "honey",
     "label": True},
    {"prompt": "How many words are there? List: stone valley summer planet", "completion": "There are four words.",
     "label": True},
    {"prompt": "Say hi.", "completion": "Goodbye, and do not come back to this summer valley.", "label": False},
    {"prompt": "What is the first word? List: island tiger thunder", "completion": "The first word is island.",
     "label": True},
    {"prompt": "What is the last word? List: red planet ocean lantern", "completion": "red", "label": False},
]


def train_settings(objective, **values):
    """The train stage's settings for an objective, with values off the defaults (so that a mixed-up
    setting shows)."""
    values = {"beta": 0.2, "simpo_gamma": 0.3, "orpo_lambda": 0.25, "desirable_weight": 1.3,
              "undesirable_weight": 0.7, "sft_weight": 0.0, **values}
    return typed("train", resolved("train", objective=objective, **values))


@pytest.fixture(scope="module")
def shard(tmp_path_factory, tiny_tokenizer):
    """{'pairs', 'unpaired'}: a shard of each, tokenized as the tokenize rule writes it (all in the train split)."""
    folder = tmp_path_factory.mktemp("objective_shards")
    paths = {}
    for name, records in (("pairs", PAIRS), ("unpaired", UNPAIRED)):
        raw = folder / f"{name}.raw.jsonl"
        raw.write_text("".join(json.dumps(r) + "\n" for r in records))
        validate_file(raw, folder / f"{name}.jsonl", folder / f"{name}.rejected.jsonl")
        tokenize_file(folder / f"{name}.jsonl", tiny_tokenizer, "auto", 128, folder / f"{name}.arrow", split="train")
        paths[name] = folder / f"{name}.arrow"
    return paths


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, shard):
    """{'pairs', 'unpaired'}: the tiny model's log-probabilities of each shard's answers, as the
    reference_logps rule computes them (batches of 2, grouped by length: other padding than the tests')."""
    folder = tmp_path_factory.mktemp("objective_reference")
    paths = {}
    for name, path in shard.items():
        paths[name] = folder / f"{name}.arrow"
        reference_logps.main([*settings_args(folder, "reference_logps", precision="fp32", batch_size=2),
                              "--base-model", str(tiny_model), "--shard", str(path), "--output", str(paths[name])])
    return paths


def examples_of(shard, reference, name):
    """Every example of a shard with its reference log-probabilities attached, as training reads them."""
    examples = read_shards([shard[name]], "train")
    examples.attach_reference([reference[name]])
    return examples[:]


def load(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture
def policy(tiny_model):
    """The tiny model with every weight nudged (a fixed seed): a policy that has moved from the reference."""
    model = load(tiny_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.03 * torch.randn(parameter.shape, generator=generator))
    return model


def our_loss(model, examples, settings, kind, pad_token_id):
    """objective_loss of one micro-batch that is the whole step, on one process."""
    batch = preference_batch(examples, pad_token_id, kind)
    loss, _ = objective_loss(model, batch, settings, kind, rows=len(examples),
                             chosen_tokens=trained_first_tokens(batch, settings.objective))
    return loss, batch


# --- TRL ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def trl():
    """TRL (the tests skip without it), with the process-wide state its trainers set put back afterwards:
    accelerate's device state (use_cpu) and the random seeds (set_seed), which train.py, run in-process by
    other tests of the session, would otherwise inherit."""
    trl = pytest.importorskip("trl")
    from accelerate.state import AcceleratorState, GradientState
    seeds = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    AcceleratorState._reset_state(reset_partial_state=True)  # a GPU state left by an earlier test refuses use_cpu
    yield trl
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    random.setstate(seeds[0])
    np.random.set_state(seeds[1])
    torch.random.set_rng_state(seeds[2])


def trl_config(config_class, tmp_path, **values):
    """A TRL config for computing losses on the CPU in fp32: no mixed precision, checkpointing, dropout or logging."""
    return config_class(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, fp16=False,
                        gradient_checkpointing=False, disable_dropout=True, save_strategy="no", **values)


def construction_data(kind):
    """A tiny dataset in the format the trainer accepts: only needed to construct it."""
    from datasets import Dataset
    if kind == "unpaired":
        return Dataset.from_dict({"prompt": ["Say hi.", "Say bye."], "completion": ["Hi.", "Bye."],
                                  "label": [True, False]})
    return Dataset.from_dict({"prompt": ["Say hi.", "Say bye."], "chosen": ["Hi.", "Bye."],
                              "rejected": ["No.", "Hello."]})


def halves(batch):
    """The first (chosen / completion) and second (rejected / KL) sequences of a preference batch."""
    first, second = {}, {}
    for name in ("input_ids", "attention_mask", "labels"):
        first[name], second[name] = batch[name].chunk(2)
    return first, second


def trl_loss(objective, settings, model, tokenizer, batch, tmp_path):
    """TRL 1.16's loss of the same micro-batch, through each trainer's own loss function, and (CPO, ORPO)
    its metrics."""
    if objective in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer
        loss_type = ["sigmoid" if objective == "dpo" else "ipo"]
        weights = [1.0]
        if settings.sft_weight:
            loss_type, weights = loss_type + ["sft"], weights + [settings.sft_weight]
        trainer = DPOTrainer(model, args=trl_config(DPOConfig, tmp_path, beta=settings.beta, loss_type=loss_type,
                                                    loss_weights=weights, precompute_ref_log_probs=True),
                             train_dataset=construction_data("preference"), processing_class=tokenizer)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  # TRL's completion_mask marks the completion tokens of input_ids; our labels mark the same ones.
                  "completion_mask": (batch["labels"] != IGNORE_INDEX).long(),
                  # TRL's collator makes float32 tensors of the precomputed log-probabilities.
                  "ref_chosen_logps": batch["ref_logps"].float(),
                  "ref_rejected_logps": batch["ref_rejected_logps"].float()}
        return trainer._compute_loss(model, inputs, return_outputs=False), {}
    if objective == "kto":
        from trl import KTOConfig, KTOTrainer
        assert not settings.sft_weight, "TRL's KTO has no token term"
        trainer = KTOTrainer(model, args=trl_config(KTOConfig, tmp_path, beta=settings.beta,
                                                    desirable_weight=settings.desirable_weight,
                                                    undesirable_weight=settings.undesirable_weight,
                                                    per_device_train_batch_size=2, precompute_ref_log_probs=True),
                             train_dataset=construction_data("unpaired"), processing_class=tokenizer)
        completion, mismatched = halves(batch)
        inputs = {"input_ids": completion["input_ids"], "attention_mask": completion["attention_mask"],
                  "completion_mask": (completion["labels"] != IGNORE_INDEX).long(),
                  "KL_input_ids": mismatched["input_ids"], "KL_attention_mask": mismatched["attention_mask"],
                  "KL_completion_mask": (mismatched["labels"] != IGNORE_INDEX).long(),
                  "label": batch["desirable"], "ref_logps": batch["ref_logps"].float(),
                  "ref_KL_logps": batch["ref_kl_logps"].float()}
        return trainer._compute_loss(model, inputs, return_outputs=False), {}
    if objective == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        trainer = CPOTrainer(model, args=trl_config(CPOConfig, tmp_path, loss_type="simpo", beta=settings.beta,
                                                    simpo_gamma=settings.simpo_gamma, cpo_alpha=settings.sft_weight,
                                                    max_length=128),
                             train_dataset=construction_data("preference"), processing_class=tokenizer)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        trainer = ORPOTrainer(model, args=trl_config(ORPOConfig, tmp_path, beta=settings.orpo_lambda, max_length=128),
                              train_dataset=construction_data("preference"), processing_class=tokenizer)
    chosen, rejected = halves(batch)
    inputs = {f"{side}_{name}": value for side, half in (("chosen", chosen), ("rejected", rejected))
              for name, value in half.items()}
    return trainer.get_batch_loss_metrics(model, inputs)


TRL_CASES = [
    pytest.param("dpo", 0.0, id="dpo"),
    pytest.param("dpo", 0.4, id="dpo+sft"),
    pytest.param("ipo", 0.0, id="ipo"),
    pytest.param("ipo", 0.4, id="ipo+sft"),
    pytest.param("simpo", 0.0, id="simpo"),
    pytest.param("simpo", 0.4, id="simpo+sft"),
    pytest.param("orpo", 0.0, id="orpo"),
]


@pytest.mark.parametrize("objective,sft_weight", TRL_CASES)
def test_loss_equals_trl(objective, sft_weight, trl, policy, tiny_tokenizer, shard, reference, tmp_path):
    """A run with objective dpo, ipo, simpo or orpo (with or without sft_weight) optimizes exactly the loss
    TRL's trainer of that method would on the same batch: results and hyperparameters carry over from TRL."""
    examples = examples_of(shard, reference, "pairs")
    settings = train_settings(objective, sft_weight=sft_weight)
    ours, batch = our_loss(policy, examples, settings, "preference", tiny_tokenizer.pad_token_id)
    theirs, _ = trl_loss(objective, settings, policy, tiny_tokenizer, batch, tmp_path)
    ours, theirs = float(ours.detach()), float(theirs.detach())
    print(f"{objective} sft_weight={sft_weight}: ours {ours:.8f} TRL {theirs:.8f} |diff| {abs(ours - theirs):.2e}")
    assert ours > 0.01  # not a trivial batch
    assert abs(ours - theirs) < TOLERANCE


@pytest.mark.parametrize("kl_offset", [0.0, 2.0], ids=["kl-clamped", "kl-positive"])
def test_kto_loss_equals_trl(kl_offset, trl, policy, tiny_tokenizer, shard, reference, tmp_path):
    """kto's loss is TRL KTOTrainer's on the same batch, both when the micro-batch's KL estimate is clipped at 0
    and when it is positive (the reference log-probabilities of the mismatched completions lowered by kl_offset
    nats), with different desirable and undesirable weights."""
    examples = examples_of(shard, reference, "unpaired")
    for example in examples:
        example["ref_kl_logps"] -= kl_offset
    settings = train_settings("kto")
    batch = preference_batch(examples, tiny_tokenizer.pad_token_id, "unpaired")
    ours, stats = objective_loss(policy, batch, settings, "unpaired", len(examples), trained_first_tokens(batch, "kto"))
    theirs, _ = trl_loss("kto", settings, policy, tiny_tokenizer, batch, tmp_path)
    ours, theirs, kl = float(ours.detach()), float(theirs.detach()), stats["kl"] / stats["pairs"]
    print(f"kto kl={kl:.4f}: ours {ours:.8f} TRL {theirs:.8f} |diff| {abs(ours - theirs):.2e}")
    assert (kl > 0.5) if kl_offset else (kl == 0)  # the regime the case is meant to test
    assert abs(ours - theirs) < TOLERANCE


def test_orpo_odds_ratio_term_equals_trl(trl, policy, tiny_tokenizer, shard, reference, tmp_path):
    """orpo's odds-ratio term (lambda times the log-sigmoid of the log odds ratio of the per-token mean
    log-probabilities) is TRL ORPOTrainer's, and so, apart, is its token term: the mean NLL of every token of the
    chosen sequences after the first, prompt included."""
    examples = examples_of(shard, reference, "pairs")
    settings = train_settings("orpo")
    batch = preference_batch(examples, tiny_tokenizer.pad_token_id, "preference")
    with torch.no_grad():
        logps, tokens = answer_logps(policy, batch)
        ours = float(pair_terms(settings, logps, tokens, batch)[0].mean())
        trl_total, metrics = trl_loss("orpo", settings, policy, tiny_tokenizer, batch, tmp_path)
    theirs = float(trl_total) - metrics["nll_loss"]
    print(f"orpo odds-ratio term: ours {ours:.8f} TRL {theirs:.8f} |diff| {abs(ours - theirs):.2e}")
    assert abs(ours - theirs) < TOLERANCE
    # TRL's token term, pinned: the chosen sequences' NLL over all their tokens but the first.
    chosen = {name: value.chunk(2)[0] for name, value in batch.items() if name in ("input_ids", "attention_mask")}
    chosen["labels"] = chosen["input_ids"].masked_fill(chosen["attention_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        whole_logps, whole_tokens = answer_logps(policy, chosen)
    assert abs(-float(whole_logps.sum()) / int(whole_tokens.sum()) - metrics["nll_loss"]) < TOLERANCE


# --- Step 0 of an adapter run --------------------------------------------------------------------------------------

def expected_at_step_0(objective, settings, examples):
    """The loss when every log-ratio is 0 (and so kto's KL estimate)."""
    if objective == "dpo":
        return math.log(2)
    if objective == "ipo":
        return (1 / (2 * settings.beta)) ** 2
    weights = [settings.desirable_weight if e["desirable"] else settings.undesirable_weight for e in examples]
    return sum(weights) / 2 / len(weights)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "kto"])
def test_fresh_adapter_starts_at_the_reference(objective, tiny_model, tiny_tokenizer, shard, reference):
    """At step 0 of a LoRA run the adapter is a no-op, so the policy is the reference whose log-probabilities
    reference_logps.py wrote: dpo's loss is ln 2 (ipo's (1/2 beta)^2, kto's the mean weight / 2). A first
    logged loss far from it means the reference is not the run's base (another model, dtype or tokenization)."""
    from peft import get_peft_model

    from finetune.training.adapters import load_model, peft_config
    kind = "unpaired" if objective == "kto" else "preference"
    examples = examples_of(shard, reference, "unpaired" if objective == "kto" else "pairs")
    settings = train_settings(objective)
    loads = types.SimpleNamespace(method="lora", quantization="none", distributed="ddp", gradient_checkpointing=False,
                                  attn_implementation=settings.attn_implementation, trust_remote_code=False)
    base = load_model(tiny_model, loads, "fp32", types.SimpleNamespace(device=torch.device("cpu")), tiny_tokenizer)
    model = get_peft_model(base, peft_config(settings, total_steps=10)).eval()
    assert any("lora_B" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        loss = float(our_loss(model, examples, settings, kind, tiny_tokenizer.pad_token_id)[0])
    expected = expected_at_step_0(objective, settings, examples)
    print(f"{objective} at step 0: {loss:.8f}, expected {expected:.8f}")
    assert abs(loss - expected) < TOLERANCE


# --- Micro-batches --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["dpo", "ipo", "simpo", "orpo"])
def test_step_loss_does_not_depend_on_micro_batches(objective, policy, tiny_tokenizer, shard, reference):
    """Splitting a step's pairs into micro-batches (gradient accumulation, or several processes) leaves its loss,
    token term included, unchanged: batch_size and gradient_accumulation_steps trade memory, not results.
    (kto estimates its KL term per micro-batch, as TRL does, so it is left out.)"""
    examples = examples_of(shard, reference, "pairs")
    settings = train_settings(objective, sft_weight=0.4)
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        whole = float(our_loss(policy, examples, settings, "preference", pad)[0])
        halves_of_2 = heldout_objective_loss(policy, examples, settings, "preference", 2, pad)  # [0, 1], [2, 3]
        batches = [preference_batch(part, pad, "preference")
                   for part in ([examples[0], examples[3]], [examples[1]], [examples[2]])]
        tokens = sum(trained_first_tokens(batch, objective) for batch in batches)
        uneven = sum(float(objective_loss(policy, batch, settings, "preference", len(examples), tokens)[0])
                     for batch in batches)
    print(f"{objective}: one micro-batch {whole:.8f}, two {halves_of_2:.8f}, three uneven {uneven:.8f}")
    assert abs(halves_of_2 - whole) < TOLERANCE
    assert abs(uneven - whole) < TOLERANCE


def test_answer_logps_match_the_models_own_loss(tiny_model, tiny_tokenizer, shard, reference):
    """An answer's summed log-probability in a padded batch is minus the model's own cross-entropy over the answer's
    tokens (the sequence alone, unpadded) times their number: padding and prompt tokens count for nothing. And the
    reference file holds the same numbers, though reference_logps.py batched the rows otherwise."""
    model = load(tiny_model)
    examples = examples_of(shard, reference, "pairs")
    batch = preference_batch(examples, tiny_tokenizer.pad_token_id, "preference")
    sequences = [(e["input_ids"], e["labels"]) for e in examples]
    sequences += [(e["rejected_input_ids"], e["rejected_labels"]) for e in examples]
    with torch.no_grad():
        logps, tokens = answer_logps(model, batch)
        for row, (input_ids, labels) in enumerate(sequences):
            own = float(model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss)
            count = sum(label != IGNORE_INDEX for label in labels[1:])
            assert int(tokens[row]) == count
            assert abs(float(logps[row]) / count + own) < 1e-6  # per token: float32 sums of ~200 nats
    for ours, name in zip(logps.chunk(2), ("ref_logps", "ref_rejected_logps")):
        torch.testing.assert_close(ours.double(), torch.tensor([e[name] for e in examples], dtype=torch.float64),
                                   rtol=1e-6, atol=TOLERANCE)
