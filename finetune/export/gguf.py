"""A GGUF file (llama.cpp, Ollama) of a merged or fully fine-tuned model folder, written with gguf-py:
the architecture's metadata, the tokenizer (byte-level BPE: tokens, token types, merges, special
tokens, whether BOS is prepended, the chat template) and the tensors under llama.cpp's names, in
f16, bf16, q8_0 or q4_0. `problem(model_dir)` says, before anything is written, why a folder cannot
be written (its family, its tokenizer), or None."""
import json
import re
from pathlib import Path

import numpy as np

# config.json's model_type -> llama.cpp's architecture. Mistral (without sliding windows) is Llama.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# The architectures whose rotary embedding llama.cpp applies to interleaved pairs: their Q and K rows
# are reordered from transformers' two halves (Qwen2's NEOX rotation takes the halves as they are).
PERMUTED = {"llama"}
# Byte-level BPE pre-tokenizers llama.cpp knows: GPT-2's own regex (a plain ByteLevel), and the split
# regexes of Llama 3 and Qwen2 (a Split before a ByteLevel that does not split again).
SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
}
BLOCK = 32  # the block size of q8_0 and q4_0: rows of another length stay f16
# transformers' {% generation %} markers only mark the assistant's tokens for training; llama.cpp's
# template engine does not know the tag, and the text renders the same without it.
GENERATION_MARKERS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def pre_tokenizer(tokenizer_json):
    """llama.cpp's name of a tokenizer.json's pre-tokenizer (tokenizer.ggml.pre), or None when it is none
    of the byte-level BPE kinds it knows."""
    model, pre = tokenizer_json.get("model") or {}, tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or tokenizer_json.get("normalizer") not in (
            None, {"type": "NFC"}):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"  # llama.cpp spells this pre-tokenizer with a hyphen
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split" \
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
        return SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def tokenizer_problem(tokenizer_json):
    if pre_tokenizer(tokenizer_json) is not None:
        return None
    model = tokenizer_json.get("model") or {}
    kind = "SentencePiece-style BPE (byte fallback)" if model.get("byte_fallback") else \
        f"{model.get('type')} with pre-tokenizer {(tokenizer_json.get('pre_tokenizer') or {}).get('type')}"
    return (f"its tokenizer ({kind}) cannot be written as GGUF (supported: byte-level BPE tokenizers, "
            "with GPT-2's, Llama 3's or Qwen2's pre-tokenizer)")


def family_problem(config):
    family = config.get("model_type")
    if family not in ARCHITECTURES:
        return f"family {family} cannot be written as GGUF (supported: {', '.join(ARCHITECTURES)})"
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "llama3"):
        return f"family {family} with rope scaling {rope.get('rope_type')} cannot be written as GGUF " \
               "(supported: none, or llama3)"
    if family == "mistral" and config.get("sliding_window"):
        return "family mistral with sliding-window attention cannot be written as GGUF (supported: sliding_window null)"
    return None


def problem(model_dir, need_tokenizer=True):
    """Why the model folder cannot be written as GGUF, or None. Without tokenizer.json its tokenizer is
    a problem only when need_tokenizer (the config check reads what a Hub cache holds)."""
    folder = Path(model_dir)
    found = family_problem(read_json(folder / "config.json"))
    if found or not (need_tokenizer or (folder / "tokenizer.json").is_file()):
        return found
    if not (folder / "tokenizer.json").is_file():
        return "it has no tokenizer.json (a tokenizer GGUF can hold is byte-level BPE in tokenizer.json)"
    return tokenizer_problem(read_json(folder / "tokenizer.json"))


def rope(config):
    """(theta, scaling) from config.json: transformers 5 writes rope_parameters, earlier ones rope_theta
    and rope_scaling."""
    parameters = config.get("rope_parameters") or {}
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = parameters if parameters.get("rope_type", "default") != "default" else config.get("rope_scaling")
    return theta, scaling


def head_dim(config):
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama3_rope_factors(config, scaling):
    """Llama 3.1's frequency-dependent rope scaling as llama.cpp takes it: a rope_freqs tensor of the
    factor each frequency's wavelength is divided by (as convert_hf_to_gguf.py computes it)."""
    dim, theta = head_dim(config), rope(config)[0]
    factor, low, high = scaling.get("factor", 8.0), scaling.get("low_freq_factor", 1.0), \
        scaling.get("high_freq_factor", 4.0)
    context = scaling.get("original_max_position_embeddings", 8192)
    wavelengths = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (context / wavelengths - low) / (high - low)
    factors = np.where(wavelengths < context / high, 1.0,
                       np.where(wavelengths > context / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def add_hyperparameters(writer, config, name):
    heads = config["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope(config)[0]))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) * heads != config["hidden_size"]:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config["vocab_size"])


def merges(tokenizer_json):
    """The merges as llama.cpp reads them, "left right"; a space inside a part (transformers >= 4.45 writes
    pairs, which may hold one) is escaped the way gguf-py's SpecialVocab escapes it."""
    found = tokenizer_json["model"].get("merges") or []
    if found and isinstance(found[0], str):
        return list(found)
    return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair) for pair in found]


def vocabulary(tokenizer, rows):
    """(tokens, token types) of every embedding row: added special tokens are CONTROL, other added tokens
    USER_DEFINED, the rest NORMAL; rows no token has (embeddings padded to a multiple) UNUSED."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= rows:
        raise ValueError(f"the tokenizer has {max(by_id) + 1} tokens but the model only {rows} embedding rows")
    tokens, types = [], []
    for index in range(rows):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def add_tokenizer(writer, model_dir, rows):
    """The tokenizer as llama.cpp's BPE reads it; BOS is marked prepended exactly when transformers prepends it."""
    from transformers import AutoTokenizer

    tokenizer_json = read_json(Path(model_dir) / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, types = vocabulary(tokenizer, rows)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges(tokenizer_json))
    for role in ("bos", "eos", "unk", "pad"):
        if getattr(tokenizer, f"{role}_token_id") is not None:
            getattr(writer, f"add_{role}_token_id")(getattr(tokenizer, f"{role}_token_id"))
    encoded = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and encoded[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and encoded[-1] == tokenizer.eos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(GENERATION_MARKERS.sub("", tokenizer.chat_template))
    return tokenizer


def permute(weights, heads):
    """Reorder each head's rows from transformers' rotary layout (two halves) to llama.cpp's (interleaved
    pairs), as convert_hf_to_gguf.py does for Llama: without it the file loads and answers wrong."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def unpermute(weights, heads):
    """The inverse of permute (for the tests' round trip)."""
    return weights.reshape(heads, weights.shape[0] // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def weights(model_dir):
    """(name, float32 array) of every tensor of the folder's safetensors files, one at a time."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no safetensors weights")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).float().numpy()


def tensors(model_dir, config):
    """(llama.cpp's name, array) of every tensor the file holds; a tied output matrix is left out
    (llama.cpp reuses the token embeddings)."""
    import gguf

    arch = ARCHITECTURES[config["model_type"]]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    for name, data in weights(model_dir):
        if name.endswith("rotary_emb.inv_freq") or (config.get("tie_word_embeddings") and name == "lm_head.weight"):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{model_dir}: the tensor {name} has no llama.cpp name in architecture {arch}")
        projection = name.split(".")[-2]
        yield gguf_name, permute(data, heads[projection]) if arch in PERMUTED and projection in heads else data
    scaling = rope(config)[1]
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(config, scaling)


def stored(name, data, kind):
    """(array, ggml type) of a tensor in a file of `kind`: 1-D tensors (norms) stay F32; q8_0 and q4_0
    quantize matrices whose rows are whole blocks (others stay F16); q4_0 keeps the token embeddings and
    the output matrix at q8_0 (llama.cpp's own q4_0 keeps the output at higher precision too)."""
    import gguf
    from gguf.quants import quantize

    types = gguf.GGMLQuantizationType
    if data.ndim == 1:
        return data.astype(np.float32), types.F32
    if kind in ("q8_0", "q4_0") and data.shape[-1] % BLOCK == 0:
        wide = kind == "q8_0" or name in ("token_embd.weight", "output.weight")
        qtype = types.Q8_0 if wide else types.Q4_0
        return quantize(data, qtype), qtype
    if kind == "bf16":
        return quantize(data, types.BF16), types.BF16
    return data.astype(np.float16), types.F16


def write_gguf(model_dir, path, kind, name):
    """Write the model folder as one GGUF file of `kind` (f16, bf16, q8_0 or q4_0) at `path`."""
    import gguf

    found = problem(model_dir)
    if found:
        raise ValueError(f"{model_dir}: {found}")
    config = read_json(Path(model_dir) / "config.json")
    file_types = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    writer = gguf.GGUFWriter(str(path), ARCHITECTURES[config["model_type"]])
    add_hyperparameters(writer, config, name)
    writer.add_file_type(gguf.LlamaFileType[file_types[kind]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokenizer = add_tokenizer(writer, model_dir, config["vocab_size"])
    for tensor_name, data in tensors(model_dir, config):
        array, qtype = stored(tensor_name, data, kind)
        writer.add_tensor(tensor_name, array, raw_dtype=qtype if qtype not in (
            gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokenizer
