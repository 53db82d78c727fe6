"""An Ollama Modelfile for a run's GGUF file: FROM the file, the chat template in Ollama's Go template
language (for the shapes this knows: ChatML, Llama 3 headers, Mistral [INST] and the tiny model's
<|role|> turns), the tokens that end a turn as stop parameters, and greedy decoding (as the workflow
evaluates). A template of another shape passes the prompt as it is, and says so."""
import json
from pathlib import Path

# Each renders what the chat template renders for a conversation and its generation prompt (BOS aside:
# llama.cpp prepends it as the file's tokenizer.ggml.add_bos_token says). EOS: the tokenizer's EOS.
TEMPLATES = {
    "<|im_start|>": "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                    "<|im_start|>assistant\n",
    "<|start_header_id|>": "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                           "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    "[INST]": '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
              '{{ else if eq .Role "assistant" }}{{ .Content }}EOS{{ end }}{{ end }}',
    "<|{{ message['role'] }}|>": '{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}'
                                 '{{ if eq .Role "assistant" }}EOS{{ else }}\n{{ end }}{{ end }}<|assistant|>\n',
}


def go_template(chat_template, eos):
    """Ollama's TEMPLATE for a chat template of a known shape, or None."""
    for marker, template in TEMPLATES.items():
        if chat_template and marker in chat_template:
            return template.replace("EOS", eos or "")
    return None


def stop_tokens(tokenizer, model_dir):
    """The tokens that end an answer: EOS, and every token generation_config.json stops at (an end-of-turn
    token that is not EOS, such as <|eot_id|> or <|im_end|>)."""
    ids = [tokenizer.eos_token_id]
    config_file = Path(model_dir) / "generation_config.json"
    if config_file.is_file():
        eos = json.loads(config_file.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    return list(dict.fromkeys(tokenizer.convert_ids_to_tokens(i) for i in ids if i is not None))


def modelfile(gguf_name, tokenizer, model_dir, run_name):
    template = go_template(tokenizer.chat_template, tokenizer.eos_token)
    lines = [f"# Ollama Modelfile of the run {run_name}: ollama create {run_name} -f Modelfile", f"FROM ./{gguf_name}"]
    if template is None:
        lines += ["# The chat template could not be translated into Ollama's template language: the prompt is",
                  "# passed as it is (format it as the model's chat template would).", 'TEMPLATE """{{ .Prompt }}"""']
    else:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(token)}" for token in stop_tokens(tokenizer, model_dir)]
    return "\n".join(lines + ["PARAMETER temperature 0", ""])
