"""Mixture-of-experts models whose experts are fused parameters, not linear layers.

transformers 5 stores the experts of Mixtral, Qwen3-MoE (and the families built like them:
OLMoE, DeepSeek-V3, GLM-4-MoE, ...) as 3-D parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), beside a router (`mlp.gate`). peft 0.21 adapts them through its
`ParamWrapper` when `target_modules` reaches them (all-linear does on these families; so do
the old per-expert names w1/w2/w3 or gate_proj/up_proj/down_proj, which peft maps onto the
fused ones). ParamWrapper takes no dropout and no DoRA, and peft has no per-layer dropout.
So a run on such a model either adapts the experts (lora or qlora with dropout 0) or
targets the attention layers only; anything else stops before any job, saying so.
AdaLoRA never adapts fused experts (peft skips them); QLoRA leaves them unquantized
(bitsandbytes quantizes linear layers only).
"""
import json

import torch

MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # a config.json of a mixture of experts


def is_mixture_of_experts(config_file):
    with open(config_file) as f:
        settings = json.load(f)
    return any(settings.get(key) for key in MOE_KEYS)


_ADAPTED = {}  # (config, targets) -> what adapted_expert_parameters found


def adapted_expert_parameters(config, target_modules, trust_remote_code=False):
    """The names of the fused expert parameters peft would adapt for these target modules (peft's own
    decision, on the model built on the meta device: no weights load); () for a model without them."""
    if not any(getattr(config, key, None) for key in MOE_KEYS):
        return ()
    targets = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    key = (config.to_json_string(), targets)
    if key not in _ADAPTED:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        lora = LoraConfig(r=8, target_modules=targets if isinstance(targets, str) else list(targets),
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        found = wrapped_parameters(get_peft_model(model, lora, low_cpu_mem_usage=True)) if has_fused_experts(model) \
            else []
        _ADAPTED[key] = tuple(found)
    return _ADAPTED[key]


def has_fused_experts(model):
    return any(parameter.ndim == 3 for parameter in model.parameters())


def wrapped_parameters(peft_model):
    """The parameters (not layers) a peft model adapts, by their names within a decoder layer's MLP:
    experts.gate_up_proj, experts.down_proj, gate.weight (the router)."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:
        return []
    names = set()
    for name, module in peft_model.named_modules():
        if isinstance(module, ParamWrapper):
            owner = name.replace(".base_layer", "").rsplit(".", 1)[-1]
            names.add(f"{owner}.{module.parameter_name}")
    return sorted(names)


def fused_expert_problem(config, method, target_modules, dropout, trust_remote_code=False):
    """Why an adapter run cannot train these targets of this model as configured, with the setting to
    change; None when it can."""
    if method not in ("lora", "qlora", "dora"):
        return None
    targets = target_modules if isinstance(target_modules, str) else tuple(target_modules)
    experts = adapted_expert_parameters(config, targets, trust_remote_code)
    if not experts:
        return None
    model = type(config).__name__.replace("Config", "")
    reached = f"target_modules {targets if isinstance(targets, str) else list(targets)} reaches the fused " \
              f"expert weights of {model} ({', '.join(experts)})"
    attention = "list target_modules without the experts, e.g. [q_proj, k_proj, v_proj, o_proj]"
    if method == "dora":
        return f"{reached}, which peft cannot train with DoRA: {attention}, or use method lora"
    if dropout:
        return f"{reached}, which peft trains only without dropout (dropout {dropout}): set dropout: 0, or {attention}"
    return None
