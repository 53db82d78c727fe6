"""The OpenAI API's requests and answers: a request body checked field by field and turned into
the prompts to complete (a chat formatted with the served run's own template, exactly as its
evaluation formats prompts); the completion, chat completion and streamed chunk objects; and the
error object every refused request gets."""
import time
import uuid

import torch

from finetune.data.prompts import adds_bos
from finetune.evaluation.generation import encode_prompt

SAMPLING_FIELDS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0)}


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def check_type(body, name, types, required=False):
    if name not in body:
        if required:
            raise ApiError(400, f"'{name}' is required", name, "missing_required_parameter")
        return None
    value, types = body[name], types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        raise ApiError(400, f"'{name}' has the wrong type ({type(value).__name__})", name, "invalid_type")
    return value


def served_model(body, servables):
    name = check_type(body, "model", str, required=True)
    if name not in servables:
        raise ApiError(404, f"The model '{name}' does not exist; served: {', '.join(sorted(servables))}", "model",
                       "model_not_found")
    return servables[name]


def sampling(body, limits):
    """(the sequence's options: max_tokens, temperature, top_p, stop strings, ignore_eos; n; seed) of a
    request, each checked."""
    max_tokens = check_type(body, "max_tokens", int)
    max_tokens = check_type(body, "max_completion_tokens", int) if max_tokens is None else max_tokens
    max_tokens = limits["default_max_tokens"] if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= limits["max_tokens"]:
        raise ApiError(400, f"max_tokens must be between 1 and {limits['max_tokens']} (got {max_tokens})",
                       "max_tokens", "invalid_value")
    values = {}
    for name, (low, high) in SAMPLING_FIELDS.items():
        value = check_type(body, name, (int, float))
        if value is not None and not low <= value <= high:
            raise ApiError(400, f"'{name}' must be between {low} and {high}", name, "invalid_value")
        values[name] = float(value) if value is not None else (0.0 if name == "temperature" else 1.0)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop", "invalid_value")
    n = check_type(body, "n", int) or 1
    if not 1 <= n <= limits["max_n"]:
        raise ApiError(400, f"'n' must be between 1 and {limits['max_n']}", "n", "invalid_value")
    seed = check_type(body, "seed", int)
    ignore_eos = bool(check_type(body, "ignore_eos", bool))  # vLLM's extension: always max_tokens tokens
    return dict(max_tokens=max_tokens, temperature=values["temperature"], top_p=values["top_p"],
                stop_texts=tuple(stop), ignore_eos=ignore_eos), n, seed


def completion_prompts(body, servable):
    """Token ids of each prompt of a /v1/completions request: a string (BOS added as the tokenizer
    adds it, unless the text starts with it), a list of strings, or a list of token ids."""
    prompt = body.get("prompt")
    tokenizer = servable.tokenizer
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if max(prompt) >= len(tokenizer) or min(prompt) < 0:
            raise ApiError(400, "'prompt' holds a token id outside the vocabulary", "prompt", "invalid_value")
        return [list(prompt)]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string, a list of strings or a list of token ids", "prompt",
                       "invalid_type")
    bos = tokenizer.bos_token
    return [tokenizer(p, add_special_tokens=adds_bos(tokenizer) and not (bos and p.startswith(bos))).input_ids
            for p in prompts]


def chat_prompt(body, servable):
    """Token ids of a chat, formatted with the run's template and ending where the answer starts."""
    messages = check_type(body, "messages", list, required=True)
    roles = ("system", "user", "assistant")
    if not messages or not all(isinstance(m, dict) and m.get("role") in roles and isinstance(m.get("content"), str)
                               for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of {role: system|user|assistant, content: string}",
                       "messages", "invalid_value")
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if turns[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must not be the assistant's", "messages", "invalid_value")
    record = {"format": "chat", "messages": turns + [{"role": "assistant", "content": ""}]}
    try:
        return encode_prompt(record, servable.tokenizer, servable.template)[0]
    except Exception as exc:  # a template that refuses the conversation (e.g. roles that must alternate)
        raise ApiError(400, f"the chat template of '{servable.name}' refuses these messages: {exc}", "messages",
                       "invalid_value") from None


def check_length(prompt_ids, max_tokens, servable, param):
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty (no tokens to continue)", param, "invalid_value")
    if len(prompt_ids) + max_tokens > servable.context_length:
        raise ApiError(400, f"This model's maximum context length is {servable.context_length} tokens; the request "
                       f"asks for {len(prompt_ids)} prompt tokens plus {max_tokens} to generate",
                       param, "context_length_exceeded")


def seeded_generator(seed, index):
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + index)
    return generator


def new_id(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(sequences):
    prompt = sum(len(s.prompt_ids) for s in sequences)
    completion = sum(s.steps for s in sequences)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def answer(chat, request_id, model, sequences):
    """The whole (not streamed) completion or chat completion object."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": s.text}, "finish_reason": s.finish_reason,
                    "logprobs": None} for i, s in enumerate(sequences)]
    else:
        choices = [{"index": i, "text": s.text, "finish_reason": s.finish_reason, "logprobs": None}
                   for i, s in enumerate(sequences)]
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(sequences)}


def chunk(chat, request_id, model, index, text, finish_reason, first=False):
    """One streamed piece: a chat.completion.chunk (the first names the role) or a text_completion."""
    if chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def model_list(servables, created):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "finetune",
                                        "kind": s.kind} for name, s in servables.items()]}
