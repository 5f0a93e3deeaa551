"""The texts that ship with the runtime (runtime/data/), all written for the project: the
evaluation text that `verify` scores perplexity on and that `bench` cuts its prompts from
(prose), and two of other kinds that quality tables score beside it (a chat, Python code): a
quantization can hold on one kind of text and fail on another."""

from __future__ import annotations

import importlib.resources


def eval_text() -> str:
    return importlib.resources.files("runtime").joinpath("data/eval.txt").read_text()


KINDS = {"prose": "eval.txt", "chat": "chat.txt", "code": "code.txt"}


def eval_texts() -> dict[str, str]:
    """kind → text, for prose, chat and code."""
    data = importlib.resources.files("runtime").joinpath("data")
    return {kind: data.joinpath(name).read_text() for kind, name in KINDS.items()}


# A second, longer text of each kind (1,400–1,900 tokens), also written for the project and
# scored only where two engines' perplexities are compared to a fraction of a percent
# (export/verify/gguf_quality.py): on the three texts above, ~1,600 tokens, such a ratio has a
# standard error of ~0.25 %.
MORE_KINDS = {"prose 2": "more-prose.txt", "chat 2": "more-chat.txt", "code 2": "more-code.txt"}


def more_texts() -> dict[str, str]:
    """kind → text, for the second prose, chat and code texts."""
    data = importlib.resources.files("runtime").joinpath("data")
    return {kind: data.joinpath(name).read_text() for kind, name in MORE_KINDS.items()}
