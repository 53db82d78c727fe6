"""How a normalized record becomes a prompt and tokens: the prompt template
(the tokenizer's chat template, or the alpaca template), the (text, is_target)
segments of a record, and token ids with labels in which everything but the
answers is IGNORE_INDEX.

Tokenization and generation both format records through `format_segments`,
so what the model sees at inference time is exactly what it was trained on.
"""
from transformers import AutoTokenizer

IGNORE_INDEX = -100

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_TURN = "### {role}:\n{content}\n\n"


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


def count_trained_tokens(labels):
    """Tokens the loss is computed on, in one sequence or a batch of them (a numpy
    array or torch tensor of labels). Labels shift left by one inside the model,
    so the first position is never a target."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------- tokenizer

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

