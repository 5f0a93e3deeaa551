"""Hugging Face `tokenizer.json` built from a GGUF file's `tokenizer.ggml.*` metadata.

Two vocabulary kinds:
- byte-level BPE (`tokenizer.ggml.model == "gpt2"`): merges from the file; the pre-tokenizer
  follows llama.cpp's `tokenizer.ggml.pre` table (src/llama-vocab.cpp): e.g. "smollm" splits every
  digit on its own before the GPT-2 regex, as SmolLM2's original tokenizer.json does.
- SentencePiece (`"llama"`: Llama 2, TinyLlama, Gemma, Phi-3): a BPE over "▁"-spelled text with
  byte fallback (<0xNN> tokens). The file has no merges: a piece is formed where both halves are
  pieces, the likelier first, as SentencePiece's BPE encoder merges (by score; by position in the
  file for Gemma, whose scores do not follow its merge order). Text becomes "▁"-spelled by a
  prefix and a replacement whose details differ per family (see `_sentencepiece`).
Control tokens are special added tokens, user-defined ones (Gemma's runs of newlines) added
tokens matched whole, as llama.cpp matches them. tests/test_gguf_tokenizers.py holds both kinds to
transformers' own GGUF conversion.
"""

from __future__ import annotations

from export.errors import SourceError

# GGUF token types (gguf.TokenType): 3 = control, 4 = user defined.
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Qwen2 / 2.5 / 3 (`qwen2`): like Llama 3's, but every digit on its own
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
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
    if pre in ("llama-bpe", "llama3", "qwen2"):
        split = {
            "type": "Split",
            "pattern": {"Regex": _QWEN2_REGEX if pre == "qwen2" else _LLAMA3_REGEX},
            "behavior": "Isolated",
            "invert": False,
        }
        return {"type": "Sequence", "pretokenizers": [split, _byte_level(False)]}
    raise SourceError(
        f"GGUF tokenizer pre-type {pre!r} is not supported; supported: gpt2, smollm, starcoder, "
        "refact, llama-bpe, qwen2"
    )


def tokenizer_json_from_gguf(meta: dict) -> dict:
    """`meta`: the GGUF key/value metadata as plain Python values."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        return _sentencepiece(meta)
    if kind != "gpt2":
        raise SourceError(
            f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level "
            "BPE) and 'llama' (SentencePiece)"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges: list[str] = meta.get("tokenizer.ggml.merges", [])
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added(tokens, types),
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt2")),
        "post_processor": _bos_processor(meta, tokens, default=False),
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


_SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece(meta: dict) -> dict:
    arch = meta.get("general.architecture", "llama")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    gemma = arch.startswith("gemma")
    if gemma:  # runs of spaces are stored as spaces, but the text they match is "▁"-spelled
        tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        priority = [-i for i in range(len(tokens))]
    else:
        priority = list(meta.get("tokenizer.ggml.scores", [-i for i in range(len(tokens))]))
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE}
    strip = [{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
    if gemma:  # no prefix space
        normalizer = replace
        pre = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
               "invert": False}  # fmt: skip
        strip = []
    elif arch == "phi3":  # the prefix from a normalizer: "  hi" → "▁▁▁hi"
        normalizer = {"type": "Sequence",
                      "normalizers": [{"type": "Prepend", "prepend": _SPACE}, replace]}  # fmt: skip
        pre = None
    else:
        normalizer = None
        scheme = "first" if meta.get("tokenizer.ggml.add_space_prefix", True) else "never"
        pre = {"type": "Metaspace", "replacement": _SPACE, "prepend_scheme": scheme,
               "split": False}  # fmt: skip
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": _added(tokens, types),
        "normalizer": normalizer,
        "pre_tokenizer": pre,
        "post_processor": _bos_processor(meta, tokens, default=True),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": _SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                *strip,
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[unk] if gemma and unk is not None else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": _merges(tokens, priority),
        },
    }


def _merges(tokens: list[str], priority: list[float]) -> list[list[str]]:
    """Every (left, right) split of a piece whose halves are pieces, the likeliest piece first;
    among equals, the longer left half, then the longer right half, then the order of the file
    (transformers' `generate_merges` orders them the same, which the tests hold us to)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, score in zip(tokens, priority, strict=True):
        local = [
            (piece[:k], piece[k:], score)
            for k in range(1, len(piece))
            if piece[:k] in ids and piece[k:] in ids
        ]
        local.sort(key=lambda m: (ids[m[0]], ids[m[1]]))
        found.extend(local)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [[left, right] for left, right, _ in found]


def _added(tokens: list[str], types: list[int]) -> list[dict]:
    return [
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


def _bos_processor(meta: dict, tokens: list[str], default: bool) -> dict | None:
    """Prepends the BOS token where the file says to (SentencePiece files that do not say: yes,
    as llama.cpp does)."""
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", default) and bos is not None:
        bos_tok = tokens[bos]
        return {
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
    return None
