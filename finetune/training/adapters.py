"""The model a training run starts from: the base, loaded whole or quantized by
bitsandbytes (4-bit NF4 or 8-bit), the peft configuration of its adapter, and its
optimizer. `settings` is the train stage's (finetune.settings)."""
import math

import torch
from peft import AdaLoraConfig, LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from finetune.models import DTYPES, grow_embeddings_for, load_base_model, load_config
from finetune.training.preflight import quantization_of


def load_model(base_model, settings, precision, accelerator, tokenizer, empty=False):
    """Full fine-tuning keeps fp32 master weights (mixed precision casts the compute);
    adapter methods train small fp32 adapters on a base stored in the compute dtype.
    Under FSDP the 4-bit weights are stored in that float dtype (bnb_4bit_quant_storage),
    which FSDP can split like any other weight; bitsandbytes' default uint8 it cannot."""
    dtype = torch.float32 if settings.method == "full" else DTYPES[precision]
    common = dict(dtype=dtype, attn_implementation=settings.attn_implementation,
                  trust_remote_code=settings.trust_remote_code, tokenizer=tokenizer)
    if quantization_of(settings) == "none":
        return empty_model(base_model, **common) if empty else load_base_model(base_model, **common)
    if quantization_of(settings) == "4bit":
        storage = dtype if settings.distributed == "fsdp" else torch.uint8
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=storage)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    model = load_base_model(base_model, quantization_config=quantization, device_map={"": accelerator.device},
                            **common)
    keep_4bit_weights_trainable(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def empty_model(name_or_path, dtype, attn_implementation, trust_remote_code, tokenizer):
    """The base model's structure without its weights (on the meta device), for the processes
    of a sharded run that receive their shards from the first process instead of reading them."""
    config = load_config(name_or_path, trust_remote_code)
    attention = None if attn_implementation == "auto" else attn_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention,
                                                 trust_remote_code=trust_remote_code)
        grow_embeddings_for(model, tokenizer)
    return model


def keep_4bit_weights_trainable(model):
    """bitsandbytes repacks a 4-bit layer's weights for its CPU inference kernel the first time
    the layer runs in eval mode without gradients (a held-out loss, samples), and keeps them so:
    that kernel passes no gradient back through the base, which silently changes what every
    later step learns (or fails on layers with a bias). Training never wants the repacking."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def adalora_schedule(total_steps):
    """AdaLoRA's warmup (tinit), final fine-tuning (tfinal) and reallocation interval,
    leaving a non-empty budget-allocation phase however short the run."""
    tinit = total_steps // 10
    tfinal = total_steps // 5
    if total_steps - tfinal - tinit < 1:
        tinit, tfinal = 0, max(total_steps - 1, 0) // 2
    return tinit, tfinal, max(1, (total_steps - tinit - tfinal) // 10)


def peft_config(settings, total_steps):
    common = dict(lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=settings.target_modules,
                  bias=settings.bias, use_rslora=settings.use_rslora, task_type="CAUSAL_LM")
    if settings.method == "adalora":
        tinit, tfinal, delta_t = adalora_schedule(total_steps)
        return AdaLoraConfig(target_r=settings.r, init_r=settings.adalora_init_r or math.ceil(1.5 * settings.r),
                             tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total_steps, **common)
    return LoraConfig(r=settings.r, use_dora=settings.method == "dora", **common)


def make_optimizer(settings, parameters):
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    import bitsandbytes as bnb
    optimizer_class = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
                       "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[settings.optimizer]
    return optimizer_class(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
