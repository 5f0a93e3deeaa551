"""The Gradio demo, served for real: through gradio_client and in headless Chromium (Playwright).

One app serves the default int4 model (first in the model list, so the browser uses it) and a tiny
model; the browser test saves its screenshots under test-artifacts/.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ARTIFACTS = Path("test-artifacts")
CHROMIUM = os.environ.get("LLAMAONNX_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GREEDY = dict(temperature=0.0, top_p=1.0, top_k=0, seed=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(default_int4, tiny_folders, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app",
                str(default_int4),
                str(tiny_folders["ort"]),
                "--port",
                str(port),
                "--concurrency",
                "2",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"the app did not answer within 180 s:\n{log.read_text()}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _label(folder: Path) -> str:
    from app.server import Models

    return Models.label(folder)


def _chat(client, message: str, label: str, max_new_tokens: int, history=(), **setting):
    g = {**GREEDY, "max_new": max_new_tokens, **setting}
    return client.predict(
        message,
        list(history),
        "",
        label,
        "cpu",
        g["temperature"],
        g["top_p"],
        g["top_k"],
        g["max_new"],
        g["seed"],
        api_name="/chat",
    )


def _reply(history) -> str:
    from app.server import _text

    assert history[-1]["role"] == "assistant"
    return _text(history[-1]["content"])


def _expected(folder: Path, message: str, max_new: int) -> str:
    from runtime.generator import GenerationConfig, Generator
    from runtime.session import Session

    gen = Generator(Session(folder, provider="cpu"))
    return gen.generate(
        [{"role": "user", "content": message}], GenerationConfig(max_new_tokens=max_new)
    )


def test_client_reply_is_the_runtime_greedy_reply_with_figures(app_url, tiny_folders):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    history, figures = _chat(client, "Hello there", _label(tiny_folders["ort"]), 16)
    assert history[0]["role"] == "user"
    assert _reply(history) == _expected(tiny_folders["ort"], "Hello there", 16)
    assert "time to first token" in figures and "tok/s" in figures and "16 new tokens" in figures
    assert "batched with up to 2 chats" in figures  # the CPU `ort` folder runs on the engine


def test_two_users_at_once_get_their_own_replies(app_url, default_int4):
    """Both replies run at the same time, decoded together in one batch by the engine (2 slots),
    and each equals its one-by-one run through the runtime's Generator."""
    from gradio_client import Client

    label = _label(default_int4)
    prompts = [
        "What is the capital of France? Answer in one sentence.",
        "Name three colours of the rainbow.",
    ]
    results: dict[int, str] = {}

    def user(k: int) -> None:
        history, _ = _chat(Client(app_url, verbose=False), prompts[k], label, 40)
        results[k] = _reply(history)

    threads = [threading.Thread(target=user, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results[0] == _expected(default_int4, prompts[0], 40)
    assert results[1] == _expected(default_int4, prompts[1], 40)
    assert "Paris" in results[0] and results[0] != results[1]


def test_bad_input_gets_a_friendly_error_and_the_app_stays_up(app_url, tiny_folders):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    label = _label(tiny_folders["ort"])
    with pytest.raises(AppError, match="Type a message first"):
        _chat(client, "   ", label, 8)
    with pytest.raises(AppError, match="no longer fits the model's context of 256 tokens"):
        _chat(client, "a" * 400, label, 8)  # the tiny model's context is 256 tokens
    # gradio refuses what is outside a slider; our own checks name the rest
    for setting, match in (
        ({"temperature": -1.0}, r"Value -1.0 is less than minimum value 0"),
        ({"top_p": 0.0}, r"Value 0.0 is less than minimum value 0.05"),
        ({"top_k": -4}, r"Value -4 is less than minimum value 0"),
        ({"max_new": 0}, r"Value 0 is less than minimum value 1"),
        ({"seed": 2**70}, r"seed must be an integer in \[0, 9223372036854775807\]"),
    ):
        with pytest.raises(AppError, match=match):
            _chat(client, "hello", label, 8, **setting)
    history, _ = _chat(client, "still there?", label, 4)
    assert _reply(history)


def test_app_builds_without_torch(default_int4, tiny_folders):
    code = (
        "import sys; from app.server import build, model_markdown; "
        f"build([{str(default_int4)!r}, {str(tiny_folders['portable'])!r}]); "
        f"model_markdown(__import__('pathlib').Path({str(default_int4)!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'export')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "target, ops",
    [
        ("portable", {"RMSNorm", "RotaryEmbedding", "GroupQueryAttention"}),
        ("onnx23", {"RMSNormalization", "RotaryEmbedding", "Attention"}),
        (
            "ort",
            {
                "SimplifiedLayerNormalization",
                "SkipSimplifiedLayerNormalization",
                "GroupQueryAttention+RoPE",
            },
        ),
    ],
)
def test_model_tab_draws_a_decoder_layer_from_the_onnx_file(tiny_folders, target, ops):
    from app.graph_view import layer_nodes, layer_picture
    from app.server import model_markdown

    folder = tiny_folders[target]
    found = {op for _, op, _, _ in layer_nodes(folder / "model.onnx", 0)}
    assert ops <= found
    png = Path(layer_picture(folder / "model.onnx", 0))
    assert png.read_bytes()[:4] == b"\x89PNG"
    md = model_markdown(folder)
    assert "Verification against the PyTorch reference" in md and "GQA" in md


def test_model_tab_names_a_norm_folded_into_a_projection(tiny_folders, tmp_path):
    """An int4 folder on llamaonnx's kernels folds each residual RMSNorm into the projection that
    reads it: the picture says so rather than dropping the norm."""
    from app.graph_view import _label, layer_nodes
    from export.quant import QuantSettings, quantize_folder

    out = tmp_path / "int4"
    quantize_folder(tiny_folders["ort"], out, QuantSettings("int4", kernel="native"), verify=False)
    nodes = layer_nodes(out / "model.onnx", 1)
    folded = {op: name for name, op, _, _ in nodes if op.endswith("+RMSNorm")}
    assert set(folded) == {"MatMulQ4+RMSNorm", "MatMulQ4SwiGLU+RMSNorm"}
    assert "[RMSNorm + residual + gate/up + SwiGLU" in _label(
        folded["MatMulQ4SwiGLU+RMSNorm"], "MatMulQ4SwiGLU+RMSNorm", 1
    )


def test_benchmarks_tab_reads_a_results_file(tmp_path, tiny_folders):
    from app.server import _bench_view
    from runtime.bench import bench

    data = bench([tiny_folders["ort"]], prompt_tokens=16, new_tokens=4, runs=2, threads=1)
    path = tmp_path / "bench.json"
    path.write_text(__import__("json").dumps(data))
    md, png = _bench_view(path)
    assert "decode tok/s" in md and Path(png).read_bytes()[:4] == b"\x89PNG"
    assert "No benchmark results yet" in _bench_view(tmp_path / "missing.json")[0]


def test_browser_streams_a_reply_stops_it_and_answers(app_url):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        box = page.locator("#message textarea")
        bot = page.locator("#chatbot .bot .message-content").last

        box.fill("Write a long story about a lighthouse keeper and a storm.")
        page.locator("#send").click()
        page.wait_for_function(
            "() => { const m = document.querySelectorAll('#chatbot .bot .message-content');"
            " return m.length && m[m.length - 1].innerText.length > 20; }",
            timeout=120_000,
        )
        first = bot.inner_text()
        page.wait_for_timeout(400)
        assert len(bot.inner_text()) > len(first)  # streamed: it keeps growing
        page.locator("#stop").click()
        page.wait_for_timeout(800)
        stopped = bot.inner_text()
        page.wait_for_timeout(1500)
        assert bot.inner_text() == stopped  # nothing more after stop
        page.screenshot(path=str(ARTIFACTS / "app-stopped.png"))

        page.locator("#clear").click()
        temperature = page.locator("#temperature input[type=number]")
        temperature.fill("0")  # greedy: the answer is the model's most likely one
        temperature.press("Enter")
        box.fill("What is the capital of France? Answer in one sentence.")
        page.locator("#send").click()
        page.wait_for_function(
            "() => document.querySelector('#stats').innerText.includes('tok/s')",
            timeout=120_000,
        )
        assert "Paris" in bot.inner_text()
        page.screenshot(path=str(ARTIFACTS / "app-chat.png"))
        browser.close()
