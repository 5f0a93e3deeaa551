"""`llamaonnx serve MODEL_DIR… --ray --replicas N`: the same OpenAI routes on Ray Serve, for when
one process (or one machine) is not enough.

One Ray Serve deployment, `llamaonnx`, whose every replica is the FastAPI app of
app/openai_server.py with its own engines (one per folder, `--slots` each), built on the replica
itself (serve.ingress with a builder: nothing but the folder paths crosses the wire). Ray's proxy
and router spread requests over the replicas; `--max-replicas M` lets Ray's autoscaler grow from
N to M replicas with the number of requests in flight. Each replica reserves one CPU (a 2-core
machine runs two) and gives onnxruntime `--threads` threads (default: the cores / replicas).

Without `--ray-address` it starts a local Ray instance; with one it joins that cluster, where
every node needs llamaonnx installed and the model folders at the same path (a shared file system
or the same copy on each node). Ray is the `ray` extra, never needed by `generate` or the edge
install. The entry point for `serve run` and config files is `app.ray_serve:build_app` (see
there).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

DEPLOYMENT = "llamaonnx"


def application(folders, slots=8, queue_size=64, threads=None, replicas=1, max_replicas=None,
                api_key=None, cors=None):  # fmt: skip
    """The Ray Serve application (bound, not yet running)."""
    from ray import serve

    paths = [str(Path(f).resolve()) for f in folders]
    per_replica = threads or max(1, (os.cpu_count() or 2) // replicas)

    def build():  # runs on each replica
        from app.openai_server import create_app, load

        served = load([Path(p) for p in paths], slots, queue_size, per_replica)
        return create_app(served, api_key=api_key, cors=cors)

    options: dict = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": 1},
        "max_ongoing_requests": slots + queue_size,
        # on shutdown: requests in flight get 10 s, then the replica goes
        "graceful_shutdown_timeout_s": 10,
        "graceful_shutdown_wait_loop_s": 1,
    }
    if max_replicas and max_replicas > replicas:
        options["autoscaling_config"] = {
            "min_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": slots,  # a replica's slots full: add one
        }
    else:
        options["num_replicas"] = replicas
    return serve.deployment(serve.ingress(build)(), **options).bind()


def build_app(args: dict):
    """`serve run app.ray_serve:build_app models=DIR[,DIR…] replicas=2 slots=8`: the entry
    point for Ray's own CLI and config files."""
    folders = [f for f in str(args["models"]).split(",") if f]
    return application(
        folders,
        slots=int(args.get("slots", 8)),
        replicas=int(args.get("replicas", 1)),
        max_replicas=int(args["max_replicas"]) if "max_replicas" in args else None,
        api_key=args.get("api_key"),
    )


def serve(args) -> int:
    """Starts (or joins) Ray, runs the application on HOST:PORT and waits for a signal."""
    import ray
    from ray import serve as ray_serve

    from runtime.folder import read_model_folder

    for folder in args.model_dirs:  # typed errors here, before any replica starts
        read_model_folder(folder)
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    ray_serve.start(http_options={"host": args.host, "port": args.port})
    app = application(args.model_dirs, args.slots, args.queue_size, args.threads,
                      args.replicas, args.max_replicas, args.api_key, args.cors)  # fmt: skip
    ray_serve.run(app, name=DEPLOYMENT, route_prefix="/")
    print(f"serving {', '.join(Path(f).name for f in args.model_dirs)} at "
          f"http://{args.host}:{args.port}/v1 on Ray Serve, {args.replicas} replicas "
          f"({args.slots} slots each)", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    ray_serve.shutdown()
    ray.shutdown()
    return 0
