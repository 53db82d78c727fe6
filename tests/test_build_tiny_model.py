import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tokenizer_has_distinct_special_tokens(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3, "bos, eos and pad must be three different tokens"


def test_tokenizer_adds_bos_once_and_never_eos(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = tokenizer("Sort these words alphabetically.").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids


def test_chat_template_ends_assistant_turns_with_eos(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    messages = [{"role": "user", "content": "What is the first word?\n\nred blue"},
                {"role": "assistant", "content": "red"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<s><|user|>\nWhat is the first word?\n\nred blue\n<|assistant|>\nred</s>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>\n")


def test_model_reloads_through_from_pretrained_and_generates(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.model_type == "llama"
    assert model.config.pad_token_id == tokenizer.pad_token_id != model.config.eos_token_id
    inputs = tokenizer("Add the two numbers.", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
