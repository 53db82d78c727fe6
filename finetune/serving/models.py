"""What a server answers with: the base model and every finished run trained on it, loaded once.

Plain LoRA adapters (qlora's included) are loaded into one peft model over the shared base, so
that requests for any of them, and for the base itself ("__base__"), share a batch: peft applies
each row's own adapter (adapter_names=). DoRA adapters live in the same peft model but peft
cannot mix them in a batch: a batch for one of them holds only its requests. An AdaLoRA adapter
is another kind of peft model and a full fine-tune another model: each is a model of its own
(its memory: one more copy of the base), answered a batch at a time."""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finetune.data.prompts import resolve_template, stop_token_ids
from finetune.data.tokenizer import load_tokenizer
from finetune.evaluation.generation import model_stop_ids
from finetune.models import load_adapter, load_base_model
from finetune.serving.mixed_lora import stack_adapters

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Servable:
    name: str
    kind: str                 # base, lora, dora, adalora or full
    model: torch.nn.Module    # the module a batch runs on
    adapter: str | None       # the adapter's name in a shared peft model (BASE: the base), None for a model of its own
    tokenizer: object
    template: str             # the resolved prompt format: chat or alpaca
    stop_ids: list = field(default_factory=list)
    context_length: int = 2048
    stacks: dict | None = None  # the shared model's stacked LoRA weights (mixed_lora.py), and this one's row
    row: int = 0

    @property
    def mixable(self):
        """Whether requests for it can share a batch with other mixable ones of the same model."""
        return self.adapter is not None and self.kind in ("base", "lora")


def adapter_kind(trained_dir):
    """lora, dora or adalora from the adapter's config; full for a whole model."""
    config_file = Path(trained_dir) / "adapter_config.json"
    if not config_file.exists():
        return "full"
    config = json.loads(config_file.read_text())
    if config.get("peft_type") == "ADALORA":
        return "adalora"
    return "dora" if config.get("use_dora") else "lora"


def base_loader(quantization, dtype, trust_remote_code):
    """Loads the base model in full precision (dtype) or 4-bit NF4 (quantization '4bit')."""
    options = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig
        options["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return lambda path, tokenizer: load_base_model(path, tokenizer=tokenizer, **options).eval()


def servable(name, kind, model, adapter, tokenizer, template_setting):
    template = resolve_template(tokenizer, template_setting)
    config = model.config
    return Servable(name, kind, model, adapter, tokenizer, template,
                    model_stop_ids(model, stop_token_ids(tokenizer, template)),
                    getattr(config, "max_position_embeddings", None) or 2048)


def load_servables(manifest, quantization="none", dtype=torch.float32, device="cpu", runs=None):
    """{served name: Servable} of the manifest's base model (under its name) and runs (under theirs);
    runs: the names to serve (default all)."""
    options = dict(trust_remote_code=manifest.get("trust_remote_code", False))
    load = base_loader(quantization, dtype, options["trust_remote_code"])
    template = manifest.get("template", "auto")
    chosen = [run for run in manifest["runs"] if runs is None or run["name"] in runs]
    kinds = {run["name"]: adapter_kind(run["trained"]) for run in chosen}
    shared_tokenizer = load_tokenizer(chosen[0]["trained"] if chosen else manifest["path"], **options)
    shared = load(manifest["path"], shared_tokenizer).to(device)
    served, peft_model = {}, None
    for run in chosen:
        if kinds[run["name"]] not in ("lora", "dora"):
            continue
        if peft_model is None:
            from peft import PeftModel
            peft_model = PeftModel.from_pretrained(shared, run["trained"], adapter_name=run["name"])
        else:
            peft_model.load_adapter(run["trained"], adapter_name=run["name"])
        tokenizer = load_tokenizer(run["trained"], **options)
        served[run["name"]] = (kinds[run["name"]], run["name"], tokenizer)
    model = (peft_model or shared).eval()
    result = {manifest["name"]: servable(manifest["name"], "base", model, BASE if peft_model else None,
                                         shared_tokenizer, template)}
    for name, (kind, adapter, tokenizer) in served.items():
        result[name] = servable(name, kind, model, adapter, tokenizer, template)
    mixed = [name for name, (kind, _, _) in served.items() if kind == "lora"]
    stacks = stack_adapters(peft_model, mixed) if mixed else None
    for row, name in enumerate([manifest["name"], *mixed]):
        result[name].stacks, result[name].row = stacks, row
    for run in chosen:
        kind = kinds[run["name"]]
        if kind in ("adalora", "full"):
            tokenizer = load_tokenizer(run["trained"], **options)
            own = (load(run["trained"], tokenizer) if kind == "full"
                   else load_adapter(load(manifest["path"], tokenizer), run["trained"]).eval())
            result[run["name"]] = servable(run["name"], kind, own.to(device), None, tokenizer, template)
    return result

