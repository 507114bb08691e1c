"""The Ray Serve application behind `avray serve` (built by `build`; `jobs.serve.build_app` for
`serve run`): glue only, every task's work is its module's (jobs/tasks).

    HTTP ─▶ Ingress (FastAPI: auth, limits, one route per served task, answer formats, the web page)
              └▶ DecodeAndInfer (CPU: Task.from_upload in threads; in the ingress, or in a Decoder
                 deployment with decode_in "decoder") ─▶ one ModelServer per task
                                       (Task.infer; GPU when present, @serve.batch there: batching auto)

Clip arrays go decoder -> model once. Expected failures (bad media, limits, bad options) come back
from the decode step as `{"error": (status, message)}`, which the ingress turns into 4xx JSON:
`{"detail": "what was wrong"}`.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations as objects
# (Ray Serve's class-based view copies them as they are).
import asyncio
import dataclasses
import hmac
import inspect
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError

from jobs.tasks import TASKS, get, load_checkpoint, served_config
from jobs.tasks.base import RequestError, Task

log = logging.getLogger(__name__)
# Arrays that arrive through Ray's object store are read-only; the tasks' infer never writes to them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


@dataclass(frozen=True)
class AppArgs:
    """The application's arguments: `args:` of the Serve config file, or avray serve's options. In
    the file (and `from_dict` / `to_dict`), each checkpoint is under its task's name."""

    checkpoints: dict[str, str] = field(default_factory=dict)  # task -> checkpoint; a route per task given
    embeddings: str | None = None    # an avray embed folder: POST /v1/search over it (with its retrieval checkpoint)
    examples: str | None = None      # a folder of media files offered by the web page (GET /v1/examples)
    max_upload_mb: float = 50.0      # larger uploads: 413
    max_seconds: float = 60.0        # longer media: 413
    max_pixels: int = 1920 * 1080    # larger frames: 413
    token: str | None = None         # bearer token for /v1 routes (None: open)
    batching: str = "auto"           # @serve.batch on model calls: yes, no, or auto (on GPU replicas only: on CPU
                                     # it measured 0.76-1.03x, BENCHMARKS.md); true / false mean yes / no
    max_batch_size: int = 16         # requests per model call when batching
    batch_wait_ms: float = 0.0       # how long a batch waits to fill (a lone request waits this long); 0: a
                                     # batch is what queued up while the previous one ran
    use_gpu: str = "auto"            # auto: model deployments take a GPU share when the cluster has GPUs
    decode_in: str = "ingress"       # ingress: the ingress decodes uploads (threads) and calls the model, one hop;
                                     # decoder: a Decoder deployment does, scaling apart from the ingress (clusters)
    max_decodes: int = 4             # uploads decoded at once by one replica (the ingress's or a Decoder's)

    def __post_init__(self) -> None:
        if not self.checkpoints:
            raise ValueError("give at least one checkpoint: " + ", ".join(f"--{t}" for t in TASKS)
                             + " (trained ones ship in checkpoints/)")
        for t, path in self.checkpoints.items():
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; known tasks: {sorted(TASKS)}")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{t} checkpoint not found: {path}")
        if self.examples is not None and not os.path.isdir(self.examples):
            raise FileNotFoundError(f"examples folder not found: {self.examples}")
        if self.max_upload_mb <= 0 or self.max_seconds <= 0 or self.max_pixels <= 0:
            raise ValueError("max_upload_mb, max_seconds and max_pixels must be > 0")
        if self.max_decodes < 1:
            raise ValueError("max_decodes must be >= 1")
        if self.max_batch_size < 1 or self.batch_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and batch_wait_ms >= 0")
        if self.use_gpu not in ("auto", "yes", "no"):
            raise ValueError(f"use_gpu must be auto, yes or no, got {self.use_gpu!r}")
        if self.batching not in ("auto", "yes", "no"):
            raise ValueError(f"batching must be auto, yes or no (or true / false), got {self.batching!r}")
        if self.decode_in not in ("ingress", "decoder"):
            raise ValueError(f"decode_in must be ingress or decoder, got {self.decode_in!r}")
        if self.embeddings is not None:
            from pipelines.embedstore import EmbeddingStore

            made_by = EmbeddingStore(self.embeddings).config["checkpoint_sha1"]
            if "retrieval" not in self.checkpoints:
                raise ValueError("searching embeddings needs the retrieval checkpoint that made them (--retrieval)")
            from jobs.embed import checkpoint_id
            if checkpoint_id(self.checkpoints["retrieval"]) != made_by:
                raise ValueError(f"{self.embeddings} was not made by {self.checkpoints['retrieval']}: "
                                 "its embeddings would not be comparable with the queries")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AppArgs":
        """From the config file's form: task names -> checkpoint paths (relative to where serve
        was started; empty ones ignored) beside the other fields. The token defaults to AVRAY_TOKEN."""
        names = {f.name for f in dataclasses.fields(cls)} - {"checkpoints"}
        unknown = sorted(set(d) - names - set(TASKS))
        if unknown:
            raise ValueError(f"unknown serve args {unknown}; known: {sorted(names | set(TASKS))}")
        kw = {k: v for k, v in d.items() if k in names}
        kw["token"] = kw.get("token") or os.environ.get("AVRAY_TOKEN") or None
        if isinstance(kw.get("batching"), bool):  # the config file's and the CLI's true / false
            kw["batching"] = "yes" if kw["batching"] else "no"
        for folder in ("embeddings", "examples"):
            if kw.get(folder):
                kw[folder] = os.path.abspath(kw[folder])
        return cls(checkpoints={t: os.path.abspath(d[t]) for t in TASKS if d.get(t)}, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "checkpoints"}
        return {**self.checkpoints, **d}

    @property
    def limits(self) -> dict[str, Any]:
        return {"max_pixels": self.max_pixels, "max_seconds": self.max_seconds}


class DecodeAndInfer:
    """The CPU side of a request: the upload decoded with its model's training clip settings and
    prepared by its task (`Task.from_upload`, in a thread so that several decodes overlap), then
    the model deployment's answer. Run by the ingress itself (decode_in "ingress": one hop fewer)
    or by the Decoder deployment (decode_in "decoder": decode replicas scale apart)."""

    def __init__(self, args: "AppArgs", models: dict[str, Any]) -> None:
        from jobs.allocator import keep_freed_memory

        keep_freed_memory()  # each decode's frames reuse the last one's memory instead of page-faulting anew
        self.args, self.models = args, models  # task -> DeploymentHandle
        self.served = {t: served_config(args.checkpoints[t], task=t) for t in models}  # task -> (Task, cfg, settings)
        self.slots = asyncio.Semaphore(args.max_decodes)  # past it, requests wait for a decode thread

    async def __call__(self, task: str, data: bytes, options: dict[str, Any]) -> dict[str, Any]:
        """-> {"result": the model's answer, "meta": ...}, or {"error": (status, message)}. meta["timing"]:
        milliseconds spent decoding, waiting for the model deployment, and in its forward pass."""
        t0 = time.perf_counter()
        t, cfg, settings = self.served[task]
        try:
            async with self.slots:
                item, meta = await asyncio.to_thread(t.from_upload, data, cfg, settings, options=options, **self.args.limits)
        except RequestError as e:
            return {"error": (e.status, e.message)}
        t1 = time.perf_counter()
        try:
            out = await self.models[task].remote(item)
        except BackPressureError as e:
            return {"error": (503, f"overloaded, retry later ({e.message})")}
        meta["timing"] = {"decode": (t1 - t0) * 1000, "model": (time.perf_counter() - t1) * 1000,
                          "inference": out["ms"], "batch": out["batch"]}
        return {"result": out["result"], "meta": meta}


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Decoder:
    """DecodeAndInfer as its own deployment (decode_in "decoder")."""

    def __init__(self, args: dict[str, Any], **models) -> None:
        self.work = DecodeAndInfer(AppArgs.from_dict(args), models)

    async def __call__(self, task: str, data: bytes, options: dict[str, Any]) -> dict[str, Any]:
        return await self.work(task, data, options)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})  # the models + decoder + ingress fit 2 CPUs
class ModelServer:
    """One task's model; `__call__(item)` goes through `@serve.batch` (args.batching: yes, or auto
    on a GPU) or alone."""

    def __init__(self, task: str, args: dict[str, Any]) -> None:
        self.args = AppArgs.from_dict(args)
        self.task, self.path = get(task), self.args.checkpoints[task]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            from jobs.allocator import keep_freed_memory

            keep_freed_memory()  # see there: a third faster forward pass in a replica of 0.25 CPU
        self.model, self.ckpt = load_checkpoint(self.path, self.device, task=task)
        self.batching = self.args.batching == "yes" or (self.args.batching == "auto" and self.device.type == "cuda")
        self._batched.set_max_batch_size(self.args.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batch_wait_ms / 1000.0)

    def describe(self) -> dict[str, Any]:
        """The model, the clip settings of its training data and those uploads are decoded with."""
        extra = self.ckpt["extra"]
        _, _, trained = served_config(self.path)
        return {"task": self.task.name, "checkpoint": self.path, "device": str(self.device),
                "trained_epochs": int(extra.get("epoch", -1)) + 1, "clip_settings": trained.to_dict(),
                "upload_clip_settings": self.task.clip_settings(trained).to_dict(), "config": self.ckpt["config"],
                "parameters": sum(p.numel() for p in self.model.parameters()),
                "batching": self.batching, "max_batch_size": self.args.max_batch_size}

    async def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """-> {"result": the task's result, "ms": the forward pass's milliseconds, "batch": requests in it}."""
        if self.batching:
            return await self._batched(item)
        return (await self._infer([item]))[0]

    @serve.batch(max_batch_size=AppArgs.max_batch_size, batch_wait_timeout_s=AppArgs.batch_wait_ms / 1000.0)  # set per app in __init__
    async def _batched(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self._infer(items)

    async def _infer(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # in a thread: the replica's event loop keeps taking requests, which queue up as the next batch
        t0 = time.perf_counter()
        results = await asyncio.to_thread(self.task.infer, self.model, items, self.device)
        ms = (time.perf_counter() - t0) * 1000
        return [{"result": r, "ms": ms, "batch": len(items)} for r in results]


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Searcher:
    """The embeddings of `args.embeddings` (memory-mapped; its FAISS index per column when `avray
    index` made one) ranked for a query vector. One replica holds them all: README says how to
    shard past one node's memory."""

    def __init__(self, args: dict[str, Any]) -> None:
        from pipelines.embedstore import EmbeddingStore

        self.args = AppArgs.from_dict(args)
        self.store = EmbeddingStore(self.args.embeddings)
        self.store.current()  # built now (if missing), not on the first request

    def describe(self) -> dict[str, Any]:
        return {"embeddings": self.store.folder, "clips": self.store.rows().num_rows, "dim": self.store.dim}

    def __call__(self, vector, k: int, against: str) -> dict[str, Any]:
        from jobs.search import search

        t0 = time.perf_counter()
        found, how = search(self.store, vector, k, against, exact=False)
        return {"clips": found, "search": how, "ms": (time.perf_counter() - t0) * 1000}


with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html"), encoding="utf-8") as _f:
    PAGE = _f.read()  # GET /: the web page (plain HTML + JS, no build step, nothing from elsewhere)
RETRY_AFTER_S = 1  # every 503 says when to retry: the app's own and the proxy's (Ingress backpressure_config)
_RETRY = {"Retry-After": str(RETRY_AFTER_S)}
_ALLOWED_TYPES = ("video/", "application/octet-stream", "application/mp4", "application/x-matroska")

app = FastAPI(
    title="avray",
    version="1",
    description="Where the sound comes from, each speaker's own voice, and what happens in a video. "
                "Upload media as multipart form field `file`. Errors are JSON: {\"detail\": \"...\"}.",
)


async def _ingress():
    """The replica serving the request (Ray Serve's own way to give a route its `self`)."""
    return serve.get_replica_context().servable_object


def _add_route(task: Task) -> None:
    """POST task.route.path: `file` plus the route's options as FastAPI parameters (validated and
    documented in the OpenAPI schema), answered by `Ingress.answer`. Added before `serve.ingress`
    takes the app (it serialises it then)."""
    route = task.route

    async def endpoint(request: Request, file: UploadFile | None, ingress, **options: Any) -> Response:
        return await ingress.answer(task, request, file, options)

    where = {"query": Query, "form": Form}
    P = inspect.Parameter
    text = [P("text", P.KEYWORD_ONLY, annotation=str | None, default=Form(None, description="the text to embed"))]
    endpoint.__signature__ = inspect.Signature([
        P("request", P.KEYWORD_ONLY, annotation=Request),
        P("file", P.KEYWORD_ONLY, annotation=UploadFile | None if route.text else UploadFile,
          default=File(None if route.text else ..., description=route.upload)),
        P("ingress", P.KEYWORD_ONLY, default=Depends(_ingress)),
        *(text if route.text else []),
        *(P(o.name, P.KEYWORD_ONLY, annotation=o.annotation,
            default=where[o.where](o.default, description=o.description, **o.checks)) for o in route.options)])
    app.add_api_route(route.path, endpoint, methods=["POST"], name=task.name, summary=route.summary.split(":")[0],
                      description=route.summary)


for _name in TASKS:
    _add_route(get(_name))


@serve.deployment(ray_actor_options={"num_cpus": 0.5})  # it decodes uploads (decode_in "ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, args: dict[str, Any], decoder=None, searcher=None, **models) -> None:
        self.args = AppArgs.from_dict(args)
        self.searcher = searcher
        # decoder None: this replica decodes (decode_in "ingress"), else the Decoder deployment's handle
        self.decode = DecodeAndInfer(self.args, models) if decoder is None else decoder.remote
        self.models = models  # task -> DeploymentHandle, in TASKS order
        self.max_bytes = int(self.args.max_upload_mb * 1024 * 1024)

    def _auth(self, request: Request) -> None:
        if not self.args.token:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.args.token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    async def _read(self, request: Request, file: UploadFile, image_ok: bool) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_bytes + 64 * 1024:
            raise HTTPException(413, f"upload larger than the {self.args.max_upload_mb:g} MB limit")
        ctype = (file.content_type or "application/octet-stream").split(";")[0].strip().lower()
        if not (ctype.startswith(_ALLOWED_TYPES) or (image_ok and ctype.startswith("image/"))):
            kinds = "a video or an image" if image_ok else "a video"
            raise HTTPException(415, f"unsupported content type {ctype!r}: send {kinds} "
                                     "(video/*" + (", image/*" if image_ok else "") + " or application/octet-stream)")
        data = await file.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise HTTPException(413, f"upload larger than the {self.args.max_upload_mb:g} MB limit")
        if not data:
            raise HTTPException(400, "empty upload")
        return data

    async def answer(self, task: Task, request: Request, file: UploadFile | None, options: dict[str, Any]) -> Response:
        """A task's route: auth, the upload read within the limits, decode -> model, the task's answer
        with a Server-Timing header: ms of decode and model together (round trip from the ingress),
        decoding, the model deployment (round trip from where the upload was decoded), its forward
        pass, and how many requests shared that forward pass."""
        self._auth(request)
        if task.name not in self.models:
            raise HTTPException(404, f"no {task.name} model is loaded (start avray serve with --{task.name} CHECKPOINT)")
        if task.route.text and (file is None) == (options.get("text") is None):
            raise HTTPException(422, "send either a file or a text, not both and not neither")
        data = None if file is None else await self._read(request, file, task.route.image_ok)
        result, meta = await self._run(task, data, options)
        # answers are JSON-native values returned as JSONResponse: FastAPI's jsonable_encoder walk
        # over a heatmap list costs milliseconds
        a = task.answer(result, meta, options)
        response = (JSONResponse(a.body, headers=a.headers) if isinstance(a.body, dict)
                    else Response(a.body, media_type=a.media_type, headers=a.headers))
        return self._timed(response, meta["timing"])

    async def _run(self, task: Task, data: bytes | None, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Decode -> model for one request: (the model's result, the answer's metadata with `timing`;
        its `decoder`: the decode and model round trip from here)."""
        t0 = time.perf_counter()
        try:
            out = await self.decode(task.name, data, options)
        except BackPressureError as e:  # the Decoder deployment's queue (decode_in "decoder"); in the ingress
            # DecodeAndInfer turns the model deployment's into {"error": (503, ...)} itself
            raise HTTPException(503, f"overloaded, retry later ({e.message})", headers=_RETRY) from e
        if "error" in out:
            status, message = out["error"]
            raise HTTPException(status, message, headers=_RETRY if status == 503 else None)
        out["meta"]["timing"]["decoder"] = (time.perf_counter() - t0) * 1000
        return out["result"], out["meta"]

    @staticmethod
    def _timed(response: Response, t: dict[str, Any]) -> Response:
        response.headers["Server-Timing"] = ", ".join(
            [f'decoder;dur={t["decoder"]:.2f}, decode;dur={t["decode"]:.2f}, model;dur={t["model"]:.2f}, '
             f'inference;dur={t["inference"]:.2f}']
            + ([f"search;dur={t['search']:.2f}"] if "search" in t else []) + [f'batch;desc="{t["batch"]}"'])
        return response

    @app.post("/v1/search")
    async def search(self, request: Request,
                     file: UploadFile | None = File(None, description="a video or sound to find clips like (or send `text`)"),
                     text: str | None = Form(None, description="what to find, in words"),
                     k: int = Form(10, ge=1, le=1000, description="clips to return"),
                     against: str = Form("emb", pattern="^(emb|video_emb|audio_emb)$",
                                         description="which embedding of the clips to rank")):
        """The clips of the served embeddings folder closest to a text, a sound or a video: source
        path, start and end seconds, score, caption when known."""
        self._auth(request)
        if self.searcher is None:
            raise HTTPException(404, "no embeddings are loaded (start avray serve with --embeddings EMB and the "
                                     "--retrieval CHECKPOINT that made them)")
        task = get("retrieval")
        if (file is None) == (text is None):
            raise HTTPException(422, "send either a file or a text, not both and not neither")
        data = None if file is None else await self._read(request, file, image_ok=False)
        result, meta = await self._run(task, data, {"text": text})
        if text is not None:
            vector = result["text"][0]
        else:
            key = "clip" if meta["pictures"] and meta["sound"] else ("video" if meta["pictures"] else "audio")
            vector = result[key].mean(axis=0)
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        found = await self.searcher.remote(vector.astype(np.float32), k, against)
        body = {"query": text if text is not None else file.filename, "against": against, "search": found["search"],
                "clips": found["clips"]}
        if text is not None:
            body["unknown_words"] = meta["unknown_words"]
        return self._timed(JSONResponse(body), {**meta["timing"], "search": found["ms"]})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The web page: drop a video (or pick an example) and see every served model's answer."""
        return HTMLResponse(PAGE)

    def _examples(self) -> list[str]:
        from pipelines.sources import MEDIA_EXTENSIONS

        folder = self.args.examples
        if folder is None:
            return []
        return sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in MEDIA_EXTENSIONS
                      and os.path.isfile(os.path.join(folder, f)))

    @app.get("/v1/examples")
    async def examples(self, request: Request) -> dict[str, Any]:
        """The media files of the examples folder (avray serve --examples), by name."""
        self._auth(request)
        return {"examples": self._examples()}

    @app.get("/v1/examples/{name}")
    async def example(self, name: str, request: Request) -> FileResponse:
        self._auth(request)
        if name not in self._examples():  # only a listed file: no other path is ever opened
            raise HTTPException(404, f"no example named {name!r}")
        return FileResponse(os.path.join(self.args.examples, name))

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.models), "token_required": self.args.token is not None}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        infos = await asyncio.gather(*(h.describe.remote() for h in self.models.values()))
        return {"models": dict(zip(self.models, infos)),
                "limits": {"max_upload_mb": self.args.max_upload_mb, "max_seconds": self.args.max_seconds,
                           "max_pixels": self.args.max_pixels}}


def build(args: AppArgs, deployments: list[dict[str, Any]]):
    """The bound application. GPU share for model deployments when args.use_gpu says so (auto:
    when the connected cluster has GPUs); `deployments` entries override options by name (the
    tasks' `deployment` names, Decoder, Ingress)."""
    plain = args.to_dict()
    opts = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments}
    use_gpu = args.use_gpu == "yes"
    if args.use_gpu == "auto":
        import ray
        use_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0

    def model(task: Task):
        o = dict(opts.get(task.deployment, {}))
        if use_gpu:
            o.setdefault("ray_actor_options", {}).setdefault("num_gpus", 0.25)
        return ModelServer.options(name=task.deployment, **o).bind(task.name, plain)

    ingress = dict(opts.get("Ingress", {}))
    # the proxy's 503s (past the Ingress queue) say when to retry, too, whatever else the config sets
    ingress["backpressure_config"] = {"retry_after_s": RETRY_AFTER_S, **dict(ingress.get("backpressure_config") or {})}
    handles = {t: model(get(t)) for t in TASKS if t in args.checkpoints}
    decoder = Decoder.options(**opts.get("Decoder", {})).bind(plain, **handles) if args.decode_in == "decoder" else None
    searcher = Searcher.options(**opts.get("Searcher", {})).bind(plain) if args.embeddings else None
    return Ingress.options(**ingress).bind(plain, decoder, searcher, **handles)
