"""`llamaonnx load TARGET…`: the serving benchmark. N concurrent clients (1, 2, 4, 8, 16 by
default) each send the same set of chat prompts, one after another, to an OpenAI-compatible
server, streaming; per level: aggregate output tokens/s (all clients' tokens over the level's wall
time), p50/p95 time to first token and inter-token latency, requests, errors. JSON, markdown and
a chart.

A TARGET is `NAME=URL` (a server already running, e.g. http://127.0.0.1:8000), or one this
command starts and stops itself:

    NAME=llamaonnx:MODEL_DIR[:SLOTS]            `llamaonnx serve MODEL_DIR --slots SLOTS`
    NAME=llama-server:BINARY:GGUF[:SLOTS]       llama.cpp's server with -np SLOTS (continuous
                                                batching, a context of 2048 per slot)
    NAME=genai:DIR[:SLOTS]                      onnxruntime-genai's Engine behind a thin
                                                adapter (runtime/bench/genai_server.py)

Clients start together (a burst: the worst case for time to first token), or spread evenly over
`ramp` seconds. Per level also: each stream's own decode rate (median over requests of tokens
after the first / time from first to last), and for our server its engine's decode rate (tokens
of decode steps / seconds in them, from /metrics): what batching buys with prompt work left out.

Every target gets the same prompts, max_tokens and greedy sampling; targets run one after
another, each level after the previous one, so they never compete for the CPU. Tokens are counted
from the server's `usage` (stream_options.include_usage) where it sends one, else one per content
chunk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from runtime.errors import OptionError

LEVELS = (1, 2, 4, 8, 16)
# a client's requests at one level, however long --min-steady asks it to go on
MAX_REQUESTS_PER_CLIENT = 1000


@dataclasses.dataclass
class Target:
    name: str
    url: str = ""
    command: list[str] | None = None  # a server to start (and stop) for the run
    proc: subprocess.Popen | None = None
    log: Path | None = None


def parse_target(spec: str, workdir: Path, threads: int) -> Target:
    """NAME=URL, NAME=llamaonnx:DIR[:SLOTS] or NAME=llama-server:BIN:GGUF[:SLOTS]."""
    if "=" not in spec:
        raise OptionError(
            f"target {spec!r}: write NAME=URL, NAME=llamaonnx:DIR[:SLOTS], NAME=genai:DIR[:SLOTS]"
            " or NAME=llama-server:BINARY:GGUF[:SLOTS]"
        )
    name, rest = spec.split("=", 1)
    if rest.startswith(("http://", "https://")):
        return Target(name, rest.rstrip("/"))
    kind, _, args = rest.partition(":")
    parts = args.split(":")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    if kind == "llamaonnx" and 1 <= len(parts) <= 2:
        slots = parts[1] if len(parts) == 2 else "8"
        code = "import sys; from runtime.cli import main; sys.exit(main())"
        cmd = [sys.executable, "-c", code, "serve", parts[0], "--port", str(port),
               "--slots", slots, "--threads", str(threads)]  # fmt: skip
    elif kind == "genai" and 1 <= len(parts) <= 2:
        slots = parts[1] if len(parts) == 2 else "8"
        cmd = [sys.executable, "-m", "runtime.bench.genai_server", parts[0], "--port", str(port),
               "--slots", slots, "--threads", str(threads)]  # fmt: skip
    elif kind == "llama-server" and 2 <= len(parts) <= 3:
        slots = int(parts[2]) if len(parts) == 3 else 8
        cmd = [parts[0], "-m", parts[1], "--port", str(port), "-np", str(slots),
               "-c", str(2048 * slots), "-t", str(threads), "-tb", str(threads),
               "--cont-batching", "--log-disable"]  # fmt: skip
    else:
        raise OptionError(f"target {spec!r}: unknown kind {kind!r} or wrong parts")
    return Target(name, url, cmd, log=workdir / f"{name}.log")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(t: Target, timeout: float = 300) -> None:
    if t.command is None:
        return
    t.log.parent.mkdir(parents=True, exist_ok=True)
    with open(t.log, "w") as out:
        t.proc = subprocess.Popen(t.command, stdout=out, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if t.proc.poll() is not None:
            raise OptionError(f"{t.name} exited with {t.proc.returncode}: see {t.log}")
        try:
            if httpx.get(f"{t.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    _stop(t)
    raise OptionError(f"{t.name} did not answer /health within {timeout:.0f} s: see {t.log}")


def _stop(t: Target) -> None:
    if t.proc is not None:
        t.proc.terminate()
        try:
            t.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            t.proc.kill()
        t.proc = None


def prompts(n: int = 4, words: int = 65) -> list[str]:
    """The shared prompts: the first `words` words of the shipped texts (prose, chat, code) and
    of the prose's second half, each with an instruction. 65 words: 113–172 tokens with
    SmolLM2's tokenizer and chat template (code is dense), 131 on average."""
    from runtime.texts import eval_texts

    texts = list(eval_texts().values())
    prose = texts[0].split()
    pieces = [t.split()[:words] for t in texts] + [prose[len(prose) // 2 :][:words]]
    asks = ["Summarize this text in two sentences:", "What happens next? Reply briefly:",
            "Explain what this code does:", "Give this passage a title and say why:"]  # fmt: skip
    return [f"{asks[i % 4]}\n\n{' '.join(pieces[i % len(pieces)])}" for i in range(n)]


def _model(url: str, api_key: str | None) -> str:
    import httpx

    r = httpx.get(f"{url}/v1/models", headers=_headers(api_key), timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def one_request(url, model, prompt, max_tokens, api_key=None, timeout=180.0) -> dict:
    """One streamed chat completion: {"ttft", "itl": [...], "tokens", "seconds"} or {"error"}.

    Plain `http.client` on one connection, the lines read by its buffered reader: the clients
    share the machine with the server they measure, and httpx's streaming cost ~1 ms of CPU a
    chunk (a quarter of a core at 8 clients on two cores), this a small fraction of that."""
    import http.client
    from urllib.parse import urlsplit

    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    headers = {"Content-Type": "application/json", **_headers(api_key)}
    t0 = time.monotonic()
    stamps: list[float] = []
    usage = None
    conn = kind(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", f"{parts.path.rstrip('/')}/v1/chat/completions",
                     json.dumps(body).encode(), headers)  # fmt: skip
        r = conn.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read().decode(errors='replace')[:200]}"}
        while line := r.readline():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    stamps.append(time.monotonic())
    except (OSError, http.client.HTTPException, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        conn.close()
    end = time.monotonic()
    tokens = (usage or {}).get("completion_tokens") or len(stamps)
    return {  # (no content at all: a reply of only an end token, or of incomplete characters)
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
        "ttft": stamps[0] - t0 if stamps else None,
        "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "tokens": tokens,
        "seconds": end - t0,
        "stamps": stamps,  # monotonic times of the content chunks, and of the request's ends
        "began": t0,
        "ended": end,
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _metrics_text(url: str, api_key: str | None = None) -> str | None:
    """The server's /metrics page, None where it cannot be asked."""
    import httpx

    try:
        return httpx.get(f"{url}/metrics", headers=_headers(api_key), timeout=10).text
    except httpx.HTTPError:
        return None


def _metric_sums(url: str, names: tuple[str, ...], api_key: str | None = None) -> dict | None:
    """Our server's /metrics values `llamaonnx_<name>`, each summed over its models; None where
    the server cannot be asked or reports none of them."""
    text = _metrics_text(url, api_key)
    if text is None:
        return None
    sums, seen = dict.fromkeys(names, 0.0), False
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0].removeprefix("llamaonnx_")
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
            seen = True
    return sums if seen else None


def steps_by_rows(url: str, api_key: str | None = None) -> dict[int, list[float]] | None:
    """{rows: [decode steps, seconds in them]} summed over our server's models, from /metrics'
    `decode_{steps,seconds}_by_rows_total`; None for a server without them."""
    import re

    text = _metrics_text(url, api_key)
    if text is None:
        return None
    found: dict[int, list[float]] = {}
    pattern = re.compile(
        r'^llamaonnx_decode_(steps|seconds)_by_rows_total\{.*rows="(\d+)".*\} (\S+)$'
    )
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            found.setdefault(int(m[2]), [0.0, 0.0])[m[1] == "seconds"] += float(m[3])
    return found or None


def engine_figures(before: dict | None, after: dict | None) -> dict:
    """What our engine's decode steps did between two readings of `steps_by_rows`: the batch's
    decode rate (tokens over seconds in decode steps), the rows a step ran on average, and the
    rows and rate of the steps that ran the most rows. Each None for a server without them."""
    figures = dict.fromkeys(("decode", "rows_per_step", "full_rows", "full_rate"))
    if after is None:
        return figures
    before = before or {}
    ran = {k: (v[0] - before.get(k, [0, 0])[0], v[1] - before.get(k, [0, 0])[1])
           for k, v in after.items()}  # fmt: skip
    ran = {k: v for k, v in ran.items() if v[0] > 0 and v[1] > 0}
    if not ran:
        return figures
    tokens = sum(k * steps for k, (steps, _) in ran.items())
    rows = max(ran)
    return {
        "decode": tokens / sum(seconds for _, seconds in ran.values()),
        "rows_per_step": tokens / sum(steps for steps, _ in ran.values()),
        "full_rows": rows,
        "full_rate": rows * ran[rows][0] / ran[rows][1],
    }


def steady_window(results: list[dict], clients: int) -> tuple[float, float] | None:
    """The span in which every client had a request in flight or just answered, i.e. all
    `clients` were taking part: from the last client's first request to the first client's end
    of its last. None where some client never ran or the span is empty."""
    spans: dict[int, list[float]] = {}
    for r in results:
        if "began" in r:
            span = spans.setdefault(r["client"], [r["began"], r["ended"]])
            span[0], span[1] = min(span[0], r["began"]), max(span[1], r["ended"])
    if len(spans) < clients:
        return None
    start, end = max(s for s, _ in spans.values()), min(e for _, e in spans.values())
    return (start, end) if end > start else None


def steady_figures(results: list[dict], window, samples: list) -> dict:
    """Output tokens/s within `window` (each content chunk counted as its request's tokens per
    chunk), and our engine's figures between the first /metrics sample inside it and the last;
    each None where the window or the samples do not allow it."""
    figures = {"steady_s": None, "steady_tok_s": None, "steady_engine_decode_tok_s": None,
               "steady_engine_rows_per_step": None}  # fmt: skip
    if window is None:
        return figures
    start, end = window
    tokens = 0.0
    for r in results:
        stamps = r.get("stamps") or ()
        if stamps:
            tokens += sum(start <= t <= end for t in stamps) * r["tokens"] / len(stamps)
    figures["steady_s"] = end - start
    figures["steady_tok_s"] = tokens / (end - start)
    inside = [snap for t, snap in samples if start <= t <= end]
    if len(inside) >= 2:
        engine = engine_figures(inside[0], inside[-1])
        figures["steady_engine_decode_tok_s"] = engine["decode"]
        figures["steady_engine_rows_per_step"] = engine["rows_per_step"]
    return figures


def level(url, model, texts, clients, per_client, max_tokens, api_key=None, ramp=0.0,
          sample_every: float = 0.5, min_steady: float = 0.0) -> dict:  # fmt: skip
    """`clients` threads, each sending `per_client` requests in turn (client c starts at prompt
    c, so every level sends the same mix), client c starting at c · ramp / clients seconds;
    with `min_steady`, each goes on sending until every client has been taking part for that
    many seconds (a fast server would otherwise answer them all inside the ramp, and leave no
    steady span to measure). Besides the whole level's figures, the same figures over its
    steady span (`steady_window`: all clients taking part, the ramp and the last requests left
    out), for which our server's /metrics is read every `sample_every` seconds."""
    results: list[dict] = []
    lock = threading.Lock()
    # each client's first request's "began" (its start where it failed before one), the stamp
    # steady_window measures from: a level stopped by `more` has a steady span of at least
    # min_steady by the same measure, not by one a few microseconds off
    first: dict[int, float] = {}

    def more(j: int, ended: float) -> bool:
        """Whether a client that sent j requests, the last of them answered at `ended`, sends
        another."""
        if j < per_client:
            return True
        if not min_steady or j >= MAX_REQUESTS_PER_CLIENT:
            return False
        with lock:
            last = max(first.values()) if len(first) == clients else None
        return last is None or ended - last < min_steady

    before = steps_by_rows(url, api_key)
    samples: list[tuple[float, dict]] = []
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(sample_every):
            snap = steps_by_rows(url, api_key)
            if snap is not None:
                samples.append((time.monotonic(), snap))

    def client(c: int) -> None:
        time.sleep(c * ramp / clients)
        j, ended = 0, 0.0
        while more(j, ended):
            start = time.monotonic() - t0
            # a tag of its own in front: no server finds the prompt in a cache (beyond the
            # chat template's shared start), so each request's prompt is computed under load
            prompt = f"[{c + 1}.{j + 1}] {texts[(c + j) % len(texts)]}"
            r = one_request(url, model, prompt, max_tokens, api_key)
            with lock:
                results.append({**r, "client": c, "start": start})
                first.setdefault(c, r.get("began", t0 + start))
            ended = r.get("ended", time.monotonic())
            j += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    watcher = threading.Thread(target=sampler) if before is not None else None
    t0 = time.monotonic()
    for t in threads + ([watcher] if watcher else []):
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    done.set()
    if watcher:
        watcher.join()
    steady = steady_figures(results, steady_window(results, clients), samples)
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    engine = engine_figures(before, steps_by_rows(url, api_key))
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r["error"] for r in results if "error" in r})[:3],
        "output_tokens": sum(r["tokens"] for r in ok),
        "wall_s": wall,
        "tokens_per_second": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_ms": _ms(_pct(ttft, 0.5)),
        "ttft_p95_ms": _ms(_pct(ttft, 0.95)),
        "itl_p50_ms": _ms(_pct(itl, 0.5)),
        "itl_p95_ms": _ms(_pct(itl, 0.95)),
        "single_stream_tok_s": statistics.median(
            [(len(r["itl"])) / sum(r["itl"]) for r in ok if r["itl"] and sum(r["itl"]) > 0]
        )
        if any(r["itl"] and sum(r["itl"]) > 0 for r in ok)
        else None,
        "engine_decode_tok_s": engine["decode"],
        # streams a decode step ran, on average: below `clients` while some start, prefill or
        # finish (the ramp, a new request's prompt chunks, the last requests)
        "engine_rows_per_step": engine["rows_per_step"],
        # the decode rate of the steps that ran the most rows (all the clients, or every slot):
        # what that many streams decoding together give, occupancy left out
        "engine_full_batch_rows": engine["full_rows"],
        "engine_full_batch_tok_s": engine["full_rate"],
        **steady,
        "prompt_tokens": sorted({r["prompt_tokens"] for r in ok if r.get("prompt_tokens")}),
        # each request as sent: which client, when (s after the level began), its first token
        "timeline": [
            {
                "client": r["client"],
                "start_s": round(r["start"], 3),
                "ttft_ms": _ms(r.get("ttft")),
                "tokens": r.get("tokens"),
                "error": r.get("error"),
            }
            for r in sorted(results, key=lambda r: r["start"])
        ],
    }


def _rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MB (Linux /proc), None where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, TypeError):
        return None
    return None


def _chat(url, model, prompt, max_tokens, api_key, stream, drop_after=None) -> dict:
    """One greedy chat request: {"text", "finish"} when answered, {"refused": status} for an
    OpenAI-style error (429 queue full, 503 shutting down), {"dropped": True} when this client
    hung up after `drop_after` content chunks, {"failed": why} for anything else."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream}  # fmt: skip
    try:
        if not stream:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=_headers(api_key),
                           timeout=600)  # fmt: skip
            if r.status_code != 200:
                return _refusal(r.status_code, r.text)
            choice = r.json()["choices"][0]
            return {"text": choice["message"]["content"], "finish": choice["finish_reason"]}
        text, finish, chunks, done = "", None, 0, False
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body,
                          headers=_headers(api_key), timeout=600) as r:  # fmt: skip
            if r.status_code != 200:
                r.read()
                return _refusal(r.status_code, r.text)
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                for choice in json.loads(data).get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        text += piece
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
                if drop_after is not None and chunks >= drop_after:
                    return {"dropped": True}  # leaving the `with` closes the connection
        if not done or finish is None:
            return {"failed": f"stream ended without [DONE] or a finish reason ({chunks} chunks)"}
        return {"text": text, "finish": finish}
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as e:
        return {"failed": f"{type(e).__name__}: {e}"}


def _refusal(status: int, text: str) -> dict:
    try:
        message = json.loads(text)["error"]["message"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return {"failed": f"HTTP {status} without an OpenAI error body: {text[:120]}"}
    if status in (429, 503):
        return {"refused": status, "message": message}
    return {"failed": f"HTTP {status}: {message[:120]}"}


def soak(url, model, texts, clients, seconds, max_tokens, api_key=None, pid=None,
         progress=lambda m: None, seed=0) -> dict:  # fmt: skip
    """`clients` clients for `seconds`, each request one of: streamed to the end (half), hung
    up after 1–8 chunks (a quarter: the server must cancel it), or not streamed. Every answered
    reply must equal the prompt's reply alone (greedy: batching must not change it); anything
    else but a refusal with an OpenAI error counts as failed. The server's resident memory is
    sampled every 5 s; afterwards its /metrics must show no slot or queue entry left behind."""
    import random

    import httpx

    reference = {p: _chat(url, model, p, max_tokens, api_key, stream=False) for p in texts}
    if any("text" not in r for r in reference.values()):
        raise OptionError(f"soak: the reference replies failed: {list(reference.values())}")
    counts = {"answered": 0, "dropped": 0, "refused": 0, "failed": 0, "garbled": 0}
    examples: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        while time.monotonic() < end:
            prompt = texts[rng.randrange(len(texts))]
            roll = rng.random()
            if roll < 0.5:
                r = _chat(url, model, prompt, max_tokens, api_key, stream=True)
            elif roll < 0.75:
                r = _chat(url, model, prompt, max_tokens, api_key, stream=True,
                          drop_after=rng.randint(1, 8))  # fmt: skip
            else:
                r = _chat(url, model, prompt, max_tokens, api_key, stream=False)
            with lock:
                if "dropped" in r:
                    counts["dropped"] += 1
                elif "refused" in r:
                    counts["refused"] += 1
                elif "failed" in r:
                    counts["failed"] += 1
                    examples.append(r["failed"])
                elif r["text"] != reference[prompt]["text"]:
                    counts["garbled"] += 1
                    examples.append(f"reply differs from the reference: {r['text'][:80]!r}")
                else:
                    counts["answered"] += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        mb = _rss_mb(pid)
        if mb is not None:
            rss.append((time.monotonic() - t0, mb))
        done = sum(counts.values())
        progress(f"soak: {time.monotonic() - t0:.0f} s, {done} requests, {counts}, "
                 f"RSS {mb or 0:.0f} MB")  # fmt: skip
        for t in threads:
            t.join(timeout=5 / len(threads))
    time.sleep(1.0)  # the last hang-ups reach the engine at its next step
    left = engine_state(url, api_key)
    warm = [m for s, m in rss if s >= min(60.0, seconds / 4)]
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": sum(counts.values()),
        **counts,
        "failure_examples": sorted(set(examples))[:5],
        "rss_mb": {
            "first": warm[0] if warm else None,
            "last": warm[-1] if warm else None,
            "max": max(warm) if warm else None,
            "samples": rss,
        },
        "left_after": left,
        "httpx": httpx.__version__,
    }


def engine_state(url: str, api_key: str | None = None) -> dict | None:
    """Our server's active slots and queue depth (summed over models), from /metrics."""
    return _metric_sums(url, ("active_slots", "queue_depth"), api_key)


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000


def run(specs: list[str], levels=LEVELS, per_client: int = 4, max_tokens: int = 64,
        threads: int = 2, api_key: str | None = None, workdir: Path = Path("build/load"),
        progress=lambda m: None, prompt_words: int = 65, ramp: float = 0.0,
        soak_seconds: float = 0.0, min_steady: float = 0.0) -> dict:  # fmt: skip
    from runtime.bench.harness import machine, versions

    targets = [parse_target(s, workdir, threads) for s in specs]
    texts = prompts(words=prompt_words)
    out = []
    for t in targets:
        progress(f"start   {t.name}")
        _start(t)
        try:
            model = _model(t.url, api_key)
            one_request(t.url, model, texts[0], 8, api_key)  # warm-up
            if soak_seconds:
                pid = t.proc.pid if t.proc is not None else None
                result = soak(t.url, model, texts, max(levels), soak_seconds, max_tokens,
                              api_key, pid, progress)  # fmt: skip
                out.append({"name": t.name, "url": t.url, "command": t.command, "soak": result})
                continue
            rows = []
            for n in levels:
                rows.append(level(t.url, model, texts, n, per_client, max_tokens, api_key,
                                  ramp, min_steady=min_steady))  # fmt: skip
                r = rows[-1]
                progress(
                    f"{t.name}: {n} clients, {r['tokens_per_second']:.1f} tok/s, "
                    f"TTFT p95 {r['ttft_p95_ms'] or 0:.0f} ms, {r['errors']} errors"
                )
            out.append({"name": t.name, "url": t.url, "command": t.command, "levels": rows})
        finally:
            _stop(t)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "levels": list(levels),
            "requests_per_client": per_client,
            "max_tokens": max_tokens,
            "threads": threads,
            "prompts": len(texts),
            "prompt_words": prompt_words,
            "distinct_prompts": True,
            "ramp_s": ramp,
            "min_steady_s": min_steady,
            "sampling": "greedy (temperature 0)",
        },
        "targets": out,
    }


def soak_markdown(data: dict, command: str) -> str:
    from runtime.bench.report import cpu_key

    m, s = data["machine"], data["settings"]
    lines = [
        "# Serving soak: clients that hang up, for minutes",
        "",
        f"Measured {data['date']} on {cpu_key(m)}; {s['threads']} threads per "
        f"server; greedy, {s['max_tokens']} new tokens at most. Each client loops: a streamed "
        "request read to the end (half), one it hangs up on after 1–8 chunks (a quarter), or "
        "a non-streamed one. An answered reply must equal that prompt's reply alone.",
        "",
        "```bash",
        command,
        "```",
        "",
        "| server | clients | seconds | requests | answered | hung up | refused | failed "
        "| garbled | RSS after warm-up → end (max) MB | left in slots / queue |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for t in data["targets"]:
        r = t["soak"]
        rss, left = r["rss_mb"], r["left_after"] or {}
        mem = ("—" if rss["first"] is None
               else f"{rss['first']:.0f} → {rss['last']:.0f} ({rss['max']:.0f})")  # fmt: skip
        lines.append(
            f"| {t['name']} | {r['clients']} | {r['seconds']:.0f} | {r['requests']} | "
            f"{r['answered']} | {r['dropped']} | {r['refused']} | {r['failed']} | "
            f"{r['garbled']} | {mem} | {left.get('active_slots', '—')} / "
            f"{left.get('queue_depth', '—')} |"
        )
        for e in r["failure_examples"]:
            lines.append(f"\n- {t['name']}: {e}")
    return "\n".join(lines) + "\n"


# docs/load.md: one section per CPU, as docs/benchmarks.md (report.merge_sections)
HEADER = (
    "# Serving: concurrent clients against OpenAI-compatible servers\n\nOne section per CPU "
    "this benchmark has run on; `make load` replaces its own machine's section and keeps the "
    "others. Speed depends on the CPU: never read one section as another machine's figure.\n"
)


def markdown(data: dict, command: str, png: str | None = None) -> str:
    """A soak's report, or this machine's section of a load report (starting "## CPU")."""
    if data["targets"] and "soak" in data["targets"][0]:
        return soak_markdown(data, command)
    from runtime.bench.report import cpu_key

    s, m = data["settings"], data["machine"]
    counts = sorted({n for t in data["targets"] for r in t["levels"]
                     for n in r.get("prompt_tokens") or ()})  # fmt: skip
    sizes = f" ({counts[0]}–{counts[-1]} tokens as the servers count them)" if counts else ""
    lines = [
        f"## {cpu_key(m)}",
        "",
        f"Measured {data['date']} on {m['cpu']} ({m['cores']} cores); {s['threads']} threads per "
        f"server, {s['prompts']} chat prompts of {s['prompt_words']} words of text{sizes}"
        + (
            ", each request's with a tag of its own in front ([client.request]: no server finds "
            "it in a prompt cache), "
            if s.get("distinct_prompts")
            else ", "
        )
        + f"{s['max_tokens']} new tokens each "
        f"({s['sampling']}), "
        + (
            f"at least {s['requests_per_client']} requests per client in turn, and more until "
            f"all of a level's clients have taken part together for {s['min_steady_s']:g} s, "
            if s.get("min_steady_s")
            else f"{s['requests_per_client']} requests per client in turn, "
        )
        + "streamed; "
        + (
            f"clients start spread over {s['ramp_s']:g} s."
            if s.get("ramp_s")
            else "clients start together."
        ),
        "",
        "*stream tok/s*: one stream's decode rate (median over requests of tokens after the "
        "first / time from first to last token). *engine decode tok/s*: our engine's tokens "
        "of decode steps / seconds in them (its /metrics), i.e. the batch's rate with prompt "
        "work left out; *rows/step*: the streams its average decode step ran (fewer than the "
        "clients while some start, take their prompt or finish); *full batch tok/s (rows)*: the "
        "rate of its steps that ran the most rows, occupancy left out; — for servers that do "
        "not report them. *steady*: the same over the level's steady span, from the last "
        "client's first request to the first client's end of its last (all clients taking "
        "part; the ramp and the last requests finishing alone left out), its length in "
        "seconds; the engine's figures there from /metrics read every 0.5 s, and its decode rate "
        "as a multiple of the same server's at 1 client.",
        "",
        "```bash",
        command,
        "```",
        "",
        "| server | clients | requests | errors | output tok/s | stream tok/s "
        "| engine decode tok/s | rows/step | full batch tok/s (rows) | steady s | steady output "
        "tok/s | steady engine decode tok/s (rows/step) | TTFT p50 ms | TTFT p95 ms "
        "| ITL p50 ms | ITL p95 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def f(x, digits=0):
        return "—" if x is None else f"{x:.{digits}f}"

    def full(r):
        rate = r.get("engine_full_batch_tok_s")
        return "—" if rate is None else f"{rate:.1f} ({r['engine_full_batch_rows']})"

    def steady_engine(r, one):
        rate = r.get("steady_engine_decode_tok_s")
        if rate is None:
            return "—"
        ratio = f", {rate / one:.2f}× 1 client" if one and r["clients"] > 1 else ""
        return f"{rate:.1f} ({r['steady_engine_rows_per_step']:.2f}{ratio})"

    for t in data["targets"]:
        ones = [r.get("steady_engine_decode_tok_s") for r in t["levels"] if r["clients"] == 1]
        one = ones[0] if ones else None  # what batching buys: against this server's one stream
        for r in t["levels"]:
            lines.append(
                f"| {t['name']} | {r['clients']} | {r['requests']} | {r['errors']} | "
                f"{f(r['tokens_per_second'], 1)} | {f(r.get('single_stream_tok_s'), 1)} | "
                f"{f(r.get('engine_decode_tok_s'), 1)} | {f(r.get('engine_rows_per_step'), 2)} | "
                f"{full(r)} | {f(r.get('steady_s'), 1)} | {f(r.get('steady_tok_s'), 1)} | "
                f"{steady_engine(r, one)} | {f(r['ttft_p50_ms'])} | "
                f"{f(r['ttft_p95_ms'])} "
                f"| {f(r['itl_p50_ms'], 1)} | {f(r['itl_p95_ms'], 1)} |"
            )
    if png:
        lines += ["", f"![serving benchmark]({png})"]
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    for t in data["targets"]:
        x = [r["clients"] for r in t["levels"]]
        axes[0].plot(x, [r["tokens_per_second"] for r in t["levels"]], marker="o", label=t["name"])
        axes[1].plot(x, [r["ttft_p95_ms"] or 0 for r in t["levels"]], marker="o", label=t["name"])
    for ax, title in zip(axes, ("aggregate output tok/s", "time to first token p95 (ms)"),
                         strict=True):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(data["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main_args(p) -> None:
    from runtime.options import argparse_type, integer, number

    p.add_argument("targets", nargs="+", help="NAME=URL | NAME=llamaonnx:DIR[:SLOTS] | "
                   "NAME=llama-server:BINARY:GGUF[:SLOTS]")  # fmt: skip
    p.add_argument("--clients", default=",".join(map(str, LEVELS)),
                   help="concurrency levels, comma-separated (default 1,2,4,8,16)")  # fmt: skip
    p.add_argument("--requests", type=argparse_type(integer, 1, 1000), default=4,
                   help="requests per client at each level")  # fmt: skip
    p.add_argument("--max-tokens", type=argparse_type(integer, 1, 4096), default=64)
    p.add_argument("--prompt-words", type=argparse_type(integer, 1, 100_000), default=65,
                   help="words of text in each prompt (65: ~130 tokens)")  # fmt: skip
    p.add_argument("--soak", type=argparse_type(number, 0, 86400), default=0.0,
                   help="instead of the levels: SECONDS of the highest --clients level with "
                   "random hang-ups; checks every reply and the server's memory")  # fmt: skip
    p.add_argument("--ramp", type=argparse_type(number, 0, 3600), default=0.0,
                   help="seconds over which a level's clients start (0: a burst)")  # fmt: skip
    p.add_argument("--min-steady", type=argparse_type(number, 0, 3600), default=0.0,
                   help="clients go on past --requests until all of them have been taking "
                   "part for SECONDS (0: exactly --requests each)")  # fmt: skip
    p.add_argument("--threads", type=argparse_type(integer, 1, 256), default=os.cpu_count() or 2)
    p.add_argument("--api-key", default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)


def levels_arg(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(x) for x in text.split(","))
    except ValueError:
        levels = ()
    if not levels or any(n < 1 or n > 1024 for n in levels):
        raise OptionError(f"--clients {text!r}: comma-separated integers from 1 to 1024")
    return levels
