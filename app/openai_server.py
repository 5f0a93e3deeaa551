"""`llamaonnx serve`: an OpenAI-compatible HTTP server on the continuous-batching engine.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both streaming as
server-sent events ending in `data: [DONE]`, or not), GET /health, GET /metrics (Prometheus
text). Errors come in OpenAI's JSON form, {"error": {"message", "type", "param", "code"}}, with
its status codes: 400 bad parameters or a prompt that does not fit (code
context_length_exceeded), 401 a wrong API key, 404 an unknown model or route, 413 a body over
the size limit, 429 the queue is full, 503 shutting down. A client that disconnects cancels its
request, whose slot is free at the engine's next step.

Loopback by default, an API key when asked (`Authorization: Bearer KEY`, compared in constant
time), no CORS unless an origin is given. Built on FastAPI and uvicorn (the `serve` extra; the
app extra already has them).
"""

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid
from pathlib import Path

from runtime.engine import Engine, Request
from runtime.errors import (
    ChatTemplateError,
    ContextLengthError,
    EngineClosedError,
    InvalidTextError,
    LlamaonnxError,
    OptionError,
    QueueFullError,
)
from runtime.generator import GenerationConfig

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON: far more than any context's worth of text
DEFAULT_MAX_TOKENS = 256
# OpenAI's parameters this server does not implement: refused with a 400 rather than ignored
UNSUPPORTED = ("tools", "tool_choice", "functions", "response_format", "suffix", "best_of",
               "audio", "prediction", "web_search_options")  # fmt: skip
MAX_TOP_LOGPROBS = {True: 20, False: 5}  # chat's top_logprobs, the completions' logprobs


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status, message, kind, param, code
        )  # fmt: skip

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


class _Logprobs:
    """The logprobs a reply's events carry (Event.logprob, Event.top_logprobs), gathered until
    the next chunk and put in OpenAI's form: chat's `content` entries, each token with its
    bytes (a token may hold part of a character), or the completions' parallel lists."""

    def __init__(self, tokenizer, chat: bool, asked: bool):
        self.tok, self.chat, self.asked = tokenizer, chat, asked
        self.pending: list[tuple[int, float, tuple[tuple[int, float], ...]]] = []
        self.offset = 0  # the completions' text_offset: characters of the reply so far

    def add(self, event) -> None:
        if event.logprob is not None:
            self.pending.append((event.token, event.logprob, event.top_logprobs))

    def add_prompt(self, prompt: list[int], logprobs: list) -> None:
        """The completions' echo: the prompt's tokens first, the first with null logprobs."""
        if self.asked and logprobs is not None and len(logprobs) == len(prompt):  # (else: a
            # request that ended before its prompt was computed: cancelled, or an error)
            entries = zip(prompt, logprobs, strict=True)
            self.pending[:0] = [(t, *(lp or (None, None))) for t, lp in entries]

    def _text(self, token: int) -> str:
        return self.tok.token_bytes(token).decode("utf-8", errors="replace")

    def _entry(self, token: int, logprob: float) -> dict:
        raw = self.tok.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}  # fmt: skip

    def take(self) -> dict | None:
        """What has come since the last take, for the next chunk (None: logprobs not asked)."""
        if not self.asked:
            return None
        items, self.pending = self.pending, []
        if self.chat:
            return {"content": [
                {**self._entry(token, lp), "top_logprobs": [self._entry(i, p) for i, p in top]}
                for token, lp, top in items]}  # fmt: skip
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in items:
            text = self._text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {self._text(i): p for i, p in top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


@dataclasses.dataclass
class Served:
    name: str
    engine: Engine
    created: int


def _api_error(e: Exception) -> ApiError:
    """A typed llamaonnx error → the OpenAI status and code that say the same."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), kind="rate_limit_error", code="queue_full")
    if isinstance(e, EngineClosedError):
        return ApiError(503, str(e), kind="server_error", code="shutting_down")
    if isinstance(e, (OptionError, InvalidTextError, ChatTemplateError, ValueError)):
        return ApiError(400, str(e))
    if isinstance(e, LlamaonnxError):
        return ApiError(400, str(e))
    log.exception("request failed")
    return ApiError(500, f"internal error: {type(e).__name__}", kind="server_error")


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many likeliest tokens each token's logprobs list, or None for no logprobs: chat's
    `logprobs` (true/false) with `top_logprobs` (0–20), the completions' `logprobs` (0–5)."""
    top = MAX_TOP_LOGPROBS[chat]
    if not chat:
        n = body.get("logprobs")
        if n is None:
            return None
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= top:
            raise ApiError(400, f"logprobs must be an integer from 0 to {top}, got {n!r}",
                           param="logprobs")  # fmt: skip
        return n
    on, n = body.get("logprobs"), body.get("top_logprobs")
    if on not in (None, True, False):
        raise ApiError(400, f"logprobs must be true or false, got {on!r}", param="logprobs")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= top):
        raise ApiError(400, f"top_logprobs must be an integer from 0 to {top}, got {n!r}",
                       param="top_logprobs")  # fmt: skip
    if n is not None and not on:
        raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    return (n or 0) if on else None


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias, a map from token ids (JSON keys: strings) to biases of -100 to 100."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError(400, f"logit_bias must map token ids to biases, got {value!r:.80}",
                       param="logit_bias")  # fmt: skip
    pairs = []
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias keys must be token ids, got {key!r:.40}",
                           param="logit_bias") from None  # fmt: skip
        pairs.append((token, bias))
    return tuple(pairs)


def _echo(body: dict, chat: bool) -> bool:
    """The completions' `echo`: the prompt in front of the reply (with its logprobs where
    logprobs are asked: how evaluation harnesses score a text, with max_tokens 0)."""
    echo = body.get("echo")
    if echo in (None, False):
        return False
    if chat:
        raise ApiError(400, "echo is a parameter of /v1/completions, not of chat", param="echo")
    if echo is not True:
        raise ApiError(400, f"echo must be true or false, got {echo!r}", param="echo")
    return True


def _config(body: dict, chat: bool) -> GenerationConfig:
    for key in UNSUPPORTED:
        if body.get(key) not in (None, False, [], {}):
            raise ApiError(400, f"{key} is not supported by this server", param=key)
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: one choice per request", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    logprobs, echo = _logprobs(body, chat), _echo(body, chat)
    if max_tokens == 0 and not echo:
        raise ApiError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
    prompt_logprobs = None  # the prompt's logprobs where shown, or where the echo is all
    if echo and (logprobs is not None or max_tokens == 0):
        prompt_logprobs = logprobs or 0
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(stop) > 4:
        raise ApiError(400, "stop takes at most 4 strings", param="stop")
    ignore_eos = body.get("ignore_eos", False)  # vLLM's and llama-server's extension
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, f"ignore_eos must be true or false, got {ignore_eos!r}",
                       param="ignore_eos")  # fmt: skip
    try:
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=body.get("temperature", 1.0),  # OpenAI's defaults
            top_p=body.get("top_p", 1.0),
            top_k=body.get("top_k", 0),  # extensions some clients send
            repetition_penalty=body.get("repetition_penalty", 1.0),
            presence_penalty=_or(body.get("presence_penalty"), 0.0),
            frequency_penalty=_or(body.get("frequency_penalty"), 0.0),
            logit_bias=_logit_bias(body.get("logit_bias")),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            seed=_seed(body.get("seed")),
            stop_strings=tuple(stop),
            stop_token_ids=() if ignore_eos else None,
        )
    except (OptionError, TypeError, ValueError) as e:
        raise ApiError(400, str(e)) from None


def _or(value, default):
    """A parameter's value, or its default where the client sent null (as OpenAI accepts)."""
    return default if value is None else value


def _seed(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"seed must be an integer, got {value!r}", param="seed")
    return value % (1 << 63)


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{k}] needs a role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if any(p.get("type") != "text" for p in content if isinstance(p, dict)):
                raise ApiError(400, f"messages[{k}]: only text content is supported",
                               param="messages")  # fmt: skip
            content = "".join(t for t in texts if isinstance(t, str))
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{k}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def error(e: Exception):
    """Any exception as OpenAI's JSON error response."""
    from fastapi.responses import JSONResponse

    api = _api_error(e)
    return JSONResponse(api.body(), status_code=api.status)


def parse_body(raw: bytes, max_body: int = MAX_BODY_BYTES) -> dict:
    if len(raw) > max_body:
        raise ApiError(413, f"the request body exceeds {max_body} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


class _Guard:
    """What every request passes before a route runs: the body's size, the API key on /v1/,
    and 503 once `closing()` says so. A plain ASGI middleware: Starlette's `@app.middleware`
    (BaseHTTPMiddleware) would relay every chunk of a streamed reply through its own memory
    stream and task, a cost paid per token."""

    def __init__(self, app, api_key: str | None, max_body: int, closing):
        self.app, self.api_key, self.max_body, self.closing = app, api_key, max_body, closing

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                return await error(refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, scope) -> Exception | None:
        headers: dict[bytes, bytes] = {}  # lower-case byte names, as ASGI gives them
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # a repeated header: its first value, as Starlette
        length = headers.get(b"content-length", b"").decode("latin-1")
        if b"content-length" in headers and (not length.isdigit() or int(length) > self.max_body):
            return ApiError(413, f"the request body exceeds {self.max_body} bytes")
        v1 = scope["path"].startswith("/v1/")
        if self.api_key and v1:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return ApiError(401, "incorrect API key provided", code="invalid_api_key")
        if self.closing() and v1:
            return EngineClosedError("the server is shutting down")
        return None


def base_app(api_key: str | None, cors: list[str] | None, max_body: int, closing=lambda: False):
    """A FastAPI app with what every front of the OpenAI routes checks before a route runs:
    the body's size, the API key on /v1/, CORS only for the origins given, OpenAI error bodies
    for unknown routes, and 503 once `closing()` says so."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="llamaonnx", docs_url=None, redoc_url=None, openapi_url=None)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body, closing=closing)  # outermost

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc):
        kind = "not_found" if exc.status_code == 404 else None
        return error(ApiError(exc.status_code, str(exc.detail), code=kind))

    return app


def unknown_model(name, served) -> ApiError:
    message = f"the model {name!r} does not exist; served: {', '.join(served)}"
    return ApiError(404, message, param="model", code="model_not_found")


def create_app(served: dict[str, Served], api_key: str | None = None,
               cors: list[str] | None = None, max_body: int = MAX_BODY_BYTES):  # fmt: skip
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    state = {"closing": False}
    app = base_app(api_key, cors, max_body, closing=lambda: state["closing"])

    @app.on_event("shutdown")
    def _shutdown():
        state["closing"] = True
        for s in served.values():
            s.engine.close()

    async def body_of(request: HttpRequest) -> dict:
        return parse_body(await request.body(), max_body)

    def model_of(body: dict) -> Served:
        name = body.get("model")
        if name is None and len(served) == 1:
            return next(iter(served.values()))
        if name not in served:
            raise unknown_model(name, served)
        return served[name]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": s.created, "owned_by": "llamaonnx"}
            for s in served.values()]}  # fmt: skip

    @app.get("/health")
    async def health():
        ok = not state["closing"]
        body = {"status": "ok" if ok else "shutting down", "models": list(served),
                "process": os.getpid()}  # (which replica answered, behind Ray Serve)  # fmt: skip
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(served), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        try:
            body = await body_of(request)
            s = model_of(body)
            config = _config(body, chat=True)
            prompt = s.engine.session.tokenizer.encode_chat(_messages(body))
            events, listener = _listener()
            handle = s.engine.submit(prompt, config, listener=listener)
        except Exception as e:  # noqa: BLE001 (every error becomes an OpenAI error body)
            return error(e)
        return await _respond(request, s, handle, events, body, chat=True, echo=None)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        try:
            body = await body_of(request)
            s = model_of(body)
            config = _config(body, chat=False)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "prompt must be a non-empty string", param="prompt")
            events, listener = _listener()
            ids = s.engine.session.tokenizer.encode(prompt)
            handle = s.engine.submit(ids, config, listener=listener)
        except Exception as e:  # noqa: BLE001
            return error(e)
        echo = prompt if _echo(body, chat=False) else None
        return await _respond(request, s, handle, events, body, chat=False, echo=echo)

    def _listener():
        """An asyncio queue and the engine-side callback that fills it: one wake-up of the
        loop per event, no thread parked per request (a thread pool has ~cores + 4 of them,
        fewer than the streams a server holds)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        return events, lambda event: loop.call_soon_threadsafe(events.put_nowait, event)

    async def _respond(http: HttpRequest, s: Served, handle: Request, events: asyncio.Queue,
                       body: dict, chat: bool, echo: str | None):  # fmt: skip
        """The reply, streamed or whole; `echo`: the completions' prompt text, put in front
        (with its tokens' logprobs, whole before the first event)."""
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        def usage() -> dict:
            n = len(handle.tokens)
            return {"prompt_tokens": len(handle.prompt), "completion_tokens": n,
                    "total_tokens": len(handle.prompt) + n}  # fmt: skip

        def finish() -> str:
            return "length" if handle.finish_reason == "length" else "stop"

        logprobs = _Logprobs(s.engine.session.tokenizer, chat, handle.config.logprobs is not None)

        if not body.get("stream"):
            echo_text = ""
            loop = asyncio.get_running_loop()
            checked = loop.time()
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), 0.1)
                except TimeoutError:
                    event = None
                if loop.time() - checked >= 0.1:  # a client gone: free the slot
                    checked = loop.time()
                    if await http.is_disconnected():
                        handle.cancel()
                if event is not None and echo is not None:
                    logprobs.add_prompt(handle.prompt, handle.prompt_logprobs)
                    echo_text, echo = echo, None
                if event is not None:
                    logprobs.add(event)
                if event is not None and event.finish_reason is not None:
                    break
            try:
                handle.result(timeout=0)
            except Exception as e:  # noqa: BLE001
                return error(e)
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": handle.text},
                          "finish_reason": finish(), "logprobs": logprobs.take()}  # fmt: skip
                kind = "chat.completion"
            else:
                choice = {"index": 0, "text": echo_text + handle.text,
                          "finish_reason": finish(), "logprobs": logprobs.take()}  # fmt: skip
                kind = "text_completion"
            return {"id": rid, "object": kind, "created": created, "model": s.name,
                    "choices": [choice], "usage": usage()}  # fmt: skip

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(text: str | None, reason: str | None, first: bool = False) -> str:
            lp = None if first else logprobs.take()  # (the tokens since the last chunk)
            if chat:
                delta = {} if text is None else {"content": text}
                if first:
                    delta = {"role": "assistant", "content": ""}
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": lp}
                kind = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": reason,
                          "logprobs": lp}  # fmt: skip
                kind = "text_completion"
            data = {"id": rid, "object": kind, "created": created, "model": s.name,
                    "choices": [choice]}  # fmt: skip
            return f"data: {json.dumps(data)}\n\n"

        async def stream():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                prompt = echo
                while True:
                    event = await events.get()
                    if prompt is not None:  # the prompt first, in a chunk of its own
                        logprobs.add_prompt(handle.prompt, handle.prompt_logprobs)
                        yield chunk(prompt, None)
                        prompt = None
                    logprobs.add(event)
                    if event.text:
                        yield chunk(event.text, None)
                    if event.finish_reason is not None:
                        if event.finish_reason == "error":
                            api = _api_error(handle.error or RuntimeError("engine failed"))
                            yield f"data: {json.dumps(api.body())}\n\n"
                        else:
                            yield chunk(None, finish())
                        break
                if include_usage:
                    data = {"id": rid, "object": "chat.completion.chunk" if chat else
                            "text_completion", "created": created, "model": s.name,
                            "choices": [], "usage": usage()}  # fmt: skip
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or the reply is over): free the slot
                handle.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    return app


def _prometheus(served: dict[str, Served]) -> str:
    lines = []

    def metric(name: str, kind: str, help_: str, values: list[tuple[dict, float]]):
        lines.append(f"# HELP llamaonnx_{name} {help_}")
        lines.append(f"# TYPE llamaonnx_{name} {kind}")
        for labels, value in values:
            tags = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"llamaonnx_{name}{{{tags}}} {value}")

    def each(fn):
        return [({"model": name}, fn(s.engine)) for name, s in served.items()]

    metric("queue_depth", "gauge", "requests waiting for a slot", each(lambda e: e.queue_depth))
    metric("active_slots", "gauge", "slots running a request", each(lambda e: e.active))
    metric("slots", "gauge", "slots of the engine", each(lambda e: len(e.slots)))
    metric("requests_total", "counter", "requests accepted", each(lambda e: e.metrics.requests))
    metric("refused_total", "counter", "requests refused (queue full)",
           each(lambda e: e.metrics.refused))  # fmt: skip
    metric("prompt_tokens_total", "counter", "prompt tokens of the requests taken",
           each(lambda e: e.metrics.prompt_tokens))  # fmt: skip
    metric("prompt_tokens_cached_total", "counter",
           "prompt tokens found in a slot's cache (an earlier request's), not computed again",
           each(lambda e: e.metrics.cached_prompt_tokens))  # fmt: skip
    metric("generated_tokens_total", "counter", "tokens generated",
           each(lambda e: e.metrics.generated_tokens))  # fmt: skip
    metric("tokens_per_second", "gauge", "tokens generated per second, last 10 s",
           each(lambda e: e.metrics.tokens_per_second()))  # fmt: skip
    metric("decode_steps_total", "counter", "decode steps run",
           each(lambda e: e.metrics.decode_steps))  # fmt: skip
    metric("decode_tokens_total", "counter", "tokens produced by decode steps",
           each(lambda e: e.metrics.decode_tokens))  # fmt: skip
    metric("decode_seconds_total", "counter", "seconds spent in decode steps",
           each(lambda e: e.metrics.decode_seconds))  # fmt: skip
    metric("prefill_seconds_total", "counter", "seconds spent prefilling prompt chunks",
           each(lambda e: e.metrics.prefill_seconds))  # fmt: skip
    for name, help_ in (("steps", "decode steps run"), ("seconds", "seconds in decode steps")):
        rows = []
        for model, s in served.items():
            counts = getattr(s.engine.metrics, f"decode_{name}_by_rows")
            rows += [({"model": model, "rows": k}, v) for k, v in sorted(counts.items())]
        metric(f"decode_{name}_by_rows_total", "counter", f"{help_}, by the rows they ran", rows)
    finished = []
    for name, s in served.items():
        for reason, n in sorted(s.engine.metrics.finished.items()):
            finished.append(({"model": name, "reason": reason}, n))
    metric("finished_total", "counter", "requests finished, by reason", finished)
    quantiles = []
    for name, s in served.items():
        ttft = sorted(s.engine.metrics.time_to_first_token)
        for q in (0.5, 0.95):
            value = ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else 0.0
            quantiles.append(({"model": name, "quantile": str(q)}, value))
    metric("time_to_first_token_seconds", "summary", "time from submit to first token",
           quantiles)  # fmt: skip
    return "\n".join(lines) + "\n"


def load(folders: list[Path], slots: int, queue_size: int, threads: int | None) -> dict:
    from runtime.session import Session

    served = {}
    for folder, name in zip(folders, model_names(folders), strict=True):
        session = Session(folder, provider="cpu", threads=threads)
        served[name] = Served(name, Engine(session, slots=slots, queue_size=queue_size),
                              int(time.time()))  # fmt: skip
    return served


def model_names(folders) -> list[str]:
    """The name each folder is served under (its folder's name); OptionError for a repeat."""
    names = []
    for folder in folders:
        name = Path(folder).resolve().name
        if name in names:
            raise OptionError(f"two folders are named {name!r}: serve folders with distinct names")
        names.append(name)
    return names


def serve(args) -> int:
    import uvicorn

    served = load(args.model_dirs, args.slots, args.queue_size, args.threads)
    app = create_app(served, api_key=args.api_key, cors=args.cors)
    names = ", ".join(served)
    print(f"serving {names} at http://{args.host}:{args.port}/v1 ({args.slots} slots each)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
