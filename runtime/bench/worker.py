"""The worker process: `python -m runtime.bench.worker ENGINE PATH THREADS PROVIDER` loads one
engine and serves runs as JSON lines, {"ids": […], "new": n} → {"ttft", "decode_s", "new",
"rss_mb"}, and {"profile": true, "ids", "new"} → {"profile": …} (runtime/bench/profile.py). It
answers {"error": …} instead of {"ready": true} when its engine cannot start."""

from __future__ import annotations

import json
import sys

from runtime.bench import engines


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, path: str, threads: int, provider: str) -> None:
    """Serves runs on stdin/stdout: {"ids": […], "new": n} → {"ttft", "decode_s", "new"}."""
    out = sys.stdout
    sys.stdout = sys.stderr  # engines that print must not break the protocol
    try:
        eng = engines.load(name)(path, threads, provider)
        ready = {"ready": True, "rss_mb": _peak_rss_mb()}
        if name == "llamaonnx":
            from runtime import native

            ready["kernel_path"] = native.path() if native.available() else None
        if name == "llama.cpp":  # which build ran: its instruction sets ("AVX512 = 1 | …")
            import llama_cpp

            ready["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
        out.write(json.dumps(ready) + "\n")
    except Exception as e:  # reported to the parent, which says which peer could not start
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("profile"):  # where the steps go (engines that can say: llamaonnx)
            out.write(json.dumps({"profile": eng.profile(req["ids"], req["new"])}) + "\n")
            out.flush()
            continue
        ttft, decode_s, n = eng.run(req["ids"], req["new"])
        out.write(
            json.dumps({"ttft": ttft, "decode_s": decode_s, "new": n, "rss_mb": _peak_rss_mb()})
            + "\n"
        )
        out.flush()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
