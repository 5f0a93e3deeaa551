"""The real default model, exported once per target and run through the torch-free runtime."""

import json
import subprocess
import sys

import pytest

from runtime.generator import GenerationConfig, Generator
from runtime.session import Session
from tests.test_golden import GOLDEN, PROMPT


@pytest.mark.parametrize("target", ["portable", "onnx23", "ort"])
def test_default_model_verified_in_every_target(default_folders, target):
    report = json.loads((default_folders[target] / "report.json").read_text())
    cpu = report["providers"]["cpu"]
    assert report["passed"], report["failures"]
    assert cpu["max_abs_logit_delta"] <= 1e-3 and cpu["greedy_agreement"] == 64
    assert abs(cpu["perplexity_ratio"] - 1) < 1e-4


def test_default_model_golden_answer_through_onnx(default_folders):
    gen = Generator(Session(default_folders["ort"], provider="cpu"))
    assert gen.generate(PROMPT, GenerationConfig(max_new_tokens=32)) == GOLDEN


def test_cli_generate_streams_and_reports_figures(default_folders):
    cmd = [
        sys.executable,
        "-m",
        "runtime.cli",
        "generate",
        str(default_folders["ort"]),
        "What is the capital of France?",
        "--max-new-tokens",
        "32",
        "--provider",
        "cpu",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == GOLDEN
    assert "prompt tokens" in out.stderr and "tok/s" in out.stderr
