"""The embedded tiny base model, built offline: weights in Llama's standard random
initialization, a byte-level BPE tokenizer trained on the text of a corpus of records (JSONL),
a chat template, and distinct bos/eos/pad tokens. It is saved with save_pretrained, so every
later stage loads it through the same from_pretrained path as a real model; the workflow then
pretrains it on the same corpus (the train stage, method full)."""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from finetune.files import read_jsonl, save_pretrained_atomically

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# Each turn is "<|role|>\n{content}"; an assistant turn ends with EOS, which is
# what the model must learn to emit so that generation stops. The generation
# markers let `apply_chat_template(..., return_assistant_tokens_mask=True)`
# (and TRL's assistant-only loss) find the assistant tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def record_texts(paths):
    """The text of every record in JSONL files of any format (completion, alpaca or chat)."""
    for path in paths:
        for record in read_jsonl(path):
            if "text" in record:
                yield record["text"]
            elif "messages" in record:
                yield "\n".join(message["content"] for message in record["messages"])
            else:
                yield "\n".join(record.get(field, "") for field in ("instruction", "input", "output"))


def train_tokenizer(corpus_files, vocab_size):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(record_texts(corpus_files), trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Like Llama tokenizers: encoding with special tokens prepends BOS, never EOS.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        padding_side="right",
    )


def build_model(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, initializer_range,
                seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def build_tiny_model(corpus_files, output_dir, vocab_size=1024, hidden_size=128, num_layers=2,
                     num_heads=4, num_kv_heads=2, intermediate_size=0, initializer_range=0.02, seed=0):
    tokenizer = train_tokenizer(corpus_files, vocab_size)
    model = build_model(tokenizer, hidden_size, num_layers, num_heads, num_kv_heads,
                        intermediate_size or 4 * hidden_size, initializer_range, seed)
    return save_pretrained_atomically(output_dir, model, tokenizer)
