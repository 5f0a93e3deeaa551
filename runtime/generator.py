"""Prefill, then decode: token generation over a `Session`, batched or streamed as text.

Batches are right-padded: each row's new token goes right after its own last token, which is what
GroupQueryAttention's length-based masking expects and what the masked graphs handle as well.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Mapping

import numpy as np

from runtime import options
from runtime.errors import ContextLengthError, OptionError
from runtime.sampler import apply_logit_bias, apply_penalties, apply_repetition_penalty, sample
from runtime.session import Session
from runtime.tokenizer import StreamDecoder, check_text

MAX_TEMPERATURE = 100.0  # past this every distribution is uniform to float precision


def right_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """→ input_ids, attention_mask, position_ids, each (B, S), prompts flush left."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = p, 1
    return ids, mask, np.where(mask == 1, np.arange(width)[None], 0)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: -2 to 2, on the reply's tokens
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's: (token id, -100 to 100) pairs
    logprobs: int | None = None  # the engine's events: the token's and this many likeliest
    # the engine: each prompt token's logprob (the first's None) and this many likeliest, in
    # Request.prompt_logprobs (OpenAI's completions echo; with it max_new_tokens may be 0)
    prompt_logprobs: int | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence tokens
    stop_strings: tuple[str, ...] = ()
    max_length: int | None = None  # cache size; None: longest prompt + max_new_tokens
    truncate: bool = False  # keep the prompt's last tokens instead of raising ContextLengthError

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        # (0: only the prompt's logprobs)
        low = 0 if self.prompt_logprobs is not None else 1
        set_("max_new_tokens", options.integer("max_new_tokens", self.max_new_tokens, low))
        set_("temperature", options.number("temperature", self.temperature, 0, MAX_TEMPERATURE))
        set_("top_k", options.integer("top_k (0 turns it off)", self.top_k, 0))
        set_("top_p", options.number("top_p", self.top_p, 0, 1, lo_open=True))
        set_(
            "repetition_penalty",
            options.number("repetition_penalty", self.repetition_penalty, 0, None, lo_open=True),
        )
        for name in ("presence_penalty", "frequency_penalty"):
            set_(name, options.number(name, getattr(self, name), -2, 2))
        bias = self.logit_bias
        if isinstance(bias, Mapping):
            bias = tuple(bias.items())
        try:
            pairs = [(t, b) for t, b in bias]
        except (TypeError, ValueError):
            raise OptionError(
                f"logit_bias must map token ids to biases, got {self.logit_bias!r:.80}"
            ) from None
        set_("logit_bias", tuple(sorted(
            (options.integer("a logit_bias token id", t, 0),
             options.number(f"the logit_bias of token {t}", b, -100, 100)) for t, b in pairs
        )))  # fmt: skip
        if len({t for t, _ in self.logit_bias}) < len(self.logit_bias):
            raise OptionError("logit_bias names a token twice")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                set_(name, options.integer(f"{name} (the likeliest tokens given)",
                                           getattr(self, name), 0, 20))  # fmt: skip
        if self.seed is not None:
            set_("seed", options.integer("seed", self.seed, 0, 2**63 - 1))
        if self.max_length is not None:
            set_("max_length", options.integer("max_length", self.max_length, 2))
        if self.stop_token_ids is not None:
            ids = tuple(options.integer("stop token id", t, 0) for t in self.stop_token_ids)
            set_("stop_token_ids", ids)
        stops = tuple(self.stop_strings)
        if not all(isinstance(x, str) for x in stops):
            raise OptionError(f"stop_strings must be strings, got {stops!r}")
        set_("stop_strings", tuple(check_text(x, "a stop string") for x in stops))


def check_vocabulary(config: GenerationConfig, vocab_size: int) -> None:
    """OptionError where the settings name a token the model does not have."""
    for token, _ in config.logit_bias:
        if token >= vocab_size:
            raise OptionError(
                f"logit_bias names token {token}, past this model's vocabulary "
                f"(0 to {vocab_size - 1})"
            )


@dataclasses.dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"[{self.prompt_tokens} prompt tokens, {self.new_tokens} new tokens, "
            f"time to first token {self.time_to_first_token * 1000:.0f} ms, "
            f"decode {self.decode_tokens_per_second:.1f} tok/s]"
        )


class Generator:
    def __init__(self, session: Session):
        self.session = session
        self.info = session.info
        self.tokenizer = session.tokenizer
        self.stats = Stats()

    def _stop_ids(self, config: GenerationConfig) -> set[int]:
        """The tokens that end a reply: the config's, else the model's end-of-sequence ones."""
        ids = self.info.eos_token_ids if config.stop_token_ids is None else config.stop_token_ids
        return set(ids)

    # -- token level -------------------------------------------------------------------------
    def _fit(
        self, prompts: list[list[int]], config: GenerationConfig
    ) -> tuple[list[list[int]], int]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        limit = min(config.max_length or self.info.max_position, self.info.max_position)
        room = limit - config.max_new_tokens
        if room < 1:
            raise ContextLengthError(
                f"max_new_tokens {config.max_new_tokens} leaves no room for a prompt "
                f"in {limit} tokens"
            )
        longest = max(len(p) for p in prompts)
        if longest > room:
            if not config.truncate:
                raise ContextLengthError(
                    f"prompt of {longest} tokens + {config.max_new_tokens} new tokens exceeds the "
                    f"context of {limit} tokens; shorten it, lower max_new_tokens, or keep only "
                    "the prompt's last tokens (--truncate; truncate=True in the API)"
                )
            prompts = [p[-room:] for p in prompts]
            longest = room
        return prompts, (config.max_length or longest + config.max_new_tokens)

    def steps(
        self, prompts: list[list[int]], config: GenerationConfig
    ) -> Iterator[list[int | None]]:
        """Yields, per decode step, each row's new token (None once that row has stopped)."""
        prompts, max_length = self._fit(prompts, config)
        check_vocabulary(config, self.info.vocab_size)
        if config.logprobs is not None or config.prompt_logprobs is not None:
            raise OptionError(
                "the Generator gives no logprobs: runtime.engine.Engine's events carry them "
                "(and `llamaonnx serve` answers with them)"
            )
        stop = self._stop_ids(config)
        b = len(prompts)
        ids, mask, positions = right_pad(prompts, self.info.pad_token_id)
        lengths = mask.sum(1)
        cache = self.session.new_cache(b, max_length)
        rng = np.random.default_rng(config.seed)
        history = [list(p) for p in prompts]
        replies: list[list[int]] = [[] for _ in prompts]  # (the presence and frequency penalties')
        done = [False] * b
        self.stats = Stats(prompt_tokens=int(lengths.sum()))
        start = time.perf_counter()
        # rows of one length (one prompt, mostly) need the last position's logits alone
        if (lengths == lengths[0]).all():
            last = self.session.forward(ids, mask, positions, cache, last=True)[:, -1]
        else:
            logits = self.session.forward(ids, mask, positions, cache)
            last = logits[np.arange(b), lengths - 1]  # (B, V)
        # decode on inputs bound once where the session can (Session.decode_steps); else each
        # step's inputs go to `forward`, the mask growing by a column a step in one buffer
        width = mask.shape[1]
        steps = self.session.decode_steps(cache, mask)
        if steps is not None:
            after = steps.logits[:, -1]
        else:
            full = np.zeros((b, width + config.max_new_tokens), np.int64)
            full[:, :width] = mask
        for step in range(config.max_new_tokens):
            picks: list[int | None] = []
            for i in range(b):
                if done[i]:
                    picks.append(None)
                    continue
                row = apply_repetition_penalty(last[i], history[i], config.repetition_penalty)
                row = apply_penalties(
                    row, replies[i], config.presence_penalty, config.frequency_penalty
                )
                row = apply_logit_bias(row, config.logit_bias)
                tok = sample(row, rng, config.temperature, config.top_k, config.top_p)
                history[i].append(tok)
                replies[i].append(tok)
                done[i] = tok in stop
                picks.append(tok)
            self.stats.new_tokens += b - picks.count(None)
            if step == 0:
                self.stats.time_to_first_token = time.perf_counter() - start
                decode_start = time.perf_counter()
            yield picks
            if all(done) or step == config.max_new_tokens - 1:
                break
            # A stopped row keeps feeding padding; its column is masked out.
            width += 1
            lengths += 1
            if steps is not None:
                steps.ids[:, 0] = [self.info.pad_token_id if t is None else t for t in picks]
                steps.mask[:, width - 1] = [t is not None for t in picks]
                if steps.positions is not None:
                    steps.positions[:, 0] = lengths - 1
                steps.run()
                last = after  # steps.logits[:, -1]: the next step overwrites it, read before
            else:
                nxt = np.array(
                    [[t if t is not None else self.info.pad_token_id] for t in picks], np.int64
                )
                full[:, width - 1] = [0 if t is None else 1 for t in picks]
                # the logits may be a view of the session's buffer: read before the next step
                logits = self.session.forward(
                    nxt, full[:, :width], (lengths - 1)[:, None], cache, copy=False
                )
                last = logits[:, -1]
            self.stats.decode_seconds = time.perf_counter() - decode_start

    def generate_ids(self, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]
        for picks in self.steps(prompts, config):
            for i, t in enumerate(picks):
                if t is not None:
                    out[i].append(t)
        return out

    # -- text level --------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict] | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            return self.tokenizer.encode(prompt)
        if prompt and isinstance(prompt[0], dict):
            return self.tokenizer.encode_chat(prompt)
        return list(prompt)

    def stream(
        self, prompt: str | list[dict] | list[int], config: GenerationConfig = GenerationConfig()
    ) -> Iterator[str]:
        """Text pieces as they are generated: whole UTF-8 characters, cut before any stop string."""
        decoder = StreamDecoder(self.tokenizer)
        stops = [s for s in config.stop_strings if s]
        stop_ids = self._stop_ids(config)
        pending = ""
        for (tok,) in self.steps([self.encode(prompt)], config):
            if tok is None or tok in stop_ids:
                break
            pending += decoder.push(tok)
            cut = _first_stop(pending, stops)
            if cut is not None:
                if pending[:cut]:
                    yield pending[:cut]
                return
            keep = _held_back(pending, stops)
            if len(pending) > keep:
                yield pending[: len(pending) - keep]
                pending = pending[len(pending) - keep :]
        pending += decoder.flush()
        cut = _first_stop(pending, stops)
        if pending[:cut]:
            yield pending[:cut]

    def generate(
        self, prompt: str | list[dict] | list[int], config: GenerationConfig = GenerationConfig()
    ) -> str:
        return "".join(self.stream(prompt, config))


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if s.startswith(text[-k:]):
                best = max(best, k)
                break
    return best
