"""Checks a training run passes before anything heavy loads: whether this hardware
can run its settings (flash-attention, fp16, paged optimizers, bitsandbytes), and
whether the base model's code may run and has the layers the adapter targets (and,
for fused mixture-of-experts weights, whether peft can train them as configured)."""
import importlib.util
import sys

import torch

from finetune.models import adaptable_module_names, load_config, missing_target_modules
from finetune.training.experts import fused_expert_problem


def hardware_problems(settings, device, precision):
    """Why this run (its train settings) cannot train here, found before anything heavy is loaded."""
    problems = []
    cuda = device.type == "cuda"
    quantization = quantization_of(settings)
    if settings.attn_implementation == "flash_attention_2":
        if not cuda:
            problems.append("attn_implementation flash_attention_2 needs a CUDA GPU")
        elif importlib.util.find_spec("flash_attn") is None:
            problems.append("attn_implementation flash_attention_2 needs the flash-attn package (pip install flash-attn)")
    if precision == "fp16" and not cuda:
        problems.append("precision fp16 needs a CUDA GPU (use fp32 or bf16 on CPU)")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        problems.append("precision bf16 is not supported by this GPU (use fp16)")
    if settings.optimizer.startswith("paged_") and not cuda:
        problems.append(f"optimizer {settings.optimizer} pages optimizer state between GPU and CPU and needs a CUDA GPU")
    if settings.method == "dora" and quantization == "8bit" and not cuda:
        problems.append("DoRA on an 8bit base fails inside bitsandbytes on CPU (DoRA reads the int8 weights, which "
                        "then lose their scales); use quantization 4bit, method lora, or a GPU")
    needs_bnb = quantization != "none" or settings.optimizer != "adamw"
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"method {settings.method} with quantization {quantization} and optimizer "
                        f"{settings.optimizer} needs bitsandbytes (pip install bitsandbytes)")
    return problems


def quantization_of(settings):
    """How the base is loaded: qlora is lora on a 4bit base."""
    return "4bit" if settings.method == "qlora" else settings.quantization


def check_architecture(base_model, settings, run_name):
    """Stop before any weights load when the model's code may not run or it lacks the adapter's target modules."""
    config = load_config(base_model, settings.trust_remote_code)
    if settings.method == "full":
        return
    available = adaptable_module_names(config, settings.trust_remote_code)
    missing = missing_target_modules(settings.target_modules, available)
    if missing:
        sys.exit(f"[{run_name}] target_modules {', '.join(missing)}: {type(config).__name__.replace('Config', '')} "
                 f"models have no such layer. Their adaptable layers are: {', '.join(available)} "
                 "(or use all-linear)")
    problem = fused_expert_problem(config, settings.method, settings.target_modules, settings.dropout,
                                   settings.trust_remote_code)
    if problem:
        sys.exit(f"[{run_name}] {problem}")
