"""llamaonnx's own onnxruntime kernels (tiles.h, matmul.c, attention.c, ort_binding.c), built by
`pip install` into this folder as one library."""

from __future__ import annotations

import ctypes
import importlib.machinery
import sys
from functools import cache
from pathlib import Path

from runtime.errors import ModelFolderError

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
    lib.llamaonnx_gather_q8.argtypes = [ptr, i64, i64, ptr, i64, ptr]
    lib.llamaonnx_gather_q8.restype = i64
    lib.llamaonnx_fast_path.argtypes = [ctypes.c_int]
    lib.llamaonnx_layout.argtypes = [ctypes.c_int]
    lib.llamaonnx_layout.restype = i64
    return lib


@cache
def layout() -> dict[str, int]:
    """The packed tile layout the library was built with (tiles.h): rows a tile, block width,
    bytes of a 4-bit and of an 8-bit tile."""
    lib = library()
    return {
        k: int(lib.llamaonnx_layout(i)) for i, k in enumerate(("rows", "block", "tile", "tile8"))
    }


def fast_path() -> bool:
    """Whether this CPU runs the AVX-512 VNNI kernel (else the portable C one: correct, slow)."""
    return bool(library().llamaonnx_fast_path(0))
