"""What a task is: the one interface that training, evaluation, serving and the tests go through.

A task module (jobs/tasks/<name>.py) defines one `Task` subclass and an instance `TASK` of it;
jobs/tasks/__init__.py lists the modules. Everything else is derived from that table: the
choices of `avray train` / `avray evaluate`, the model a checkpoint rebuilds, `avray serve`'s
options, routes, Serve deployments and their inference code.

Data flow through a task (shapes in each module):

    clip rows (numpy batch: Parquet as Ray Data gives it, or an upload's rows from
    pipelines.upload) ──prepare──▶ numpy arrays (images uint8, channels first)
        training:   Ray Data tasks ─▶ tensors on the device ─to_model─▶ step / evaluate
        serving:    request (prepare + the route's options) ─▶ infer (to_model, the model) ─▶ answer

`prepare` is the same function in both, so a served model reads what it was trained on.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from pipelines.clipsettings import ClipSettings


class RequestError(Exception):
    """A client error: HTTP `status` and a message saying what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Option:
    """One request option of a route: a query parameter (`where="query"`) or a multipart form
    field (`"form"`) of type `annotation` with `default`; `checks`: FastAPI's validation keywords
    (pattern, ge, le, ...)."""

    name: str
    annotation: Any
    default: Any
    description: str
    where: str = "query"
    checks: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """A task's HTTP route: POST `path` with the media as multipart field `file` (`upload` says what
    it should hold), plus `options`. `image_ok`: a still image is accepted (one clip, no sound);
    `needs_audio`: a video without an audio stream is refused (422); `audio_ok`: sound without
    pictures is accepted (clips of black frames, `video_stream` -1); `text`: the route takes a
    form field `text` instead of a file (one of the two)."""

    path: str
    summary: str
    upload: str
    options: tuple[Option, ...] = ()
    image_ok: bool = False
    needs_audio: bool = True
    audio_ok: bool = False
    text: bool = False


@dataclass(frozen=True)
class Answer:
    """A route's answer: a JSON-native dict, or bytes of `media_type`."""

    body: dict[str, Any] | bytes
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class Task(abc.ABC):
    """One task. Subclasses set the class attributes and define prepare, step, evaluate, figure,
    request, infer and answer (fit when the model config depends on the training data).

    - `name`: registry key, CLI choice and the checkpoint's `model` field;
    - `config`, `model`: the model's frozen config dataclass and nn.Module (built as model(config));
    - `presets`: preset name -> config;
    - `columns`: the clip columns prepare reads (no other column is loaded);
    - `lr_schedule`: avray train's --lr-schedule auto for the task;
    - `deployment`: its model deployment's name in the Serve config; `route`: its HTTP route;
    - `serve_settings`: ClipSettings fields that serving changes from the checkpoint's (empty:
      uploads are decoded exactly as the training clips were).
    """

    name: str
    config: type
    model: type
    presets: dict[str, Any]
    columns: tuple[str, ...]
    lr_schedule: str = "cosine"
    deployment: str
    route: Route
    serve_settings: dict[str, Any] = {}
    max_rows: int = 64  # rows (frames or clips) per forward pass when serving: long uploads run in chunks

    # -- training ---------------------------------------------------------------------------

    def fit(self, cfg: Any, read: Callable[[list[str]], dict[str, Any]]) -> Any:
        """The model config to train: `cfg` (a preset) with whatever the task learns from the
        training rows first; `read(columns)` gives those columns of every training row. By
        default nothing is fitted."""
        return cfg

    @abc.abstractmethod
    def prepare(self, batch: dict[str, Any], cfg: Any) -> dict[str, np.ndarray]:
        """numpy batch of clip rows -> the model's inputs and targets (numpy). The CPU work
        (decoding blobs, targets, crops, tokens) happens here, in Ray Data tasks during training."""

    def collate(self, batch: dict[str, Any], cfg: Any) -> dict[str, torch.Tensor]:
        """prepare + as_tensors + to_model in this process (evaluation, tests)."""
        return to_model(as_tensors(self.prepare(batch, cfg)))

    @abc.abstractmethod
    def step(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: Any,
             gen: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Forward + loss: {"loss": scalar, ...} on a collated batch."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], cfg: Any) -> dict[str, float]:
        """Metrics over collated batches (validation in avray train, and avray evaluate)."""

    @abc.abstractmethod
    def figure(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: Any, path: str, n: int = 4) -> None:
        """A PNG of n examples of one collated batch."""

    @abc.abstractmethod
    def headline(self, metrics: dict[str, float]) -> str:
        """One line of `evaluate`'s metrics that says whether the model works (avray evaluate
        prints it first and stores it in metrics.json; make demo prints one per model)."""

    # -- serving ----------------------------------------------------------------------------

    def clip_settings(self, trained: ClipSettings) -> ClipSettings:
        """How uploads are decoded for this task's model: its training clips' settings, changed
        by `serve_settings`."""
        return dataclasses.replace(trained, **self.serve_settings)

    def from_upload(self, data: bytes | None, cfg: Any, trained: ClipSettings, *, max_pixels: int, max_seconds: float,
                    options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """One request's work before the model: the upload decoded into clip rows as the model's
        training clips were made (`clip_settings(trained)`, pipelines.upload), then `request`.
        Returns (the model's item, the answer's metadata: the task's own plus `starts` (C,) clip
        starts in seconds, `fps`, `frames_per_clip`, `sample_rate` and the `source` size).
        Without data (a route taking `text`), `request` gets no rows. Raises RequestError: 413 past
        a limit, 422 for unusable media."""
        from pipelines.decode import MediaError, MediaTooLarge, MediaTooLong
        from pipelines.upload import decode_upload

        settings = self.clip_settings(trained)
        if data is None:
            return self.request(None, cfg, settings, options)
        try:
            rows, info = decode_upload(data, settings, max_pixels=max_pixels, max_seconds=max_seconds,
                                       image_ok=self.route.image_ok, audio_ok=self.route.audio_ok)
        except (MediaTooLarge, MediaTooLong) as e:
            raise RequestError(413, str(e)) from e
        except MediaError as e:
            raise RequestError(422, f"{type(e).__name__}: {e}") from e
        if self.route.needs_audio and not info.has_audio:
            raise RequestError(422, "the video has no audio stream, and this route needs its sound")
        item, meta = self.request(rows, cfg, settings, options)
        return item, {"starts": rows["start_s"].tolist(), "fps": settings.fps, "sample_rate": settings.sample_rate,
                      "frames_per_clip": int(rows["frames_shape"][0][0]),
                      "source": {"width": info.src_width, "height": info.src_height}, **meta}

    @abc.abstractmethod
    def request(self, rows: dict[str, Any], cfg: Any, settings: ClipSettings,
                options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """An upload's clip rows (pipelines.upload, decoded with `settings`; None for a text request)
        + the route's options -> (the model's item: only what `infer` reads, the answer's
        metadata). Raises RequestError."""

    @abc.abstractmethod
    def infer(self, model: torch.nn.Module, items: list[dict[str, Any]], device: torch.device) -> list[Any]:
        """One result per item; the items' rows go through the model together, `max_rows` at a time."""

    @abc.abstractmethod
    def answer(self, result: Any, meta: dict[str, Any], options: dict[str, Any]) -> Answer:
        """The HTTP answer to one request."""


class CaptionVocabulary:
    """Mixin for a task whose config has a `vocab` (put it before Task): `fit` learns the words of
    the training captions (pipelines.groundtruth.clip_captions: the scene's ground truth for each
    clip's span, else a `caption` column) into the config."""

    def fit(self, cfg: Any, read: Callable[[list[str]], dict[str, Any]]) -> Any:
        import logging

        from models.text import build_vocab
        from pipelines.groundtruth import clip_captions

        media = ("frames", "frames_shape", "logmel", "logmel_shape")
        captions = clip_captions(read([c for c in self.columns if c not in media]))
        vocab = build_vocab(captions)
        logging.getLogger(type(self).__module__).info("vocabulary: %d words from %d training captions",
                                                      len(vocab), len(captions))
        return self.fit_words(dataclasses.replace(cfg, vocab=vocab), captions)

    def fit_words(self, cfg: Any, captions: list[str]) -> Any:
        """What else a task fits on the training captions once its vocabulary is set (nothing here)."""
        return cfg


def save_figure(fig: Any, path: str) -> None:
    """Write a matplotlib figure as the tasks' PNGs are written (tight layout, 80 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def channels_first(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> uint8 (..., 3, H, W), contiguous."""
    return np.ascontiguousarray(np.moveaxis(frames, -1, -3))


def to_model(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prepared batch as the model takes it: uint8 tensors (images) become float in [0, 1],
    the rest is unchanged. Run after moving the batch to its device (images move as bytes)."""
    return {k: v.float().div_(255.0) if v.dtype == torch.uint8 else v for k, v in batch.items()}


def as_tensors(prepared: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A prepared numpy batch as tensors (no copy), as `iter_torch_batches` gives it."""
    return {k: torch.from_numpy(v) for k, v in prepared.items()}


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A prepared tensor batch moved to `device`, as the model takes it (to_model)."""
    return to_model({k: v.to(device, non_blocking=True) for k, v in batch.items()})


def joined(items: list[dict[str, Any]], key: str) -> tuple[torch.Tensor, list[int]]:
    """The `key` arrays of several items concatenated along their first axis, and each one's length."""
    parts = [torch.from_numpy(np.ascontiguousarray(it[key])) for it in items]
    return torch.cat(parts), [len(p) for p in parts]


def per_item(rows: Any, counts: Iterable[int]) -> list[Any]:
    """Rows of several items run together (concatenated, item by item) -> one slice per item,
    `counts` rows each."""
    out, start = [], 0
    for n in counts:
        out.append(rows[start:start + n])
        start += n
    return out


def chunked(fn: Callable[..., Any], max_rows: int, *xs: torch.Tensor | None) -> Any:
    """fn over row chunks (at most max_rows) of xs (None passes through as None), the outputs put
    back together: tensors or tuples of tensors concatenated, lists joined."""
    n = next(x for x in xs if x is not None).shape[0]
    outs = [fn(*(None if x is None else x[i:i + max_rows] for x in xs)) for i in range(0, n, max_rows)]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return [v for o in outs for v in o]
