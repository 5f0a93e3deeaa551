"""Runs the engines: one worker process each, the same prompt ids, warm-up then interleaved runs
(and the context sweep), medians and spreads, and the machine they ran on."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from runtime import options
from runtime.bench import engines
from runtime.bench.prompt import prompt_ids
from runtime.errors import ContextLengthError, LlamaonnxError, OptionError

SWEEP = (128, 512, 1024, 2048, 4096, 8192)


class PeerError(LlamaonnxError, RuntimeError):
    """A requested engine could not run; the others' results are still reported."""


@dataclasses.dataclass
class Case:
    name: str
    engine: str
    path: str
    size_bytes: int
    proc: subprocess.Popen | None = None
    runs: list[dict] = dataclasses.field(default_factory=list)
    sweep: list[dict] = dataclasses.field(default_factory=list)
    load_rss_mb: float = 0.0
    error: str | None = None
    kernel_path: str | None = None  # LLAMAONNX_KERNEL_PATH for this worker (llamaonnx's kernels)
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # more for this worker
    system_info: str | None = None  # llama.cpp's: the instruction sets its build uses
    profiled: dict | None = None  # where its steps go (runtime/bench/profile.py)

    def start(self, threads: int, provider: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.bench.worker",
                self.engine,
                self.path,
                str(threads),
                provider,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={
                **os.environ,
                "OMP_NUM_THREADS": str(threads),
                **({"LLAMAONNX_KERNEL_PATH": self.kernel_path} if self.kernel_path else {}),
                **self.env,
            },
        )
        msg = json.loads(self.proc.stdout.readline() or '{"error": "worker died"}')
        self.error = msg.get("error")
        self.load_rss_mb = msg.get("rss_mb", 0.0)
        self.system_info = msg.get("system_info")
        if not self.error and self.kernel_path and msg.get("kernel_path") != self.kernel_path:
            self.error = f"asked for kernel path {self.kernel_path}, ran {msg.get('kernel_path')}"

    def run(self, ids: list[int], new: int) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids, "new": new}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the benchmark worker died")
        r = json.loads(line)
        r["prompt"] = len(ids)
        return r

    def profile(self, ids: list[int], new: int) -> dict:
        self.proc.stdin.write(json.dumps({"profile": True, "ids": ids, "new": new}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the benchmark worker died while profiling")
        return json.loads(line)["profile"]

    def stop(self) -> None:
        if self.proc:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _size(path: Path) -> int:
    from runtime.folder import model_size

    return path.stat().st_size if path.is_file() else model_size(path)


def cases(
    models: list[Path],
    peers: list[str],
    genai_dirs: list[Path],
    gguf: Path | None,
    kernel_paths: tuple[str, ...] = (),
    llama_libs: dict[str, Path] | None = None,
) -> list[Case]:
    """The engines to run. `kernel_paths`: a folder on llamaonnx's kernels runs once per path
    named (AVX-512, AVX2, …: every x86 path on one machine), else on the best one.
    `llama_libs`: label → a folder holding another build of llama.cpp's libllama, which the
    llama.cpp peer also runs from (llama-cpp-python's LLAMA_CPP_LIB_PATH)."""
    from runtime.folder import read_model_folder

    out = []
    for m in models:
        info = read_model_folder(m)
        native_ops = bool(info.custom_ops)
        for p in kernel_paths if native_ops and kernel_paths else (None,):
            name = f"llamaonnx {m.name}" + (f" [{p}]" if p else "")
            out.append(Case(name, "llamaonnx", str(m), _size(m), kernel_path=p))
        if "genai" in peers and info.target == "ort":
            out.append(Case(f"genai on {m.name}", "genai", str(m), _size(m)))
    for d in genai_dirs:
        if not d.is_dir():
            raise OptionError(f"--genai-dir {d} is not a folder (one built by genai's builder)")
        out.append(Case(f"genai {d.name}", "genai", str(d), _size(d)))
    first = read_model_folder(models[0]).provenance
    if "llama.cpp" in peers:
        path = gguf or (Path(first.source) if first.format == "gguf" else None)
        if path is None:
            raise OptionError("llama.cpp needs a GGUF: pass --gguf PATH")
        if not path.is_file():
            raise OptionError(f"llama.cpp's GGUF {path} is not a file")
        out.append(Case(f"llama.cpp {path.name}", "llama.cpp", str(path), _size(path)))
        for label, folder in (llama_libs or {}).items():
            if not any(folder.glob("libllama.*")):
                raise OptionError(f"--llama-lib {label}={folder}: no libllama in that folder")
            env = {"LLAMA_CPP_LIB_PATH": str(folder.absolute())}
            name = f"llama.cpp {path.name} [{label}]"
            out.append(Case(name, "llama.cpp", str(path), _size(path), env=env))
    elif llama_libs:
        raise OptionError("--llama-lib runs the llama.cpp peer: add --peer llama.cpp")
    if "torch" in peers:
        src = Path(first.source)
        out.append(Case("PyTorch reference (fp32)", "torch", str(src), _size(src)))
    return out


def _summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def bench(
    models: list[Path],
    peers: list[str] = (),
    genai_dirs: list[Path] = (),
    gguf: Path | None = None,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    runs: int = 10,
    warmup: int = 1,
    threads: int = 2,
    provider: str = "cpu",
    sweep: tuple[int, ...] = (),
    sweep_new_tokens: int = 32,
    sweep_runs: int = 3,
    progress=lambda msg: None,
    check_files: bool = True,
    kernel_paths: tuple[str, ...] = (),
    llama_libs: dict[str, Path] | None = None,
    profile: bool = False,
) -> dict:
    """Runs every engine and returns the results; an engine that could not start has an
    "error" instead of figures (the CLI then exits non-zero). `check_files`: compare each
    model folder's files with their recorded sha256 once, before the workers open them."""
    from runtime.folder import check_integrity, read_model_folder

    models = [Path(m) for m in models]
    peers_known = engines.names()[1:]
    for p in peers:
        if p not in peers_known:
            raise OptionError(f"unknown peer {p!r}; choose from {peers_known}")
    options.threads(threads)
    options.integer("prompt_tokens", prompt_tokens, 1)
    options.integer("new_tokens", new_tokens, 2)  # decode speed needs a second token
    options.integer("runs", runs, 1)
    options.integer("warmup", warmup, 0)
    options.integer("sweep_runs", sweep_runs, 1)
    infos = [read_model_folder(m) for m in models]
    if check_files:
        for info in infos:
            check_integrity(info)
    context = min(info.max_position for info in infos)
    if prompt_tokens + new_tokens > context:
        raise ContextLengthError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the models' "
            f"context of {context} tokens; ask for at most {context - new_tokens} prompt tokens"
        )
    ids = prompt_ids(models[0], prompt_tokens)
    if kernel_paths:
        from runtime import native

        have = native.supported_paths()
        for p in kernel_paths:
            if p not in have:
                raise OptionError(f"--kernel-path {p}: this CPU runs {have}")
    todo = cases(
        models, list(peers), [Path(d) for d in genai_dirs], gguf, tuple(kernel_paths), llama_libs
    )
    for c in todo:
        progress(f"start   {c.name}")
        c.start(threads, provider)
        if c.error:
            progress(f"skip    {c.name}: {c.error}")
    live = [c for c in todo if not c.error]
    try:
        for _ in range(warmup):
            for c in live:
                c.run(ids, new_tokens)
        for r in range(runs):
            for c in live:  # interleaved: drift hits every engine alike
                c.runs.append(c.run(ids, new_tokens))
            progress(f"run     {r + 1}/{runs}")
        if profile:  # after the timed runs: the profiler slows what it watches
            for c in live:
                if c.engine == "llamaonnx":
                    c.profiled = c.profile(ids, new_tokens)
                    progress(f"profile {c.name}")
        for length in sweep:
            if length > context:
                progress(f"sweep   context {length} skipped: the models hold {context} tokens")
                continue
            length = min(length, context - sweep_new_tokens)  # 8192 → 8160 in an 8k model
            long_ids = prompt_ids(models[0], length)
            speeds: dict[str, list[float]] = {c.name: [] for c in live}
            ttfts: dict[str, list[float]] = {c.name: [] for c in live}
            for _ in range(sweep_runs):  # interleaved like the main runs
                for c in live:
                    res = c.run(long_ids, sweep_new_tokens)
                    speeds[c.name].append((res["new"] - 1) / res["decode_s"])
                    ttfts[c.name].append(res["ttft"])
            for c in live:
                ttft = statistics.median(ttfts[c.name])
                c.sweep.append(
                    {
                        "context": length,
                        "decode_tok_s": statistics.median(speeds[c.name]),
                        "runs": speeds[c.name],
                        "ttft_s": ttft,  # the whole prompt's prefill and the first token
                        "prefill_tok_s": length / ttft,
                    }
                )
            progress(f"sweep   context {length}")
    finally:
        for c in todo:
            c.stop()
    results = []
    for c in todo:
        row = {"name": c.name, "engine": c.engine, "path": c.path, "size_mb": c.size_bytes / 1e6}
        if c.kernel_path:
            row["kernel_path"] = c.kernel_path
        if c.system_info:
            row["system_info"] = c.system_info
        if c.error:
            results.append({**row, "error": c.error})
            continue
        results.append(
            {
                **row,
                "ttft_ms": _summary([r["ttft"] * 1000 for r in c.runs]),
                "prefill_tok_s": _summary([r["prompt"] / r["ttft"] for r in c.runs]),
                "decode_tok_s": _summary([(r["new"] - 1) / r["decode_s"] for r in c.runs]),
                "peak_rss_mb": max(r["rss_mb"] for r in c.runs),
                "sweep": c.sweep,
                **({"profile": c.profiled} if c.profiled else {}),
            }
        )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(gpu=provider.startswith("cuda")),
        "versions": versions(),
        "settings": {
            "prompt_tokens": len(ids),
            "new_tokens": new_tokens,
            "runs": runs,
            "warmup": warmup,
            "sweep_runs": sweep_runs if sweep else 0,
            "sweep_new_tokens": sweep_new_tokens if sweep else 0,
            "threads": threads,
            "provider": provider,
            "batch": 1,
            "sampling": "greedy, end-of-sequence ignored",
        },
        "results": results,
    }


def machine(gpu: bool = False) -> dict:
    cpu, family = platform.processor(), None
    try:  # (the first processor's block: every core of a VM is the same model)
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info)}
        cpu = fields.get("model name", cpu)
        if "cpu family" in fields and "model" in fields:
            family = f"family {fields['cpu family']}, model {fields['model']}"
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}
    if family:  # a VM's "AMD EPYC" hides its generation; x86 family and model do not
        out["family"] = family
    out["flags"] = _vector_flags()
    try:
        from runtime import native

        out["kernel_path"] = native.path()  # what llamaonnx's kernels take here by default
    except Exception:  # noqa: BLE001 — the library not built: the figure says so
        out["kernel_path"] = "not built"
    if gpu:  # the card and driver, as nvidia-smi names them
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            name, driver = smi.stdout.splitlines()[0].split(", ")
            out["gpu"] = f"{name}, driver {driver}"
        except (OSError, IndexError, ValueError, subprocess.SubprocessError):
            out["gpu"] = "unknown"
    return out


def _vector_flags() -> list[str]:
    """The CPU's vector extensions that decide a kernel's speed (x86 /proc/cpuinfo `flags`, ARM
    `Features`)."""
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx_vnni", "amx_int8", "amx_tile", "asimd", "asimddp", "sve", "i8mm")  # fmt: skip
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("llamaonnx", "onnxruntime", "onnxruntime-genai", "llama_cpp_python", "torch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:  # the build that is imported: onnxruntime-gpu can shadow a CPU onnxruntime on the path
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        if "CUDAExecutionProvider" in ort.get_available_providers():
            out["onnxruntime"] += " (CUDA build)"
    except ImportError:
        pass
    try:
        import onnxruntime_genai as og

        out["onnxruntime-genai"] = og.__version__
    except ImportError:
        pass
    return out
