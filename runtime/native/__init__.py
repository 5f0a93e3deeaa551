"""llamaonnx's own onnxruntime kernels (tiles.h, matmul.c, attention.c, weights.c,
ort_binding.c), built by `pip install` into this folder as one library."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import os
import sys
from functools import cache
from pathlib import Path

from runtime.errors import ModelFolderError, OptionError

DOMAIN = "ai.llamaonnx"
HERE = Path(__file__).parent
# the copy a model folder carries for onnxruntime-genai (export/quant/__init__.py)
FOLDER_LIBRARY = "llamaonnx_kernels.dll" if sys.platform == "win32" else "llamaonnx_kernels.so"


def library_path() -> Path:
    """The built library, or ModelFolderError saying how to build it."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = HERE / f"_q4ops{suffix}"
        if path.is_file():
            return path
    raise ModelFolderError(
        f"this model uses llamaonnx's CPU kernel ({DOMAIN}.MatMulQ4), whose library is not built "
        f"in {HERE}: reinstall with `pip install -e .` (or `pip install .`), which compiles "
        "runtime/native/*.c and needs a C compiler; or quantize with --kernel nbits"
    )


def available() -> bool:
    try:
        library_path()
    except ModelFolderError:
        return False
    return True


@cache
def library() -> ctypes.CDLL:
    """The library through ctypes: its plain C entry points, for tests and tools."""
    lib = ctypes.CDLL(str(library_path()))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.llamaonnx_matmul.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
    digits = ctypes.c_int
    lib.llamaonnx_matmul_digits.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, digits, i64]
    lib.llamaonnx_gather_q8.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr]
    lib.llamaonnx_gather_q8.restype = i64
    lib.llamaonnx_kernel_path.argtypes = [ctypes.c_int]
    lib.llamaonnx_path_supported.argtypes = [ctypes.c_int]
    lib.llamaonnx_layout.argtypes = [ctypes.c_int]
    lib.llamaonnx_layout.restype = i64
    lib.llamaonnx_held_bytes.restype = i64
    lib.llamaonnx_threads.argtypes = [ctypes.c_int]
    lib.llamaonnx_pool_jobs.restype = ctypes.c_long
    return lib


@cache
def layout() -> dict[str, int]:
    """The packed tile layout the library was built with (tiles.h): rows a tile, block width,
    bytes of a 4-bit and of an 8-bit tile, of a 4-bit tile with fp32 d and m, of 5-bit tiles
    with fp16 and fp32 d and m, of a 6-bit tile, of a 5-bit tile without m, of the 5-bit
    tiles with zero points, of a slot of Q4_K's, Q6_K's and Q5_K's super-block tiles, of a
    4-bit tile without m and z (Q4_0), of an 8-bit tile without z (Q8_0), and of a 4-bit tile
    without z (Q4_1, centred on its zero weight); then the layouts' revision, which every node
    that reads tiles carries as its `layout` attribute, and the oldest revision the kernels read
    (tiles.h, TILE_LAYOUT); then the slot of Q4_K's super-block tile without z."""
    lib = library()
    names = ("rows", "block", "tile", "tile8", "tile4f", "tile5", "tile5f", "tile6", "tile5z",
             "tile5zp", "tile5zpf", "tile4k", "tile6k", "tile5k", "tile4z", "tile8z",
             "tile4m", "revision", "oldest", "tile4km")  # fmt: skip
    return {k: int(lib.llamaonnx_layout(i)) for i, k in enumerate(names)}


HUGE_PAGES_VARIABLE = "LLAMAONNX_HUGE_PAGES"


def huge_pages_possible() -> bool:
    """Whether this kernel backs an madvise'd mapping with transparent huge pages (Linux, THP
    `always` or `madvise`), where the kernels copy their weights into them unless
    LLAMAONNX_HUGE_PAGES=0 (weights.c answers, so the two cannot disagree)."""
    return bool(library().llamaonnx_huge_pages_possible())


def held_bytes() -> int:
    """Bytes of weights this process's kernels hold in huge pages (0 where they read onnxruntime's
    own pages: no transparent huge pages, or LLAMAONNX_HUGE_PAGES=0)."""
    return int(library().llamaonnx_held_bytes())


POOL_VARIABLE = "LLAMAONNX_POOL"


def physical_cores() -> int:
    """The cores this process may run on, one a core however many hardware threads it has (what
    onnxruntime takes by default)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
            cores.add(siblings.read_text().strip())
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def start_threads(library_file: Path, threads: int | None) -> int:
    """Asks the kernel library at `library_file` to run its kernels' parallel loops on its own
    threads (pool.c), `threads` of them with the caller's (None: one a physical core), for every
    session of the process that loads it; returns how many it will use: 1 where it runs them on
    onnxruntime's instead (no pool on this platform, one thread asked for, or
    LLAMAONNX_POOL=0), which the session then gives the threads."""
    n = threads or physical_cores()
    if os.environ.get(POOL_VARIABLE, "1") == "0":
        n = 1
    lib = ctypes.CDLL(str(library_file))  # (the handle onnxruntime loaded: one pool a file)
    if not hasattr(lib, "llamaonnx_threads"):  # a build from before pool.c (an A/B's baseline)
        return 1
    lib.llamaonnx_threads.argtypes = [ctypes.c_int]
    return int(lib.llamaonnx_threads(n))


# the kernel library's code paths, by the numbers tiles.h gives them
PATHS = ("portable", "avx2", "avx512", "neon", "avxvnni", "amx")
PATH_VARIABLE = "LLAMAONNX_KERNEL_PATH"


def supported_paths() -> tuple[str, ...]:
    """The paths this CPU can run, slowest first (the portable one first)."""
    lib = library()
    order = ("portable", "avx2", "avxvnni", "avx512", "amx", "neon")
    return tuple(p for p in order if lib.llamaonnx_path_supported(PATHS.index(p)))


def path() -> str:
    """The path the kernels take on this machine: the best it has, or the one
    LLAMAONNX_KERNEL_PATH names. A name that is not a path, or one this CPU lacks, is an
    OptionError (the library itself then runs the best path)."""
    asked = os.environ.get(PATH_VARIABLE)
    if asked:
        if asked not in PATHS:
            raise OptionError(
                f"{PATH_VARIABLE}={asked!r} is not a kernel path; choose from {PATHS}"
            )
        if asked not in supported_paths():
            raise OptionError(
                f"{PATH_VARIABLE}={asked} asks for a path this CPU cannot run; it has "
                f"{supported_paths()}"
            )
    return PATHS[library().llamaonnx_kernel_path(-1)]


def fast_path() -> bool:
    """Whether the kernels run a vector path here (AVX2, AVX-VNNI, AVX-512 VNNI, AMX or NEON), not
    the portable C one (correct, but slower than onnxruntime's MatMulNBits)."""
    return path() != "portable"


_forced: list[str] = []  # the paths of the use_path blocks now open, innermost last


@contextlib.contextmanager
def use_path(name: str):
    """Runs the block on kernel path `name` (tests and the benchmark), then back to the path of
    the block around it, or to the default."""
    lib = library()
    if lib.llamaonnx_kernel_path(PATHS.index(name)) < 0:
        raise OptionError(f"this CPU cannot run the {name} path; it has {supported_paths()}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()
        lib.llamaonnx_kernel_path(PATHS.index(_forced[-1]) if _forced else -2)
