"""`llamaonnx serve MODEL_DIR… --ray --replicas N`: the same OpenAI routes on Ray Serve, for when
one process (or one machine) is not enough.

One Ray Serve application, `llamaonnx`, of one deployment per model folder plus a router:
- each model deployment (`model-NAME`) has N replicas, each one engine (`--slots` slots) behind
  app/openai_server.py's routes for that folder alone; `--max-replicas M` lets Ray's autoscaler
  grow each model from N to M replicas with its requests in flight, independently of the others;
- the router (`llamaonnx`, the ingress) checks what every request needs first (body size, the
  API key, CORS), answers /v1/models, /health and /metrics for all models, and hands each
  completion to its model's deployment through a Ray Serve handle: Ray's router picks the
  replica, and the reply (a JSON body, or server-sent events as they come) streams back the
  same way. A client that hangs up cancels the handle call, which cancels the request on its
  replica (its slot is free at the next step).

A model replica reserves one CPU where the machine has one for each (a 2-core machine runs two
replicas of one model, or one of two models), and gives onnxruntime `--threads` threads (default:
the cores over the replicas). Without `--ray-address` it starts a local Ray instance; with one it
joins that cluster, where every node needs llamaonnx installed and the model folders at the same
path (a shared file system or the same copy on each node). Ray is the `ray` extra, never needed by
`generate` or the edge install. The entry point for `serve run` and config files is
`app.ray_serve:build_app` (see there).
"""

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

DEPLOYMENT = "llamaonnx"  # the application, and its router deployment


class ModelReplica:
    """One replica of one model's deployment: an engine and the OpenAI routes for it, driven as
    an ASGI app in the replica's own event loop (the router sends the request's method, path and
    body; nothing else crosses the wire)."""

    def __init__(self, folder: str, slots: int, queue_size: int, threads: int):
        from app.openai_server import create_app, load

        self.served = load([Path(folder)], slots, queue_size, threads)
        self.name = next(iter(self.served))
        self.app = create_app(self.served)  # the router checked the key and the size

    def health(self) -> dict:
        return {"model": self.name, "process": os.getpid()}

    def metrics(self) -> str:
        from app.openai_server import _prometheus

        return _prometheus(self.served)

    async def call(self, method: str, path: str, body: bytes):
        """The app's response: first {"status", "headers"}, then the body's parts as they come.
        Cancelled (the client went away), the app sees a disconnect and cancels the request."""
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
        }  # fmt: skip
        sent, gone, out = False, asyncio.Event(), asyncio.Queue()

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(self.app(scope, receive, out.put))
        try:
            while True:
                message = asyncio.ensure_future(out.get())
                await asyncio.wait({message, task}, return_when=asyncio.FIRST_COMPLETED)
                if not message.done():  # the app ended without finishing its response
                    message.cancel()
                    task.result()
                    raise RuntimeError("the model's app ended without a response")
                m = message.result()
                if m["type"] == "http.response.start":
                    headers = [(k.decode(), v.decode()) for k, v in m.get("headers", [])]
                    yield {"status": m["status"], "headers": headers}
                elif m["type"] == "http.response.body":
                    if m.get("body"):
                        yield m["body"]
                    if not m.get("more_body"):
                        break
        finally:
            gone.set()  # (a reply still streaming stops, and its request is cancelled)
            try:
                await asyncio.wait_for(task, 10)
            except Exception:  # noqa: BLE001 — the app's own error already reached its client
                task.cancel()

    def __del__(self):  # Ray Serve shuts a replica down: stop its engine
        for s in getattr(self, "served", {}).values():
            s.engine.close()


def merge_prometheus(texts: list[str]) -> str:
    """Prometheus texts of the same families (one per model) as one: each family's HELP and TYPE
    once, then every model's samples of it."""
    families: dict[str, list[str]] = {}
    for text in texts:
        name = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split()[2]
                head = families.setdefault(name, [])
                if line not in head:
                    head.append(line)
            elif line and name is not None:
                families[name].append(line)
    return "".join(line + "\n" for lines in families.values() for line in lines)


def router_app(names: list[str], models: list, api_key, cors, max_body: int):
    """The ingress's routes, over the model deployments' handles (`models`, in `names` order)."""
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    from app.openai_server import base_app, error, parse_body, unknown_model

    app = base_app(api_key, cors, max_body)
    handles = dict(zip(names, models, strict=True))
    created = int(time.time())

    @app.get("/v1/models")
    async def listed():
        return {"object": "list", "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "llamaonnx"}
            for n in names]}  # fmt: skip

    @app.get("/health")
    async def health():
        try:
            replicas = await asyncio.gather(*(h.health.remote() for h in models))
        except Exception as e:  # noqa: BLE001 — a model's replicas are not up
            body = {"status": f"unavailable: {type(e).__name__}", "models": names}
            return JSONResponse(body, status_code=503)
        return {"status": "ok", "models": names, "process": os.getpid(),
                "replicas": {r["model"]: r["process"] for r in replicas}}  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        texts = await asyncio.gather(*(h.metrics.remote() for h in models))
        return PlainTextResponse(merge_prometheus(list(texts)),
                                 media_type="text/plain; version=0.0.4")  # fmt: skip

    async def relay(request: HttpRequest):
        raw = await request.body()
        try:
            name = parse_body(raw, max_body).get("model")
        except Exception as e:  # noqa: BLE001 — too big, not JSON, not an object
            return error(e)
        if name is None and len(names) == 1:
            name = names[0]
        if name not in handles:
            return error(unknown_model(name, names))
        call = handles[name].options(stream=True).call.remote(request.method, request.url.path,
                                                              raw)  # fmt: skip
        try:
            head = await call.__anext__()
        except Exception as e:  # noqa: BLE001 — the replica failed before answering
            call.cancel()
            return error(e)

        async def rest():
            try:
                async for part in call:
                    yield part
            finally:  # the client went away, or the reply is over
                call.cancel()

        media = dict(head["headers"]).get("content-type")
        return StreamingResponse(rest(), status_code=head["status"], media_type=media,
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip

    app.post("/v1/chat/completions")(relay)
    app.post("/v1/completions")(relay)
    return app


class Router:
    """The ingress deployment: router_app over the model deployments' handles, built on its
    replica once Ray has turned the bound models into handles."""

    def __init__(self, names: list[str], api_key, cors, *models):
        self.routes = (names, list(models), api_key, cors)

    def __serve_build_asgi_app__(self):
        from app.openai_server import MAX_BODY_BYTES

        return router_app(*self.routes, MAX_BODY_BYTES)


def application(folders, slots=8, queue_size=64, threads=None, replicas=1, max_replicas=None,
                api_key=None, cors=None):  # fmt: skip
    """The Ray Serve application (bound, not yet running): one deployment per folder, and the
    router in front."""
    from ray import serve

    from app.openai_server import model_names

    paths = [str(Path(f).resolve()) for f in folders]
    names = model_names(paths)
    cores = os.cpu_count() or 2
    per_replica = threads or max(1, cores // (replicas * len(paths)))
    cpus = min(1.0, cores / (replicas * len(paths)))
    bound = []
    for name, path in zip(names, paths, strict=True):
        options: dict = {
            "name": f"model-{name}",
            "ray_actor_options": {"num_cpus": cpus},
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
        model = serve.deployment(ModelReplica, **options)
        bound.append(model.bind(path, slots, queue_size, per_replica))

    router = serve.deployment(
        serve.ingress()(Router),
        name=DEPLOYMENT,
        ray_actor_options={"num_cpus": 0},  # it relays; the engines compute
        max_ongoing_requests=len(paths) * max(replicas, max_replicas or 0) * (slots + queue_size),
    )
    return router.bind(names, api_key, cors, *bound)


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

    from runtime.engine import check_servable
    from runtime.folder import read_model_folder

    for folder in args.model_dirs:  # typed errors here, before any replica starts
        check_servable(read_model_folder(folder))
    app = application(args.model_dirs, args.slots, args.queue_size, args.threads,
                      args.replicas, args.max_replicas, args.api_key, args.cors)  # fmt: skip
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    ray_serve.start(http_options={"host": args.host, "port": args.port})
    ray_serve.run(app, name=DEPLOYMENT, route_prefix="/")
    print(f"serving {', '.join(Path(f).name for f in args.model_dirs)} at "
          f"http://{args.host}:{args.port}/v1 on Ray Serve, {args.replicas} replicas "
          f"({args.slots} slots each) per model", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    ray_serve.shutdown()
    ray.shutdown()
    return 0
