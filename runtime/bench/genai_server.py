"""onnxruntime-genai's `Engine` behind a thin OpenAI-compatible adapter: the serving benchmark's
genai peer (`llamaonnx load NAME=genai:DIR[:SLOTS]` starts it; the `bench` and `serve` extras).

    python -m runtime.bench.genai_server DIR --port 8000 --slots 8 --threads 2

What genai 0.18 offers on the CPU: `og.Engine` over a folder built for GroupQueryAttention runs
its *static* batch scheduler (`engine.static_batching.max_batch_size`, set here to --slots): the
requests present when a batch starts are decoded together, and a request that arrives later
waits until that batch has drained. Its continuous (dynamic) batching needs a model built with
`use_paged_attention`, which genai's builder supports for CUDA with fp16/bf16 only. The adapter
adds nothing to the engine's work: one thread owns the engine (genai requires it) and runs it
whenever a request is pending; tokens go to the HTTP handlers as they come.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (streamed or not, greedy or
sampled, `max_tokens`, `usage`). A client that disconnects cancels its turn.
"""

import argparse
import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


class GenaiEngine:
    """The engine thread: takes submissions, runs the engine, hands each event to its request."""

    def __init__(self, folder: Path, slots: int, threads: int):
        import onnxruntime_genai as og

        config = og.Config(str(folder))
        config.clear_providers()
        config.overlay(json.dumps({
            "model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}},
            "engine": {"static_batching": {"max_batch_size": slots}},
        }))  # fmt: skip
        self.og, self.model = og, og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)  # decodes the stream
        # prompts are templated and encoded as our server does them, so both see the same ids
        from runtime.tokenizer import Tokenizer

        self.chat = Tokenizer.from_folder(folder)
        self.name = folder.name
        self.failed: BaseException | None = None
        self._submit: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        threading.Thread(target=self._loop, name="genai-engine", daemon=True).start()

    def submit(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, sink):
        """`sink(token | None, finish_reason | None)` is called from the engine thread; returns
        a cancel function."""
        if self.failed is not None:
            raise RuntimeError(f"the genai engine failed: {self.failed}")
        handle = {"cancel": False}
        self._submit.put((ids, max_tokens, temperature, top_p, sink, handle))
        self._wake.set()

        def cancel() -> None:
            handle["cancel"] = True
            self._wake.set()

        return cancel

    def _loop(self) -> None:
        live: dict[int, tuple] = {}  # id(request) → (request, turn, sink, handle)
        try:
            self._run(live)
        except Exception as e:  # the thread is gone: end every request rather than hang it
            log.exception("genai engine loop failed")
            self.failed = e
            for _, _, sink, _ in live.values():
                sink(None, "error")

    def _run(self, live: dict) -> None:
        import numpy as np

        og = self.og
        engine = og.Engine(self.model)
        buffer = engine.create_event_buffer(1024)
        while True:
            if not live and self._submit.empty():
                self._wake.wait()
            self._wake.clear()
            while not self._submit.empty():
                ids, max_tokens, temperature, top_p, sink, handle = self._submit.get()
                request = engine.create_request()
                options = og.TurnOptions(request)
                options.set_do_sample(temperature > 0)
                if temperature > 0:
                    options.set_temperature(temperature)
                    options.set_top_p(top_p)
                options.set_max_generated_tokens(max_tokens)
                turn = request.begin_turn(np.array(ids, np.int32), options)
                live[id(request)] = (request, turn, sink, handle)
            for key, (request, turn, sink, handle) in list(live.items()):
                if handle["cancel"]:
                    request.cancel_turn(turn)
                    request.close()
                    del live[key]
                    sink(None, "cancelled")
            if not engine.has_pending_requests():
                continue
            for event in engine.run(buffer):
                entry = live.get(id(event.request))
                if entry is None:
                    continue
                request, _, sink, _ = entry
                reason = event.finish_reason
                done = reason != og.FinishReason.NONE
                if event.token is not None:  # a turn's last event may carry none
                    sink(int(event.token), None)
                if done:
                    request.close()
                    del live[id(event.request)]
                    finish = "length" if reason == og.FinishReason.MAX_GENERATED_TOKENS else "stop"
                    sink(None, finish)


def build_app(engine: GenaiEngine):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return JSONResponse({"error": {"message": "messages must be a non-empty list",
                                           "type": "invalid_request_error"}}, 400)  # fmt: skip
        ids = engine.chat.encode_chat(messages)
        max_tokens = int(body.get("max_tokens") or 256)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(token, finish):
            loop.call_soon_threadsafe(events.put_nowait, (token, finish))

        cancel = engine.submit(ids, max_tokens, float(body.get("temperature", 1.0)),
                               float(body.get("top_p", 1.0)), sink)  # fmt: skip
        stream = engine.tokenizer.create_stream()
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish=None, usage=None) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": engine.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
            if usage is not None:
                data["usage"], data["choices"] = usage, []
            return f"data: {json.dumps(data)}\n\n"

        async def tokens():
            n = 0
            try:
                while True:
                    token, finish = await events.get()
                    if token is not None:
                        n += 1
                        yield stream.decode(token), None, n
                    if finish is not None:
                        yield "", finish, n
                        return
            finally:
                cancel()  # a no-op once finished; frees the turn of a client that left

        usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(ids) + n}  # fmt: skip
        if body.get("stream"):

            async def sse():
                yield chunk({"role": "assistant", "content": ""})
                async for text, finish, n in tokens():
                    if text:
                        yield chunk({"content": text})
                    if finish is not None:
                        yield chunk({}, finish)
                        yield chunk({}, usage=usage(n))
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        text, finish, n = "", None, 0
        async for piece, end, count in tokens():
            text, finish, n = text + piece, end or finish, count
        return {"id": rid, "object": "chat.completion", "created": created, "model": engine.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}], "usage": usage(n)}  # fmt: skip

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a folder genai runs (genai_config.json)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=8, help="static batch size")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    app = build_app(GenaiEngine(a.folder, a.slots, a.threads))
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
