"""The one module the stage scripts share: how a record becomes a prompt and
tokens, how tokenized shards are read back, and how models are loaded.

Training, evaluation and generation all format prompts through
`format_segments`, so what the model sees at inference time is exactly what it
was trained on.
"""
import shutil
from pathlib import Path

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

IGNORE_INDEX = -100

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_TURN = "### {role}:\n{content}\n\n"


# ---------------------------------------------------------------- formatting

def resolve_template(tokenizer, template):
    """'auto' means the tokenizer's own chat template when it has one."""
    if template == "auto":
        return "chat" if tokenizer.chat_template else "alpaca"
    if template == "chat" and not tokenizer.chat_template:
        raise ValueError("template 'chat' was asked for, but the tokenizer has no chat_template")
    return template


def as_messages(record):
    if record["format"] == "chat":
        return record["messages"]
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _chat_template_segments(messages, tokenizer):
    segments, rendered = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(rendered) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix; "
                             "set the base model's template to 'alpaca' instead")
        segments += [(prompt[len(rendered):], False), (full[len(prompt):], True)]
        rendered = full
    return segments


def _plain_chat_segments(messages):
    segments, pending = [], ""
    for message in messages:
        if message["role"] == "assistant":
            segments += [(pending + "### Assistant:\n", False), (message["content"], True)]
            pending = "\n\n"
        else:
            pending += PLAIN_TURN.format(role=message["role"].capitalize(), content=message["content"])
    return segments


def format_segments(record, tokenizer, template):
    """Split a normalized record into (text, is_target) pieces, in order.

    Target pieces are what the model learns to produce; the rest is prompt.
    `template` must already be resolved ('alpaca' or 'chat').
    """
    if record["format"] == "completion":
        return [(record["text"], True)]
    if template == "chat":
        return _chat_template_segments(as_messages(record), tokenizer)
    if record["format"] == "alpaca":
        prompt = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT
        return [(prompt.format(**record), False), (record["output"], True)]
    return _plain_chat_segments(record["messages"])


# ---------------------------------------------------------------- encoding

def adds_bos(tokenizer):
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("", add_special_tokens=True).input_ids[:1] == [bos]


def encode_segments(segments, tokenizer, train_on_inputs=False, append_eos=True):
    """Token ids and labels for a list of segments: exactly one BOS where the
    model expects one, prompt tokens masked unless train_on_inputs, and EOS
    appended (and trained on) when the last target does not already end with it."""
    input_ids, labels, ids = [], [], []
    for text, is_target in segments:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids += ids
        labels += ids if (is_target or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if adds_bos(tokenizer) and input_ids[:1] != [bos]:
        input_ids, labels = [bos] + input_ids, [IGNORE_INDEX] + labels
    while input_ids[:2] == [bos, bos]:
        input_ids, labels = input_ids[1:], labels[1:]
    if append_eos and eos is not None and segments and segments[-1][1] and eos not in ids:
        input_ids, labels = input_ids + [eos], labels + [eos]
    return input_ids, labels


def encode_record(record, tokenizer, template, max_length, train_on_inputs=False):
    """(input_ids, labels, truncated) for one training record."""
    input_ids, labels = encode_segments(format_segments(record, tokenizer, template), tokenizer, train_on_inputs)
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated


def encode_prompt(record, tokenizer, template):
    """Prompt ids for generation (everything before the last target) and the reference answer."""
    segments = format_segments(record, tokenizer, template)
    last_target = max(i for i, (_, is_target) in enumerate(segments) if is_target)
    prompt_segments = segments[:last_target]
    if not prompt_segments:
        return [tokenizer.bos_token_id] if adds_bos(tokenizer) else [], segments[last_target][0]
    input_ids, _ = encode_segments(prompt_segments, tokenizer, append_eos=False)
    return input_ids, reference_answer(record)


def reference_answer(record):
    if record["format"] == "completion":
        return record["text"]
    return as_messages(record)[-1]["content"]


# ---------------------------------------------------------------- shards

def in_eval_split(record_id, eval_fraction):
    """Stable split by a hash of the record's content, not its position: adding
    records never moves existing ones between train and eval."""
    return int(record_id[:8], 16) / 0x100000000 < eval_fraction


def read_shards(paths, split, eval_fraction):
    """Tokenized examples of one split ('train' or 'eval') from Arrow stream files."""
    examples = []
    for path in paths:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        for record_id, input_ids, labels in zip(table["id"].to_pylist(), table["input_ids"].to_pylist(),
                                                table["labels"].to_pylist()):
            if in_eval_split(record_id, eval_fraction) == (split == "eval"):
                examples.append({"id": record_id, "input_ids": input_ids, "labels": labels})
    return examples


def pad_batch(examples, pad_token_id):
    """Right-padded tensors of one batch: padding to the longest record, never to max_length."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ---------------------------------------------------------------- models

def load_tokenizer(name_or_path):
    """The base model's tokenizer. Labels are built explicitly, so a pad token
    that equals EOS cannot mask EOS out of the loss; still prefer a distinct one."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision, device):
    """'auto': bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def load_base_model(name_or_path, dtype=torch.float32, attn_implementation="sdpa"):
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn_implementation)


def save_pretrained_atomically(output_dir, *objects, **save_kwargs):
    """save_pretrained each object into a sibling '.partial' folder, then move it
    into place, so a crash never leaves a half-written model behind."""
    output_dir = Path(output_dir)
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for obj in objects:
        obj.save_pretrained(partial, **save_kwargs)
    shutil.rmtree(output_dir, ignore_errors=True)
    partial.rename(output_dir)
    return output_dir
