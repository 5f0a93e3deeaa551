"""The prompt every engine gets: exactly n token ids of a chat turn over the shipped text."""

from __future__ import annotations

from pathlib import Path

from runtime.texts import eval_text


def prompt_ids(folder: Path, n: int) -> list[int]:
    """Exactly n token ids: the chat template around as much of the evaluation text as fits (or,
    past the text, the text repeated)."""
    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    text = eval_text()
    words = text.split()
    while len(tok.encode(" ".join(words))) < n:
        words = words + text.split()

    def encode(k: int) -> list[int]:
        content = " ".join(words[:k])
        msgs = [{"role": "user", "content": content}]
        return tok.encode_chat(msgs) if tok.chat_template else tok.encode(content)

    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose prompt is at most n tokens
        mid = (lo + hi + 1) // 2
        if len(encode(mid)) <= n:
            lo = mid
        else:
            hi = mid - 1
    ids = encode(lo)
    if len(ids) < n:  # pad inside the user turn with the text's next tokens
        extra = tok.encode(" " + " ".join(words[lo:]))[: n - len(ids)]
        cut = len(ids) - _tail_length(tok)
        ids = ids[:cut] + extra + ids[cut:]
    return ids[:n]


def _tail_length(tok) -> int:
    """Tokens the chat template puts after the user's text (end of turn, assistant header)."""
    if not tok.chat_template:
        return 0
    a = tok.encode_chat([{"role": "user", "content": "x"}])
    b = tok.encode_chat([{"role": "user", "content": "x y"}])
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    return k
