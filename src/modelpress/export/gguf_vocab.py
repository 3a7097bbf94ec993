"""The tokenizer as GGUF keys (`tokenizer.ggml.*`, `tokenizer.chat_template`).

From a GGUF source the keys are copied as they are (the tokenizer llama.cpp already runs for that model).
From a Hugging Face fast tokenizer we write a byte-level BPE vocabulary ("gpt2" in llama.cpp's words): tokens
by id, their types (normal, control for special added tokens, user-defined for other added tokens), merges,
special token ids, whether a BOS is added, the chat template, and `tokenizer.ggml.pre`, the name under which
llama.cpp knows the pre-tokenizer's splitting rule. llama.cpp has no way to read a rule it does not name, so
the rule is recognised from the tokenizer's own description (PRE_TOKENIZERS) and an unknown one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFWriter, TokenType

from modelpress.errors import ModelpressError
from modelpress.export.gguf_kv import read_kv

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

# a pre-tokenizer's signature (see _signature) -> llama.cpp's name for the same splitting rule
PRE_TOKENIZERS: dict[tuple, str] = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
}


def copy_tokenizer_keys(source: Path, writer: GGUFWriter, tokenizer=None) -> int:
    """Copy every tokenizer key of a GGUF file; returns how many. With the model's `tokenizer`, whether a BOS is
    added follows it (a user may have switched it on or off) rather than the source file."""
    copied = 0
    for key, vtype, sub_type, value in read_kv(source):
        if key == "tokenizer.ggml.add_bos_token" and tokenizer is not None:
            continue
        if key.startswith("tokenizer."):
            writer.add_key_value(key, value, vtype, sub_type)
            copied += 1
    if tokenizer is not None:
        writer.add_add_bos_token(adds_bos(tokenizer))
        copied += 1
    return copied


def write_hf_tokenizer(tokenizer, writer: GGUFWriter, vocab_size: int) -> None:
    """Byte-level BPE tokenizer keys from a transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ModelpressError(f"GGUF export needs a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ModelpressError("GGUF export writes byte-level BPE tokenizers; this one is "
                              f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    tokens, types = token_table(spec, vocab_size)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token in (("add_bos_token_id", tokenizer.bos_token), ("add_eos_token_id", tokenizer.eos_token),
                          ("add_unk_token_id", tokenizer.unk_token), ("add_pad_token_id", tokenizer.pad_token)):
        if token is not None:
            getattr(writer, setter)(tokenizer.convert_tokens_to_ids(token))
    writer.add_add_bos_token(adds_bos(tokenizer))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def token_table(spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padded to the model's vocabulary with placeholder tokens) and their llama.cpp types."""
    by_id: dict[int, str] = {i: t for t, i in spec["model"]["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise ModelpressError(f"the tokenizer has token id {max(by_id)} but the model's vocabulary has {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(kinds.get(i, TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
    return tokens, types


def pre_tokenizer_name(pre: dict | None) -> str:
    signature = _signature(pre)
    try:
        return PRE_TOKENIZERS[signature]
    except KeyError:
        raise ModelpressError(f"llama.cpp has no name for this tokenizer's pre-tokenizer {signature}; "
                              f"GGUF export knows {', '.join(sorted(set(PRE_TOKENIZERS.values())))}") from None


def _signature(pre: dict | None) -> tuple:
    if pre is None:
        return ()
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    signature = []
    for step in steps:
        kind = step.get("type")
        if kind == "ByteLevel":
            signature.append((kind, bool(step.get("use_regex", True))))
        elif kind == "Digits":
            signature.append((kind, bool(step.get("individual_digits"))))
        elif kind == "Split":
            pattern = step.get("pattern", {})
            signature.append((kind, pattern.get("Regex", pattern.get("String"))))
        else:
            signature.append((kind,))
    return tuple(signature)
