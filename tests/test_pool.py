"""The kernel library's own threads (runtime/native/pool.c): the same bits as onnxruntime's
parallel loop, on every op that shares its work out; sessions that ask for them; and a process
that forks, runs two sessions at once or exits with the threads running."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from export.quant.native import ROWS, pack
from runtime import native
from tests.test_native import BLOCKS, HKV, D, H, _gqa, _session, _tables

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the library's threads are Linux's (pool.c)"
)


@pytest.fixture
def threads():
    """Sets the library's threads for the test (1: onnxruntime's loop), then back to none."""
    lib = native.library()
    yield lambda n: lib.llamaonnx_threads(n)
    lib.llamaonnx_threads(1)


def _jobs() -> int:
    return int(native.library().llamaonnx_pool_jobs())


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_K", "Q5_0", "Q6_K", "Q8_0"])
@pytest.mark.parametrize("m", [1, 3, 8, 40])
def test_a_matmul_on_the_librarys_threads_gives_onnxruntimes_bits(threads, kind, m):
    """64 row groups in 8 chunks (one row) or 16 (more), shared out as the threads' ranges and
    their stolen tails: exactly what onnxruntime's loop gives, on two threads and on three."""
    n, k = 64 * ROWS, 256
    packed = pack(BLOCKS[kind](n, k, seed=m))
    a = np.random.default_rng(m).standard_normal((1, m, k)).astype(np.float32)
    session = _session(packed, k, threads=1)
    threads(1)
    (want,) = session.run(None, {"a": a})
    for t in (2, 3):
        threads(t)
        before = _jobs()
        (got,) = session.run(None, {"a": a})
        assert _jobs() > before, "the pool did not run the node"
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n", [300, 1200])
def test_attention_on_the_librarys_threads_gives_onnxruntimes_bits(threads, n):
    """A decode step over a long fp16 cache (its chunks of keys shared out, then merged in
    order) and a prompt (its blocks of queries): the same output and cache."""
    rng = np.random.default_rng(n)
    length = n + 8
    tables = _tables(length)
    width = (H + 2 * HKV) * D
    key = (rng.standard_normal((1, HKV, length, D)) * 0.5).astype(np.float16)
    value = (rng.standard_normal((1, HKV, length, D)) * 0.5).astype(np.float16)
    for s, total in ((1, n), (n, n)):  # a decode step at position n - 1; a whole prompt
        qkv = rng.standard_normal((1, s, width)).astype(np.float32)
        runs = {}
        for t in (1, 2):
            threads(t)
            before = _jobs()
            runs[t] = _gqa(True, qkv, key, value, [total - 1], total, tables)
            if t > 1:
                assert _jobs() > before, "the pool did not run the node"
        for got, want in zip(runs[2], runs[1], strict=True):
            np.testing.assert_array_equal(got, want)


def test_sessions_ask_for_the_threads(default_int4, monkeypatch):
    """A CPU session of llamaonnx's kernels runs them on the library's threads and onnxruntime
    on one; one thread, or LLAMAONNX_POOL=0, leaves everything to onnxruntime's."""
    from runtime.session import Session

    try:
        session = Session(default_int4, threads=2)
        assert session.kernel_threads == 2
        assert session.session.get_session_options().intra_op_num_threads == 1
        session = Session(default_int4, threads=1)
        assert session.kernel_threads == 1
        monkeypatch.setenv(native.POOL_VARIABLE, "0")
        session = Session(default_int4, threads=2)
        assert session.kernel_threads == 1
        assert session.session.get_session_options().intra_op_num_threads == 2
    finally:
        native.library().llamaonnx_threads(1)


def test_the_default_model_decodes_the_same_on_either_threads(default_int4, monkeypatch):
    """A prompt's logits and 8 greedy decode steps' on the real model: bit for bit the same on
    the library's two threads as on onnxruntime's two."""
    from runtime.session import Session

    def run(session):
        ids = np.array([[(7 + 13 * i) % 4000 + 100 for i in range(40)]])
        cache = session.new_cache(1, 64)
        out = [session.forward(ids, np.ones((1, 40), np.int64), np.arange(40)[None], cache)]
        for step in range(8):
            token = np.array([[int(out[-1][0, -1].argmax())]])
            mask = np.ones((1, 41 + step), np.int64)
            out.append(session.forward(token, mask, np.array([[40 + step]]), cache))
        return out

    try:
        monkeypatch.setenv(native.POOL_VARIABLE, "0")
        want = run(Session(default_int4, threads=2))
        monkeypatch.delenv(native.POOL_VARIABLE)
        pooled = Session(default_int4, threads=2)
        before = _jobs()
        got = run(pooled)
        assert _jobs() > before
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    finally:
        native.library().llamaonnx_threads(1)


def test_two_sessions_at_once_share_the_threads(threads):
    """Two threads running nodes at the same time: one gets the library's threads, the other
    onnxruntime's loop; both give the bits each gives alone."""
    n, k = 64 * ROWS, 256
    packed = pack(BLOCKS["Q4_1"](n, k, seed=5))
    sessions = [_session(packed, k, threads=1) for _ in range(2)]
    rngs = [np.random.default_rng(i) for i in (0, 1)]
    inputs = [rng.standard_normal((1, 1, k)).astype(np.float32) for rng in rngs]
    threads(1)
    want = [s.run(None, {"a": a})[0] for s, a in zip(sessions, inputs, strict=True)]
    threads(2)
    wrong = []

    def loop(i):
        for _ in range(200):
            (y,) = sessions[i].run(None, {"a": inputs[i]})
            if not np.array_equal(y, want[i]):
                wrong.append(i)

    runners = [threading.Thread(target=loop, args=(i,)) for i in (0, 1)]
    for r in runners:
        r.start()
    for r in runners:
        r.join(120)
    assert not any(r.is_alive() for r in runners)
    assert not wrong


# A process that runs nodes on the library's threads, forks (the child, which has none of its
# parent's threads, starts its own), and exits with them polling (they are stopped first).
_FORK = """
import os, sys
import numpy as np
from export.quant.native import ROWS, pack
from runtime import native
from tests.test_native import BLOCKS, _session

n, k = 64 * ROWS, 256
session = _session(pack(BLOCKS["Q4_1"](n, k, seed=1)), k, threads=1)
a = np.random.default_rng(0).standard_normal((1, 1, k)).astype(np.float32)
lib = native.library()
lib.llamaonnx_threads(2)
(want,) = session.run(None, {"a": a})
assert lib.llamaonnx_pool_jobs() > 0
pid = os.fork()
if pid == 0:
    before = lib.llamaonnx_pool_jobs()
    ok = all(np.array_equal(session.run(None, {"a": a})[0], want) for _ in range(50))
    os._exit(0 if ok and lib.llamaonnx_pool_jobs() > before else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_and_the_exit(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _FORK], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0", out.stdout + out.stderr[-2000:]
