"""Decoding a batch of requests together: left-padded prompts, one forward per new token for the
whole batch (each row with its own adapter where the model mixes them), each row with its own
sampling settings, stop tokens, stop strings and token limit. Greedy rows pick what
`model.generate` picks for the same prompt (the evaluation's generations)."""
import math
from dataclasses import dataclass, field

import torch


@dataclass
class Sequence:
    """One completion being generated; `emit(text, finish_reason)` receives its text as it grows."""
    prompt_ids: list
    max_tokens: int
    stop_ids: frozenset
    tokenizer: object
    emit: object
    temperature: float = 0.0
    top_p: float = 1.0
    stop_texts: tuple = ()
    generator: torch.Generator | None = None
    generated: list = field(default_factory=list)
    steps: int = 0
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def done(self):
        return self.finish_reason is not None or self.cancelled

    def add(self, token):
        self.steps += 1
        if token in self.stop_ids:
            return self.finish("stop")
        self.generated.append(token)
        self.text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop_texts) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.finish("stop")
        if self.steps >= self.max_tokens:
            return self.finish("length")
        held = max((len(s) - 1 for s in self.stop_texts), default=0)  # could be the start of a stop string
        safe = len(self.text) - held
        while safe > self.sent and self.text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character
            safe -= 1
        if safe > self.sent:
            self.emit(self.text[self.sent:safe], None)
            self.sent = safe

    def finish(self, reason):
        self.finish_reason = reason
        self.emit(self.text[self.sent:], reason)
        self.sent = len(self.text)


def choose_tokens(logits, sequences):
    """The next token of each row: the most likely for greedy rows, else drawn at the row's temperature
    from its top_p nucleus with its own generator."""
    chosen = logits.argmax(-1)
    for row, sequence in enumerate(sequences):
        if sequence.temperature <= 0 or sequence.done:
            continue
        probs = torch.softmax(logits[row] / sequence.temperature, -1)
        if sequence.top_p < 1:
            ordered, order = probs.sort(descending=True)
            outside = ordered.cumsum(-1) - ordered >= sequence.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(0, order[outside], 0.0)
        chosen[row] = torch.multinomial(probs, 1, generator=sequence.generator)[0]
    return chosen


@torch.no_grad()
def decode_batch(model, sequences, pad_id, suppress_ids=(), **forward_options):
    """Generate every sequence to its end; forward_options go to each forward (adapter_names=)."""
    device = next(model.parameters()).device
    width = max(len(s.prompt_ids) for s in sequences)
    input_ids = torch.tensor([[pad_id] * (width - len(s.prompt_ids)) + s.prompt_ids for s in sequences], device=device)
    mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in sequences],
                        device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = {}
    for _ in range(max(s.max_tokens for s in sequences)):
        output = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache,
                       **forward_options)
        name = "cache" if "cache" in output.keys() else "past_key_values"  # renamed in transformers 5.x
        cache = {name: output[name]}
        logits = output.logits[:, -1].float()
        if suppress_ids:
            logits[:, list(suppress_ids)] = -math.inf
        tokens = choose_tokens(logits, sequences)
        for sequence, token in zip(sequences, tokens.tolist()):
            if not sequence.done:
                sequence.add(token)
        if all(s.done for s in sequences):
            break
        input_ids = tokens[:, None]
        mask = torch.cat([mask, mask.new_ones(len(sequences), 1)], dim=1)
        positions = positions[:, -1:] + 1
    for sequence in sequences:  # a cancelled request is closed here
        if sequence.finish_reason is None:
            sequence.finish("length")
