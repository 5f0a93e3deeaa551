"""Shared fixtures: tiny seeded models for the many tests, the real default model built once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_source():
    from export.sources import load_source

    return load_source(None)


@pytest.fixture(scope="session")
def default_model(default_source):
    from export.sources import build_model

    return build_model(default_source)


@pytest.fixture(scope="session")
def default_tokenizer(default_source):
    from runtime.tokenizer import Tokenizer

    return Tokenizer(default_source.tokenizer_json, default_source.chat_template)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory):
    from tests.tiny import write_tiny

    folder = tmp_path_factory.mktemp("tiny-hf")
    model = write_tiny(folder)
    return folder, model


@pytest.fixture(scope="session")
def tiny_folders(tiny_source, tmp_path_factory):
    """The tiny model exported (and verified) once per target."""
    from export.pipeline import export_model

    src, _ = tiny_source
    root = tmp_path_factory.mktemp("tiny-onnx")
    out = {}
    for target in ("portable", "onnx23", "ort"):
        out[target] = root / target
        export_model(src, out[target], target=target)
    return out


@pytest.fixture(scope="session")
def default_folders(tmp_path_factory, default_model):
    """The real default model exported (and verified) once per target, for the end-to-end tests."""
    from export.pipeline import export_model

    root = tmp_path_factory.mktemp("default-onnx")
    return {
        t: export_model(None, root / t, target=t) and root / t
        for t in ("portable", "onnx23", "ort")
    }


@pytest.fixture(scope="session")
def default_int4(default_folders, default_model, tmp_path_factory):
    """The default model's int4 `ort` folder (GGUF blocks carried), quantized and verified once."""
    from export.quant import QuantSettings, quantize_folder

    out = tmp_path_factory.mktemp("default-int4") / "ort-int4"
    quantize_folder(default_folders["ort"], out, QuantSettings("int4"), model=default_model)
    return out
