"""The one compiled part: llamaonnx's CPU kernel library for onnxruntime (runtime/native/*.c).

It is a plain shared library that onnxruntime loads (SessionOptions.register_custom_ops_library),
not a Python module; setuptools builds it because it already knows the platform's compiler and
naming. It needs GCC or Clang; where it cannot be built the install goes on without it and int4
models are written in onnxruntime's own MatMulNBits form (`--kernel auto`), slower on the CPU.
Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "runtime.native._q4ops",
            sources=[
                f"runtime/native/{f}.c"
                for f in ("activations", "matmul", "attention", "weights", "pool", "ort_binding")
            ],
            depends=["runtime/native/tiles.h", "runtime/native/tiles256.h"],
            # -g0: Python's CFLAGS ask for debug info, 10× the library's size, and every quantized
            # folder carries a copy of it
            extra_compile_args=["-O3", "-std=gnu11", "-g0"],
            libraries=["m", "pthread"],
            optional=True,
        )
    ]
)
