"""Write synthetic audio-visual scenes (MP4 + per-object WAVs + JSON ground truth).

Each scene shows 1 to --max-objects moving coloured shapes (circle/square/triangle,
red/green/blue/yellow, solid/striped) on a dark background. Every (shape, colour) has its
own sound (a harmonic tone, band-limited noise or a click train; with --speech-dir, circles
talk using real recordings), switched on and off in segments of 0.5-2 s; a sounding object
pulses in size with its own loudness. Per scene i, OUT gets:

  scene_{i:05d}.mp4         H.264 video + AAC mono audio (the mixture of all objects)
  scene_{i:05d}_obj{k}.wav  object k's clean track (float32; the mixture is their sum)
  scene_{i:05d}.json        ground truth: per-frame boxes and sounding flags, sounding
                            segments, sound names and a one-sentence caption
  manifest.jsonl            one line per scene: path, caption, ground_truth (the JSON as a
                            string); `avray preprocess OUT/manifest.jsonl` carries both
                            columns into every clip row

Scenes are deterministic for (--seed, i) and the other options; the JSON format and the
caption grammar are documented in pipelines/synth.py. Existing files are overwritten.

example:
  avray synth --out media/ --videos 20 --seed 0
  avray synth -o media-speech/ --videos 100 --speech-dir ../shared/media/speech
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# sample rates the AAC encoder accepts
AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


@dataclass(frozen=True)
class SynthConfig:
    out: str = field(metadata={"help": "output folder (created if missing)", "short": "-o"})
    videos: int = field(default=8, metadata={"help": "number of scenes to write"})
    seed: int = field(default=0, metadata={"help": "random seed; scene i uses numpy default_rng([seed, i])"})
    seconds: float = field(default=6.0, metadata={"help": "length of each scene in seconds"})
    size: int = field(default=256, metadata={"help": "frame width and height in pixels (even, >= 32)"})
    fps: int = field(default=25, metadata={"help": "video frame rate"})
    sample_rate: int = field(default=16000, metadata={"help": "audio sample rate in Hz"})
    speech_dir: str | None = field(default=None, metadata={
        "help": "folder of speech recordings (.wav/.mp3/.flac): circles then talk; default: synthetic sounds only"})
    max_objects: int = field(default=3, metadata={"help": "most objects per scene (1-12; 2-3 are favoured)"})


CONFIG = SynthConfig


def validate(cfg: SynthConfig) -> None:
    """Raise ValueError with a clear message for bad options."""
    if cfg.videos < 1:
        raise ValueError(f"--videos must be >= 1, got {cfg.videos}")
    if not cfg.seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {cfg.seconds}")
    if cfg.size < 32 or cfg.size % 2:
        raise ValueError(f"--size must be an even number >= 32 (H.264 yuv420p), got {cfg.size}")
    if cfg.fps < 1:
        raise ValueError(f"--fps must be >= 1, got {cfg.fps}")
    if round(cfg.seconds * cfg.fps) < 1:
        raise ValueError(f"--seconds {cfg.seconds} at --fps {cfg.fps} gives no video frame")
    if cfg.sample_rate not in AAC_RATES:
        raise ValueError(f"--sample-rate must be one AAC supports {AAC_RATES}, got {cfg.sample_rate}")
    if not 1 <= cfg.max_objects <= 12:
        raise ValueError(f"--max-objects must be between 1 and 12 (distinct shape-colour pairs), got {cfg.max_objects}")
    if cfg.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {cfg.seed}")


def run(cfg: SynthConfig) -> int:
    """Write `cfg.videos` scenes into `cfg.out`; returns 0."""
    validate(cfg)
    from pathlib import Path

    from pipelines.synth import make_scene, write_scene
    from pipelines.synth_audio import list_speech_files

    speech_files = []
    if cfg.speech_dir is not None:
        speech_files = list_speech_files(cfg.speech_dir)
        if not speech_files:
            log.warning("no .wav/.mp3/.flac files in %s: using synthetic sounds only", cfg.speech_dir)
        else:
            log.info("%d speech recordings in %s", len(speech_files), cfg.speech_dir)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    manifest = []
    for i in range(cfg.videos):
        t0 = time.perf_counter()
        scene = make_scene(cfg.seed, i, seconds=cfg.seconds, size=cfg.size, fps=cfg.fps,
                           sample_rate=cfg.sample_rate, max_objects=cfg.max_objects, speech_files=speech_files)
        gt = write_scene(scene, out)
        manifest.append({"path": gt["video"], "caption": gt["caption"],
                         "ground_truth": json.dumps(gt, separators=(",", ":"))})
        log.info("%d/%d %s (%d objects, %.2f s): %s", i + 1, cfg.videos, out / gt["video"],
                 len(gt["objects"]), time.perf_counter() - t0, gt["caption"])
    (out / "manifest.jsonl").write_text("".join(json.dumps(m) + "\n" for m in manifest))
    log.info("wrote %d scenes and manifest.jsonl to %s in %.1f s", cfg.videos, out, time.perf_counter() - start)
    return 0
