"""The one module the stage scripts share: how a record becomes a prompt and
tokens, how tokenized shards are read back, and how models are loaded.

Training, evaluation and generation all format prompts through
`format_segments`, so what the model sees at inference time is exactly what it
was trained on.
"""
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
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
        answer = full[len(prompt):]
        # Whitespace a template puts after the end of a turn is not part of the answer.
        segments += [(prompt[len(rendered):], False), (answer.rstrip(), True)]
        if answer != answer.rstrip():
            segments.append((answer[len(answer.rstrip()):], False))
        rendered = full
    return segments


def _plain_chat_segments(messages, eos_token):
    """Without a chat template: '### Role:' headers, each answer ending with EOS."""
    segments, pending = [], ""
    for message in messages:
        if message["role"] == "assistant":
            segments += [(pending + "### Assistant:\n", False), (message["content"] + (eos_token or ""), True)]
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
    return _plain_chat_segments(record["messages"], tokenizer.eos_token)


# ---------------------------------------------------------------- encoding

def adds_bos(tokenizer):
    """Whether the model expects a BOS first (its tokenizer adds one by default)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("", add_special_tokens=True).input_ids[:1] == [bos]


def assemble(pieces, bos, eos, wants_bos, train_on_inputs=False, append_eos=True):
    """Token ids and labels from (ids, is_target) pieces: exactly one BOS where
    the model expects one, prompt tokens masked unless train_on_inputs, and EOS
    appended (and trained on) when the last target does not already hold it."""
    input_ids, labels = [], []
    for ids, is_target in pieces:
        input_ids += ids
        labels += ids if (is_target or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    if wants_bos and input_ids[:1] != [bos]:
        input_ids, labels = [bos] + input_ids, [IGNORE_INDEX] + labels
    while bos is not None and input_ids[:2] == [bos, bos]:
        input_ids, labels = input_ids[1:], labels[1:]
    last_answer = [ids for ids, is_target in pieces if is_target][-1:]
    if append_eos and eos is not None and last_answer and eos not in last_answer[0]:
        input_ids, labels = input_ids + [eos], labels + [eos]
    return input_ids, labels


def tokenize_texts(texts, tokenizer):
    """Token ids of many texts, without special tokens added. A fast tokenizer's
    Rust backend is called directly: it spreads the batch over the cores and
    skips the Python-side conversion that `tokenizer(texts)` adds."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


def encode_batch(records, tokenizer, template, train_on_inputs=False):
    """[(input_ids, labels)] of whole records, with one batched tokenizer call
    for all their segments."""
    segments = [format_segments(record, tokenizer, template) for record in records]
    token_ids = iter(tokenize_texts([text for record_segments in segments for text, _ in record_segments], tokenizer))
    specials = tokenizer.bos_token_id, tokenizer.eos_token_id, adds_bos(tokenizer)
    return [assemble([(next(token_ids), is_target) for _, is_target in record_segments], *specials,
                     train_on_inputs=train_on_inputs)
            for record_segments in segments]


def encode_record(record, tokenizer, template, max_length, train_on_inputs=False):
    """(input_ids, labels, truncated) for one training record."""
    ((input_ids, labels),) = encode_batch([record], tokenizer, template, train_on_inputs)
    return input_ids[:max_length], labels[:max_length], len(input_ids) > max_length


def encode_prompt(record, tokenizer, template):
    """Prompt ids for generation (everything before the last target) and the reference answer."""
    segments = format_segments(record, tokenizer, template)
    last_target = max(i for i, (_, is_target) in enumerate(segments) if is_target)
    pieces = [(tokenizer(text, add_special_tokens=False).input_ids, False) for text, _ in segments[:last_target]]
    input_ids, _ = assemble(pieces, tokenizer.bos_token_id, tokenizer.eos_token_id, adds_bos(tokenizer),
                            append_eos=False)
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


def read_shards(paths, split):
    """Tokenized examples of one split ('train' or 'eval') from Arrow stream files."""
    examples = []
    for path in paths:
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_stream(source).read_all()
        table = table.filter(pa.compute.equal(table["split"], split))
        examples += [{"id": record_id, "input_ids": input_ids, "labels": labels} for record_id, input_ids, labels
                     in zip(table["id"].to_pylist(), table["input_ids"].to_pylist(), table["labels"].to_pylist())]
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


def count_trained_tokens(batch):
    """Tokens that are targets of the loss (labels shift left by one)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def mean_token_loss(model, examples, batch_size, pad_token_id):
    """Mean loss per trained token over the examples, and the number of trained tokens."""
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(model.device) for k, v in pad_batch(examples[start:start + batch_size], pad_token_id).items()}
        tokens = count_trained_tokens(batch)
        total_loss += model(**batch, num_items_in_batch=tokens, use_cache=False).loss.item() * tokens
        total_tokens += tokens
    return total_loss / max(total_tokens, 1), total_tokens


# ---------------------------------------------------------------- models

def load_tokenizer(name_or_path, chat_template=None):
    """The base model's tokenizer, with `chat_template` replacing its own if given.
    Labels are built explicitly, so a pad token that equals EOS cannot mask EOS
    out of the loss; still prefer a distinct one."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if chat_template:
        tokenizer.chat_template = chat_template
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
