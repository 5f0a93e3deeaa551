"""The kernels' ARM NEON path, for correctness only: runtime/native/matmul.c and activations.c
cross-compiled with Debian's aarch64 toolchain (gcc-aarch64-linux-gnu) into a static driver
(tests/native/driver.c) that runs under qemu-user (qemu-aarch64), against the same numpy
reference as the x86 paths. `make test` installs both tools (apt); the test says how when they
are missing. No speed is claimed for this path: qemu emulates it."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from export.quant import native as q
from tests.test_native import BLOCKS, reference

ROOT = Path(__file__).resolve().parents[1]
CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
PATHS = {"portable": 0, "neon": 3}  # tiles.h's PATH_PORTABLE, PATH_NEON


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    missing = [tool for tool in (CC, QEMU) if shutil.which(tool) is None]
    assert not missing, (
        f"{missing} not found: the NEON kernel is tested by cross-compiling it; install them "
        "with `apt-get install gcc-aarch64-linux-gnu qemu-user` (make setup does, as root)"
    )
    out = tmp_path_factory.mktemp("neon") / "driver"
    native = ROOT / "runtime" / "native"
    subprocess.run(
        [CC, "-O2", "-static", "-std=gnu11", f"-I{native}", str(ROOT / "tests/native/driver.c"),
         str(native / "activations.c"), str(native / "matmul.c"), "-lm", "-o", str(out)],
        check=True,
    )  # fmt: skip
    return out


def _run(driver: Path, packed: np.ndarray, a: np.ndarray, n: int, path: str, digits=1, keep=0):
    m, k = a.shape
    args = [QEMU, str(driver), str(packed.shape[-1]), str(m), str(k), str(n), str(PATHS[path])]
    args += [str(digits), str(keep)]
    data = np.ascontiguousarray(packed).tobytes() + a.astype(np.float32).tobytes()
    out = subprocess.run(args, input=data, capture_output=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr.decode())
    return np.frombuffer(out.stdout, np.float32).reshape(m, n)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize(
    "kind",
    [
        "Q4_0",
        "Q4_1",
        "Q4-zp",
        "Q4_K",
        "Q4_K-z",
        "Q4_K-fp32",
        "Q8_0",
        "Q8-zp",
        "Q5_0",
        "Q5_1",
        "Q5_K",
        "Q5_K-fp32",
        "Q6_K",
        "Q6_K-fp32",
    ],
)
@pytest.mark.parametrize("m", [1, 3, 6])
@pytest.mark.parametrize("digits,keep", [(1, 0), (2, 0), (2, 3)])  # keep: the `blocks` attribute
def test_arm_kernel_matches_numpy(driver, path, kind, m, digits, keep, monkeypatch):
    """(`Q4_K-z`: Q4_K's blocks in the super-block tile that keeps each block's z, as folders
    written before the zero-weight one hold them.)"""
    n, k = 48, 512
    blocks = BLOCKS[kind.removesuffix("-z")](n, k, seed=m)
    if kind.endswith("-z"):
        monkeypatch.setattr(q, "K_SLOTS", {4: q.TILE4K, 5: q.TILE5K})
    packed = q.pack(blocks)
    tiles = {"Q4_0": q.TILE4Z, "Q4_1": q.TILE4M, "Q4-zp": q.TILE, "Q4_K": q.TILE4KM,
             "Q4_K-z": q.TILE4K, "Q4_K-fp32": q.TILE4F,
             "Q8_0": q.TILE8Z, "Q8-zp": q.TILE8,
             "Q5_0": q.TILE5Z, "Q5_1": q.TILE5ZP, "Q5_K": q.TILE5K,
             "Q5_K-fp32": q.TILE5ZPF, "Q6_K": q.TILE6K, "Q6_K-fp32": q.TILE6}  # fmt: skip
    assert packed.shape[-1] == tiles[kind]
    a = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
    y = _run(driver, packed, a, n, path, digits, keep)
    want = reference(a, packed, digits, keep)  # (two digits: what int8 rounding left rounded too)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
