"""Shared fixtures: tiny seeded models for the many tests, the real default model built once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_source():
    from export.weights import load_source

    return load_source(None)


@pytest.fixture(scope="session")
def default_model(default_source):
    from export.weights import build_model

    return build_model(default_source)


@pytest.fixture(scope="session")
def default_tokenizer(default_source):
    from runtime.tokenizer import Tokenizer

    return Tokenizer(default_source.tokenizer_json, default_source.chat_template)
