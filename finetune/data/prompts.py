"""How a normalized record becomes a prompt and tokens: the prompt template
(the tokenizer's chat template, or the alpaca template), the (text, is_target)
segments of a record, and token ids with labels in which everything but the
answers is IGNORE_INDEX.

Tokenization and generation both format records through `format_segments`,
so what the model sees at inference time is exactly what it was trained on.
"""
import os

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


SYSTEM_PROBE = "SYSTEM-PROBE-7f3a"


def renders_system_turns(tokenizer):
    """Whether the chat template renders a system turn (some raise on one, some drop it silently)."""
    cached = getattr(tokenizer, "_renders_system_turns", None)
    if cached is None or cached[0] != tokenizer.chat_template:
        probe = [{"role": "system", "content": SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
        try:
            rendered = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            cached = (tokenizer.chat_template, SYSTEM_PROBE in rendered)
        except Exception:  # jinja's raise_exception, or a template error on the role
            cached = (tokenizer.chat_template, False)
        tokenizer._renders_system_turns = cached
    return cached[1]


def fold_system_turns(messages):
    """Each system turn joined to the start of the user turn after it (system text, a blank
    line, user text): the rule for chat templates that cannot render a system turn."""
    folded, pending = [], []
    for message in messages:
        if message["role"] == "system":
            pending.append(message["content"])
        elif message["role"] == "user" and pending:
            folded.append({"role": "user", "content": "\n\n".join(pending + [message["content"]])})
            pending = []
        elif pending:
            raise ValueError("a system turn is not followed by a user turn, and this chat template cannot render "
                             "system turns, so it cannot be folded into one")
        else:
            folded.append(message)
    return folded


def _render(tokenizer, messages, **options):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as exc:  # jinja's raise_exception() and template errors alike
        raise ValueError(f"the chat template cannot render this conversation: {exc}") from None


def _end_of_turn_markers(tokenizer):
    """The texts of the tokenizer's special tokens (cached on it: this runs for every record)."""
    cached = getattr(tokenizer, "_end_of_turn_markers", None)
    if cached is None or cached[0] != len(tokenizer):  # tokens added since: compute again
        cached = (len(tokenizer), {tokenizer.convert_ids_to_tokens(i) for i in special_ids(tokenizer)})
        tokenizer._end_of_turn_markers = cached
    return cached[1]


def _marker_end(region, content, markers):
    """Where the trained part of an assistant turn ends in `region` (the rendering from its
    prompt on): after the special token that follows its content, whitespace apart (the
    template's end-of-turn marker: </s>, <|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>);
    None for a template that puts none there."""
    content = content.strip()
    content_end = region.find(content) + len(content) if content and content in region else 0
    after = content_end + len(region[content_end:]) - len(region[content_end:].lstrip())
    marker = max((token for token in markers if region.startswith(token, after)), key=len, default=None)
    return after + len(marker) if marker else None


def _chat_template_segments(messages, tokenizer):
    """(text, is_target) pieces of a conversation rendered by the chat template: each
    assistant turn's prompt is the template's generation prompt for the turns before
    it, so prompts at inference time are exactly what training saw. The answers are
    found in the whole conversation's rendering, because a template may render a turn
    differently once later turns follow it (Qwen3 drops the reasoning block of past turns)."""
    if not renders_system_turns(tokenizer) and any(m["role"] == "system" for m in messages):
        messages = fold_system_turns(messages)
    whole = _render(tokenizer, messages)
    markers = _end_of_turn_markers(tokenizer)
    segments, position = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        if not (whole.startswith(prompt) and len(prompt) >= position):
            raise ValueError("the tokenizer's chat template does not render conversations prefix by prefix; "
                             "set the base model's template to 'alpaca' instead")
        answer_end = _marker_end(whole[len(prompt):], message["content"], markers)
        if answer_end is None:  # no end-of-turn marker: the turn ends where its own rendering does
            upto_turn = _render(tokenizer, messages[: i + 1])
            answer_end = len(whole[len(prompt):len(os.path.commonprefix([upto_turn, whole]))].rstrip())
        segments += [(whole[position:len(prompt)], False), (whole[len(prompt):len(prompt) + answer_end], True)]
        position = len(prompt) + answer_end
    if position < len(whole):
        segments.append((whole[position:], False))
    return [(text, is_target) for text, is_target in segments if text or is_target]


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


def special_ids(tokenizer):
    """Ids of the tokenizer's special tokens, the added ones (end-of-turn markers) included."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


def assemble(pieces, bos, eos, wants_bos, train_on_inputs=False, append_eos=True, ends_turn=()):
    """Token ids and labels from (ids, is_target) pieces: exactly one BOS where
    the model expects one, prompt tokens masked unless train_on_inputs, and EOS
    appended (and trained on) unless the last target already ends with EOS or
    with one of `ends_turn` (a chat template's own end-of-turn token, such as
    <|im_end|> or <end_of_turn>, which then stops generation)."""
    input_ids, labels = [], []
    for ids, is_target in pieces:
        input_ids += ids
        labels += ids if (is_target or train_on_inputs) else [IGNORE_INDEX] * len(ids)
    if wants_bos and input_ids[:1] != [bos]:
        input_ids, labels = [bos] + input_ids, [IGNORE_INDEX] + labels
    while bos is not None and input_ids[:2] == [bos, bos]:
        input_ids, labels = input_ids[1:], labels[1:]
    last_answer = [ids for ids, is_target in pieces if is_target][-1:]
    ended = last_answer and last_answer[0][-1:] and (last_answer[0][-1] == eos or last_answer[0][-1] in ends_turn)
    if append_eos and eos is not None and last_answer and not ended:
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
    ends_turn = special_ids(tokenizer) if template == "chat" else ()
    return [assemble([(next(token_ids), is_target) for _, is_target in record_segments], *specials,
                     train_on_inputs=train_on_inputs, ends_turn=ends_turn)
            for record_segments in segments]


def stop_token_ids(tokenizer, template):
    """Tokens that end an answer: EOS, and with a chat template the special token it closes
    assistant turns with when that is not EOS (Gemma's <end_of_turn>, Llama 3's <|eot_id|>)."""
    stops = {tokenizer.eos_token_id} - {None}
    if template == "chat":
        probe = {"format": "chat", "messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "ok"}]}
        answer = [text for text, is_target in format_segments(probe, tokenizer, template) if is_target][-1]
        last = tokenize_texts([answer], tokenizer)[0][-1:]
        stops |= set(last) & special_ids(tokenizer)
    return sorted(stops)


def encode_record(record, tokenizer, template, max_length, train_on_inputs=False):
    """(input_ids, labels, truncated) for one training record."""
    ((input_ids, labels),) = encode_batch([record], tokenizer, template, train_on_inputs)
    return input_ids[:max_length], labels[:max_length], len(input_ids) > max_length


def count_trained_tokens(labels):
    """Tokens the loss is computed on, in one sequence or a batch of them (a numpy
    array or torch tensor of labels). Labels shift left by one inside the model,
    so the first position is never a target."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())
