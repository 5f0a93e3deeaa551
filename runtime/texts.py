"""The texts that ship with the runtime (runtime/data/): the evaluation text that `verify`
scores perplexity on and that `bench` cuts its prompts from."""

from __future__ import annotations

import importlib.resources


def eval_text() -> str:
    return importlib.resources.files("runtime").joinpath("data/eval.txt").read_text()
