"""`llamaonnx serve`, served for real in a subprocess: the official `openai` client and plain HTTP
against the OpenAI routes, errors in OpenAI's form with its status codes, the API key, the queue
limit, a disconnect cancelling its request, /health and /metrics."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path_factory, folders, *extra) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    code = "import sys; from runtime.cli import main; sys.exit(main())"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", *map(str, folders), "--port", str(port), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"serve did not answer within 180 s:\n{log.read_text()}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def server(default_int4, tiny_folders, tmp_path_factory):
    """The default int4 model and the tiny one, 4 slots, an API key."""
    proc, url = _start(
        tmp_path_factory, [default_int4, tiny_folders["ort"]], "--slots", "4", "--api-key", KEY
    )
    yield url, default_int4.name, tiny_folders["ort"].name
    proc.terminate()
    proc.wait(timeout=30)


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def _post(url: str, path: str, body, key: str | None = KEY, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_streamed_and_not_give_the_same_reply(server):
    url, model, _ = server
    client = _client(url)
    assert {m.id for m in client.models.list().data} >= {model}
    whole = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=16, temperature=0
    )
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens <= 16 and whole.usage.prompt_tokens > 5
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_seeded_sampling_repeat(server):
    url, model, _ = server
    client = _client(url)
    a, b = (
        client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=7
        )  # fmt: skip
        for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text != ""
    stopped = client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=7,
        stop=[a.choices[0].text[4:7]],
    )  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop"
    assert a.choices[0].text.startswith(stopped.choices[0].text)
    # ignore_eos (vLLM's and llama-server's extension): exactly max_tokens, end-of-text or not
    prompt = "The capital of France is Paris.<|endoftext|>"
    held = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    assert held.usage.completion_tokens == 40 and held.choices[0].finish_reason == "length"
    status, body = _post(url, "/v1/completions",
                         {"model": model, "prompt": prompt, "ignore_eos": "yes"})  # fmt: skip
    assert status == 400 and body["error"]["param"] == "ignore_eos"
    # OpenAI's frequency penalty counts the reply's own tokens: the commas of a count stop
    count = dict(model=model, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0)
    plain = client.completions.create(**count).choices[0].text
    penalised = client.completions.create(**count, frequency_penalty=2.0).choices[0].text
    assert plain.count(",") > penalised.count(",")
    with pytest.raises(openai.BadRequestError, match=r"presence_penalty .* \[-2, 2\]"):
        client.completions.create(**count, presence_penalty=3)


def test_logprobs_and_logit_bias(server, default_int4):
    """Chat's logprobs (each token with its bytes and its likeliest alternatives; streamed, the
    same entries), the completions' form, and logit_bias, through the openai client."""
    from runtime.tokenizer import Tokenizer

    url, model, _ = server
    client = _client(url)
    ask = dict(model=model, max_tokens=24, temperature=0, logprobs=True, top_logprobs=2,
               messages=[{"role": "user", "content": "Say café, then an emoji."}])  # fmt: skip
    whole = client.chat.completions.create(**ask)
    choice = whole.choices[0]
    content = choice.logprobs.content
    assert len(content) == whole.usage.completion_tokens - (choice.finish_reason == "stop")
    # the reply's text is its tokens' bytes joined (a token may hold part of a character),
    # less a last character that max_tokens cut short (the text never ends in part of one)
    joined, text = b"".join(bytes(e.bytes) for e in content), choice.message.content.encode()
    assert joined.startswith(text) and len(joined) - len(text) < 4
    for e in content:  # greedy: the token taken is the likeliest
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].bytes == e.bytes
        assert e.top_logprobs[0].logprob == e.logprob <= 0
        assert e.top_logprobs[1].logprob <= e.logprob
    chunks = list(client.chat.completions.create(**ask, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]  # fmt: skip
    assert [(e.bytes, e.logprob) for e in streamed] == [(e.bytes, e.logprob) for e in content]

    count = dict(model=model, prompt="Count: 1, 2, 3,", max_tokens=8, temperature=0)
    done = client.completions.create(**count, logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(8)]
    pairs = zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    assert all(max(d.values()) == p for d, p in pairs)  # greedy: the likeliest taken
    tok = Tokenizer.from_folder(default_int4)
    first = next(i for i in range(50_000) if tok.token_bytes(i) == lp.tokens[0].encode())
    banned = client.completions.create(**count, logit_bias={str(first): -100}, logprobs=0)
    assert banned.choices[0].logprobs.tokens[0] != lp.tokens[0]
    assert banned.choices[0].logprobs.top_logprobs[0] == {}

    chat = {"model": model, "messages": MESSAGES}
    for body, param in (({**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({**chat, "top_logprobs": 2}, "top_logprobs"),
                        ({**chat, "logit_bias": {"x": 1}}, "logit_bias"),
                        ({**count, "logprobs": 6}, "logprobs")):  # fmt: skip
        status, answer = _post(url, "/v1/completions" if "prompt" in body else
                               "/v1/chat/completions", body)  # fmt: skip
        assert status == 400 and answer["error"]["param"] == param, answer
    status, answer = _post(url, "/v1/completions", {**count, "logit_bias": {"999999": 5}})
    assert status == 400 and "past this model's vocabulary" in answer["error"]["message"]


def test_echo_scores_the_prompt(server, default_int4):
    """The completions' echo, as evaluation harnesses score a text (echo, logprobs, max_tokens
    0): the prompt comes back as the text with each token's logprob (the first's null), equal
    to a teacher-forced forward pass's log-softmax on the same folder; streamed, the prompt
    comes first in a chunk of its own and the reply after it. Chat has no echo, and max_tokens
    0 needs it."""
    import numpy as np

    from runtime.session import Session

    url, model, _ = server
    client = _client(url)
    prompt = "The capital of France is Paris. The capital of Italy is"
    scored = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=2,
                                       max_tokens=0)  # fmt: skip
    choice, n = scored.choices[0], scored.usage.prompt_tokens
    lp = choice.logprobs
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    assert "".join(lp.tokens) == prompt and len(lp.tokens) == n
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(n)]
    session = Session(default_int4, provider="cpu")
    ids = np.array([session.tokenizer.encode(prompt)], np.int64)
    assert ids.shape[1] == n
    logits = session.forward(ids, np.ones((1, n), np.int64), np.arange(n)[None],
                             session.new_cache(1, n))[0][:-1].astype(np.float64)  # fmt: skip
    mx = logits.max(1, keepdims=True)
    want = logits - mx - np.log(np.exp(logits - mx).sum(1, keepdims=True))
    assert lp.token_logprobs[1:] == pytest.approx(want[np.arange(n - 1), ids[0, 1:]], abs=2e-3)
    for d, p in zip(lp.top_logprobs[1:], lp.token_logprobs[1:], strict=True):
        assert len(d) == 2 and max(d.values()) >= p

    ask = dict(model=model, prompt=prompt, echo=True, max_tokens=4, temperature=0)
    whole = client.completions.create(**ask).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(**ask, stream=True)]
    assert chunks[0] == prompt and "".join(chunks) == whole and whole.startswith(prompt)
    assert len(whole) > len(prompt)
    for path, body, param in (
        ("/v1/chat/completions", {"model": model, "messages": MESSAGES, "echo": True}, "echo"),
        ("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": model, "prompt": prompt, "echo": 1}, "echo"),
    ):
        status, answer = _post(url, path, body)
        assert status == 400 and answer["error"]["param"] == param, answer


def test_errors_come_in_openais_form_with_its_status_codes(server):
    url, model, tiny = server
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()
    client = _client(url)
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="exceeds the engine's context") as e:
        client.completions.create(model=tiny, prompt="x " * 2000, max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    status, body = _post(
        url, "/v1/chat/completions", {"model": model, "messages": MESSAGES, "n": 2}
    )
    assert status == 400 and body["error"]["param"] == "n"
    tools = {"model": model, "messages": MESSAGES, "tools": [{"type": "function"}]}
    status, body = _post(url, "/v1/chat/completions", tools)
    assert status == 400 and body["error"]["param"] == "tools"
    status, body = _post(url, "/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    # a body over the limit is refused from its Content-Length, before it is read: the client
    # announces 2 MiB and waits for the answer (sending it all races the server's early reply,
    # which closes the connection: a reset on a busy machine)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/v1/completions")
    for name, value in (("Content-Type", "application/json"), ("Content-Length", str(2 << 20)),
                        ("Authorization", f"Bearer {KEY}")):  # fmt: skip
        conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    status, body = response.status, json.loads(response.read())
    conn.close()
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    status, body = _post(url, "/v1/chat/completions", {"model": model, "messages": MESSAGES},
                         key=None)  # fmt: skip
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_a_disconnect_cancels_the_request(server):
    url, model, _ = server
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    # ignore_eos and 2000 tokens: the reply cannot end on its own before the server sees the
    # client leave, however fast the CPU (as the queue test below)
    body = {"model": model, "messages": MESSAGES, "max_tokens": 2000, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.close()  # gone, ~2000 tokens early
    deadline = time.time() + 60
    while time.time() < deadline:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        if f'llamaonnx_finished_total{{model="{model}",reason="cancelled"}}' in text:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the request was not cancelled after its client left:\n" + text)
    idle = f'llamaonnx_active_slots{{model="{model}"}} 0'
    deadline = time.time() + 10  # (the slot is freed just after the count is taken)
    while idle not in text and time.time() < deadline:
        time.sleep(0.1)
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    assert idle in text, "the cancelled request still holds its slot:\n" + text


def test_health_and_metrics(server):
    url, model, _ = server
    # a request of its own, so that decode steps ran whichever tests ran before
    request = {"model": model, "messages": MESSAGES, "max_tokens": 4, "ignore_eos": True,
               "temperature": 0}  # fmt: skip
    status, body = _post(url, "/v1/chat/completions", request)
    assert status == 200 and body["usage"]["completion_tokens"] == 4
    # asked again, the prompt is found in the slot's cache (all of it but its last token)
    status, again = _post(url, "/v1/chat/completions", request)
    assert status == 200 and again["choices"] == body["choices"]
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for name in ("queue_depth", "active_slots", "tokens_per_second", "requests_total",
                 "time_to_first_token_seconds", "prompt_tokens_cached_total"):  # fmt: skip
        assert f"# TYPE llamaonnx_{name}" in text and f'llamaonnx_{name}{{model="{model}"' in text
    cached = f'llamaonnx_prompt_tokens_cached_total{{model="{model}"}} '
    line = next(x for x in text.splitlines() if x.startswith(cached))
    assert int(line.split()[-1]) >= body["usage"]["prompt_tokens"] - 1
    # the decode steps by their rows add up to the totals (the server is idle here)
    values = {}
    for line in text.splitlines():
        if line.startswith("llamaonnx_decode_") and f'model="{model}"' in line:
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    by_rows = {k: v for k, v in values.items() if "_by_rows_total" in k}
    steps = {int(k.split('rows="')[1].split('"')[0]): v for k, v in by_rows.items() if "steps" in k}
    assert steps, "the request above ran decode steps"
    assert sum(steps.values()) == values[f'llamaonnx_decode_steps_total{{model="{model}"}}']
    assert (
        sum(k * n for k, n in steps.items())
        == values[f'llamaonnx_decode_tokens_total{{model="{model}"}}']
    )


def test_a_full_queue_answers_429(tiny_folders, default_int4, tmp_path_factory):
    """One slot, one place in the queue: a third request is refused at once with 429."""
    proc, url = _start(tmp_path_factory, [default_int4], "--slots", "1", "--queue-size", "1")
    held = []
    try:
        host, port = url.removeprefix("http://").split(":")
        # ignore_eos and 2000 tokens (seconds on any CPU): the running reply must not free the
        # slot before the third request; a fixed sleep raced a fast machine's 300 tokens
        body = {"messages": MESSAGES, "max_tokens": 2000, "stream": True, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        for _ in range(2):  # one running, one waiting
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps(body),
                         {"Content-Type": "application/json"})  # fmt: skip
            held.append(conn)
        model = default_int4.name
        busy = (f'llamaonnx_active_slots{{model="{model}"}} 1',
                f'llamaonnx_queue_depth{{model="{model}"}} 1')  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline:  # until the server holds one running and one waiting
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                text = r.read().decode()
            if all(line in text for line in busy):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the server never held one request running and one waiting:\n" + text)
        start = time.time()
        status, error = _post(url, "/v1/chat/completions", {"messages": MESSAGES}, key=None)
        assert status == 429 and error["error"]["code"] == "queue_full"
        assert time.time() - start < 5
    finally:
        for conn in held:  # hanging up cancels both, so the server stops at once
            conn.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_load_benchmark_starts_the_server_and_measures_each_level(tiny_folders, tmp_path):
    """`llamaonnx load`: the server started and stopped by the command itself, clients at each
    level streaming the same prompts, clients spread over a ramp; figures per level, JSON,
    markdown and chart (no speed is asserted). The genai peer (its Engine behind the adapter)
    serves the same folder; only our server reports its engine's decode rate."""
    from runtime.cli import main

    out = tmp_path / "load"
    out.mkdir()
    other = "## Another CPU, AVX2, 2 cores\n\nits own table\n"
    (out / "load.md").write_text("# Serving\n\n" + other)  # another machine's run, kept
    rc = main(["load", f"ours=llamaonnx:{tiny_folders['ort']}:2",
               f"genai=genai:{tiny_folders['ort']}:2", "--clients", "1,2",
               "--requests", "2", "--max-tokens", "6", "--prompt-words", "10", "--threads", "1",
               "--ramp", "0.2", "--json", str(out / "load.json"),
               "--markdown", str(out / "load.md"), "--png", str(out / "load.png")])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "load.json").read_text())
    ours, genai = (t["levels"] for t in data["targets"])
    for levels in (ours, genai):
        assert [lv["clients"] for lv in levels] == [1, 2]
        assert [lv["requests"] for lv in levels] == [2, 4]
        assert all(lv["errors"] == 0 and lv["output_tokens"] > 0 for lv in levels)
        assert all(lv["tokens_per_second"] > 0 for lv in levels)
    assert all(lv["engine_decode_tok_s"] > 0 for lv in ours)
    assert all(1 <= lv["engine_rows_per_step"] <= lv["clients"] for lv in ours)
    assert all(1 <= lv["engine_full_batch_rows"] <= lv["clients"] for lv in ours)
    assert all(lv["engine_full_batch_tok_s"] > 0 for lv in ours)
    assert all(lv["engine_full_batch_tok_s"] is None for lv in genai)
    assert all(lv["engine_decode_tok_s"] is None for lv in genai)
    assert all(lv["engine_rows_per_step"] is None for lv in genai)
    for lv in ours + genai:  # a steady span where both clients took part, or none at all
        assert lv["steady_s"] is None or lv["steady_tok_s"] > 0
    text = (out / "load.md").read_text()
    assert "| ours | 2 | 4 | 0 |" in text and "| genai | 2 | 4 | 0 |" in text
    assert "spread over 0.2 s" in text
    assert text.count("\n## ") == 2 and other in text  # this machine's section beside the other
    (png,) = out.glob("load-*.png")  # one chart per machine, named after its section
    assert png.stat().st_size > 1000 and f"]({png.name})" in text


def test_load_goes_on_until_the_clients_ran_together_long_enough(tiny_folders, tmp_path):
    """`--min-steady S`: a level whose clients would all be answered inside the ramp goes on
    past --requests until every client has been taking part for S seconds, so it has a steady
    span of at least S to measure; without it, exactly --requests each."""
    from runtime.cli import main

    out = tmp_path / "load.json"
    rc = main(["load", f"ours=llamaonnx:{tiny_folders['ort']}:2", "--clients", "2",
               "--requests", "1", "--max-tokens", "4", "--prompt-words", "10", "--threads", "1",
               "--ramp", "0.3", "--min-steady", "1.5", "--json", str(out)])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    (lv,) = data["targets"][0]["levels"]
    assert data["settings"]["min_steady_s"] == 1.5
    assert lv["errors"] == 0 and lv["requests"] > 2
    assert lv["steady_s"] >= 1.5 and lv["steady_tok_s"] > 0
    per_client = {c: sum(r["client"] == c for r in lv["timeline"]) for c in (0, 1)}
    assert min(per_client.values()) >= 2, per_client


def test_engine_figures_come_from_the_steps_between_two_readings():
    """The load benchmark's engine figures from two readings of /metrics' steps by rows: only
    what ran between them counts; tokens are rows × steps."""
    from runtime.bench.load import engine_figures

    before = {1: [10.0, 1.0], 4: [5.0, 2.0]}
    after = {1: [12.0, 1.2], 4: [5.0, 2.0], 8: [3.0, 0.5]}  # 2 one-row steps, 3 of 8 rows
    got = engine_figures(before, after)
    assert got["decode"] == pytest.approx((2 + 24) / 0.7)
    assert got["rows_per_step"] == pytest.approx(26 / 5)
    assert (got["full_rows"], got["full_rate"]) == (8, pytest.approx(24 / 0.5))
    assert engine_figures(None, after)["full_rows"] == 8  # a first reading before any step
    assert set(engine_figures(after, None).values()) == {None}  # a server without them
    assert set(engine_figures(after, after).values()) == {None}  # nothing ran


def test_steady_span_leaves_out_the_ramp_and_the_last_requests():
    """The steady span runs from the last client's first request to the first client's end of
    its last; output tokens and the engine's figures count only what fell inside it."""
    from runtime.bench.load import steady_figures, steady_window

    def request(client, began, ended, stamps, tokens=None):
        return {"client": client, "began": began, "ended": ended, "stamps": stamps,
                "tokens": tokens or len(stamps)}  # fmt: skip

    results = [
        request(0, 0.0, 4.0, [1.0, 2.0, 3.0]),
        request(0, 4.0, 9.0, [5.0, 6.0, 7.0, 8.0], tokens=8),  # 2 tokens a chunk
        request(1, 2.0, 6.0, [3.0, 4.0, 5.0]),
        request(1, 6.0, 12.0, [7.0, 11.0]),
        {"client": 1, "error": "HTTP 429"},  # a refusal carries no times
    ]
    assert steady_window(results, 2) == (2.0, 9.0)
    assert steady_window(results, 3) is None  # a client that never ran: no steady span
    assert steady_window([request(0, 0, 1, []), request(1, 2, 3, [])], 2) is None  # disjoint
    samples = [(1.0, {8: [1.0, 0.1]}), (2.5, {8: [2.0, 0.2]}), (8.5, {8: [12.0, 1.2]}),
               (10.0, {8: [20.0, 2.0]})]  # fmt: skip
    got = steady_figures(results, (2.0, 9.0), samples)
    # inside 2..9: stamps 2, 3 (client 0), 5, 6, 7, 8 at 2 tokens each, 3, 4, 5 and 7
    assert got["steady_s"] == 7.0
    assert got["steady_tok_s"] == pytest.approx((2 + 8 + 3 + 1) / 7.0)
    assert got["steady_engine_decode_tok_s"] == pytest.approx(80 / 1.0)  # samples 2.5 and 8.5
    assert got["steady_engine_rows_per_step"] == pytest.approx(8.0)
    assert steady_figures(results, (2.0, 9.0), samples[:2])["steady_engine_decode_tok_s"] is None
    assert set(steady_figures(results, None, samples).values()) == {None}


def test_load_report_gives_the_steady_decode_as_a_multiple_of_one_client():
    """The markdown's steady engine column: the rate, the rows a step, and for more than one
    client the rate over the same server's at 1 client (what the serving goal compares); a
    server without engine figures gets a dash."""
    from runtime.bench.load import markdown

    def level(clients, rate, rows):
        return {"clients": clients, "requests": clients, "errors": 0, "tokens_per_second": 1.0,
                "ttft_p50_ms": 1.0, "ttft_p95_ms": 2.0, "itl_p50_ms": 1.0, "itl_p95_ms": 2.0,
                "steady_engine_decode_tok_s": rate,
                "steady_engine_rows_per_step": rows}  # fmt: skip

    data = {
        "date": "2026-12-02 23:00",
        "machine": {"cpu": "Some CPU", "cores": 2, "flags": ["avx2"]},
        "settings": {
            "threads": 2,
            "prompts": 4,
            "prompt_words": 65,
            "max_tokens": 128,
            "sampling": "greedy",
            "requests_per_client": 6,
            "ramp_s": 2,
        },  # fmt: skip
        "targets": [
            {"name": "ours", "levels": [level(1, 200.0, 1.0), level(8, 500.0, 7.5)]},
            {"name": "peer", "levels": [level(1, None, None), level(8, None, None)]},
        ],
    }
    lines = markdown(data, "llamaonnx load").splitlines()
    rows = {"".join(cell.strip() for cell in line.split("|")[1:3]): line
            for line in lines if line.startswith("| ")}  # fmt: skip
    assert "| 200.0 (1.00) |" in rows["ours1"]  # no ratio against itself
    assert "| 500.0 (7.50, 2.50× 1 client) |" in rows["ours8"]
    assert "| — |" in rows["peer8"]


def test_soak_checks_every_reply_and_leaves_no_slot_behind(tiny_folders, tmp_path):
    """`llamaonnx load --soak`: clients that hang up mid-stream among ones that read to the end;
    every answered reply equals the prompt's reply alone, nothing fails, the server's memory is
    sampled, and no slot or queue entry is left once the clients are gone."""
    from runtime.cli import main

    out = tmp_path / "soak"
    rc = main(["load", f"ours=llamaonnx:{tiny_folders['ort']}:2", "--clients", "3",
               "--soak", "8", "--max-tokens", "12", "--prompt-words", "10", "--threads", "1",
               "--json", str(out / "soak.json"), "--markdown", str(out / "soak.md")])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "soak.json").read_text())
    r = data["targets"][0]["soak"]
    assert r["failed"] == 0 and r["garbled"] == 0, r["failure_examples"]
    assert r["answered"] > 0 and r["requests"] == r["answered"] + r["dropped"] + r["refused"]
    assert r["left_after"] == {"active_slots": 0.0, "queue_depth": 0.0}
    assert r["rss_mb"]["samples"] and r["rss_mb"]["samples"][0][1] > 10
    from runtime.bench.report import cpu_key

    text = (out / "soak.md").read_text()
    assert "| ours | 3 | 8 |" in text and f"on {cpu_key(data['machine'])};" in text


def test_ray_serve_runs_each_model_as_its_own_deployment_of_two_replicas(
    tiny_folders, default_int4, tmp_path_factory
):
    """`llamaonnx serve A B --ray --replicas 2` on a local Ray instance: one deployment per model
    folder, two replicas each (the router's /health names the replica that answered for each
    model), the same OpenAI routes through the router, streaming and not, the replies equal the
    plain generator's (greedy), an unknown model a 404 from the router, the API key checked,
    /metrics one Prometheus text for both models, and a client that hangs up cancels its request
    on the replica that ran it."""
    folders = [tiny_folders["ort"], default_int4]
    proc, url = _start(tmp_path_factory, folders, "--ray", "--replicas", "2", "--threads", "1",
                       "--slots", "2", "--api-key", "k")  # fmt: skip
    try:
        names = [f.name for f in folders]
        client = _client(url, key="k")
        assert [m.id for m in client.models.list().data] == names
        # the router answers once one replica of each model runs; on two cores the others may
        # still be loading their model for a few seconds more
        processes = {n: set() for n in names}
        deadline = time.time() + 120
        while time.time() < deadline:
            with urllib.request.urlopen(url + "/health", timeout=10) as r:
                for name, pid in json.loads(r.read())["replicas"].items():
                    processes[name].add(pid)
            if all(len(p) == 2 for p in processes.values()):
                break
            time.sleep(0.05)
        assert all(len(p) == 2 for p in processes.values()), processes
        assert not processes[names[0]] & processes[names[1]]  # a replica serves one model
        from runtime.generator import GenerationConfig, Generator
        from runtime.session import Session

        for folder in folders:
            ask = {"model": folder.name, "max_tokens": 8, "temperature": 0,
                   "messages": [{"role": "user", "content": "Hello"}]}  # fmt: skip
            whole = client.chat.completions.create(**ask).choices[0].message.content
            chunks = client.chat.completions.create(**ask, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert whole == streamed
            want = Generator(Session(folder, provider="cpu")).generate(
                ask["messages"], GenerationConfig(max_new_tokens=8)
            )
            assert whole == want
        with pytest.raises(openai.NotFoundError, match="does not exist") as e:
            client.chat.completions.create(model="nope", messages=MESSAGES)
        assert e.value.code == "model_not_found"
        with pytest.raises(openai.AuthenticationError):
            _client(url, key="wrong").models.list()
        with pytest.raises(openai.BadRequestError, match="temperature"):  # from the replica
            client.chat.completions.create(model=names[1], messages=MESSAGES, temperature=-1)
        with pytest.raises(openai.BadRequestError, match="exceeds the engine's context") as e:
            client.completions.create(model=names[0], prompt="x " * 2000, max_tokens=4)
        assert e.value.code == "context_length_exceeded"
        bad = urllib.request.Request(url + "/v1/chat/completions", data=b"{not json",
                                     headers={"Authorization": "Bearer k"})  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bad, timeout=10)
        assert e.value.code == 400 and b"not valid JSON" in e.value.read()
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        assert text.count("# TYPE llamaonnx_requests_total counter") == 1
        for name in names:
            assert f'llamaonnx_requests_total{{model="{name}"}}' in text
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        body = {"model": names[1], "messages": MESSAGES, "max_tokens": 2000, "stream": True,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        conn.close()  # gone, ~2000 tokens early
        cancelled = f'llamaonnx_finished_total{{model="{names[1]}",reason="cancelled"}}'
        deadline = time.time() + 60
        while time.time() < deadline:  # (each /metrics: one replica's figures)
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                if cancelled in r.read().decode():
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the request was not cancelled on its replica after its client left")
    finally:
        proc.terminate()
        proc.wait(timeout=120)
