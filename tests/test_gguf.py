"""GGUF export: files that read back with gguf-py's GGUFReader (metadata, every tensor's name, shape,
type and values, the vocabulary), llama.cpp's Q/K permutation, refusals that name the run, the family and
what is supported, before any job and with nothing half-written; and, where llama-cpp-python is
installed, llama.cpp's next-token logits and greedy text against the transformers model's."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import gguf_export
from conftest import settings_args
from finetune.config import gguf_problems
from finetune.export.gguf import GENERATION_MARKERS, problem, unpermute
from model_families import FAMILIES, build_family_model
from workflow import copy_workflow, dry_run_jobs, snakemake

# transformers' module names -> llama.cpp's tensor names, written out here rather than taken from gguf-py.
BLOCK_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
# Largest |difference| of a weight read back from the file, relative to the tensor's largest |value|.
WEIGHT_TOLERANCE = {"f16": 1e-3, "q8_0": 1e-2, "q4_0": 0.15}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    """{family: model folder}: the workflow's tiny Llama and tiny random models of three families."""
    built = {"tiny": tiny_model}
    for name in ("llama", "mistral", "qwen2"):
        built[name] = build_family_model(name, tmp_path_factory.mktemp(name))
    weights = load_file(str(built["qwen2"] / "model.safetensors"))  # Qwen2's q/k/v biases start at zero
    generator = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(tensor.shape, generator=generator) * 0.1 if name.endswith(".bias") else tensor
               for name, tensor in weights.items()}, str(built["qwen2"] / "model.safetensors"),
              metadata={"format": "pt"})
    return built


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """{family: the gguf folder} written by the stage script, every type."""
    folders = {}
    for family, model in models.items():
        out = tmp_path_factory.mktemp(f"gguf-{family}")
        gguf_export.main(["--model", str(model), "--run-name", f"run-{family}", "--output-dir", str(out / "gguf"),
                          *settings_args(out, "gguf_export", gguf=["f16", "q8_0", "q4_0"])])
        folders[family] = out / "gguf"
    return folders


def hf_tensors(model):
    """{llama.cpp name: transformers weight} of a model folder."""
    weights = load_file(str(model / "model.safetensors"))
    named = {}
    for name, tensor in weights.items():
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            module, kind = ".".join(parts[3:-1]), parts[-1]
            named[f"blk.{parts[2]}.{BLOCK_TENSORS[module]}.{kind}"] = tensor.float().numpy()
        else:
            named[TOP_TENSORS[name]] = tensor.float().numpy()
    return named


def read_field(reader, key):
    return reader.fields[key].contents()


def expected_type(name, shape, kind):
    if len(shape) == 1:
        return GGMLQuantizationType.F32
    if kind == "f16":
        return GGMLQuantizationType.F16
    wide = kind == "q8_0" or name in ("token_embd.weight", "output.weight")
    return GGMLQuantizationType.Q8_0 if wide else GGMLQuantizationType.Q4_0


@pytest.mark.parametrize("family", ["tiny", "llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_every_tensor_reads_back_with_its_name_shape_type_and_values(models, exported, family, kind):
    """Every transformers weight is in the file under llama.cpp's name, its shape in ggml's order, norms F32,
    and its values (Llama's Q and K rows in llama.cpp's order: un-permuted they are the transformers weight)."""
    config = json.loads((models[family] / "config.json").read_text())
    reader = GGUFReader(exported[family] / f"run-{family}-{kind}.gguf")
    expected = hf_tensors(models[family])
    if config.get("tie_word_embeddings"):
        assert "output.weight" not in expected  # llama.cpp reuses token_embd
    assert sorted(t.name for t in reader.tensors) == sorted(expected)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for tensor in reader.tensors:
        weight = expected[tensor.name]
        assert list(tensor.shape) == list(reversed(weight.shape)), tensor.name
        assert tensor.tensor_type == expected_type(tensor.name, weight.shape, kind), tensor.name
        data = dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape).astype(np.float32)
        role = tensor.name.split(".")[-2]
        if config["model_type"] != "qwen2" and role in heads:
            assert not np.allclose(data, weight, atol=1e-2), f"{tensor.name} is not permuted"
            data = unpermute(data, heads[role])
        error = np.abs(data - weight).max() / np.abs(weight).max()
        assert error < WEIGHT_TOLERANCE[kind], f"{tensor.name}: {error}"


@pytest.mark.parametrize("family", ["tiny", "llama", "mistral", "qwen2"])
def test_metadata_and_vocabulary_are_the_models(models, exported, family):
    config = json.loads((models[family] / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(models[family])
    reader = GGUFReader(exported[family] / f"run-{family}-f16.gguf")
    arch = "qwen2" if family == "qwen2" else "llama"
    assert read_field(reader, "general.architecture") == arch
    assert read_field(reader, "general.name") == f"run-{family}"
    for key, value in [("block_count", config["num_hidden_layers"]), ("embedding_length", config["hidden_size"]),
                       ("feed_forward_length", config["intermediate_size"]),
                       ("attention.head_count", config["num_attention_heads"]),
                       ("attention.head_count_kv", config["num_key_value_heads"]),
                       ("context_length", config["max_position_embeddings"])]:
        assert read_field(reader, f"{arch}.{key}") == value, key
    assert read_field(reader, f"{arch}.rope.freq_base") == pytest.approx(config["rope_parameters"]["rope_theta"])
    assert read_field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    tokens = read_field(reader, "tokenizer.ggml.tokens")
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = read_field(reader, "tokenizer.ggml.token_type")
    special = set(tokenizer.all_special_ids)
    assert {i for i, t in enumerate(types) if t == TokenType.CONTROL} == special
    assert all(t == TokenType.NORMAL for i, t in enumerate(types) if i not in special)
    assert read_field(reader, "tokenizer.ggml.model") == "gpt2" and read_field(reader, "tokenizer.ggml.pre") == "gpt-2"
    merges = json.loads((models[family] / "tokenizer.json").read_text())["model"]["merges"]
    assert read_field(reader, "tokenizer.ggml.merges") == [" ".join(pair) for pair in merges]
    for role in ("bos", "eos", "padding", "unknown"):
        token_id = getattr(tokenizer, f"{ {'padding': 'pad', 'unknown': 'unk'}.get(role, role)}_token_id")
        key = f"tokenizer.ggml.{role}_token_id"
        assert (read_field(reader, key) if key in reader.fields else None) == token_id, role
    adds_bos = FAMILIES["llama" if family == "tiny" else family].adds_bos
    assert read_field(reader, "tokenizer.ggml.add_bos_token") is adds_bos
    assert read_field(reader, "tokenizer.chat_template") == GENERATION_MARKERS.sub("", tokenizer.chat_template)
    assert "{% generation %}" not in read_field(reader, "tokenizer.chat_template")


@pytest.mark.parametrize("family, template, stops", [
    ("tiny", "<|assistant|>", ["</s>"]), ("llama", "<|start_header_id|>", ["<|eot_id|>"]),
    ("mistral", "[INST]", ["</s>"]), ("qwen2", "<|im_start|>", ["<|im_end|>"])])
def test_the_modelfile_names_the_file_its_template_and_stop_tokens(exported, family, template, stops):
    modelfile = (exported[family] / "Modelfile").read_text()
    assert f"FROM ./run-{family}-f16.gguf\n" in modelfile
    assert 'TEMPLATE """' in modelfile and template in modelfile and "{{ .Prompt }}" not in modelfile
    assert [line.split(" ", 2)[2] for line in modelfile.splitlines() if line.startswith("PARAMETER stop")] == \
        [json.dumps(stop) for stop in stops]
    assert "PARAMETER temperature 0" in modelfile
    assert sorted(p.name for p in exported[family].iterdir()) == sorted(
        ["Modelfile"] + [f"run-{family}-{kind}.gguf" for kind in ("f16", "q8_0", "q4_0")])


def config_only(folder, model_type):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


@pytest.mark.parametrize("model_type", ["gemma2", "gpt2", "phi3"])
def test_other_families_are_refused_naming_run_family_and_what_is_supported(tmp_path, model_type, models):
    """Refused before anything is written: by the stage (the folder never appears) and by the config check."""
    folder = tmp_path / "model"
    shutil.copytree(models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    message = f"family {model_type} cannot be written as GGUF (supported: llama, mistral, qwen2)"
    with pytest.raises(ValueError, match="run 'r1': .*" + re.escape(message)):
        gguf_export.export(folder, tmp_path / "gguf", "r1", ["f16"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    config = {"base_models": {"other": {"name_or_path": str(folder)}}}
    run = {"gguf": ["q8_0"], "method": "lora", "merge": True, "base_model": "other"}
    assert gguf_problems(config, run) == [f"base model 'other' ({folder}): {message}"]


def test_a_tokenizer_gguf_cannot_hold_and_a_run_without_its_merge_are_refused(tmp_path, models):
    folder = shutil.copytree(models["mistral"], tmp_path / "spm")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert "SentencePiece-style BPE (byte fallback)" in problem(folder)
    assert "byte-level BPE tokenizers" in problem(folder)
    assert problem(models["qwen2"]) is None and problem(models["tiny"]) is None
    run = {"gguf": ["f16"], "method": "lora", "merge": False, "base_model": "tiny"}
    assert gguf_problems({"base_models": {"tiny": {"build_tiny": {}}}}, run) == [
        "gguf is written from the merged model, but merge is false (set merge: true)"]


def test_a_failed_write_leaves_no_folder(tmp_path, models, monkeypatch):
    """The second file fails after the first was written: neither it nor the folder remains."""
    import finetune.export.gguf as writer

    original = writer.stored

    def stored(name, data, kind):
        if kind == "q8_0":
            raise RuntimeError("disk full")
        return original(name, data, kind)

    monkeypatch.setattr(writer, "stored", stored)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_export.export(models["tiny"], tmp_path / "gguf", "r1", ["f16", "q8_0"])
    assert list(tmp_path.iterdir()) == []


def test_the_workflow_plans_the_gguf_job_and_refuses_an_unsupported_base_before_any_job(tmp_path, models):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "gguf.yaml").write_text("runs:\n  lora-r16:\n    gguf: [f16, q8_0]\n"
                                       "    hub: {repo_id: me/tiny, what: gguf}\n")
    jobs = dry_run_jobs(workdir, "--configfile", "gguf.yaml", env={"HF_TOKEN": "hf_dummy"})
    (gguf_inputs, gguf_shell), = [(inputs, shell) for rule, inputs, shell in jobs if rule == "gguf"]
    assert "results/runs/lora-r16/merged_weights" in gguf_inputs and "--run-name lora-r16" in gguf_shell
    assert "scripts/gguf_export.py" in gguf_inputs and "finetune/export/gguf.py" in gguf_inputs
    (upload_inputs,) = [inputs for rule, inputs, _ in jobs if rule == "upload"]
    assert "results/runs/lora-r16/gguf" in upload_inputs
    other = shutil.copytree(models["llama"], tmp_path / "other")
    (other / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()),
                                                    "model_type": "phi3"}))
    (workdir / "bad.yaml").write_text(f"base_models:\n  other: {{name_or_path: {other}}}\n"
                                      "runs:\n  lora-r16:\n    base_model: other\n    gguf: [q4_0]\n")
    result = snakemake(workdir, "-n", "--configfile", "bad.yaml", check=False)
    assert result.returncode != 0
    assert "run 'lora-r16'" in result.stderr + result.stdout
    assert "family phi3 cannot be written as GGUF (supported: llama, mistral, qwen2)" in result.stderr + result.stdout


def test_the_model_card_of_the_merged_model_lists_the_gguf_files():
    from finetune.export.model_card import render

    evaluation = {"eval_records": 4, "eval_tokens": 9, "base": {"loss": 2.0}, "tuned": {"loss": 1.0}}
    summary = {"trainable_parameters": 1, "total_parameters": 2, "steps": 3, "wall_time_s": 1.0, "processes": 1}
    stats = [{"file": "data/a.jsonl", "records": 1, "rejected": 0, "duplicates": 0}]
    settings = {"method": "lora", "gguf": ["q8_0", "f16"]}
    card = render("merged", "r8", "base", settings, summary, evaluation, stats)
    assert "## GGUF" in card and "`r8-q8_0.gguf`, `r8-f16.gguf`" in card and "FROM `r8-q8_0.gguf`" in card
    assert "ollama create r8 -f Modelfile" in card
    assert "## GGUF" not in render("adapter", "r8", "base", settings, summary, evaluation, stats)
    assert "## GGUF" not in render("merged", "r8", "base", {"method": "lora"}, summary, evaluation, stats)


try:
    import llama_cpp
except ImportError:  # CI has no llama-cpp-python: the tests that run llama.cpp skip
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed")
PROMPTS = ["What is the first word?\nList: tiger ocean maple river", "Which number is larger? 17 or 41",
           "count the words: apple stone cloud"]
# Largest |llama.cpp logit - transformers fp32 logit| allowed, over every position of every prompt; measured
# (docs/using.md): f16 files differ by f16 rounding of the weights, q8_0 files by their quantization.
# The largest |logit difference| against the fp32 transformers model, as a share of the largest |logit|
# (measured on these random-weight models: f16 4.5e-4 to 1.8e-3, q8_0 7e-3 to 5.4e-2; docs/using.md).
LOGIT_TOLERANCE = {"f16": 5e-3, "q8_0": 0.1}


def chat_prompt(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def llama_cpp_run(path, ids, new_tokens):
    """llama.cpp's logits at every position of `ids`, and its greedy continuation (token ids)."""
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    model.eval(ids)
    logits = np.array(model.scores[:len(ids)])
    generated = []
    for _ in range(new_tokens):
        generated.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        if generated[-1] == model.token_eos():
            break
        model.eval(generated[-1:])
    return model, logits, generated


@needs_llama_cpp
@pytest.mark.parametrize("family", ["tiny", "llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_llama_cpp_gives_the_models_logits_and_greedy_text(models, exported, family, kind):
    """llama.cpp tokenizes plain and chat-formatted prompts as transformers does, its next-token logits at
    every position equal the fp32 transformers model's within the tolerance, and (f16) its greedy answer is
    the same text."""
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(models[family])
    hf_model = AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32).eval()
    path = exported[family] / f"run-{family}-{kind}.gguf"
    for text in PROMPTS + [chat_prompt(tokenizer, PROMPTS[0])]:
        chat = text not in PROMPTS
        ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
        model, logits, generated = llama_cpp_run(path, ids, 8)
        assert model.tokenize(text.encode(), add_bos=not chat, special=True) == ids, text
        with torch.no_grad():
            expected = hf_model(torch.tensor([ids])).logits[0].numpy()
            greedy = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                       eos_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
        difference, scale = np.abs(logits - expected).max(), np.abs(expected).max()
        print(f"{family} {kind} {text[:20]!r}: max |logit difference| {difference:.2e}, logits up to "
              f"{scale:.2f} (relative {difference / scale:.1e})")
        assert difference < LOGIT_TOLERANCE[kind] * scale, (family, kind, text, difference, scale)
        if kind == "f16":
            assert generated == greedy[:len(generated)] and len(generated) == len(greedy), text
            text_of = tokenizer.decode(greedy, skip_special_tokens=True)
            # random weights pick byte tokens that need not make whole UTF-8 characters
            assert model.detokenize(generated).decode(errors="replace") == text_of, text
