"""Continuous batching: many requests decoded together over one shared KV buffer.

A decode step reads every weight once whatever the batch, so eight streams decoded together cost
little more than one. The engine keeps `slots` rows of one (slots, Hkv, max_length, Dh) buffer
per layer; a request takes a free slot at a step boundary and leaves it as soon as it finishes,
is cancelled or passes its deadline, so a long reply never blocks a short one.

Each turn of the loop (one background thread):
1. admit queued requests into free slots: each into the free slot whose cache rows already hold
   the longest start of its prompt (a chat's next turn finds its history there, as a repeated
   prompt does), which it keeps and does not compute again (`reuse_prefixes`; the keys and
   values of a position are the same bits prefilled, chunked or decoded, so the reply is the
   one it gets alone; tested);
2. prefill one chunk of one joining request, on its slot's rows alone: `prefill_chunk` tokens
   when no stream is decoding, `busy_chunk` when some are (each chunk stalls them for its
   length: 64 tokens of the default model are ~0.13 s on 2 cores, against ~0.03 s a step);
3. one decode step for the k running requests at once, in slots [0, k): before it, a running
   request in a higher slot moves down into a lower one that is idle or prefilling (`_pack`,
   its cache rows copied), so no row of the step is wasted and no request waits for another's
   prefill; a lone stream runs a batch of one.

It needs a folder whose graph shares past and present (the `ort` target): onnxruntime's
GroupQueryAttention takes each row's own length (mask sum) and writes that row's new key/value at
its own position, and it runs a chunk of a prompt after a cached part (tests/test_engine.py
holds chunked to whole). Batching does not change results: a greedy request's tokens are the same
alone and among others joining and leaving (tested).

Per request: its sampling settings and seed, stop tokens and strings, max new tokens, streaming
(text pieces of whole characters), logprobs of its tokens and, asked, of its prompt's (computed
from position 0, so such a request takes no cached start), cancellation (its slot is free at
the next step) and a deadline. The queue is bounded: beyond it `submit` raises QueueFullError
at once.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from runtime.errors import (
    ContextLengthError,
    EngineClosedError,
    ModelFolderError,
    OptionError,
    QueueFullError,
)
from runtime.generator import GenerationConfig, _first_stop, _held_back, check_vocabulary
from runtime.sampler import (
    apply_logit_bias,
    apply_penalties,
    apply_repetition_penalty,
    sample,
    token_logprobs,
)
from runtime.session import Session, kv_buffers
from runtime.tokenizer import StreamDecoder

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error")
Logprobs = tuple[float, tuple[tuple[int, float], ...]]  # a token's, and the likeliest tokens'


@dataclasses.dataclass(frozen=True)
class Event:
    """One step of a request: a new token and the text it completes (may be ""), or its end."""

    token: int | None
    text: str
    finish_reason: str | None = None  # one of FINISH_REASONS on the last event
    # where the request asked for logprobs (GenerationConfig.logprobs), for every token but a
    # stop token: its log-probability under the model and the likeliest tokens' (id, logprob)
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class Request:
    """A handle on one submitted request: iterate it for its events, or wait for `result()`."""

    _ids = itertools.count(1)

    def __init__(self, prompt: list[int], config: GenerationConfig, deadline: float | None,
                 listener: Callable[[Event], None] | None = None):  # fmt: skip
        self.id = next(self._ids)
        self.listener = listener
        self.prompt = prompt
        self.config = config
        self.deadline = deadline  # time.monotonic() value, or None
        self.tokens: list[int] = []
        # config.prompt_logprobs: each prompt token's (logprob, likeliest), None for the first
        # (nothing predicts it); whole before the request's first event
        self.prompt_logprobs: list[Logprobs | None] | None = (
            None if config.prompt_logprobs is None else [None]
        )
        self.text = ""
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop this request: its slot is free at the engine's next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[Event]:
        if self.listener is not None:
            raise RuntimeError("this request's events go to its listener")
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> tuple[list[int], str]:
        """(new token ids, finish reason) once it has finished."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        return self.tokens, self.finish_reason or "error"

    # engine side
    def _emit(self, token: int | None, text: str, reason: str | None = None,
              logprobs: Logprobs | None = None) -> None:  # fmt: skip
        if token is not None and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.text += text
        if reason is not None:  # done before the last event is seen: result() then holds
            self.finish_reason = reason
            self._done.set()
        event = Event(token, text, reason, *(logprobs or (None, ())))
        if self.listener is not None:  # an asyncio server: no thread waits on the queue
            self.listener(event)
        else:
            self._events.put(event)


@dataclasses.dataclass
class _Slot:
    request: Request
    pending: list[int]  # prompt tokens not yet in the cache
    length: int = 0  # tokens in this slot's cache rows
    last: int | None = None  # the token the next decode step feeds
    history: list[int] = dataclasses.field(default_factory=list)
    rng: np.random.Generator | None = None
    decoder: StreamDecoder | None = None
    held: str = ""  # text held back while it could still grow into a stop string
    stop_ids: frozenset[int] = frozenset()


@dataclasses.dataclass
class Metrics:
    """What /metrics reports: counters since start and the latest latencies."""

    requests: int = 0
    refused: int = 0
    finished: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens the decode steps produced (rows that were running)
    decode_seconds: float = 0.0  # time in decode steps: decode_tokens / it is the batch's rate
    # the same by the rows a step ran: a full batch's own rate apart from the steps of fewer
    # rows (streams starting, taking their prompt or finishing)
    decode_steps_by_rows: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    decode_seconds_by_rows: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    moves: int = 0  # running slots moved down past idle or prefilling ones (Engine._pack)
    cached_prompt_tokens: int = 0  # prompt tokens found in a slot's cache, not computed again
    prefill_seconds: float = 0.0  # time in prompt chunks (every decoding stream waits for them)
    time_to_first_token: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=1000)
    )
    token_times: collections.deque = dataclasses.field(  # when each of the last tokens came
        default_factory=lambda: collections.deque(maxlen=100_000)
    )

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        since = time.monotonic() - window
        return sum(1 for t in self.token_times if t >= since) / window


def check_servable(info) -> None:
    """ModelFolderError unless the engine can serve this folder (its ModelInfo)."""
    if not info.shared_kv_buffer:
        raise ModelFolderError(
            f"{info.folder}: the serving engine needs a graph whose past and present share "
            f"one buffer (export with --target ort); this folder's target is {info.target!r}"
        )


class Engine:
    def __init__(
        self,
        session: Session,
        slots: int = 8,
        max_length: int | None = None,
        queue_size: int = 64,
        prefill_chunk: int = 256,
        busy_chunk: int = 64,
        reuse_prefixes: bool = True,
    ):
        info = session.info
        check_servable(info)
        if session.device != "cpu":
            raise OptionError("the serving engine runs on the CPU provider only, for now")
        for name, value, low in (("slots", slots, 1), ("queue_size", queue_size, 1),
                                 ("prefill_chunk", prefill_chunk, 1),
                                 ("busy_chunk", busy_chunk, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise OptionError(f"{name} must be an integer >= {low}, got {value!r}")
        self.session, self.info = session, info
        self.max_length = min(max_length or min(info.max_position, 4096), info.max_position)
        self.slots: list[_Slot | None] = [None] * slots
        self.queue_size, self.prefill_chunk = queue_size, prefill_chunk
        self.busy_chunk = min(busy_chunk, prefill_chunk)
        self.reuse_prefixes = bool(reuse_prefixes)
        self.metrics = Metrics()
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._buffers = _Buffers(session, slots, self.max_length)
        self._buffers.warm_up()
        self._thread = threading.Thread(target=self._loop, name="llamaonnx-engine", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        config: GenerationConfig | None = None,
        timeout: float | None = None,
        listener: Callable[[Event], None] | None = None,
    ) -> Request:
        """Queue a request (prompt token ids); its handle streams its events. Raises at once:
        ContextLengthError if it cannot fit, QueueFullError if the queue is full,
        EngineClosedError when shutting down. `listener`: called with each event on the
        engine's thread instead (it must not block: an asyncio server hands the event to its
        loop with call_soon_threadsafe), and the handle is not iterated."""
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        config = config or GenerationConfig()
        room = self.max_length - config.max_new_tokens
        if len(prompt) > room:
            if not config.truncate or room < 1:
                raise ContextLengthError(
                    f"prompt of {len(prompt)} tokens + {config.max_new_tokens} new tokens "
                    f"exceeds the engine's context of {self.max_length} tokens"
                )
            prompt = prompt[-room:]
        check_vocabulary(config, self.session.info.vocab_size)
        if timeout is not None and not (timeout > 0):
            raise OptionError(f"timeout must be > 0 seconds, got {timeout}")
        deadline = None if timeout is None else time.monotonic() + timeout
        request = Request(list(prompt), config, deadline, listener)
        with self._wake:
            if self._closing:
                raise EngineClosedError("the engine is shutting down: no new requests")
            # a request the loop has not yet moved into a free slot is not waiting for one:
            # counting it refused a burst that the slots and the queue together would hold
            free = sum(slot is None for slot in self.slots)
            if len(self._waiting) - free >= self.queue_size:
                self.metrics.refused += 1
                raise QueueFullError(
                    f"the queue is full ({self.queue_size} requests waiting, "
                    f"{len(self.slots)} running): try again later"
                )
            self._waiting.append(request)
            self.metrics.requests += 1
            self._wake.notify()
        return request

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot: those not yet admitted, less the free slots the loop
        gives them at its next step (the count `submit` refuses by)."""
        with self._wake:
            return max(0, len(self._waiting) - sum(slot is None for slot in self.slots))

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new requests, cancel the queued and running ones, stop the loop."""
        with self._wake:
            self._closing = True
            for request in self._waiting:
                request.cancel()
            for slot in self.slots:
                if slot is not None:
                    slot.request.cancel()
            self._wake.notify()
        self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and self.active == 0:
                    self._wake.wait()
                if self._closing and not self._waiting and self.active == 0:
                    return
                self._admit()
            try:
                self._retire()
                self._prefill_one_chunk()
                self._decode_step()
            except Exception as e:  # a bug or a broken model: fail every running request
                log.exception("engine step failed")
                self._buffers.forget()  # (a step cut short may have written part of its rows)
                for i, slot in enumerate(self.slots):
                    if slot is not None:
                        slot.request.error = e
                        self._finish(i, "error")

    def _admit(self) -> None:
        free = [i for i, slot in enumerate(self.slots) if slot is None]
        while free and self._waiting:
            request = self._waiting.popleft()
            if request.cancelled:
                request._emit(None, "", "cancelled")
                self.metrics.finished["cancelled"] += 1
                continue
            # the free slot whose cache already holds the longest start of this prompt (a
            # chat's next turn: its history), whose rows are taken as they are; at least the
            # prompt's last token is computed, for its logits
            # (not a request for its prompt's logprobs: it needs every position's logits)
            prompt, c = request.prompt, request.config
            i, reuse = free[0], 0
            for j in free if self.reuse_prefixes and c.prompt_logprobs is None else ():
                n = _common_start(self._buffers.cached[j], prompt)
                if n > reuse:
                    i, reuse = j, n
            reuse = min(reuse, len(prompt) - 1)
            free.remove(i)
            stops = self.info.eos_token_ids if c.stop_token_ids is None else c.stop_token_ids
            self.slots[i] = _Slot(
                request,
                pending=list(prompt[reuse:]),
                length=reuse,
                history=list(prompt),
                rng=np.random.default_rng(c.seed),
                decoder=StreamDecoder(self.session.tokenizer),
                stop_ids=frozenset(stops),
            )
            self.metrics.prompt_tokens += len(prompt)
            self.metrics.cached_prompt_tokens += reuse

    def _retire(self) -> None:
        now = time.monotonic()
        for i, slot in enumerate(self.slots):
            if slot is None:
                continue
            if slot.request.cancelled:
                self._finish(i, "cancelled")
            elif slot.request.deadline is not None and now > slot.request.deadline:
                self._finish(i, "deadline")

    def _prefill_one_chunk(self) -> None:
        joining = [i for i, s in enumerate(self.slots) if s is not None and s.pending]
        if not joining:
            return
        i = min(joining, key=lambda k: self.slots[k].request.id)  # first come, first served
        slot = self.slots[i]
        decoding = any(s is not None and not s.pending and s.last is not None for s in self.slots)
        n = self.busy_chunk if decoding else self.prefill_chunk
        chunk, slot.pending = slot.pending[:n], slot.pending[n:]
        request = slot.request
        every = request.prompt_logprobs is not None
        t = time.perf_counter()
        logits = self._buffers.prefill(i, chunk, slot.length, every)
        self.metrics.prefill_seconds += time.perf_counter() - t
        if every:  # position p's logits give the prompt's token p + 1
            prompt, top = request.prompt, request.config.prompt_logprobs
            for k in range(min(len(chunk), len(prompt) - 1 - slot.length)):
                request.prompt_logprobs.append(
                    token_logprobs(logits[0, k], prompt[slot.length + k + 1], top)
                )
        slot.length += len(chunk)
        if slot.pending:
            return
        if request.config.max_new_tokens == 0:  # the prompt's logprobs were all it asked
            self._finish(i, "length")
        else:
            self._take(i, logits[0, -1])

    def _running(self, i: int) -> bool:
        s = self.slots[i]
        return s is not None and not s.pending and s.last is not None

    def _pack(self) -> int:
        """The running slots first; returns how many run (slots [0, k) after it). A decode step
        runs the first k slots, so an idle or prefilling slot among them would cost a row (~1 ms
        a step on 2 cores at 8 rows) and make no token. The highest running slot past the
        running count moves into the lowest slot below it that is not running (swapping places
        with a prefilling one), its cache rows copied: the same numbers at the same positions,
        so its tokens do not change. A move copies ~23 kB a cached token on the default model,
        once; it saves a row on every step after."""
        running = [i for i in range(len(self.slots)) if self._running(i)]
        below = (i for i in range(len(running)) if not self._running(i))
        for j in reversed(running):
            if j < len(running):
                break
            i = next(below)
            other = self.slots[i]
            self._buffers.swap(i, j, other.length if other is not None else 0,
                               self.slots[j].length)  # fmt: skip
            self.slots[i], self.slots[j] = self.slots[j], other
            self.metrics.moves += 1
        return len(running)

    def _decode_step(self) -> None:
        k = self._pack()
        if not k:
            return
        slots = self.slots[:k]  # every one running
        t = time.perf_counter()
        logits = self._buffers.decode([s.last for s in slots], [s.length for s in slots])
        seconds = time.perf_counter() - t
        self.metrics.decode_seconds += seconds
        self.metrics.decode_steps += 1
        self.metrics.decode_tokens += k
        self.metrics.decode_steps_by_rows[k] += 1
        self.metrics.decode_seconds_by_rows[k] += seconds
        for i, slot in enumerate(slots):
            slot.length += 1
            self._take(i, logits[i, 0])

    def _take(self, i: int, row: np.ndarray) -> None:
        """Sample slot i's next token from its logits row, emit it, and finish where it ends."""
        slot, c = self.slots[i], self.slots[i].request.config
        raw = row
        row = apply_repetition_penalty(row, slot.history, c.repetition_penalty)
        # the reply's tokens so far: request.tokens (a stop token joins it only as it finishes)
        row = apply_penalties(row, slot.request.tokens, c.presence_penalty, c.frequency_penalty)
        row = apply_logit_bias(row, c.logit_bias)
        token = sample(row, slot.rng, c.temperature, c.top_k, c.top_p)
        request = slot.request
        self.metrics.generated_tokens += 1
        self.metrics.token_times.append(time.monotonic())
        if request.first_token_at is None:
            self.metrics.time_to_first_token.append(time.monotonic() - request.submitted)
        if token in slot.stop_ids:
            request.tokens.append(token)
            self._finish(i, "stop", token)
            return
        request.tokens.append(token)
        slot.history.append(token)
        slot.last = token
        lp = None if c.logprobs is None else token_logprobs(raw, token, c.logprobs)
        text = slot.held + slot.decoder.push(token)
        stops = [s for s in c.stop_strings if s]
        cut = _first_stop(text, stops)
        if cut is not None:
            slot.held = ""
            self._finish(i, "stop", token, text[:cut], lp)
            return
        keep = _held_back(text, stops)
        slot.held = text[len(text) - keep :] if keep else ""
        out = text[: len(text) - keep]
        if len(request.tokens) >= c.max_new_tokens or slot.length + 1 >= self.max_length:
            self._finish(i, "length", token, out, lp)
            return
        request._emit(token, out, logprobs=lp)

    def _finish(self, i: int, reason: str, token: int | None = None, text: str = "",
                logprobs: Logprobs | None = None) -> None:  # fmt: skip
        slot = self.slots[i]
        if (
            reason in ("stop", "length")
            and slot.decoder is not None
            and not text.endswith("\ufffd")
        ):
            text += slot.held + (slot.decoder.flush() if reason == "length" else "")
        slot.request._emit(token, text, reason, logprobs)
        self.metrics.finished[reason] += 1
        self.slots[i] = None


def _common_start(a: list[int], b: list[int]) -> int:
    """How many tokens a and b share from their start."""
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k : k + 64] == b[k : k + 64]:  # 64 at a time in C, then one by one
        k += 64
    k = min(k, n)
    while k < n and a[k] == b[k]:
        k += 1
    return k


class _Buffers:
    """The slots' KV buffers (numpy, so that a slot's rows are a view onto the same memory) and
    the IO bindings that run the graph over all slots or over one."""

    def __init__(self, session: Session, slots: int, max_length: int):
        import onnxruntime as ort

        info = session.info
        self.session, self.info, self.slots, self.max_length = session, info, slots, max_length
        shape = (slots, info.n_kv_heads, max_length, info.head_dim)
        self.kv = kv_buffers(2 * info.n_layers, shape, info.kv_dtype)
        self.mask = np.zeros((slots, max_length), np.int64)
        self.logits = np.empty((slots, 1, info.vocab_size), np.float32)
        # decode runs over the first k slots only, the k running ones (Engine._pack): one
        # stream alone does not pay for eight rows
        # the tokens whose keys and values each slot's rows hold, from position 0: what a
        # later request with the same start may take instead of computing them again
        self.cached: list[list[int]] = [[] for _ in range(slots)]
        self.first = [None]
        for k in range(1, slots + 1):
            binding = self._binding([ort.OrtValue.ortvalue_from_numpy(a[:k]) for a in self.kv])
            logits = ort.OrtValue.ortvalue_from_numpy(self.logits[:k])
            binding.bind_ortvalue_output("logits", logits)
            self.first.append(binding)
        self.one = [
            self._binding([ort.OrtValue.ortvalue_from_numpy(a[i : i + 1]) for a in self.kv])
            for i in range(slots)
        ]

    def warm_up(self) -> None:
        """One decode step over every slot before any request: onnxruntime's CPU provider plans
        and grows its memory the first time it meets the largest batch (0.3 s to 3 s on 2 cores,
        then 10 ms), and a smaller batch after it costs nothing extra. Without this the first
        requests of a busy server wait for it, once per new batch size (each new size up to
        the largest costs up to 0.8 s: the opening requests' time to first token, measured
        0.8 to 3 s with 8 clients, against 0.15 to 0.5 s after). The step writes position 0
        of each empty slot, which a request's prefill overwrites."""
        self.decode([self.info.pad_token_id] * self.slots, [0] * self.slots)
        self.forget()

    def forget(self) -> None:
        """Hold no slot's rows as any prompt's."""
        for held in self.cached:
            held.clear()

    def _wrote(self, slot: int, start: int, tokens: list[int]) -> None:
        held = self.cached[slot]
        del held[start:]
        if len(held) == start:
            held.extend(tokens)

    def swap(self, i: int, j: int, ni: int, nj: int) -> None:
        """Slot j's first nj cached positions into slot i, and slot i's first ni into slot j."""
        for a in self.kv:
            kept = a[i, :, :ni].copy()
            a[i, :, :nj] = a[j, :, :nj]
            a[j, :, :ni] = kept
        ci, cj = self.cached[i], self.cached[j]
        # rows past those copied keep what they held, which belongs with neither list: cut there
        self.cached[i] = cj[:nj]
        self.cached[j] = ci[:ni] if ni else cj

    def _binding(self, values):
        binding = self.session.session.io_binding()
        for i in range(self.info.n_layers):
            for j, kv in enumerate(("key", "value")):
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", values[2 * i + j])
                binding.bind_ortvalue_output(f"present.{i}.{kv}", values[2 * i + j])
        return binding

    def _feed(self, binding, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> None:
        import onnxruntime as ort

        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for name, arr in feeds.items():
            if name in self.session.input_names:
                binding.bind_ortvalue_input(
                    name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr, np.int64))
                )

    def prefill(self, slot: int, chunk: list[int], past: int, every: bool = False) -> np.ndarray:
        """Slot `slot`'s next prompt chunk after its `past` cached tokens → logits (1, S, V), or
        (1, 1, V) for the chunk's last position alone where the graph can (`keeps_logits`) and
        `every` position's are not asked for."""
        import onnxruntime as ort

        s = len(chunk)
        binding = self.one[slot]
        self._feed(
            binding,
            np.array([chunk], np.int64),
            np.ones((1, past + s), np.int64),
            np.arange(past, past + s)[None],
        )
        keep = self.session.keeps_logits and not every
        if self.session.keeps_logits:
            binding.bind_ortvalue_input("logits_to_keep", self.session.logits_to_keep[int(keep)])
        logits = np.empty((1, 1 if keep else s, self.info.vocab_size), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.session.run_with_iobinding(binding)
        self._wrote(slot, past, chunk)
        return logits

    def decode(self, tokens: list[int], lengths: list[int]) -> np.ndarray:
        """One token for each of the first len(tokens) slots, each after its own cached length →
        (k, 1, V) logits, a view valid until the next decode."""
        k = len(tokens)
        width = max(lengths) + 1
        mask = self.mask[:k, :width]
        mask[:] = 0
        for i, n in enumerate(lengths):
            mask[i, : n + 1] = 1
        binding = self.first[k]
        self._feed(
            binding,
            np.array(tokens, np.int64)[:, None],
            np.ascontiguousarray(mask),
            np.array(lengths, np.int64)[:, None],
        )
        self.session.session.run_with_iobinding(binding)
        for i, (token, n) in enumerate(zip(tokens, lengths, strict=True)):
            self._wrote(i, n, [token])
        return self.logits[:k]
