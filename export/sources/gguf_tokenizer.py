"""Hugging Face `tokenizer.json` built from a GGUF file's `tokenizer.ggml.*` metadata.

Supports the byte-level BPE family (`tokenizer.ggml.model == "gpt2"`). The pre-tokenizer
follows llama.cpp's `tokenizer.ggml.pre` table (src/llama-vocab.cpp): e.g. "smollm" splits every
digit on its own before the GPT-2 regex, as SmolLM2's original tokenizer.json does.
"""

from __future__ import annotations

from export.errors import SourceError

# GGUF token types (gguf.TokenType): 3 = control, 4 = user defined.
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(use_regex: bool) -> dict:
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": use_regex,
    }


def _pre_tokenizer(pre: str) -> dict:
    if pre in ("gpt2", "default", "gpt-2"):
        return _byte_level(True)
    if pre in ("smollm", "starcoder", "refact"):
        digits = {"type": "Digits", "individual_digits": True}
        return {"type": "Sequence", "pretokenizers": [digits, _byte_level(True)]}
    if pre in ("llama-bpe", "llama3"):
        split = {
            "type": "Split",
            "pattern": {"Regex": _LLAMA3_REGEX},
            "behavior": "Isolated",
            "invert": False,
        }
        return {"type": "Sequence", "pretokenizers": [split, _byte_level(False)]}
    raise SourceError(
        f"GGUF tokenizer pre-type {pre!r} is not supported; supported: gpt2, smollm, starcoder, "
        "refact, llama-bpe"
    )


def tokenizer_json_from_gguf(meta: dict) -> dict:
    """`meta`: the GGUF key/value metadata as plain Python values."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise SourceError(
            f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges: list[str] = meta.get("tokenizer.ggml.merges", [])
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": t == _CONTROL,
        }
        for i, (tok, t) in enumerate(zip(tokens, types, strict=True))
        if t in (_CONTROL, _USER_DEFINED)
    ]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_tok = tokens[bos]
        post = {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": bos_tok, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": bos_tok, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos_tok: {"id": bos_tok, "ids": [bos], "tokens": [bos_tok]}},
        }
    else:
        post = None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2")),
        "post_processor": post,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges,
        },
    }
