"""Loading a base model: the dtype a precision setting means on this device, and
`from_pretrained` on a local folder or Hub id (the same path for the built tiny
model and for real ones)."""
import torch
from transformers import AutoModelForCausalLM

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
