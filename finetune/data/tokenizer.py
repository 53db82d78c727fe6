"""The base model's tokenizer as every stage loads it: its own chat template or one the
config supplies, and a pad token that is not EOS (chosen among its special tokens, or added)."""
import re

from transformers import AutoTokenizer

PAD_LIKE = re.compile(r"pad|reserved|unused", re.IGNORECASE)
ADDED_PAD = "<|pad|>"


def distinct_pad_token(tokenizer):
    """A pad token that is not EOS for a tokenizer without one (or whose pad is EOS):
    its unknown token, else a spare special token made for padding or reserved
    (<|finetune_right_pad_id|>, <|fim_pad|>, <|reserved_special_token_0|>, <unused0>),
    else a new <|pad|> token (the model's embeddings then grow by a row: see load_base_model)."""
    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in taken:
        return tokenizer.unk_token
    spare = [token.content for token_id, token in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())
             if token.special and token_id not in taken and PAD_LIKE.search(token.content)]
    return spare[0] if spare else ADDED_PAD


def load_tokenizer(name_or_path, chat_template=None, trust_remote_code=False):
    """The base model's tokenizer, with `chat_template` replacing its own if given, and a
    pad token distinct from EOS. Labels are built explicitly, so a pad equal to EOS could
    not mask EOS out of the loss; a distinct one keeps padding unambiguous for any reader."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        pad = distinct_pad_token(tokenizer)
        if pad == ADDED_PAD:
            tokenizer.add_special_tokens({"pad_token": ADDED_PAD})
        else:
            tokenizer.pad_token = pad
    return tokenizer
