"""The Ray Serve application behind `avray serve` (built by `jobs.serve.build_app`).

    HTTP ─▶ Ingress (FastAPI: auth, limits, answer formats)
              └▶ Decoder (CPU: `prepare` in threads) ─▶ Localizer / Separator / Captioner
                                                        (ModelServer, GPU when present, @serve.batch)

Clip arrays go decoder -> model once; the ingress sees only bytes in and results out.
The plain pieces, also called directly by benchmarks/serve.py as the no-Serve baseline:
- `clip_spec(ckpt)`: how a model's training clips were made (stored by avray train in the
  checkpoint's `extra["clip_settings"]`), so uploads are decoded the same way;
- `prepare(task, data, spec)`: upload bytes -> the model's input item (`decode_upload` + the
  task's crops / options), or `RequestError`;
- `Runner`: a model loaded from its checkpoint with `infer(items) -> results`, where `items`
  come from several requests and go through the model as one batch.

Expected failures (bad media, limits) come back from the decoder as `{"error": (status,
message)}`, which the ingress turns into 4xx JSON: `{"detail": "what was wrong"}`.
"""


import abc
import asyncio
import base64
import dataclasses
import hmac
import io
import json
import logging
import time
import warnings
import wave
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jobs.serve import DEPLOYMENT, TASKS, AppArgs
from models.checkpoint import load_checkpoint
from pipelines.decode import (DecodeConfig, MediaError, MediaReader, MediaTooLarge, MediaTooLong, TooShort,
                              _resize_plan, read_image)
from pipelines.spectrogram import SpectrogramConfig, log_mel

log = logging.getLogger(__name__)
# Arrays that arrive through Ray's object store are read-only; the runners never write to them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

FACE_SIZE = 48  # the separation visual stream's input side (jobs.tasks.SeparationTask.face_size)
MAX_BEAM = 10


class RequestError(Exception):
    """A client error: HTTP `status` and a message saying what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------------------------
# Decoding uploads: the ingest decoder on bytes held in memory


@dataclass(frozen=True)
class ClipSpec:
    """How to turn an upload into one model's input: its task, the decoder and log-mel settings of
    its training clips, and (separation) how many speakers it separates."""

    task: str
    decode: DecodeConfig
    spectrogram: SpectrogramConfig
    speakers: int = 0


def clip_spec(ckpt: dict[str, Any], args: AppArgs) -> ClipSpec:
    """The ClipSpec of a checkpoint: its `extra["clip_settings"]` (avray preprocess's
    `_config.json`, stored by avray train), else the defaults of avray preprocess with the
    model's `image_size`; limits from `args`. Separation crops speaker boxes from the whole
    picture, so its frames are letterboxed, never cropped."""
    task = ckpt["model"]
    s = ckpt["extra"].get("clip_settings") or {}
    size = int(s.get("size") or ckpt["config"].get("image_size") or DecodeConfig.size)
    dec = DecodeConfig(clip_seconds=float(s.get("clip_seconds", DecodeConfig.clip_seconds)),
                       fps=float(s.get("fps", DecodeConfig.fps)), size=size,
                       resize="letterbox" if task == "separation" else "crop",
                       sample_rate=int(s.get("sample_rate", DecodeConfig.sample_rate)),
                       max_pixels=args.max_pixels, max_seconds=args.max_seconds)
    spec_fields = {f.name for f in dataclasses.fields(SpectrogramConfig)}
    spec = SpectrogramConfig(**{k: v for k, v in s.items() if k in spec_fields})
    return ClipSpec(task, dec, spec, int(ckpt["config"].get("num_speakers", 0)))


def decode_upload(data: bytes, spec: ClipSpec, *, need_audio: bool, image_ok: bool = False,
                  with_mel: bool = True) -> dict[str, Any]:
    """Upload bytes -> clips as the model's training data had them.

    Returns frames uint8 (C, T, H, W, 3), audio float32 (C, S), logmel float32 (C, M, N) or None
    (no audio stream, a still image, or not `with_mel`), starts (C,) seconds, image (bool) and info (source
    width/height as displayed, rotation). A still image (when `image_ok`) is one clip whose T
    frames all show it. Raises RequestError (413: over a limit; 422: not usable media).
    """
    if not data:
        raise RequestError(400, "empty upload")
    try:
        try:
            with MediaReader(io.BytesIO(data), spec.decode) as reader:
                clips = list(reader.clips())
                info = reader.info
        except TooShort:
            if not image_ok:
                raise
            img = read_image(io.BytesIO(data), spec.decode)  # (H, W, 3)
            frames = np.repeat(img[None, None], spec.decode.frames_per_clip, axis=1)  # (1, T, H, W, 3)
            return {"frames": frames, "audio": None, "logmel": None, "starts": [0.0], "image": True,
                    "info": {"width": None, "height": None, "rotation": 0, "has_audio": False}}
    except (MediaTooLarge, MediaTooLong) as e:
        raise RequestError(413, str(e)) from e
    except MediaError as e:
        raise RequestError(422, f"{type(e).__name__}: {e}") from e
    except Exception as e:  # PyAV/FFmpeg errors on corrupt data
        raise RequestError(422, f"corrupt or unsupported media: {e}") from e
    if need_audio and not info.has_audio:
        raise RequestError(422, "the video has no audio stream, and this route needs its sound")
    audio = np.stack([c.audio for c in clips])  # (C, S)
    mel = log_mel(torch.from_numpy(audio), spec.spectrogram).numpy() if info.has_audio and with_mel else None  # (C, M, N)
    return {"frames": np.stack([c.frames for c in clips]), "audio": audio, "logmel": mel,
            "starts": [c.start_s for c in clips], "image": False,
            "info": {"width": info.src_width, "height": info.src_height, "rotation": info.rotation,
                     "has_audio": info.has_audio}}


def _letterbox_plan(width: int, height: int, size: int) -> tuple[float, int, int]:
    """(scale, x0, y0): source pixel (x, y) lands at (x * scale + x0, y * scale + y0) in a letterboxed frame."""
    sw, sh, y0, x0 = _resize_plan(width, height, 0, DecodeConfig(size=size, resize="letterbox"))
    return sw / width, x0, y0


def parse_boxes(text: str | None, k: int, width: int, height: int) -> list[list[float]]:
    """Speaker boxes [[x0, y0, x1, y1], ...] in source pixels (JSON), exactly k of them, inside
    the frame with x0 < x1 and y0 < y1; None: k equal vertical strips. Raises RequestError(422)."""
    if text is None or not text.strip():
        return [[width * i / k, 0.0, width * (i + 1) / k, float(height)] for i in range(k)]
    try:
        boxes = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(422, f"boxes is not JSON ({e.msg}); send e.g. [[0, 0, 320, 480], [320, 0, 640, 480]]") from e
    if (not isinstance(boxes, list) or not all(isinstance(b, list) and len(b) == 4 for b in boxes)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for b in boxes for v in b)):
        raise RequestError(422, "boxes must be a JSON list of [x0, y0, x1, y1] number lists")
    if len(boxes) != k:
        raise RequestError(422, f"the separation model separates {k} speakers; got {len(boxes)} boxes")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise RequestError(422, f"box {i} {[x0, y0, x1, y1]} is empty or outside the {width}x{height} frame")
    return [[float(v) for v in b] for b in boxes]


def speaker_faces(frames: np.ndarray, boxes: list[list[float]], width: int, height: int) -> np.ndarray:
    """Crop each box (source pixels) from letterboxed frames uint8 (C, T, H, W, 3) and resize it
    to FACE_SIZE as training does (area interpolation). Returns uint8 (C, K, T, 3, s, s)."""
    C, T, H, W, _ = frames.shape
    scale, ox, oy = _letterbox_plan(width, height, H)
    x = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).flatten(0, 1).float()  # (C·T, 3, H, W)
    crops = []
    for x0, y0, x1, y1 in boxes:
        c0, r0 = int(x0 * scale + ox), int(y0 * scale + oy)
        c1, r1 = max(c0 + 1, int(np.ceil(x1 * scale + ox))), max(r0 + 1, int(np.ceil(y1 * scale + oy)))
        crop = F.interpolate(x[:, :, r0:r1, c0:c1], size=(FACE_SIZE, FACE_SIZE), mode="area")  # (C·T, 3, s, s)
        crops.append(crop.round().clamp(0, 255).to(torch.uint8).reshape(C, T, 3, FACE_SIZE, FACE_SIZE))
    return torch.stack(crops, dim=1).numpy()  # (C, K, T, 3, s, s)


def prepare(data: bytes, spec: ClipSpec, *, boxes: str | None = None, beam_size: int = 1) -> dict[str, Any]:
    """One request's work before `spec.task`'s model: decode the upload as the model's training
    clips were made and add the task's inputs. Returns the model's item (see the Runners) plus
    `starts`, `info`, `fps`, `sample_rate`, `frames_per_clip`; localization adds `view` (the
    crop's plan), separation `boxes` and `faces` (frames dropped; no log-mel: the separator
    computes its own STFT). Raises RequestError."""
    task = spec.task
    d = decode_upload(data, spec, need_audio=task != "captioning", image_ok=task == "captioning",
                      with_mel=task != "separation")
    d.update(fps=spec.decode.fps, sample_rate=spec.decode.sample_rate, frames_per_clip=d["frames"].shape[1])
    w, h = d["info"]["width"], d["info"]["height"]
    if task == "separation":
        d["boxes"] = parse_boxes(boxes, spec.speakers, w, h)
        d["faces"] = speaker_faces(d.pop("frames"), d["boxes"], w, h)
    elif task == "localization":
        sw, _, y0, x0 = _resize_plan(w, h, 0, spec.decode)
        d["view"] = {"scale": sw / w, "x0": x0, "y0": y0, "size": spec.decode.size}
    else:
        d["beam_size"] = beam_size
    return d


# ---------------------------------------------------------------------------------------------
# Models: one Runner per task; infer() takes the items of several requests as one batch


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Runner(abc.ABC):
    """A checkpoint loaded for inference. `infer(items)` -> one result per item."""

    task = ""
    inputs: tuple[str, ...] = ()  # the keys of a prepared request that infer() reads (all that is sent to it)

    def __init__(self, path: str, device: torch.device | None = None) -> None:
        self.path, self.device = path, device or _device()
        self.model, self.ckpt = load_checkpoint(path, map_location=self.device)
        if self.ckpt["model"] != self.task:
            raise ValueError(f"{path} holds a {self.ckpt['model']} model, not {self.task}")
        self.cfg = self.model.cfg

    def describe(self) -> dict[str, Any]:
        extra = self.ckpt["extra"]
        return {"task": self.task, "checkpoint": self.path, "device": str(self.device),
                "trained_epochs": int(extra.get("epoch", -1)) + 1, "clip_settings": extra.get("clip_settings") or {},
                "config": self.ckpt["config"],
                "parameters": sum(p.numel() for p in self.model.parameters())}

    max_rows = 64  # rows (frames or clips) per forward pass: a batch of long uploads runs in chunks

    def _float(self, x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(self.device, torch.float32)

    def _chunked(self, fn, *xs: torch.Tensor | None):
        """fn over row chunks (at most max_rows) of xs (None passes through as None), the outputs
        put back together: tensors or tuples of tensors concatenated, lists joined."""
        n = next(x for x in xs if x is not None).shape[0]
        outs = [fn(*(None if x is None else x[i:i + self.max_rows] for x in xs)) for i in range(0, n, self.max_rows)]
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs)
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return [v for o in outs for v in o]

    @abc.abstractmethod
    def infer(self, items: list[dict[str, Any]]) -> list[Any]:
        """One result per item; the items' tensors go through the model as one batch."""


class LocalizeRunner(Runner):
    """Item: frames uint8 (C, T, H, W, 3), logmel (C, M, N). Result: grid float32 (C·T, h, w) of
    min-max normalised audio-visual similarity per frame, and peak (C·T, 2) as (x, y) in frame
    pixels of the heatmap at frame resolution."""

    task = "localization"
    inputs = ("frames", "logmel", "fps")

    def _heard(self, item: dict[str, Any]) -> torch.Tensor:
        """What the model hears for each frame of the item: its clip's log-mel, or the
        `cfg.audio_window_s` seconds around the frame when the model was trained that way.
        Returns float (C·T, M, N')."""
        from models.localization import audio_window

        C, T = item["frames"].shape[:2]
        mel = torch.from_numpy(item["logmel"]).repeat_interleave(T, dim=0)  # (C·T, M, N)
        centres = ((torch.arange(T, dtype=torch.float64) + 0.5) / T).repeat(C)  # (C·T,)
        return audio_window(mel, centres, self.cfg.audio_window_s, T / item["fps"])

    @torch.no_grad()
    def infer(self, items):
        from models.localization import heatmap

        def run(frames: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self._float(frames).permute(0, 3, 1, 2) / 255.0  # (n, 3, H, W)
            out = self.model(x, self._float(mel))
            sim = out["sim"]  # (n, h, w)
            lo, hi = sim.amin(dim=(1, 2), keepdim=True), sim.amax(dim=(1, 2), keepdim=True)
            full = heatmap(out, x.shape[-2:])  # (n, H, W)
            flat = full.flatten(1).argmax(dim=1)  # (n,)
            W = full.shape[-1]
            return (sim - lo) / (hi - lo).clamp_min(1e-12), torch.stack([flat % W, flat // W], dim=1)  # (n, h, w), (n, 2)

        counts = [it["frames"].shape[0] * it["frames"].shape[1] for it in items]
        frames = torch.cat([torch.from_numpy(it["frames"]).flatten(0, 1) for it in items])  # uint8 (n, H, W, 3)
        mel = torch.cat([self._heard(it) for it in items])  # (n, M, N'): each frame with its sound
        grid, peak = self._chunked(run, frames, mel)
        return [{"grid": g.cpu().numpy(), "peak": p.cpu().numpy()}
                for g, p in zip(grid.split(counts), peak.split(counts))]


class SeparateRunner(Runner):
    """Item: audio float32 (C, S), faces uint8 (C, K, T, 3, s, s). Result: float32 (K, C·S), each
    speaker's track over the clips in order."""

    task = "separation"
    inputs = ("audio", "faces")

    @torch.no_grad()
    def infer(self, items):
        def run(mixture: torch.Tensor, faces: torch.Tensor | None) -> torch.Tensor:
            faces = None if faces is None else self._float(faces) / 255.0  # (n, K, T, 3, s, s)
            return self.model(self._float(mixture), faces)["waveforms"]  # (n, K, S)

        counts = [it["audio"].shape[0] for it in items]
        mixture = torch.cat([torch.from_numpy(it["audio"]) for it in items])  # (n, S)
        faces = None if self.cfg.audio_only else torch.cat([torch.from_numpy(it["faces"]) for it in items])
        waves = self._chunked(run, mixture, faces)  # (n, K, S)
        return [w.permute(1, 0, 2).flatten(1).cpu().numpy() for w in waves.split(counts)]  # (K, C·S)


class CaptionRunner(Runner):
    """Item: frames uint8 (C, T, H, W, 3), logmel (C, M, N) or None, beam_size. Result: one
    caption per clip. Items with the same beam size and audio presence run as one batch."""

    task = "captioning"
    inputs = ("frames", "logmel", "beam_size")

    @torch.no_grad()
    def infer(self, items):
        from models.captioning import decode

        results: list[list[str] | None] = [None] * len(items)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((int(it["beam_size"]), it["logmel"] is None), []).append(i)
        def run(beam: int, frames: torch.Tensor, mel: torch.Tensor | None) -> list[str]:
            x = self._float(frames).permute(0, 1, 4, 2, 3) / 255.0  # (n, T, 3, H, W)
            ids = self.model.greedy(x, self._float(mel)) if beam == 1 else self.model.beam_search(x, self._float(mel), beam)
            return [decode(t, self.cfg.vocab) for t in ids]

        for (beam, silent), idx in groups.items():
            counts = [items[i]["frames"].shape[0] for i in idx]
            frames = torch.cat([torch.from_numpy(items[i]["frames"]) for i in idx])  # uint8 (n, T, H, W, 3)
            mel = None if silent else torch.cat([torch.from_numpy(items[i]["logmel"]) for i in idx])  # (n, M, N)
            caps = self._chunked(lambda f, m: run(beam, f, m), frames, mel)
            start = 0
            for i, n in zip(idx, counts):
                results[i], start = caps[start:start + n], start + n
        return results


RUNNERS: dict[str, type[Runner]] = {"localization": LocalizeRunner, "separation": SeparateRunner,
                                    "captioning": CaptionRunner}


# ---------------------------------------------------------------------------------------------
# Response formats


def wav_bytes(x: np.ndarray, sample_rate: int) -> bytes:
    """float32 (S,) in [-1, 1] -> 16-bit PCM mono WAV bytes (peaks above 1 are clipped)."""
    pcm = (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def overlay_png(frames: np.ndarray, grids: np.ndarray, fps: float) -> bytes:
    """Heatmaps over frames as an animated PNG (one PNG when there is one frame).
    frames uint8 (n, H, W, 3); grids float (n, h, w) in [0, 1]."""
    from matplotlib import colormaps
    from PIL import Image

    H, W = frames.shape[1:3]
    up = F.interpolate(torch.from_numpy(grids).float()[:, None], size=(H, W), mode="bilinear",
                       align_corners=False)[:, 0].clamp(0, 1).numpy()  # (n, H, W)
    colour = colormaps["jet"](up)[..., :3] * 255.0  # (n, H, W, 3)
    mixed = (0.55 * frames + 0.45 * colour).round().clip(0, 255).astype(np.uint8)
    images = [Image.fromarray(m) for m in mixed]
    buf = io.BytesIO()
    images[0].save(buf, format="PNG", save_all=len(images) > 1, append_images=images[1:],
                   duration=int(round(1000 / fps)), loop=0)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Deployments: the Ray Serve side (the pieces above use no Ray and run in any process)


def _present(**handles) -> dict[str, Any]:
    """task -> DeploymentHandle of the models being served (those given, in TASKS order)."""
    return {t: handles[t] for t in TASKS if handles.get(t) is not None}

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Decoder:
    """CPU side of a request: decode the upload with the model's training clip settings
    (`prepare`, in a thread so that several decodes overlap), hand the item to the model's
    deployment and return its result with what the ingress needs to format the answer. Clip
    arrays thus travel decoder -> model once and never through the ingress."""

    def __init__(self, args: dict[str, Any], localization=None, separation=None, captioning=None) -> None:
        self.args = AppArgs.from_dict(args)
        self.models = _present(localization=localization, separation=separation, captioning=captioning)
        self.specs = {task: clip_spec(torch.load(getattr(self.args, task), map_location="cpu", weights_only=True),
                                      self.args) for task in self.models}

    async def __call__(self, task: str, data: bytes, boxes: str | None = None, beam_size: int = 1,
                       overlay: bool = False) -> dict[str, Any]:
        """-> {"result": the model's answer, "meta": ...}, or {"error": (status, message)}. meta["timing"]:
        milliseconds spent decoding, waiting for the model deployment, and in its forward pass."""
        t0 = time.perf_counter()
        try:
            d = await asyncio.to_thread(prepare, data, self.specs[task], boxes=boxes, beam_size=beam_size)
        except RequestError as e:
            return {"error": (e.status, e.message)}
        t1 = time.perf_counter()
        try:  # only what the model reads travels to it
            out = await self.models[task].remote({k: d[k] for k in RUNNERS[task].inputs})
        except BackPressureError as e:
            return {"error": (503, f"overloaded, retry later ({e.message})")}
        meta = {k: d[k] for k in ("starts", "info", "fps", "sample_rate", "frames_per_clip", "view", "boxes") if k in d}
        meta["timing"] = {"decode": (t1 - t0) * 1000, "model": (time.perf_counter() - t1) * 1000,
                          "inference": out["ms"], "batch": out["batch"]}
        meta["audio_used"] = d["logmel"] is not None
        if overlay:
            meta["frames"] = d["frames"]
        return {"result": out["result"], "meta": meta}


@serve.deployment(ray_actor_options={"num_cpus": 0.25})  # three models + decoder + ingress fit 2 CPUs
class ModelServer:
    """One model; `__call__(item)` goes through `@serve.batch` (args.batching) or alone."""

    def __init__(self, task: str, args: dict[str, Any]) -> None:
        self.args = AppArgs.from_dict(args)
        self.runner = RUNNERS[task](getattr(self.args, task))
        self._batched.set_max_batch_size(self.args.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batch_wait_ms / 1000.0)

    def describe(self) -> dict[str, Any]:
        return {**self.runner.describe(), "batching": self.args.batching,
                "max_batch_size": self.args.max_batch_size}

    async def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """-> {"result": the runner's result, "ms": the forward pass's milliseconds, "batch": requests in it}."""
        if self.args.batching:
            return await self._batched(item)
        return (await self._infer([item]))[0]

    @serve.batch(max_batch_size=AppArgs.max_batch_size, batch_wait_timeout_s=AppArgs.batch_wait_ms / 1000.0)  # set per app in __init__
    async def _batched(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self._infer(items)

    async def _infer(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # in a thread: the replica's event loop keeps taking requests, which queue up as the next batch
        t0 = time.perf_counter()
        results = await asyncio.to_thread(self.runner.infer, items)
        ms = (time.perf_counter() - t0) * 1000
        return [{"result": r, "ms": ms, "batch": len(items)} for r in results]


_ALLOWED_TYPES = ("video/", "application/octet-stream", "application/mp4", "application/x-matroska")

app = FastAPI(
    title="avray",
    version="1",
    description="Where the sound comes from, each speaker's own voice, and what happens in a video. "
                "Upload media as multipart form field `file`. Errors are JSON: {\"detail\": \"...\"}.",
)


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(app)
class Ingress:
    def __init__(self, args: dict[str, Any], decoder, localization=None, separation=None, captioning=None) -> None:
        self.args = AppArgs.from_dict(args)
        self.decoder = decoder
        self.models = _present(localization=localization, separation=separation, captioning=captioning)
        self.max_bytes = int(self.args.max_upload_mb * 1024 * 1024)

    # -- plumbing ---------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if not self.args.token:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.args.token}".encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def _need(self, task: str) -> None:
        if task not in self.models:
            raise HTTPException(404, f"no {task} model is loaded (start avray serve with --{task} CHECKPOINT)")

    async def _read(self, request: Request, file: UploadFile, image_ok: bool = False) -> bytes:
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

    async def _run(self, task: str, data: bytes, **options) -> tuple[Any, dict[str, Any]]:
        """Decoder -> model for one upload: (the model's result, the request's metadata)."""
        t0 = time.perf_counter()
        try:
            out = await self.decoder.remote(task, data, **options)
        except BackPressureError as e:
            raise HTTPException(503, f"overloaded, retry later ({e.message})", headers={"Retry-After": "1"}) from e
        if "error" in out:
            status, message = out["error"]
            raise HTTPException(status, message, headers={"Retry-After": "1"} if status == 503 else None)
        out["meta"]["timing"]["decoder"] = (time.perf_counter() - t0) * 1000
        return out["result"], out["meta"]

    @staticmethod
    def _timed(response: Response, meta: dict[str, Any]) -> Response:
        """The answer with a Server-Timing header: ms in the decoder deployment (round trip from the
        ingress), decoding, the model deployment (round trip from the decoder), its forward pass,
        and how many requests shared that forward pass."""
        t = meta["timing"]
        response.headers["Server-Timing"] = (
            f'decoder;dur={t["decoder"]:.2f}, decode;dur={t["decode"]:.2f}, model;dur={t["model"]:.2f}, '
            f'inference;dur={t["inference"]:.2f}, batch;desc="{t["batch"]}"')
        return response

    # -- routes (answers are built as JSON-native values and returned as JSONResponse: FastAPI's
    #    jsonable_encoder walk over a heatmap list costs milliseconds) ----------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": sorted(self.models)}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        infos = await asyncio.gather(*(h.describe.remote() for h in self.models.values()))
        return {"models": dict(zip(self.models, infos)),
                "limits": {"max_upload_mb": self.args.max_upload_mb, "max_seconds": self.args.max_seconds,
                           "max_pixels": self.args.max_pixels}}

    @app.post("/v1/localize")
    async def localize(self, request: Request, file: UploadFile = File(..., description="video with sound"),
                       overlay: str | None = Query(None, pattern="^png$", description="png: heatmaps over frames as an animated PNG")):
        """Where the sound comes from: per sampled frame, a heatmap grid in [0, 1] and its peak,
        in source pixels; `view` is the centred square of the source that the model sees."""
        self._auth(request)
        self._need("localization")
        res, m = await self._run("localization", await self._read(request, file), overlay=overlay == "png")
        if overlay == "png":
            frames = m["frames"].reshape(-1, *m["frames"].shape[2:])  # (C·T, H, W, 3)
            return self._timed(Response(overlay_png(frames, res["grid"], m["fps"]), media_type="image/png"), m)
        v = m["view"]

        def src(p: float, offset: int) -> float:  # frame pixel -> source pixel
            return round((p + offset) / v["scale"], 1)

        times = [s + j / m["fps"] for s in m["starts"] for j in range(m["frames_per_clip"])]
        body = {"fps": m["fps"], "frames_sampled": len(times), "grid": list(res["grid"].shape[1:]),
                "source": {"width": m["info"]["width"], "height": m["info"]["height"]},
                "view": {"x0": src(0, v["x0"]), "y0": src(0, v["y0"]), "x1": src(v["size"], v["x0"]),
                         "y1": src(v["size"], v["y0"])},
                "frames": [{"t": round(t, 4), "heatmap": np.round(g.astype(np.float64), 3).tolist(),
                            "peak": {"x": src(float(p[0]) + 0.5, v["x0"]), "y": src(float(p[1]) + 0.5, v["y0"])}}
                           for t, g, p in zip(times, res["grid"], res["peak"])]}
        return self._timed(JSONResponse(body), m)

    @app.post("/v1/separate")
    async def separate(self, request: Request, file: UploadFile = File(..., description="video with speech"),
                       boxes: str | None = Form(None, description="JSON [[x0, y0, x1, y1], ...] in source pixels, one per speaker; default: equal vertical strips"),
                       format: str = Query("zip", pattern="^(zip|json)$", description="zip of WAVs, or JSON with base64 WAVs")):
        """Each speaker's own voice: one 16-bit WAV per box, in box order."""
        self._auth(request)
        self._need("separation")
        tracks, m = await self._run("separation", await self._read(request, file), boxes=boxes)  # (K, C·S)
        sr = m["sample_rate"]
        wavs = [wav_bytes(t, sr) for t in tracks]
        if format == "json":
            return self._timed(JSONResponse({"sample_rate": sr, "seconds": tracks.shape[1] / sr,
                                             "speakers": [{"box": b, "wav_base64": base64.b64encode(w).decode()}
                                                          for b, w in zip(m["boxes"], wavs)]}), m)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # PCM barely deflates; storing is ~free
            for i, w in enumerate(wavs):
                z.writestr(f"speaker_{i}.wav", w)
            z.writestr("boxes.json", json.dumps({"boxes": m["boxes"], "sample_rate": sr}))
        return self._timed(Response(buf.getvalue(), media_type="application/zip",
                                    headers={"Content-Disposition": 'attachment; filename="speakers.zip"'}), m)

    @app.post("/v1/caption")
    async def caption(self, request: Request, file: UploadFile = File(..., description="video or image"),
                      beam_size: int = Query(1, ge=1, le=MAX_BEAM, description="1: greedy decoding")):
        """What happens: one caption per clip (a still image is one clip, captioned without sound)."""
        self._auth(request)
        self._need("captioning")
        caps, m = await self._run("captioning", await self._read(request, file, image_ok=True), beam_size=beam_size)
        span = m["frames_per_clip"] / m["fps"]
        return self._timed(JSONResponse({"caption": caps[0], "audio_used": m["audio_used"], "beam_size": beam_size,
                                         "clips": [{"start_s": s, "end_s": s + span, "caption": c}
                                                   for s, c in zip(m["starts"], caps)]}), m)


def build(args: AppArgs, deployments: list[dict[str, Any]]):
    """The bound application. GPU share for model deployments when args.use_gpu says so (auto:
    when the connected cluster has GPUs); `deployments` entries override options by name."""
    plain = dataclasses.asdict(args)
    opts = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in deployments}
    use_gpu = args.use_gpu == "yes"
    if args.use_gpu == "auto":
        import ray
        use_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0

    def model(task: str, name: str):
        o = dict(opts.get(name, {}))
        if use_gpu:
            o.setdefault("ray_actor_options", {}).setdefault("num_gpus", 0.25)
        return ModelServer.options(name=name, **o).bind(task, plain)

    handles = {t: model(t, DEPLOYMENT[t]) for t in TASKS if getattr(args, t)}
    decoder = Decoder.options(**opts.get("Decoder", {})).bind(plain, **handles)
    return Ingress.options(**opts.get("Ingress", {})).bind(plain, decoder, **handles)
