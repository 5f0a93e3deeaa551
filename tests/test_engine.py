"""The continuous-batching engine (runtime/engine.py): batching never changes a request's tokens,
requests join and leave at step boundaries, and cancellation, deadlines, stops and the bounded
queue behave as promised. On the tiny model's fp32 and int4 folders (llamaonnx's native kernel
and MatMulNBits) and on the default model's int4 folder."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from export.quant import QuantSettings, quantize_folder
from runtime.engine import Engine
from runtime.errors import EngineClosedError, ModelFolderError, OptionError, QueueFullError
from runtime.generator import GenerationConfig, Generator
from runtime.session import Session


@pytest.fixture(scope="module")
def folders(tiny_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    out = {"fp32": tiny_folders["ort"]}
    for kernel in ("native", "nbits"):  # our attention on an fp32 cache; onnxruntime's
        out[f"int4-{kernel}"] = root / kernel
        settings = QuantSettings("int4", kernel=kernel, kv_cache="float32")
        quantize_folder(tiny_folders["ort"], out[f"int4-{kernel}"], settings)
    out["int4-kv16"] = root / "kv16"  # our attention on an fp16 cache (the default)
    quantize_folder(tiny_folders["ort"], out["int4-kv16"], QuantSettings("int4", kernel="native"))
    return out


def _prompts(vocab: int, n: int = 7) -> list[list[int]]:
    return [[(5 + 11 * k + 7 * j) % vocab for j in range(3 + 4 * k)] for k in range(n)]


def _alone(session: Session, prompt: list[int], config: GenerationConfig) -> list[int]:
    return Generator(session).generate_ids([prompt], config)[0]


@pytest.mark.parametrize("which", ["fp32", "int4-native", "int4-nbits", "int4-kv16"])
def test_batching_does_not_change_a_requests_tokens(folders, which):
    """7 requests of 3 to 27 tokens, in 3 slots, prompts prefilled 4 tokens at a time: each
    joins as another leaves, and each gets the tokens it gets alone (greedy, and sampled with
    its own seed; three with presence or frequency penalties, which count each reply's own
    tokens)."""
    session = Session(folders[which], provider="cpu")
    configs = [
        GenerationConfig(
            max_new_tokens=4 + 3 * k,
            temperature=0.8 * (k % 2),
            seed=k,
            frequency_penalty=1.5 * (k in (2, 5)),
            presence_penalty=0.7 * (k in (3, 5)),
        )
        for k in range(7)
    ]
    prompts = _prompts(session.info.vocab_size)
    want = [_alone(session, p, c) for p, c in zip(prompts, configs, strict=True)]
    engine = Engine(session, slots=3, prefill_chunk=4)
    try:
        requests = [engine.submit(p, c) for p, c in zip(prompts, configs, strict=True)]
        got = [r.result(60)[0] for r in requests]
    finally:
        engine.close()
    assert got == want
    assert engine.metrics.moves > 0  # running requests moved to other slots on the way


@pytest.mark.parametrize("which", ["fp32", "int4-native", "int4-nbits", "int4-kv16"])
def test_a_prompt_that_starts_as_a_slots_cache_does_reuses_it_exactly(folders, which):
    """A chat's next turn: its prompt starts with the last turn's prompt and reply, whose keys
    and values the slot still holds (prefilled and decoded). Only the rest is computed, and the
    reply is the one it gets alone; a prompt that differs early takes what is the same."""
    session = Session(folders[which], provider="cpu")
    greedy = GenerationConfig(max_new_tokens=9, stop_token_ids=())
    first = [5, 6, 7, 8, 9, 10, 11]
    engine = Engine(session, slots=2, prefill_chunk=4)
    try:
        reply = engine.submit(first, greedy).result(60)[0]
        turn = first + reply + [12, 13, 14]
        got = engine.submit(turn, greedy).result(60)[0]
        held = len(first) + len(reply) - 1  # (the reply's last token was never fed)
        assert engine.metrics.cached_prompt_tokens == held
        other = [5, 6, 7, 40, 41]
        assert engine.submit(other, greedy).result(60)[0] == _alone(session, other, greedy)
        assert engine.metrics.cached_prompt_tokens == held + 3
    finally:
        engine.close()
    assert got == _alone(session, turn, greedy)


def test_the_default_models_int4_folder_batches_exactly(default_int4):
    """Alone in the engine or among three others, the same tokens: llamaonnx's kernels compute
    each row of a batch as they compute it alone (int8 activations per row, the attention's
    chunks per row), so a request's result does not depend on who else is running or which
    slot it was moved to. (onnxruntime's MatMulNBits, which this folder ran on before, picks its
    kernel by the number of rows: at accuracy level 4 a row's logits moved by up to 0.5 between
    a batch of 1 and of 4 on an AMD EPYC.)"""
    session = Session(default_int4, provider="cpu")
    tok = session.tokenizer
    messages = ["What is the capital of France?", "Name a colour.", "Count to five.", "Hi!"]
    prompts = [tok.encode_chat([{"role": "user", "content": m}]) for m in messages]
    config = GenerationConfig(max_new_tokens=24)
    engine = Engine(session, slots=4, prefill_chunk=16)
    try:
        want = [engine.submit(p, config).result(120)[0] for p in prompts]
        got = [r.result(120)[0] for r in [engine.submit(p, config) for p in prompts]]
    finally:
        engine.close()
    assert got == want


def test_a_cancelled_request_frees_its_slot_for_the_next(folders):
    engine = Engine(Session(folders["fp32"], provider="cpu"), slots=1)
    try:
        config = GenerationConfig(max_new_tokens=200, stop_token_ids=())
        # cancelled on the engine's thread at its first token, so the 200 tokens cannot all
        # come before the cancel does (a test thread descheduled on a busy CI machine could)
        events = []

        def cancel_at_first_token(event):
            events.append(event)
            if len(events) == 1:
                long.cancel()

        with engine._wake:  # neither is admitted before `long` is bound
            long = engine.submit([5, 6, 7], config, listener=cancel_at_first_token)
            short = engine.submit([8, 9], GenerationConfig(max_new_tokens=3, stop_token_ids=()))
        tokens, reason = long.result(30)
        # the slot is free within one step of the cancel
        assert reason == "cancelled" and 1 <= len(tokens) <= 2
        assert events[-1].finish_reason == "cancelled"
        assert short.result(30) == (short.tokens, "length") and len(short.tokens) == 3
    finally:
        engine.close()


def test_a_full_queue_refuses_at_once_and_loses_nothing(folders):
    engine = Engine(Session(folders["fp32"], provider="cpu"), slots=1, queue_size=1)
    try:
        # as long as the tiny model's context allows: the running request must still hold its
        # slot when the third arrives, else that one fits (a free slot counts as room)
        config = GenerationConfig(max_new_tokens=240, stop_token_ids=())
        running = engine.submit([5, 6, 7], config)
        next(iter(running))
        waiting = engine.submit([8, 9], GenerationConfig(max_new_tokens=2, stop_token_ids=()))
        start = time.monotonic()
        with pytest.raises(QueueFullError, match="queue is full"):
            engine.submit([10], config)
        assert time.monotonic() - start < 1.0
        assert running.result(60)[1] == "length" and waiting.result(60)[1] == "length"
        assert engine.metrics.refused == 1 and engine.metrics.finished["length"] == 2
    finally:
        engine.close()


def test_a_burst_fills_the_free_slots_and_the_queue_before_refusing(folders):
    """Requests that arrive before the loop admits any: a free slot still counts as room.
    (Holding the engine's lock keeps the loop from admitting between the submits; the CI saw
    the server refuse the second of two quick requests with one slot and one queue place.)"""
    engine = Engine(Session(folders["fp32"], provider="cpu"), slots=2, queue_size=1)
    try:
        config = GenerationConfig(max_new_tokens=3, stop_token_ids=())
        with engine._wake:
            accepted = [engine.submit([5 + i, 6], config) for i in range(2)]
            assert engine.queue_depth == 0  # the two free slots will take them, not the queue
            accepted.append(engine.submit([7, 6], config))
            assert engine.queue_depth == 1
            with pytest.raises(QueueFullError, match="queue is full"):
                engine.submit([9], config)
        assert [r.result(60)[1] for r in accepted] == ["length"] * 3
        assert engine.metrics.refused == 1 and engine.metrics.requests == 3
    finally:
        engine.close()


def test_deadlines_and_stop_tokens_end_a_request(folders):
    session = Session(folders["fp32"], provider="cpu")
    engine = Engine(session, slots=2)
    try:
        slow = engine.submit([5, 6], GenerationConfig(max_new_tokens=250, stop_token_ids=()),
                             timeout=1e-6)  # fmt: skip
        assert slow.result(30)[1] == "deadline"
        free = _alone(session, [5, 6, 7], GenerationConfig(max_new_tokens=8, stop_token_ids=()))
        stop_at = free[3]
        ended = engine.submit(
            [5, 6, 7], GenerationConfig(max_new_tokens=8, stop_token_ids=(stop_at,))
        )
        tokens, reason = ended.result(30)
        assert (reason, tokens) == ("stop", free[: free.index(stop_at) + 1]), free
    finally:
        engine.close()


@pytest.mark.parametrize("which", ["fp32", "int4-kv16"])
def test_logprobs_are_the_models_and_do_not_depend_on_the_batch(folders, which):
    """Each token's logprob and its likeliest alternatives (sampled at temperature 0.9) are the
    log-softmax of the logits a teacher-forced forward pass over prompt + reply gives at that
    position, alone and among other requests; a stop token carries none."""
    session = Session(folders[which], provider="cpu")
    prompt = [5, 6, 7, 8, 9]
    config = GenerationConfig(max_new_tokens=10, temperature=0.9, seed=4, logprobs=3,
                              stop_token_ids=())  # fmt: skip
    engine = Engine(session, slots=3, prefill_chunk=4)
    try:
        alone = list(engine.submit(prompt, config))
        others = [engine.submit(p, GenerationConfig(max_new_tokens=12)) for p in _prompts(50, 2)]
        batched = list(engine.submit(prompt, config))
        [r.result(60) for r in others]
    finally:
        engine.close()
    assert [(e.token, e.logprob, e.top_logprobs) for e in batched] == [
        (e.token, e.logprob, e.top_logprobs) for e in alone
    ]
    reply = [e.token for e in alone]
    ids = np.array([prompt + reply], np.int64)
    n = ids.shape[1]
    cache = session.new_cache(1, n)
    logits = session.forward(ids, np.ones((1, n), np.int64), np.arange(n)[None], cache)[0]
    x = logits[len(prompt) - 1 : -1].astype(np.float64)
    mx = x.max(1, keepdims=True)
    want = x - mx - np.log(np.exp(x - mx).sum(1, keepdims=True))  # log-softmax
    for k, event in enumerate(alone):
        assert event.logprob == pytest.approx(want[k, event.token], abs=2e-3)
        best = np.argsort(-want[k], kind="stable")[:3]
        assert [i for i, _ in event.top_logprobs] == best.tolist()
        assert [p for _, p in event.top_logprobs] == pytest.approx(want[k, best], abs=2e-3)
    stopped = Engine(session, slots=1)
    try:
        ends = list(stopped.submit(prompt, dataclasses.replace(config, stop_token_ids=(reply[2],))))
    finally:
        stopped.close()
    assert ends[-1].token == reply[2] and ends[-1].logprob is None
    assert all(e.logprob is not None for e in ends[:-1])


@pytest.mark.parametrize("which", ["fp32", "int4-kv16"])
def test_prompt_logprobs_are_the_models_whatever_the_chunks_cache_and_batch(folders, which):
    """prompt_logprobs (the completions' echo): each prompt token's logprob and likeliest
    alternatives are the teacher-forced log-softmax at the position before it (the first token
    has none), over chunks of 4, alone and beside other requests, and again for the same prompt
    whose start a slot's cache already holds; max_new_tokens 0 ends after the prompt."""
    session = Session(folders[which], provider="cpu")
    prompt = [(3 + 7 * j) % 50 for j in range(11)]
    n = len(prompt)
    ids = np.array([prompt], np.int64)
    logits = session.forward(ids, np.ones((1, n), np.int64), np.arange(n)[None],
                             session.new_cache(1, n))[0]  # fmt: skip
    x = logits[:-1].astype(np.float64)
    mx = x.max(1, keepdims=True)
    want = x - mx - np.log(np.exp(x - mx).sum(1, keepdims=True))
    only = GenerationConfig(max_new_tokens=0, prompt_logprobs=2)
    engine = Engine(session, slots=3, prefill_chunk=4)
    try:
        first = engine.submit(prompt, only)
        events = list(first)
        others = [engine.submit(p, GenerationConfig(max_new_tokens=12)) for p in _prompts(50, 2)]
        again = engine.submit(prompt, dataclasses.replace(only, max_new_tokens=3))
        again.result(60)
        [r.result(60) for r in others]
    finally:
        engine.close()
    assert [(e.token, e.finish_reason) for e in events] == [(None, "length")]
    assert first.tokens == [] and first.text == ""
    assert len(again.tokens) == 3 and again.prompt_logprobs == first.prompt_logprobs
    got = first.prompt_logprobs
    assert len(got) == n and got[0] is None
    for q in range(1, n):
        lp, top = got[q]
        assert lp == pytest.approx(want[q - 1, prompt[q]], abs=2e-3)
        best = np.argsort(-want[q - 1], kind="stable")[:2]
        assert [i for i, _ in top] == best.tolist()
        assert [p for _, p in top] == pytest.approx(want[q - 1, best], abs=2e-3)


def test_max_new_tokens_zero_needs_prompt_logprobs():
    """0 new tokens is a request for the prompt's logprobs only; without them it is an error."""
    with pytest.raises(OptionError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(OptionError, match="prompt_logprobs"):
        GenerationConfig(max_new_tokens=0, prompt_logprobs=21)
    assert GenerationConfig(max_new_tokens=0, prompt_logprobs=0).max_new_tokens == 0


def test_a_chats_next_turn_reuses_its_history_on_the_default_model(default_int4):
    """The chat template renders the last reply again in the next turn's prompt: the slot's
    cache holds most of it, and the reply is the one the turn gets alone."""
    session = Session(default_int4, provider="cpu")
    tok = session.tokenizer
    config = GenerationConfig(max_new_tokens=16)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    engine = Engine(session, slots=2)
    try:
        first = engine.submit(tok.encode_chat(chat), config)
        first.result(120)
        chat += [{"role": "assistant", "content": first.text},
                 {"role": "user", "content": "And of Italy?"}]  # fmt: skip
        prompt = tok.encode_chat(chat)
        before = engine.metrics.cached_prompt_tokens
        got = engine.submit(prompt, config).result(120)[0]
        reused = engine.metrics.cached_prompt_tokens - before
    finally:
        engine.close()
    assert reused > len(first.prompt)  # the first prompt and some of its reply
    assert got == _alone(session, prompt, config)


def test_streamed_text_and_stop_strings_on_real_text(default_int4):
    """The streamed pieces add up to the reply's tokens decoded; a stop string cuts the reply
    before it and ends the request."""
    session = Session(default_int4, provider="cpu")
    prompt = session.tokenizer.encode_chat([{"role": "user", "content": "Name three colours."}])
    config = GenerationConfig(max_new_tokens=24)
    engine = Engine(session, slots=2)
    try:
        request = engine.submit(prompt, config)
        pieces = [e.text for e in request]
        assert "".join(pieces) == request.text != ""
        assert request.text == session.tokenizer.decode(request.tokens)
        cut = request.text[5:8]
        stopped = engine.submit(prompt, GenerationConfig(max_new_tokens=24, stop_strings=(cut,)))
        stopped.result(60)
        assert stopped.finish_reason == "stop"
        assert stopped.text == request.text[: request.text.index(cut)]
    finally:
        engine.close()


def test_engine_refuses_what_it_cannot_serve(tiny_folders, folders):
    with pytest.raises(ModelFolderError, match="--target ort"):
        Engine(Session(tiny_folders["portable"], provider="cpu"))
    engine = Engine(Session(folders["fp32"], provider="cpu"), slots=1)
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.submit([5], GenerationConfig(max_new_tokens=1))
    assert engine.metrics.requests == 0
