"""Loading a base model: the dtype a precision setting means on this device,
the checks that run before any weights load (code that is not in transformers,
adapter target modules the architecture lacks), `from_pretrained` on a local
folder or Hub id (the same path for the built tiny model and for real ones),
and a trained adapter on top of it."""
import json
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision, device):
    """'auto': bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def remote_code_problem(name_or_path, trust_remote_code):
    """Why a local model folder that ships its own Python code may not load, or None.
    (A Hub id is checked by transformers itself, which refuses it the same way.)"""
    folder = Path(name_or_path)
    shipped = {}
    for name in ("config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            shipped.update(json.loads((folder / name).read_text()).get("auto_map") or {})
    if not shipped or trust_remote_code:
        return None
    modules = sorted({str(v[0] if isinstance(v, list) else v).split(".")[0] for v in shipped.values() if v})
    return (f"{name_or_path} runs its own code ({', '.join(m + '.py' for m in modules)}), not code from "
            "transformers; read it, then set trust_remote_code: true on this base model to allow it")


def load_config(name_or_path, trust_remote_code=False):
    problem = remote_code_problem(name_or_path, trust_remote_code)
    if problem:
        raise SystemExit(problem)
    return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def adaptable_module_names(config, trust_remote_code=False):
    """Leaf names of the layers an adapter can target (linear and GPT-2 style Conv1D),
    from the architecture alone: the model is built on the meta device, no weights load."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    output_layer = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output_layer})


def missing_target_modules(target_modules, available):
    """Requested target module names that no adaptable layer of the model has."""
    if target_modules in ("all-linear", ["all-linear"]):
        return []
    return [name for name in target_modules if name not in available and name.rsplit(".", 1)[-1] not in available]


def load_base_model(name_or_path, dtype=torch.float32, attn_implementation="auto", trust_remote_code=False,
                    tokenizer=None, **options):
    """The model (attention 'auto': what transformers picks for the architecture), with room in its embeddings for every token of `tokenizer` (a pad token
    added by load_tokenizer gets a zero row: it is never attended to, trained on or generated)."""
    problem = remote_code_problem(name_or_path, trust_remote_code)
    if problem:
        raise SystemExit(problem)
    attention = None if attn_implementation == "auto" else attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attention,
                                                 trust_remote_code=trust_remote_code, **options)
    if tokenizer is not None:
        grow_embeddings_for(model, tokenizer)
    return model


def grow_embeddings_for(model, tokenizer):
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[rows:] = 0
        output = model.get_output_embeddings()
        if output is not None and output.weight.shape[0] > rows:
            output.weight[rows:] = 0


def load_adapter(base_model, adapter_dir):
    """A trained adapter on its base. AdaLoRA stores its final ranks as a rank_pattern
    keyed by parameter name, which peft applies when it loads the weights but also
    reports as keys that match no module: that warning is wrong here and is hidden."""
    from peft import PeftModel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        return PeftModel.from_pretrained(base_model, adapter_dir)
