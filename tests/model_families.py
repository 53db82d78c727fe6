"""Tiny random-init models of real architecture families, each with a tokenizer
that has the family's special tokens and a copy of its chat template, built
offline for the matrix tests. The templates follow the families' own (ChatML,
Llama 3 headers, Mistral [INST], Gemma <start_of_turn>, Phi-3), with
`{% generation %}` markers added so transformers can report which tokens are
the assistant's: the masks the workflow builds are checked against them.
Special tokens and pads are set the way the real tokenizers set them: Llama 3
has no pad token, Mistral pads with nothing but has <unk>, Phi-3 pads with
its EOS, GPT-2 has one token for BOS, EOS and unknown and no chat template."""
import json
from dataclasses import dataclass, field

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from conftest import REPO

LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>"
          "{% endgeneration %}{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
          "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
          "{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Mistral v0.1: no system role, strictly alternating turns, no generation prompt of its own.
MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}"
           "{% endgeneration %}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
           "{% endif %}{% endfor %}")

# Gemma 2: no system role; the assistant is 'model'; turns end with <end_of_turn>, which is not EOS.
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}"
         "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if message['role'] == 'assistant' %}<start_of_turn>model\n{% generation %}{{ message['content'] | trim }}"
         "<end_of_turn>{% endgeneration %}\n{% else %}<start_of_turn>{{ message['role'] }}\n"
         "{{ message['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

# Phi-3: turns end with <|end|>; a conversation rendered without a generation prompt ends with EOS.
PHI3 = ("{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|>\n{% generation %}"
        "{{ message['content'] }}<|end|>{% endgeneration %}\n{% else %}<|{{ message['role'] }}|>\n"
        "{{ message['content'] }}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}")


# Variants served by the same tokenizers: Qwen3's template shows an (empty) reasoning block on
# the turns after the last user turn only, so earlier turns render differently once later ones
# follow; Llama 2's puts a space before each answer and before its EOS, and drops system turns.
QWEN3 = ("{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
         "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
         "{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
         "{% generation %}{% if loop.index0 > ns.last_user %}<think>\n\n</think>\n\n{% endif %}"
         "{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
         "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAMA2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
          "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{% generation %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endgeneration %}{% endif %}{% endfor %}")


@dataclass
class Family:
    config_class: str
    tokens: dict                 # bos/eos/pad/unk token strings (None: the tokenizer has none)
    specials: list               # further special tokens of the family
    template: str | None
    adds_bos: bool
    end_of_turn: str             # what closes an assistant turn (and must stop generation)
    config: dict = field(default_factory=dict)


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

FAMILIES = {
    "llama": Family("LlamaConfig", dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None),
                    ["<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>",
                     "<|reserved_special_token_0|>"], LLAMA3, True, "<|eot_id|>", SMALL),
    "qwen2": Family("Qwen2Config", dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None),
                    ["<|im_start|>"], CHATML, False, "<|im_end|>", {**SMALL, "tie_word_embeddings": True}),
    "mistral": Family("MistralConfig", dict(bos="<s>", eos="</s>", pad=None, unk="<unk>"), ["[INST]", "[/INST]"],
                      MISTRAL, True, "</s>", {**SMALL, "sliding_window": None}),
    "gemma": Family("Gemma2Config", dict(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>"),
                    ["<start_of_turn>", "<end_of_turn>"], GEMMA, True, "<end_of_turn>", {**SMALL, "head_dim": 16}),
    "phi3": Family("Phi3Config", dict(bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>"),
                   ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], PHI3, False, "<|end|>", SMALL),
    "gpt2": Family("GPT2Config", dict(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk="<|endoftext|>"), [],
                   None, False, "<|endoftext|>", dict(n_embd=64, n_layer=2, n_head=4)),
    "qwen2_moe": Family("Qwen2MoeConfig", dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None),
                        ["<|im_start|>"], CHATML, False, "<|im_end|>",
                        {**SMALL, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                         "shared_expert_intermediate_size": 64, "tie_word_embeddings": True}),
    # Experts stored as fused 3-D parameters in transformers 5 (peft adapts them through ParamWrapper).
    "mixtral": Family("MixtralConfig", dict(bos="<s>", eos="</s>", pad=None, unk="<unk>"), ["[INST]", "[/INST]"],
                      MISTRAL, True, "</s>", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2,
                                               "sliding_window": None}),
    "qwen3_moe": Family("Qwen3MoeConfig", dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None),
                        ["<|im_start|>"], CHATML, False, "<|im_end|>",
                        {**SMALL, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                         "decoder_sparse_step": 1, "mlp_only_layers": [], "head_dim": 16, "tie_word_embeddings": True}),
}


def corpus_texts(limit=600):
    with open(REPO / "data" / "word_tasks.jsonl", encoding="utf-8") as f:
        for _, line in zip(range(limit), f):
            record = json.loads(line)
            yield "\n".join([record["instruction"], record.get("input", ""), record["output"]])


def build_tokenizer(family):
    specials = list(dict.fromkeys(t for t in family.tokens.values() if t)) + family.specials
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus_texts(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if family.adds_bos:
        bos = family.tokens["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    named = {f"{role}_token": token for role, token in family.tokens.items() if token}
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=family.template,
                                   additional_special_tokens=family.specials, model_max_length=512, **named)


def build_family_model(name, folder):
    """Save a tiny random-init model of the family and its tokenizer in `folder`; return it."""
    family = FAMILIES[name]
    tokenizer = build_tokenizer(family)
    ids = {f"{role}_token_id": tokenizer.convert_tokens_to_ids(token) if token else None
           for role, token in family.tokens.items() if role != "unk"}
    config = getattr(transformers, family.config_class)(vocab_size=len(tokenizer), **ids, **family.config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"], pad_token_id=ids["pad_token_id"],
        eos_token_id=sorted({ids["eos_token_id"], tokenizer.convert_tokens_to_ids(family.end_of_turn)}))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
