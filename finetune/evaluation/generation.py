"""Generating answers for evaluation: generation prompts formatted exactly like
the training prefix, the records to generate for (configured prompts and a
fixed sample of held-out records), and batched, seeded, left-padded decoding."""
import torch

from finetune.data.prompts import adds_bos, as_messages, assemble, format_segments
from finetune.files import read_jsonl


def completion_halves(text):
    """A completion record is evaluated on continuing its text: (the first half, up to a
    space near the middle, as the prompt; the rest as the reference)."""
    middle = len(text) // 2
    cut = text.rfind(" ", 0, middle + 1)
    cut = cut if cut > 0 else middle
    return text[:cut], text[cut:]


def reference_answer(record):
    if record["format"] == "completion":
        return completion_halves(record["text"])[1].strip()
    return as_messages(record)[-1]["content"]


def question(record):
    """What a record asks, as a reader would put it (the last user turn, without the template)."""
    if record["format"] == "completion":
        return completion_halves(record["text"])[0]
    users = [m["content"] for m in as_messages(record) if m["role"] == "user"]
    return users[-1] if users else ""


def encode_prompt(record, tokenizer, template):
    """Prompt ids for generation (everything before the last target) and the reference answer."""
    if record["format"] == "completion":
        segments = [(completion_halves(record["text"])[0], False), ("", True)]
    else:
        segments = format_segments(record, tokenizer, template)
    last_target = max(i for i, (_, is_target) in enumerate(segments) if is_target)
    pieces = [(tokenizer(text, add_special_tokens=False).input_ids, False) for text, _ in segments[:last_target]]
    input_ids, _ = assemble(pieces, tokenizer.bos_token_id, tokenizer.eos_token_id, adds_bos(tokenizer),
                            append_eos=False)
    return input_ids, reference_answer(record)


def prompt_records(prompts):
    """Configured prompts as normalized records: a string is an instruction, a dict an alpaca or chat record."""
    records = []
    for prompt in prompts:
        if isinstance(prompt, str):
            prompt = {"instruction": prompt}
        if "messages" in prompt:
            messages = list(prompt["messages"])
            if messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            records.append({"format": "chat", "messages": messages})
        else:
            records.append({"format": "alpaca", "instruction": prompt["instruction"], "input": prompt.get("input", ""),
                            "output": prompt.get("output", "")})
    return records


def heldout_records(record_files, heldout_ids, count):
    """The first `count` held-out records, in a stable order (by id)."""
    wanted, records = set(sorted(heldout_ids)[:count]), {}
    for path in record_files:
        records.update((r["id"], r) for r in read_jsonl(path) if r["id"] in wanted)
    return [records[record_id] for record_id in sorted(records)]


def model_stop_ids(model, stop_ids):
    """The answer-ending tokens and those the model's generation config names (a list or one id)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted(set(stop_ids) | {i for i in configured if i is not None})


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, top_p, seed, stop_ids,
             synced_processes=False):
    """Completions of tokenized prompts, batched with left padding, ending at any of
    `stop_ids` (see prompts.stop_token_ids); the pad token is never generated.
    synced_processes: every process runs this together (a model sharded by FSDP), and
    each keeps stepping until all have finished."""
    stops = model_stop_ids(model, stop_ids)
    suppress = [tokenizer.pad_token_id] if tokenizer.pad_token_id not in stops else None
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk], device=model.device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
        # Seeded sampling that leaves the caller's random state alone (training draws dropout from it).
        with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
            torch.manual_seed(seed)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stops,
                suppress_tokens=suppress,
                synced_gpus=synced_processes,
            )
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [o.strip() for o in outputs]
