"""Tokenizers built from GGUF metadata (export/sources/gguf_tokenizer.py) give the ids that
transformers' own GGUF conversion gives, for both vocabulary kinds: byte-level BPE (the default
model's real file) and SentencePiece (a small vocabulary written as llama.cpp writes one, for the
llama, gemma and phi3 spellings of it). The oracle is transformers; ours does not use it."""

from __future__ import annotations

import pytest
import transformers
from tokenizers import Tokenizer

from export.sources import default_gguf_path
from export.sources.gguf import _open, metadata
from export.sources.gguf_tokenizer import tokenizer_json_from_gguf
from tests.gguf_writer import write_bpe_gguf, write_spm_gguf

TEXTS = [
    "Hello world! The theory of everything.",
    " leading space, then  two,   three and\ttabs\n\nnew lines\n",
    "café, naïve, Zürich, 東京, Привет, emoji 🦙🚀 and ∑ x² ≠ 0",
    "12345 + 678 = 7023; 3.14159, -0.5e-3, 0x1F",
    "def f(x):\n    return x == 123  # a comment\n\tprint('the end')\n",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "",
]


def _ours(path) -> Tokenizer:
    import json

    return Tokenizer.from_str(json.dumps(tokenizer_json_from_gguf(metadata(_open(path)))))


def _theirs(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _check(ours: Tokenizer, theirs, texts=TEXTS) -> None:
    for text in texts:
        want = theirs.encode(text)
        got = ours.encode(text).ids
        assert got == want, (text, got, want)
        assert ours.decode(got, skip_special_tokens=True) == theirs.decode(
            want, skip_special_tokens=True
        ), text


@pytest.mark.parametrize("arch,prefix", [("llama", True), ("gemma3", False), ("phi3", True)])
def test_sentencepiece_ids_match_transformers(arch, prefix, tmp_path):
    path = write_spm_gguf(tmp_path / "tok.gguf", arch, add_space_prefix=prefix)
    _check(_ours(path), _theirs(path))


def test_a_llama_vocabulary_without_a_space_prefix_gets_none(tmp_path):
    """Where a llama SentencePiece file says add_space_prefix = false, llama.cpp adds no "▁" in
    front of the text and neither do we (transformers' conversion ignores the flag)."""
    with_prefix = _ours(write_spm_gguf(tmp_path / "a.gguf", "llama", add_space_prefix=True))
    without = _ours(write_spm_gguf(tmp_path / "b.gguf", "llama", add_space_prefix=False))
    assert with_prefix.encode("the end").tokens == ["<s>", "\u2581the", "\u2581", "en", "d"]
    assert without.encode("the end").tokens == ["<s>", "t", "he", "\u2581", "en", "d"]


def test_byte_level_bpe_ids_match_transformers_on_the_default_model():
    path = default_gguf_path()
    _check(_ours(path), _theirs(path))


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "smollm", "gpt2"])
def test_byte_level_pre_tokenizers_match_transformers(pre, tmp_path):
    """The pre-tokenizer types the BPE families declare (Qwen2/2.5/3: qwen2, Llama 3: llama-bpe,
    SmolLM2: smollm), on the default model's vocabulary and merges: digits, contractions and
    whitespace split as transformers splits them."""
    path = write_bpe_gguf(tmp_path / "bpe.gguf", default_gguf_path(), pre)
    _check(_ours(path), _theirs(path), TEXTS + ["I'll say it's 2024-12-01: 1234567 apples!!"])


@pytest.mark.parametrize("arch", ["default", "llama", "gemma3", "phi3"])
def test_token_bytes_join_into_the_decoded_text(arch, tmp_path):
    """`Tokenizer.token_bytes` (OpenAI's logprobs `bytes`): a text's tokens' bytes, joined, are
    the bytes of what `tokenizers` decodes them to, characters split across tokens included; on
    byte-level BPE (the default model) and on SentencePiece with byte fallback."""
    import json

    from runtime.tokenizer import Tokenizer

    if arch == "default":
        path = default_gguf_path()
    else:
        path = write_spm_gguf(tmp_path / "tok.gguf", arch, add_space_prefix=arch != "gemma3")
    ours = _ours(path)
    tok = Tokenizer(json.loads(ours.to_str()))
    split = 0
    for text in TEXTS:
        ids = ours.encode(text).ids
        pieces = [tok.token_bytes(i) for i in ids]
        split += sum(not _whole(p) for p in pieces)
        want = ours.decode(ids, skip_special_tokens=False).encode()
        assert b"".join(pieces) == want, (arch, text)
    assert split > 0  # some token held part of a character (the emoji, 東京)
    with pytest.raises(Exception, match="not in this model's vocabulary"):
        tok.token_bytes(10**7)


def _whole(piece: bytes) -> bool:
    try:
        piece.decode()
    except UnicodeDecodeError:
        return False
    return True
