"""The edge install, `pip install llamaonnx[runtime]` (no torch, no onnx), runs the default
int4 model.

`make test` builds that environment (.venv-edge) from the registry before the tests run and names
its interpreter in LLAMAONNX_EDGE_PYTHON; the test itself needs no network.
"""

import os
import subprocess
from pathlib import Path

import pytest


def _edge_python() -> Path:
    py = Path(os.environ.get("LLAMAONNX_EDGE_PYTHON", ".venv-edge/bin/python")).absolute()
    if not py.exists():
        pytest.fail(
            f"no edge environment at {py}: run `make test`, which builds it with "
            "`pip install .[runtime]` (or set LLAMAONNX_EDGE_PYTHON)"
        )
    return py


def test_edge_environment_has_no_torch():
    py = _edge_python()
    probe = "import importlib.util as u; print([m for m in ('torch', 'onnx') if u.find_spec(m)])"
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generate_streams_an_answer_from_the_default_int4_model_without_torch(
    default_int4, tmp_path
):
    llamaonnx = _edge_python().parent / "llamaonnx"
    out = subprocess.run(
        [
            llamaonnx,
            "generate",
            default_int4,
            "What is the capital of France? Answer in one sentence.",
            "--max-new-tokens",
            "32",
            "--provider",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # the installed package, not this checkout
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "int4 on cpu" in out.stderr and "tok/s" in out.stderr
