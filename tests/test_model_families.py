"""Model families off the default path: labels against each family's own chat
template token for token, the pad and stop tokens each family gets, and a
matrix that runs the real chain (tokenize, train a few steps, evaluate,
merge, reload with stock transformers/peft) for every method on at least
two families, every family and every data format."""
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluate
import merge
import train
from conftest import REPO, settings_args
from finetune.data.prompts import IGNORE_INDEX, encode_record, fold_system_turns, stop_token_ids
from finetune.data.tokenization import tokenize_file
from finetune.data.tokenizer import load_tokenizer
from finetune.data.validation import validate_file
from model_families import FAMILIES, LLAMA2, QWEN3, build_family_model

CHAT = {"format": "chat", "messages": [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "First word: café au lait"},
    {"role": "assistant", "content": "café"},
    {"role": "user", "content": "Last word: red blue green"},
    {"role": "assistant", "content": "green"}]}
ALPACA = {"format": "alpaca", "instruction": "Give the first word.", "input": "naïve red", "output": "naïve"}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("families")
    return {name: build_family_model(name, folder / name) for name in FAMILIES}


def as_chat(record):
    if record["format"] == "chat":
        return record["messages"]
    return [{"role": "user", "content": f"{record['instruction']}\n\n{record['input']}"},
            {"role": "assistant", "content": record["output"]}]


@pytest.mark.parametrize("record", [CHAT, ALPACA], ids=["chat", "alpaca"])
@pytest.mark.parametrize("family", [name for name in FAMILIES if FAMILIES[name].template])
def test_labels_match_the_familys_template_token_for_token(family_models, family, record):
    tokenizer = load_tokenizer(family_models[family])
    messages = as_chat(record)
    if family in ("mistral", "mixtral", "gemma"):  # templates that raise on a system turn: the documented fold
        messages = fold_system_turns(messages)
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    ids, labels, _ = encode_record(record, tokenizer, "chat", 10_000)
    assert ids == reference["input_ids"]
    assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in reference["assistant_masks"]]
    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])
    end = FAMILIES[family].end_of_turn
    expected = "".join(m["content"] + end for m in messages if m["role"] == "assistant")
    assert trained == expected, "each answer and its end-of-turn token are trained, nothing else"


@pytest.mark.parametrize("family, template, trained", [
    ("qwen2", QWEN3, "café<|im_end|><think>\n\n</think>\n\ngreen<|im_end|>"),
    ("mistral", LLAMA2, " café </s> green </s>"),
], ids=["qwen3-reasoning-block", "llama2-spaces"])
def test_templates_that_render_past_turns_differently_or_pad_answers(family_models, family, template, trained):
    tokenizer = load_tokenizer(family_models[family], chat_template=template)
    messages = fold_system_turns(CHAT["messages"]) if family == "mistral" else CHAT["messages"]
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    ids, labels, _ = encode_record(CHAT, tokenizer, "chat", 10_000)
    assert ids == reference["input_ids"]
    assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in reference["assistant_masks"]]
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]) == trained


def test_a_system_turn_is_folded_into_the_next_user_turn_where_the_template_has_none(family_models):
    tokenizer = load_tokenizer(family_models["mistral"])
    ids, _, _ = encode_record(CHAT, tokenizer, "chat", 10_000)
    assert tokenizer.decode(ids).startswith("<s>[INST] Answer with one word.\n\nFirst word: café au lait [/INST]café</s>")


PADS = {"llama": "<|finetune_right_pad_id|>", "qwen2": "<|endoftext|>", "mistral": "<unk>", "gemma": "<pad>",
        "phi3": "<unk>", "gpt2": "<|pad|>", "qwen2_moe": "<|endoftext|>", "mixtral": "<unk>",
        "qwen3_moe": "<|endoftext|>"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_pads_with_a_token_that_is_not_eos(family_models, family):
    tokenizer = load_tokenizer(family_models[family])
    assert tokenizer.pad_token == PADS[family]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_at_the_templates_end_of_turn(family_models, family):
    tokenizer = load_tokenizer(family_models[family])
    template = "chat" if FAMILIES[family].template else "alpaca"
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    assert end_of_turn in stop_token_ids(tokenizer, template)


# ---------------------------------------------------------------- the chain, per (family, method, format)

def write_records(path, fmt, count=96):
    """Records of the example word tasks in the given format; chats have a system turn and two exchanges."""
    source = [json.loads(line) for line in (REPO / "data" / "word_tasks.jsonl").read_text().splitlines()[:2 * count]]
    rows = []
    for a, b in zip(source[::2], source[1::2]):
        if fmt == "alpaca":
            rows.append({k: a[k] for k in ("instruction", "input", "output")})
        elif fmt == "completion":
            rows.append({"text": f"{a['input']} → {a['output']}"})
        else:
            rows.append({"messages": [{"role": "system", "content": "Réponds brièvement."}] + [
                {"role": role, "content": text} for r in (a, b)
                for role, text in (("user", f"{r['instruction']}\n{r['input']}"), ("assistant", r["output"]))]})
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


MATRIX = [  # family, method, format, more train settings
    ("llama", "qlora", "chat", {"target_modules": "all-linear"}),
    ("llama", "adalora", "alpaca", {}),
    ("qwen2", "dora", "chat", {}),
    ("qwen2", "full", "completion", {}),
    ("mistral", "lora", "chat", {"quantization": "8bit"}),
    ("gemma", "adalora", "chat", {}),
    ("phi3", "qlora", "chat", {"target_modules": ["qkv_proj", "o_proj"]}),
    ("gpt2", "dora", "alpaca", {"target_modules": ["c_attn"]}),
    ("gpt2", "full", "alpaca", {}),
    ("qwen2_moe", "lora", "chat", {"target_modules": "all-linear", "grad_accum": 2, "epochs": 2}),
    # Fused experts: adapted (all-linear, without dropout), or left out (DoRA on the attention layers).
    ("mixtral", "lora", "chat", {"target_modules": "all-linear", "dropout": 0.0}),
    ("qwen3_moe", "qlora", "chat", {"target_modules": "all-linear", "dropout": 0.0}),
    ("mixtral", "dora", "alpaca", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
]


def run_chain(folder, model, method, fmt, extra):
    """tokenize → train → evaluate → merge, each through its script's main(); the paths they wrote."""
    out = {name: folder / name for name in ("data", "shard", "trained", "merged", "eval", "generations")}
    validate_file(write_records(folder / "raw.jsonl", fmt), out["data"], folder / "rejected.jsonl")
    tokenize_file(out["data"], load_tokenizer(model), "auto", 128, out["shard"], fraction=0.15)
    steps = {} if "epochs" in extra else {"max_steps": 6}
    settings = folder / "settings"
    train.main(["--base-model", str(model), "--shards", str(out["shard"]), "--output-dir", str(out["trained"]),
                "--metrics", str(folder / "metrics.jsonl"), "--summary", str(folder / "summary.json"),
                *settings_args(settings, "train", method=method, r=4, learning_rate=1e-2, batch_size=4, log_every=2,
                               checkpoint_every=0, **steps, **extra)])
    evaluate.main(["--base-model", str(model), "--trained-dir", str(out["trained"]), "--shards", str(out["shard"]),
                   "--records", str(out["data"]), "--eval-json", str(out["eval"]),
                   "--generations", str(out["generations"]),
                   *settings_args(settings, "evaluate", num_samples=4, max_new_tokens=4)])
    if method != "full":
        merge.main(["--base-model", str(model), "--adapter-dir", str(out["trained"]),
                    "--output-dir", str(out["merged"]), *settings_args(settings, "merge")])
    return out


def stock_logits_agree(model, out, ids):
    """Reloaded with stock transformers/peft only: merged logits equal base+adapter logits."""
    tokenizer = AutoTokenizer.from_pretrained(out["trained"])
    base = AutoModelForCausalLM.from_pretrained(model)
    vocab = base.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:  # the pad token added for a tokenizer without one (see the model card)
        base.resize_token_embeddings(len(tokenizer))
    adapted = PeftModel.from_pretrained(base, out["trained"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(out["merged"]).eval()
    with torch.no_grad():
        expected, got = adapted(ids).logits[..., :vocab], merged(ids).logits[..., :vocab]
    return torch.allclose(expected, got, atol=1e-4), float((expected - got).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("family,method,fmt,extra", MATRIX, ids=["-".join(case[:3]) for case in MATRIX])
def test_each_method_family_and_format_runs_the_whole_chain(tmp_path, family_models, family, method, fmt, extra):
    model = family_models[family]
    out = run_chain(tmp_path, model, method, fmt, extra)
    summary = json.loads((tmp_path / "summary.json").read_text())
    losses = [row["loss"] for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())]
    assert summary["method"] == method and all(map(torch.isfinite, torch.tensor(losses)))
    if family in ("mixtral", "qwen3_moe"):  # the fused experts and the router, or nothing for DoRA on attention
        expected = [] if method == "dora" else ["experts.down_proj", "experts.gate_up_proj", "gate.weight"]
        assert summary["adapted_expert_parameters"] == expected
    result = json.loads(out["eval"].read_text())
    assert result["eval_records"] > 0 and torch.isfinite(torch.tensor(result["tuned"]["loss"]))
    assert result["tuned"]["loss"] != result["base"]["loss"], "the trained weights are the ones evaluated"
    generations = [json.loads(line) for line in out["generations"].read_text().splitlines()]
    assert len(generations) == 4 and all(isinstance(g["tuned"], str) for g in generations)
    ids = torch.tensor([load_tokenizer(model)("Give the first word.\nred blue").input_ids])
    if method == "full":
        tuned = AutoModelForCausalLM.from_pretrained(out["trained"])
        assert type(tuned).__name__ == type(AutoModelForCausalLM.from_pretrained(model)).__name__
        return
    agree, difference = stock_logits_agree(model, out, ids)
    assert agree, f"merged logits differ from base+adapter by {difference}"


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "the chat template cannot render this conversation: Conversation roles must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "assistant", "content": "c"}],
     "a system turn is not followed by a user turn, and this chat template cannot render system turns"),
])
def test_a_conversation_the_template_cannot_render_stops_tokenization_at_its_file_and_line(
        tmp_path, family_models, messages, reason):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    source = tmp_path / "chats.jsonl"
    source.write_text(json.dumps(good) + "\n" + json.dumps(good | {"task": "x"}) + "\n"
                      + json.dumps({"messages": messages}) + "\n")
    validate_file(source, tmp_path / "records.jsonl", tmp_path / "rejected.jsonl")
    command = [sys.executable, str(REPO / "scripts" / "tokenize_data.py"),
               *settings_args(tmp_path / "settings", "tokenize_data"),
               "--input", str(tmp_path / "records.jsonl"), "--tokenizer", str(family_models["mistral"]),
               "--source", str(source), "--output", str(tmp_path / "shard.arrow"), "--stats", str(tmp_path / "s.json")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(f"{source}:3: {reason}")
    assert not list(tmp_path.glob("shard*")) and not (tmp_path / "s.json").exists()


FUSED_EXPERT_REFUSALS = [
    ("mixtral", "lora", {"target_modules": "all-linear"},
     "reaches the fused expert weights of Mixtral (experts.down_proj, experts.gate_up_proj, gate.weight), which peft "
     "trains only without dropout (dropout 0.05): set dropout: 0, or list target_modules without the experts"),
    ("qwen3_moe", "dora", {"target_modules": "all-linear", "dropout": 0.0},
     "reaches the fused expert weights of Qwen3Moe (experts.down_proj, experts.gate_up_proj, gate.weight), which "
     "peft cannot train with DoRA: list target_modules without the experts, e.g. [q_proj, k_proj, v_proj, o_proj], "
     "or use method lora"),
]


@pytest.mark.parametrize("family, method, settings, message", FUSED_EXPERT_REFUSALS, ids=["lora-dropout", "dora"])
def test_a_fused_expert_run_peft_cannot_train_stops_before_any_job(tmp_path, family_models, family, method,
                                                                     settings, message):
    """Where the model's config is here (a local folder), the workflow refuses the run before any job;
    the training job refuses it too (a Hub model resolved only there), before loading any weights."""
    from workflow import copy_workflow, snakemake
    workdir = copy_workflow(tmp_path / "wf")
    shutil.copytree(family_models[family], workdir / "models" / family)
    run = ", ".join(f"{key}: {json.dumps(value)}" for key, value in {"method": method, **settings}.items())
    (workdir / "moe.yaml").write_text(f"base_models:\n  moe: {{name_or_path: models/{family}}}\n"
                                      "datasets:\n  word_tasks: {path: data/word_tasks.jsonl, format: alpaca}\n"
                                      f"runs:\n  experts: {{base_model: moe, {run}}}\n")
    result = snakemake(workdir, "-n", "--configfile", "moe.yaml", "--replace-workflow-config", check=False)
    assert result.returncode != 0 and f"run 'experts': target_modules all-linear {message}" in \
        result.stdout + result.stderr
    assert not (workdir / "results").exists()
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(["--base-model", str(family_models[family]), "--shards", str(tmp_path / "no-shard.arrow"),
                    "--output-dir", str(tmp_path / "trained"), "--metrics", str(tmp_path / "m.jsonl"),
                    "--summary", str(tmp_path / "s.json"), "--run-name", "experts",
                    *settings_args(tmp_path, "train", method=method, **settings)])


PAIRS = [{"messages": [{"role": "system", "content": "Answer with one word."},
                       {"role": "user", "content": f"First word: {first} {second}"}],
          "chosen": first, "rejected": second} for first, second in
         [("café", "lait"), ("red", "blue"), ("naïve", "green"), ("stone", "river")]]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
@pytest.mark.parametrize("family", ["qwen2", "gemma", "mistral", "gpt2"])
def test_preference_objectives_start_at_the_reference_on_every_template(tmp_path, family_models, family, objective):
    """Pairs in each family's own template (ChatML, Gemma's turns, Mistral's [INST] without system turns, no
    template at all) tokenize with one shared prompt, their reference log-probabilities are those of the model
    a fresh adapter starts from (the first dpo loss is ln 2, kto's half the mean weight), and a step trains."""
    import reference_logps
    model = family_models[family]
    records = PAIRS if objective == "dpo" else [
        {"messages": pair["messages"], "completion": pair["chosen" if i % 2 else "rejected"], "label": i % 2 == 1}
        for i, pair in enumerate(PAIRS)]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    validate_file(tmp_path / "raw.jsonl", tmp_path / "data.jsonl", tmp_path / "rejected.jsonl")
    tokenizer = load_tokenizer(model)
    tokenize_file(tmp_path / "data.jsonl", tokenizer, "auto", 64, tmp_path / "data.arrow", split="train")
    reference_logps.main(["--base-model", str(model), "--shard", str(tmp_path / "data.arrow"), "--output",
                          str(tmp_path / "reference.arrow"), *settings_args(tmp_path, "reference_logps",
                                                                           precision="fp32")])
    train.main(["--base-model", str(model), "--shards", str(tmp_path / "data.arrow"), "--reference",
                str(tmp_path / "reference.arrow"), "--output-dir", str(tmp_path / "trained"), "--metrics",
                str(tmp_path / "metrics.jsonl"), "--summary", str(tmp_path / "summary.json"),
                *settings_args(tmp_path, "train", objective=objective, r=4, dropout=0.0, learning_rate=1e-2,
                               target_modules="all-linear",
                               batch_size=4, max_steps=2, log_every=1, checkpoint_every=0, precision="fp32")])
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931472 if objective == "dpo" else 0.5, abs=1e-4)
    assert (tmp_path / "trained" / "adapter_config.json").exists()


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_grpo_samples_and_trains_on_every_template(tmp_path, family_models, family):
    """GRPO on each family's own template (Llama 3's headers and <|eot_id|>, Gemma's turns, GPT-2 without a
    template, whose pad is its EOS and whose positions are absolute): completions stop at the template's end of
    turn, the rewards see their text without padding or special tokens, and a step trains."""
    model = family_models[family]
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS))
    validate_file(tmp_path / "raw.jsonl", tmp_path / "data.jsonl", tmp_path / "rejected.jsonl")
    tokenize_file(tmp_path / "data.jsonl", load_tokenizer(model), "auto", 64, tmp_path / "data.arrow", split="train")
    train.main(["--base-model", str(model), "--shards", str(tmp_path / "data.arrow"), "--records",
                str(tmp_path / "data.jsonl"), "--output-dir", str(tmp_path / "trained"), "--metrics",
                str(tmp_path / "metrics.jsonl"), "--summary", str(tmp_path / "summary.json"), "--samples",
                str(tmp_path / "samples.jsonl"),
                *settings_args(tmp_path, "train", objective="grpo", r=4, learning_rate=1e-2, target_modules="all-linear",
                               batch_size=2, num_generations=4, max_completion_length=8, max_steps=2, log_every=1,
                               sample_every=1, checkpoint_every=0, precision="fp32",
                               rewards=[{"reward": "regex", "pattern": "^[a-zé]"}])])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(0 <= r["reward"] <= 1 and r["completion_length"] <= 8 for r in rows)
    special = set(load_tokenizer(model).all_special_tokens)
    answers = [json.loads(line)["answer"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and not [a for a in answers if any(token in a for token in special)], answers
    assert (tmp_path / "trained" / "adapter_config.json").exists()
