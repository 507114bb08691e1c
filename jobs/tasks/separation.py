"""Audio-visual speech separation (Looking to Listen): each speaker's own voice, told apart by sight.

Trained by mix-and-separate: K clips' soundtracks are summed and each clip's own frames must pull
its own soundtrack out (audio-only presets: PIT, frames unused). A training clip is one speaker,
whose "face" is the whole frame; a served upload has K speakers, whose faces are crops of the
boxes the request gives. Both go through `face_crops`, so the visual stream sees the same pixels.
"""

from __future__ import annotations

import base64
import io
import json
import wave
import zipfile
from dataclasses import replace
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from jobs.tasks.base import Answer, Option, RequestError, Route, Task, channels_first, chunked, joined, save_figure, to_model
from models.separation import PRESETS, AVSeparator, SeparationConfig, mix_and_separate_batch, separation_loss
from models.separation_metrics import audible, sdr_improvement, si_sdr_improvement
from pipelines.clipsettings import ClipSettings
from pipelines.decode import frame_mapping
from pipelines.schema import decode_clip_batch

FACE_SIZE = 48  # side of the face crops the visual stream sees


def face_crops(frames: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """uint8 frames (B, T, H, W, 3) -> uint8 (B, K, T, 3, s, s): each box (x0, y0, x1, y1, frame
    pixels, x1/y1 exclusive) cropped from every frame and area-downsampled to s = FACE_SIZE."""
    B, T = frames.shape[:2]
    x = torch.from_numpy(channels_first(frames)).flatten(0, 1).float()  # (B·T, 3, H, W)
    crops = []
    for x0, y0, x1, y1 in boxes:
        crop = F.interpolate(x[:, :, y0:y1, x0:x1], size=(FACE_SIZE, FACE_SIZE), mode="area")  # (B·T, 3, s, s)
        crops.append(crop.round_().to(torch.uint8).reshape(B, T, 3, FACE_SIZE, FACE_SIZE))
    return torch.stack(crops, dim=1).numpy()  # (B, K, T, 3, s, s)


class Separation(Task):
    name = "separation"
    config, model = SeparationConfig, AVSeparator
    presets = {**PRESETS, **{f"{k}-audio-only": replace(v, audio_only=True) for k, v in PRESETS.items()}}
    # at the tiny preset's short horizon a cosine decay to 0 learned slower (BENCHMARKS.md, quality notes)
    lr_schedule = "constant"
    columns = ("video_id", "frames", "frames_shape", "audio", "audio_shape", "has_audio")
    deployment = "Separator"
    # Speakers' boxes are cropped from the whole picture: uploads are letterboxed, never cropped,
    # whatever the training clips were (on square synthetic scenes the two are the same).
    serve_settings = {"resize": "letterbox"}
    route = Route(
        "/v1/separate", upload="video with speech",
        summary="Each speaker's own voice: one 16-bit WAV per box, in box order.",
        options=(Option("boxes", str | None, None, "JSON [[x0, y0, x1, y1], ...] in source pixels, one per "
                        "speaker; default: equal vertical strips", where="form"),
                 Option("format", str, "zip", "zip of WAVs, or JSON with base64 WAVs",
                        checks={"pattern": "^(zip|json)$"})))

    def prepare(self, batch: dict[str, Any], cfg: SeparationConfig,
                boxes: list[tuple[int, int, int, int]] | None = None) -> dict[str, np.ndarray]:
        """-> audio float (B, S), faces uint8 (B, T, 3, s, s): each clip's whole frames (one
        speaker per clip); with `boxes` (K of them, frame pixels): faces (B, K, T, 3, s, s)."""
        b = decode_clip_batch(batch)
        H, W = b["frames"].shape[2:4]
        faces = face_crops(b["frames"], [(0, 0, W, H)] if boxes is None else boxes)  # (B, K, T, 3, s, s)
        return {"audio": np.ascontiguousarray(b["audio"]), "faces": faces[:, 0] if boxes is None else faces}

    def _mix(self, batch, cfg, gen):
        return mix_and_separate_batch(batch["audio"], batch["faces"], cfg.num_speakers, gen)

    def step(self, model, batch, cfg, gen=None) -> dict[str, torch.Tensor]:
        mixture, sources, faces = self._mix(batch, cfg, gen)
        out = model(mixture, None if cfg.audio_only else faces)
        return {"loss": separation_loss(out, sources, cfg)}

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, torch.Tensor]], cfg) -> dict[str, float]:
        """SI-SDRi and SDRi (dB) on fixed mixtures of audible clips; AV models also with the faces
        swapped between speakers (the wrong visual stream). `mixtures` counts those scored."""
        gen = torch.Generator().manual_seed(0)
        acc: dict[str, list[torch.Tensor]] = {"si_sdri": [], "sdri": [], "si_sdri_wrong_visual": []}
        for batch in batches:
            if len(batch["audio"]) < cfg.num_speakers:
                continue
            mixture, sources, faces = self._mix(batch, cfg, gen)  # (B, S), (B, K, S), (B, K, T, 3, s, s)
            # SDR and SI-SDR are undefined against a silent reference: score mixtures whose every
            # source is above -60 dBFS RMS (a clip can be silent: every object quiet in its span)
            scored = audible(sources).all(dim=1)  # (B,)
            if not scored.any():
                continue
            mixture, sources, faces = mixture[scored], sources[scored], faces[scored]
            est = model(mixture, None if cfg.audio_only else faces)["waveforms"]
            acc["si_sdri"].append(si_sdr_improvement(est, sources, mixture, pit=cfg.audio_only))
            acc["sdri"].append(sdr_improvement(est, sources, mixture, pit=cfg.audio_only))
            if not cfg.audio_only:
                wrong = model(mixture, faces.roll(1, dims=1))["waveforms"]
                acc["si_sdri_wrong_visual"].append(si_sdr_improvement(wrong, sources, mixture))
        res = {k: float(torch.cat(v).mean()) for k, v in acc.items() if v}
        res["mixtures"] = float(sum(len(v) for v in acc["si_sdri"]))
        return res

    def headline(self, metrics: dict[str, float]) -> str:
        if "si_sdri" not in metrics:
            return "no mixture of audible clips to score"
        wrong = metrics.get("si_sdri_wrong_visual")
        return (f"SI-SDRi {metrics['si_sdri']:.1f} dB" + ("" if wrong is None else f", {wrong:.1f} dB with the speakers' "
                "faces swapped") + f" ({int(metrics['mixtures'])} mixtures)")

    @torch.no_grad()
    def figure(self, model, batch: dict[str, torch.Tensor], cfg, path: str, n: int = 2) -> None:
        """Log spectrograms of mixture, estimate and reference for each speaker of n mixtures."""
        import matplotlib.pyplot as plt

        from pipelines.spectrogram import SpectrogramConfig, stft

        mixture, sources, faces = self._mix(batch, cfg, torch.Generator().manual_seed(0))
        mixture, sources, faces = mixture[:n], sources[:n], faces[:n]
        est = model(mixture, None if cfg.audio_only else faces)["waveforms"]
        K = sources.shape[1]
        fig, axes = plt.subplots(len(mixture), 1 + 2 * K, figsize=(3 * (1 + 2 * K), 2.6 * len(mixture)), squeeze=False)
        for i in range(len(mixture)):
            panels = [("mixture", mixture[i])] + [p for k in range(K) for p in
                                                 ((f"estimate {k}", est[i, k]), (f"reference {k}", sources[i, k]))]
            for ax, (name, wave_) in zip(axes[i], panels):
                db = 20 * torch.log10(stft(wave_.float().cpu(), SpectrogramConfig()).abs() + 1e-5)  # (F, N)
                ax.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-100, vmax=0)
                ax.set_title(name, fontsize=9)
                ax.axis("off")
        save_figure(fig, path)

    # -- serving ----------------------------------------------------------------------------

    def request(self, rows, cfg, settings: ClipSettings, options):
        """Item: audio float32 (C, S), faces uint8 (C, K, T, 3, s, s) (no faces for an audio-only
        model). Meta: the boxes in source pixels and the answer's format."""
        w, h = int(rows["src_width"][0]), int(rows["src_height"][0])
        boxes = parse_boxes(options.get("boxes"), cfg.num_speakers, w, h)
        sx, sy, ox, oy = frame_mapping(w, h, settings.decode_config())
        in_frame = []  # source pixels -> the letterboxed frames' pixels, at least one pixel wide
        for x0, y0, x1, y1 in boxes:
            c0, r0 = int(x0 * sx + ox), int(y0 * sy + oy)
            in_frame.append((c0, r0, max(c0 + 1, int(np.ceil(x1 * sx + ox))), max(r0 + 1, int(np.ceil(y1 * sy + oy)))))
        x = self.prepare(rows, cfg, boxes=None if cfg.audio_only else in_frame)
        item = {"audio": x["audio"]} if cfg.audio_only else {"audio": x["audio"], "faces": x["faces"]}
        return item, {"boxes": boxes}

    @torch.no_grad()
    def infer(self, model, items, device):
        """Result per item: float32 (K, C·S), each speaker's track over the upload's clips in order."""
        def run(mixture: torch.Tensor, faces: torch.Tensor | None) -> torch.Tensor:
            x = to_model({"audio": mixture.to(device), **({} if faces is None else {"faces": faces.to(device)})})
            return model(x["audio"], x.get("faces"))["waveforms"]  # (n, K, S)

        mixture, counts = joined(items, "audio")  # (n, S)
        faces = joined(items, "faces")[0] if "faces" in items[0] else None  # (n, K, T, 3, s, s)
        waves = chunked(run, self.max_rows, mixture, faces)  # (n, K, S)
        return [w.permute(1, 0, 2).flatten(1).cpu().numpy() for w in waves.split(counts)]  # (K, C·S)

    def answer(self, result, meta, options) -> Answer:
        sr = meta["sample_rate"]
        wavs = [wav_bytes(t, sr) for t in result]
        if options.get("format") == "json":
            return Answer({"sample_rate": sr, "seconds": result.shape[1] / sr,
                           "speakers": [{"box": b, "wav_base64": base64.b64encode(w).decode()}
                                        for b, w in zip(meta["boxes"], wavs)]})
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # PCM barely deflates; storing is ~free
            for i, w in enumerate(wavs):
                z.writestr(f"speaker_{i}.wav", w)
            z.writestr("boxes.json", json.dumps({"boxes": meta["boxes"], "sample_rate": sr}))
        return Answer(buf.getvalue(), "application/zip", {"Content-Disposition": 'attachment; filename="speakers.zip"'})


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


TASK = Separation()
