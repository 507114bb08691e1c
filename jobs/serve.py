"""Serve the trained models over HTTP on Ray Serve (blocks; Ctrl-C stops).

Routes (FastAPI; OpenAPI at /docs): POST /v1/localize (video -> heatmap per sampled frame and
its peak; ?overlay=png for an animated PNG), POST /v1/separate (video + optional speaker boxes
-> one WAV per speaker: a zip, or ?format=json with base64 WAVs), POST /v1/caption (video or
image -> caption; ?beam_size=N, ?sound=false), POST /v1/embed (text or media -> vectors in the joint space),
POST /v1/search (text or media -> the closest clips of --embeddings), GET /healthz, GET
/v1/models, GET / (a web page), GET /v1/examples (--examples). Each task's route is served only
when its checkpoint (from avray train) is given; uploads are decoded with the clip settings of
the checkpoint's training data, in the ingress (or with --decode-in decoder a Decoder deployment,
CPU, that scales apart), which feeds one deployment per model (GPU when the cluster has one) with
@serve.batch on model calls where it pays (batching auto: GPU replicas). GET / is a web page to
try the models in a browser.
Deployment settings (replicas, autoscaling, max_ongoing_requests / max_queued_requests) come
from the Serve config file, jobs/serve_config.yaml by default; options given here override its
application args. The same app runs on a cluster with `serve run jobs/serve_config.yaml` or
`serve deploy`. Binds 127.0.0.1 unless --host says otherwise; with --token (or AVRAY_TOKEN)
every /v1 route needs `Authorization: Bearer <token>`.

example:
  avray serve --localization runs/loc/model.pt --captioning runs/cap/model.pt --port 8000
  curl -F file=@demo/media/scene_00000.mp4 http://127.0.0.1:8000/v1/localize
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import field
from typing import Any

from jobs.tasks import TASKS

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_config.yaml")

# Ray Serve's documented high-throughput mode (Ray >= 2.56): replicas talk to each other over direct
# gRPC instead of through the object store, which roughly halves the cost of each hop that carries
# a clip's arrays. Direct ingress (replicas listening on their own ports, no proxy) stays off: the
# proxy is what binds --host/--port. Read by Ray's processes when they start, so set before a local
# Ray starts (avray serve, the tests and the benchmark do); on a cluster, in `ray start`'s
# environment (cluster.yaml). Values already in the environment win.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def serve_env() -> None:
    """Put SERVE_ENV into os.environ (not overriding what is set) for a Ray started after this."""
    for k, v in SERVE_ENV.items():
        os.environ.setdefault(k, v)


# One checkpoint option per task of the table (--localization CKPT, ...), then the service's own.
ServeConfig = dataclasses.make_dataclass("ServeConfig", [
    *((t, str | None, field(default=None, metadata={"help": f"{t} checkpoint (avray train's model.pt): serves its route"}))
      for t in TASKS),
    ("embeddings", str | None, field(default=None, metadata={
        "help": "an avray embed folder to search (POST /v1/search; needs the --retrieval checkpoint that made it)"})),
    ("examples", str | None, field(default=None, metadata={
        "help": "a folder of media files the web page (GET /) offers as examples"})),
    ("config", str, field(default=DEFAULT_CONFIG, metadata={"help": "Serve config file: deployment settings and default args"})),
    ("host", str, field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes the service)"})),
    ("port", int, field(default=8000, metadata={"help": "HTTP port"})),
    ("token", str | None, field(default=None, metadata={"help": "bearer token required on /v1 routes (default: AVRAY_TOKEN)"})),
    ("max_upload_mb", float | None, field(default=None, metadata={"help": "upload size limit (default: the config's)"})),
    ("max_seconds", float | None, field(default=None, metadata={"help": "media duration limit (default: the config's)"})),
    ("request_timeout_s", float | None, field(default=None, metadata={"help": "end-to-end timeout -> 408 (default: the config's)"})),
    ("batching", bool | None, field(default=None, metadata={
        "help": "@serve.batch on model calls (default: the config's auto, i.e. on GPU replicas only)"})),
    ("decode_in", str | None, field(default=None, metadata={
        "help": "where uploads are decoded: ingress (its threads, one hop fewer) or decoder (a Decoder deployment "
                "that scales apart, for clusters) (default: the config's, ingress)",
        "choices": ("ingress", "decoder")})),
    ("address", str | None, field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else a local Ray)"})),
], frozen=True)


def read_config(path: str) -> dict[str, Any]:
    """The Serve config file, validated by Ray's own schema (ServeDeploySchema); one application."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Serve config at {path}")
    with open(path) as f:
        raw = yaml.safe_load(f)
    ServeDeploySchema.model_validate(raw)
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{path} must hold exactly one application, found {len(apps)}")
    return raw


def application(args: dict[str, Any], deployments: list[dict[str, Any]] | None = None):
    """The bound Serve application. `args`: the config file's form of jobs.serve_app.AppArgs;
    `deployments`: per-deployment option overrides as in a Serve config file (`name` + options)."""
    from jobs.serve_app import AppArgs, build

    return build(AppArgs.from_dict(args), deployments or [])


def build_app(args: dict[str, Any]):
    """Serve's application builder (`import_path: jobs.serve:build_app`): `serve run/deploy` pass
    the config file's `args` here and apply its `deployments` options themselves."""
    return application(args)


def run(cfg: ServeConfig) -> int:
    import signal
    import threading

    serve_env()  # before Ray (and ray.serve's constants) are imported and a local Ray starts
    import ray
    from ray import serve

    from jobs.serve_app import AppArgs
    from jobs.tasks import get

    raw = read_config(cfg.config)
    app_cfg = raw["applications"][0]
    args = dict(app_cfg.get("args") or {})
    if any(getattr(cfg, t) for t in TASKS):  # checkpoints on the command line replace the file's
        args.update({t: getattr(cfg, t) for t in TASKS})
    overrides = {k: getattr(cfg, k) for k in ("embeddings", "examples", "token", "max_upload_mb", "max_seconds", "batching",
                                              "decode_in")}
    args.update({k: v for k, v in overrides.items() if v is not None})
    served = AppArgs.from_dict(args)  # bad args fail here, before Ray starts
    http = dict(raw.get("http_options") or {})
    http.update(host=cfg.host, port=cfg.port)
    if cfg.request_timeout_s is not None:
        http["request_timeout_s"] = cfg.request_timeout_s

    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.address or os.environ.get("RAY_ADDRESS"), include_dashboard=False)
        started = True
    stop = threading.Event()
    # SIGINT too when it is ignored (a shell starts background jobs so): `kill -INT` then stops the
    # service instead of doing nothing; otherwise Ctrl-C is Python's KeyboardInterrupt
    sigs = (signal.SIGTERM, signal.SIGINT) if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else (signal.SIGTERM,)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in sigs}
    try:
        serve.start(http_options=http)
        app = application(args, app_cfg.get("deployments"))  # after ray.init: use_gpu auto looks at the cluster
        serve.run(app, name=app_cfg.get("name", "avray"), route_prefix=app_cfg.get("route_prefix", "/"))
        routes = [get(t).route.path for t in TASKS if t in served.checkpoints] + ["/v1/search"] * bool(served.embeddings)
        print(f"avray serve: http://{cfg.host}:{cfg.port}/ (the web page)  routes: {', '.join(routes)}, /healthz, /v1/models, /docs"
              + ("  (bearer token required)" if served.token else ""), flush=True)
        print("  Ctrl-C stops", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("avray serve: shutting down", flush=True)
        serve.shutdown()
        if started:
            ray.shutdown()
    return 0


CONFIG = ServeConfig
