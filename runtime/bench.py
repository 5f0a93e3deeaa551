"""`llamaonnx bench MODEL_DIR… [--peer llama.cpp|genai|torch]`: time to first token, prefill and
decode tokens/s, peak resident memory and size, side by side with the peers that are installed.

Every engine runs in its own worker process (`python -m runtime.bench worker …`, JSON lines on
stdin/stdout), so thread pools never compete inside one process and each peak RSS is its own. All
engines get the same prompt token ids (a chat prompt cut from the shipped evaluation text), decode
greedily without stopping at end-of-sequence, and are run interleaved — one run of each engine in
turn, `runs` times after a warm-up — because this kind of machine drifts by 10-20 % within minutes;
medians and spreads are reported. A sweep decodes at growing context lengths to show how speed
falls as the cache grows.
"""

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
from runtime.errors import ContextLengthError, LlamaonnxError, OptionError

ENGINES = ("llamaonnx", "genai", "llama.cpp", "torch")


class PeerError(LlamaonnxError, RuntimeError):
    """A requested engine could not run; the others' results are still reported."""


SWEEP = (128, 512, 1024, 2048, 4096)


# -- the prompt ----------------------------------------------------------------------------------
def prompt_ids(folder: Path, n: int) -> list[int]:
    """Exactly n token ids: the chat template around as much of the evaluation text as fits (or,
    past the text, the text repeated)."""
    import importlib.resources

    from runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(folder)
    text = importlib.resources.files("runtime").joinpath("data/eval.txt").read_text()
    words = text.split()
    while len(tok.encode(" ".join(words))) < n:
        words = words + text.split()

    def encode(k: int) -> list[int]:
        content = " ".join(words[:k])
        msgs = [{"role": "user", "content": content}]
        return tok.encode_chat(msgs) if tok.chat_template else tok.encode(content)

    lo, hi = 1, len(words)
    while lo < hi:  # the most words whose prompt is at most n tokens
        mid = (lo + hi + 1) // 2
        if len(encode(mid)) <= n:
            lo = mid
        else:
            hi = mid - 1
    ids = encode(lo)
    if len(ids) < n:  # pad inside the user turn with the text's next tokens
        extra = tok.encode(" " + " ".join(words[lo:]))[: n - len(ids)]
        cut = len(ids) - _tail_length(tok)
        ids = ids[:cut] + extra + ids[cut:]
    return ids[:n]


def _tail_length(tok) -> int:
    """Tokens the chat template puts after the user's text (end of turn, assistant header)."""
    if not tok.chat_template:
        return 0
    a = tok.encode_chat([{"role": "user", "content": "x"}])
    b = tok.encode_chat([{"role": "user", "content": "x y"}])
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    return k


# -- engines (inside a worker) ---------------------------------------------------------------------
class _Ours:
    def __init__(self, path: str, threads: int, provider: str):
        from runtime.session import Session

        graph = provider == "cuda-graph"
        self.session = Session(  # the parent checked the folder's files once
            path,
            provider="cuda" if graph else provider,
            threads=threads,
            cuda_graph=graph,
            check_files=False,
        )

    def run(self, ids: list[int], new: int) -> tuple[float, float, int]:
        from runtime.generator import GenerationConfig, Generator

        gen = Generator(self.session)
        gen.generate_ids([ids], GenerationConfig(max_new_tokens=new, stop_token_ids=()))
        s = gen.stats
        return s.time_to_first_token, s.decode_seconds, s.new_tokens


class _Genai:
    def __init__(self, path: str, threads: int, provider: str):
        import onnxruntime_genai as og

        config = og.Config(path)
        config.clear_providers()
        if provider.startswith("cuda"):
            config.append_provider("cuda")
            if provider == "cuda-graph":
                config.set_provider_option("cuda", "enable_cuda_graph", "1")
        config.overlay(
            json.dumps(
                {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
            )
        )
        self.og, self.model = og, og.Model(config)

    def run(self, ids: list[int], new: int) -> tuple[float, float, int]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=len(ids) + new, min_length=len(ids) + new, do_sample=False
        )
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.get_next_tokens()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        n = 1
        while n < new and not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            n += 1
        return ttft, time.perf_counter() - t1, n


class _LlamaCpp:
    def __init__(self, path: str, threads: int, provider: str):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=path,
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=8192,
            n_batch=512,
            n_gpu_layers=-1 if provider.startswith("cuda") else 0,
            verbose=False,
        )

    def run(self, ids: list[int], new: int) -> tuple[float, float, int]:
        self.llm.reset()
        t0 = time.perf_counter()
        n = 0
        for _ in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
            n += 1
            if n == 1:
                ttft = time.perf_counter() - t0
                t1 = time.perf_counter()
            if n == new:
                break
        return ttft, time.perf_counter() - t1, n


_WORKERS = {"llamaonnx": _Ours, "genai": _Genai, "llama.cpp": _LlamaCpp}
# The PyTorch reference lives on the export side (runtime never imports export or torch).
_WORKER_MODULE = {"torch": "export.bench_torch"}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(make_engine, path: str, threads: int, provider: str) -> None:
    """Serves runs on stdin/stdout: {"ids": […], "new": n} → {"ttft", "decode_s", "new"}."""
    out = sys.stdout
    sys.stdout = sys.stderr  # engines that print must not break the protocol
    try:
        eng = make_engine(path, threads, provider)
        out.write(json.dumps({"ready": True, "rss_mb": _peak_rss_mb()}) + "\n")
    except Exception as e:  # reported to the parent, which says which peer could not start
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        ttft, decode_s, n = eng.run(req["ids"], req["new"])
        out.write(
            json.dumps({"ttft": ttft, "decode_s": decode_s, "new": n, "rss_mb": _peak_rss_mb()})
            + "\n"
        )
        out.flush()


# -- the parent ------------------------------------------------------------------------------------
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

    def start(self, threads: int, provider: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                _WORKER_MODULE.get(self.engine, "runtime.bench"),
                "worker",
                self.engine,
                self.path,
                str(threads),
                provider,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
        msg = json.loads(self.proc.stdout.readline() or '{"error": "worker died"}')
        self.error = msg.get("error")
        self.load_rss_mb = msg.get("rss_mb", 0.0)

    def run(self, ids: list[int], new: int) -> dict:
        self.proc.stdin.write(json.dumps({"ids": ids, "new": new}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the benchmark worker died")
        r = json.loads(line)
        r["prompt"] = len(ids)
        return r

    def stop(self) -> None:
        if self.proc:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _size(path: Path) -> int:
    from runtime.folder import model_size

    return path.stat().st_size if path.is_file() else model_size(path)


def cases(
    models: list[Path], peers: list[str], genai_dirs: list[Path], gguf: Path | None
) -> list[Case]:
    from runtime.folder import read_model_folder

    out = []
    for m in models:
        info = read_model_folder(m)
        out.append(Case(f"llamaonnx {m.name}", "llamaonnx", str(m), _size(m)))
        if "genai" in peers and info.target == "ort":
            out.append(Case(f"genai on {m.name}", "genai", str(m), _size(m)))
    for d in genai_dirs:
        if not d.is_dir():
            raise OptionError(f"--genai-dir {d} is not a folder (one built by genai's builder)")
        out.append(Case(f"genai {d.name}", "genai", str(d), _size(d)))
    first = read_model_folder(models[0]).raw["provenance"]
    if "llama.cpp" in peers:
        path = gguf or (Path(first["source"]) if first.get("format") == "gguf" else None)
        if path is None:
            raise OptionError("llama.cpp needs a GGUF: pass --gguf PATH")
        if not path.is_file():
            raise OptionError(f"llama.cpp's GGUF {path} is not a file")
        out.append(Case(f"llama.cpp {path.name}", "llama.cpp", str(path), _size(path)))
    if "torch" in peers:
        src = Path(first["source"])
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
) -> dict:
    """Runs every engine and returns the results; an engine that could not start has an
    "error" instead of figures (the CLI then exits non-zero). `check_files`: compare each
    model folder's files with their recorded sha256 once, before the workers open them."""
    from runtime.files import check_integrity
    from runtime.folder import read_model_folder

    models = [Path(m) for m in models]
    for p in peers:
        if p not in ENGINES[1:]:
            raise OptionError(f"unknown peer {p!r}; choose from {ENGINES[1:]}")
    options.threads(threads)
    options.integer("prompt_tokens", prompt_tokens, 1)
    options.integer("new_tokens", new_tokens, 2)  # decode speed needs a second token
    options.integer("runs", runs, 1)
    options.integer("warmup", warmup, 0)
    options.integer("sweep_runs", sweep_runs, 1)
    infos = [read_model_folder(m) for m in models]
    if check_files:
        for info in infos:
            check_integrity(info.folder, info.raw)
    context = min(info.max_position for info in infos)
    if prompt_tokens + new_tokens > context:
        raise ContextLengthError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the models' "
            f"context of {context} tokens; ask for at most {context - new_tokens} prompt tokens"
        )
    ids = prompt_ids(models[0], prompt_tokens)
    todo = cases(models, list(peers), [Path(d) for d in genai_dirs], gguf)
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
        for length in sweep:
            if length + sweep_new_tokens > context:
                progress(f"sweep   context {length} skipped: the models hold {context} tokens")
                continue
            long_ids = prompt_ids(models[0], length)
            speeds: dict[str, list[float]] = {c.name: [] for c in live}
            for _ in range(sweep_runs):  # interleaved like the main runs
                for c in live:
                    res = c.run(long_ids, sweep_new_tokens)
                    speeds[c.name].append((res["new"] - 1) / res["decode_s"])
            for c in live:
                c.sweep.append(
                    {
                        "context": length,
                        "decode_tok_s": statistics.median(speeds[c.name]),
                        "runs": speeds[c.name],
                    }
                )
            progress(f"sweep   context {length}")
    finally:
        for c in todo:
            c.stop()
    results = []
    for c in todo:
        row = {"name": c.name, "engine": c.engine, "path": c.path, "size_mb": c.size_bytes / 1e6}
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
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "system": platform.platform()}
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


def table(data: dict, markdown: bool = False) -> str:
    head = [
        "engine",
        "size MB",
        "TTFT ms",
        "prefill tok/s",
        "decode tok/s",
        "decode spread",
        "peak RSS MB",
    ]
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([r["name"], f"{r['size_mb']:.0f}", "—", "—", "—", r["error"][:40], "—"])
            continue
        d = r["decode_tok_s"]
        rows.append(
            [
                r["name"],
                f"{r['size_mb']:.0f}",
                f"{r['ttft_ms']['median']:.0f}",
                f"{r['prefill_tok_s']['median']:.0f}",
                f"{d['median']:.1f}",
                f"{d['min']:.0f}–{d['max']:.0f}",
                f"{r['peak_rss_mb']:.0f}",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*row) for row in [head, *rows])


def report_markdown(data: dict, command: str, png: str | None = None) -> str:
    """docs/benchmarks.md: the machine, versions, exact command, table, sweep and chart."""
    s, m = data["settings"], data["machine"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured {data['date']} on {m['cpu']} ({m['cores']} cores, {m['system']})"
        + (f", GPU {m['gpu']}, provider {s['provider']}" if "gpu" in m else "")
        + "; "
        f"{s['threads']} threads, batch {s['batch']}, {s['prompt_tokens']}-token chat prompt, "
        f"{s['new_tokens']} new tokens ({s['sampling']}), {s['warmup']} warm-up run then "
        f"{s['runs']} runs per engine, interleaved; medians, decode spread min–max.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()),
        "",
        "```bash",
        command,
        "```",
        "",
        table(data, markdown=True),
    ]
    sweeps = [r for r in data["results"] if r.get("sweep")]
    if sweeps:
        contexts = [p["context"] for p in sweeps[0]["sweep"]]
        lines += [
            "",
            "Decode tokens/s as the context grows (median of "
            f"{data['settings'].get('sweep_runs', 1)} interleaved runs of "
            f"{data['settings'].get('sweep_new_tokens', 32)} new tokens):",
            "",
            "| engine | " + " | ".join(str(c) for c in contexts) + " |",
            "|---|" + "---:|" * len(contexts),
        ]
        for r in sweeps:
            lines.append(
                f"| {r['name']} | "
                + " | ".join(f"{p['decode_tok_s']:.1f}" for p in r["sweep"])
                + " |"
            )
    if png:
        lines += ["", f"![benchmark chart]({png})"]
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in data["results"] if "error" not in r]
    sweeps = [r for r in ok if r.get("sweep")]
    fig, axes = plt.subplots(1, 2 if sweeps else 1, figsize=(13 if sweeps else 7, 4.5), dpi=110)
    ax = axes[0] if sweeps else axes
    names = [r["name"] for r in ok]
    y = range(len(ok))
    dec = [r["decode_tok_s"]["median"] for r in ok]
    pre = [r["prefill_tok_s"]["median"] / 10 for r in ok]
    ax.barh([i + 0.2 for i in y], dec, height=0.4, label="decode tok/s", color="#4c78a8")
    ax.barh([i - 0.2 for i in y], pre, height=0.4, label="prefill tok/s ÷ 10", color="#f58518")
    for i in range(len(ok)):
        ax.text(dec[i], i + 0.2, f" {dec[i]:.0f}", va="center", fontsize=8)
        ax.text(pre[i], i - 0.2, f" {pre[i] * 10:.0f}", va="center", fontsize=8)
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    s = data["settings"]
    ax.set_title(
        f"{s['prompt_tokens']}-token prompt, {s['new_tokens']} new, {s['threads']} threads, "
        f"median of {s['runs']}",
        fontsize=9,
    )
    if sweeps:
        for r in sweeps:
            axes[1].plot(
                [p["context"] for p in r["sweep"]],
                [p["decode_tok_s"] for p in r["sweep"]],
                marker="o",
                label=r["name"],
            )
        axes[1].set_xscale("log", base=2)
        axes[1].set_xlabel("context length (tokens)")
        axes[1].set_ylabel("decode tok/s")
        axes[1].set_title("decode speed as the cache grows", fontsize=9)
        axes[1].legend(fontsize=7)
    fig.suptitle(data["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__" and len(sys.argv) >= 6 and sys.argv[1] == "worker":
    worker(_WORKERS[sys.argv[2]], sys.argv[3], int(sys.argv[4]), sys.argv[5])
