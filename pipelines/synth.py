"""Synthetic audio-visual scenes: moving coloured shapes that make sounds, with ground truth.

A scene has 1..max_objects objects of distinct (shape, colour), hence distinct kinds and
distinct sounds (`synth_audio.SOUND_TABLE`). Objects move smoothly (linear with bounces, or
sinusoidal), stay fully inside the frame, are 18-30% of the frame side and start with box
IoU < 0.1 (paths are resampled, when possible, until no two boxes ever overlap by IoU > 0.25). Each object sounds on segments of 0.5-2 s (on with p=0.6); every scene has one
object sounding >= 30% of the frames and a frame where exactly one object sounds. A
sounding object visibly reacts to its own sound: its drawn size is scaled by
`1 + PULSE * envelope`, envelope = its RMS over each frame period / its maximum; silent
frames are drawn unscaled. Everything is a function of `numpy.random.default_rng([seed, index])`.

Files written per scene by `write_scene` (`scene_{index:05d}` stem):

- `.mp4`: H.264 (libx264, yuv420p, 1 thread, no B-frames: byte-identical reruns) at `fps`,
  size x size, plus AAC mono at `sample_rate`: the mixture, i.e. the sum of the object tracks;
- `_obj{k}.wav`: object k's clean track, float32 mono, exactly round(seconds * sample_rate)
  samples, already gated and scaled (the mixture is their plain sum);
- `.json`: ground truth::

    {"version": 1, "seed": S, "index": i, "seconds": 6.0, "fps": 25, "size": 256,
     "sample_rate": 16000, "num_frames": F, "video": "scene_00000.mp4", "caption": "...",
     "objects": [{"id": 0, "shape": "circle", "colour": "red", "texture": "solid",
                  "sound": "tone_220" | "noise_200_500" | "clicks_2hz" | "speech:<file name>",
                  "audio": "scene_00000_obj0.wav",
                  "boxes": [[x0, y0, x1, y1], ...],  # per frame, drawn extent, pixels, 2 decimals
                  "sounding": [true, ...],           # per frame: mid-frame time in a segment
                  "segments": [[start_s, end_s], ...]}, ...]}  # sounding intervals, 1 ms grid

Frame f shows time f / fps and covers [f / fps, (f + 1) / fps). Box coordinates are continuous
pixel units: pixel (r, c) spans [c, c + 1) x [r, r + 1).

Caption grammar (`caption`, computable from the JSON alone)::

    caption := clause(D) [" while " clause(O1) {" and " clause(Oi)}]
    clause  := "a " ["striped "] colour " " shape " " place " " (verb | "is silent")
    place   := "on the left" | "in the centre" | "on the right"   (x thirds of the mean box
               centre over the object's sounding frames, or all frames if it never sounds)
    verb    := "hums" (tone) | "hisses" (noise) | "clicks" (clicks) | "talks" (speech)

D is the object sounding the longest (sum of segments; ties: lower id); the others follow
by sounding time (descending), then id. E.g. "a red circle on the left hums while a striped
blue square on the right is silent".
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from pipelines.synth_audio import (COLOURS, SOUND_TABLE, SPEECH_SHAPE, TEXTURES, VERBS, frame_envelope,
                                   sample_segments, segments_frames, segments_gate, sound_type, speech_sound,
                                   synth_sound, write_wav)

log = logging.getLogger(__name__)

VERSION = 1
PULSE = 0.15  # drawn size = base size * (1 + PULSE * envelope)
SIDE_RANGE = (0.18, 0.30)  # object box side as a fraction of the frame side
MAX_PEAK = 0.9  # the mixture is scaled (all tracks alike) to peak at most this
AAC_FRAME = 1024
MAX_PATH_IOU = 0.25  # paths are resampled (up to 100 times) while two boxes overlap more at any frame


@dataclass
class SceneObject:
    """One object: kind, motion, sound. T video frames, S audio samples."""

    id: int
    shape: str
    colour: str
    texture: str
    sound: str
    half: float  # half the box side at scale 1, pixels
    centres: np.ndarray  # float64 (T, 2): x, y in pixels
    segments: list[list[float]]  # sounding intervals, seconds
    sounding: np.ndarray  # bool (T,)
    envelope: np.ndarray  # float32 (T,) in [0, 1]; 0 where not sounding
    track: np.ndarray  # float32 (S,): clean gated audio

    @property
    def halves(self) -> np.ndarray:
        """Drawn half side per frame, float64 (T,)."""
        return self.half * (1.0 + PULSE * self.envelope.astype(np.float64))

    def boxes(self) -> np.ndarray:
        """Drawn boxes float64 (T, 4): x0, y0, x1, y1."""
        h = self.halves[:, None]
        return np.concatenate([self.centres - h, self.centres + h], axis=1)


@dataclass
class Scene:
    """A sampled scene, all in memory: `render_frames` and `ground_truth` read it."""

    seed: int
    index: int
    seconds: float
    size: int
    fps: int
    sample_rate: int
    num_frames: int
    background: np.ndarray  # float32 (H, W, 3), H = W = size
    objects: list[SceneObject]

    @property
    def stem(self) -> str:
        return f"scene_{self.index:05d}"

    def mixture(self) -> np.ndarray:
        """The audio track of the video, float32 (S,): the sum of the object tracks."""
        return np.sum([o.track for o in self.objects], axis=0, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dark grey, a linear gradient in a random direction and mild fixed noise: float32 (H, W, 3)."""
    base, amp, theta = rng.uniform(35, 60), rng.uniform(5, 15), rng.uniform(0, 2 * np.pi)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    ramp = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]  # (H, W)
    grey = base + amp * ramp + rng.normal(0, 2.0, (size, size))
    return np.repeat(grey.astype(np.float32)[:, :, None], 3, axis=2)  # (H, W, 3)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes float (..., 4) x0, y0, x1, y1, broadcast over leading dims."""
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    return inter / np.maximum(union, 1e-9)


def _sample_path(rng: np.random.Generator, half: float, size: int, t: np.ndarray) -> np.ndarray:
    """Centre path float64 (T, 2) keeping the box, even at full pulse, inside [0, size]."""
    lo = half * (1 + PULSE) + 1.0
    hi = size - lo
    if rng.random() < 0.5:  # linear motion, bouncing off the walls (a fold into [lo, hi])
        p0 = rng.uniform(lo, hi, 2)
        angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.25) * size
        x = p0 + speed * np.array([np.cos(angle), np.sin(angle)]) * t[:, None] - lo  # (T, 2)
        span = hi - lo
        x = np.mod(x, 2 * span)
        return lo + np.where(x > span, 2 * span - x, x)
    amp = rng.uniform(0.03, 0.2, 2) * size  # sinusoidal path around a centre
    amp = np.minimum(amp, (hi - lo) / 2)
    centre = rng.uniform(lo + amp, hi - amp)
    freq, phase = rng.uniform(0.1, 0.4, 2), rng.uniform(0, 2 * np.pi, 2)
    return centre + amp * np.sin(2 * np.pi * freq * t[:, None] + phase)


def _sample_sounding(rng: np.random.Generator, k: int, seconds: float, num_frames: int, fps: int,
                     tries: int = 100) -> list[list[list[float]]]:
    """Segments per object such that one object sounds >= 30% of the frames and some frame has
    exactly one sounding object (rejection sampling; after `tries`, object 0 sounds throughout
    and the others are silent)."""
    for _ in range(tries):
        segs = [sample_segments(rng, seconds) for _ in range(k)]
        on = np.stack([segments_frames(s, num_frames, fps) for s in segs])  # (K, T)
        if on.mean(axis=1).max() >= 0.3 and np.any(on.sum(axis=0) == 1):
            return segs
    return [[[0.0, round(seconds, 3)]]] + [[] for _ in range(k - 1)]


def make_scene(seed: int, index: int, *, seconds: float = 6.0, size: int = 256, fps: int = 25,
               sample_rate: int = 16000, max_objects: int = 3,
               speech_files: Sequence[str | Path] = ()) -> Scene:
    """Sample scene `index` of `seed` (deterministic for (seed, index, settings, speech files)).

    With `speech_files`, objects of shape `SPEECH_SHAPE` talk (a random segment of a file).
    """
    rng = np.random.default_rng([seed, index])
    num_frames, num_samples = round(seconds * fps), round(seconds * sample_rate)
    t = np.arange(num_frames) / fps
    background = _background(rng, size)

    counts = np.arange(1, max_objects + 1)
    weights = np.where(counts == 1, 1.0, np.where(counts <= 3, 3.0, 1.0))  # favour 2-3 objects
    k = int(rng.choice(counts, p=weights / weights.sum()))
    kinds = list(SOUND_TABLE)
    picks = rng.choice(len(kinds), size=min(k, len(kinds)), replace=False)

    placed: list[tuple[str, str, str, float, np.ndarray]] = []
    boxes: list[np.ndarray] = []  # (T, 4) at scale 1 of the placed objects
    for j in picks:
        shape, colour = kinds[j]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        half = rng.uniform(*SIDE_RANGE) * size / 2
        best, best_iou = None, np.inf
        for _ in range(100):  # start IoU < 0.1 with every earlier object; prefer paths that overlap little later
            path = _sample_path(rng, half, size, t)
            box = np.concatenate([path - half, path + half], axis=1)  # (T, 4)
            ious = np.stack([_iou(box, b) for b in boxes]) if boxes else np.zeros((1, num_frames))  # (K, T)
            if ious[:, 0].max() < 0.1 and ious.max() < best_iou:
                best, best_iou = (path, box), ious.max()
                if best_iou <= MAX_PATH_IOU:
                    break
        if best is None:
            log.debug("scene %d: no room for a %s %s, dropped", index, colour, shape)
            continue
        placed.append((shape, colour, texture, half, best[0]))
        boxes.append(best[1])

    segments = _sample_sounding(rng, len(placed), seconds, num_frames, fps)
    speech_order = rng.permutation(len(speech_files)) if len(speech_files) else []
    n_talking = 0
    objects = []
    for i, ((shape, colour, texture, half, path), segs) in enumerate(zip(placed, segments)):
        if len(speech_files) and shape == SPEECH_SHAPE:
            file = Path(speech_files[speech_order[n_talking % len(speech_files)]])
            n_talking += 1
            sound, source = f"speech:{file.name}", speech_sound(file, num_samples, sample_rate, rng)
        else:
            sound = SOUND_TABLE[(shape, colour)]
            source = synth_sound(sound, num_samples, sample_rate, rng)
        track = source * segments_gate(segs, num_samples, sample_rate)
        objects.append(SceneObject(i, shape, colour, texture, sound, half, path, segs,
                                   segments_frames(segs, num_frames, fps), np.zeros(0, np.float32), track))

    peak = float(np.abs(np.sum([o.track for o in objects], axis=0)).max())
    gain = MAX_PEAK / peak if peak > MAX_PEAK else 1.0
    for o in objects:
        o.track = (o.track * gain).astype(np.float32)
        o.envelope = frame_envelope(o.track, num_frames, fps, sample_rate) * o.sounding
    return Scene(seed, index, seconds, size, fps, sample_rate, num_frames, background, objects)


def draw_object(canvas: np.ndarray, shape: str, colour: str, texture: str,
                cx: float, cy: float, half: float) -> None:
    """Draw one anti-aliased shape in place on float32 (H, W, 3) `canvas`.

    The shape fills the box [cx - half, cx + half] x [cy - half, cy + half] (triangle: apex up).
    Vectorised over the box's pixels via a signed distance; coverage = clip(0.5 - d, 0, 1).
    """
    height, width = canvas.shape[:2]
    x0, x1 = max(0, int(np.floor(cx - half - 1))), min(width, int(np.ceil(cx + half + 1)))
    y0, y1 = max(0, int(np.floor(cy - half - 1))), min(height, int(np.ceil(cy + half + 1)))
    if x1 <= x0 or y1 <= y0:
        return
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]  # (1, w)
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]  # (h, 1)
    if shape == "circle":
        dist = np.sqrt(dx * dx + dy * dy) - half
    elif shape == "square":
        dist = np.maximum(np.abs(dx), np.abs(dy)) - half
    elif shape == "triangle":  # apex (0, -half), base corners (+-half, half)
        slant = (2 * np.abs(dx) - dy - half) / np.sqrt(5.0)
        dist = np.maximum(dy - half, slant)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    alpha = np.clip(0.5 - dist, 0.0, 1.0)[:, :, None]  # (h, w, 1)
    rgb = np.asarray(COLOURS[colour], np.float32)
    if texture == "striped":  # diagonal stripes that move and scale with the object
        period = max(2.0, 0.4 * half)
        dark = (np.floor((dx + dy) / period) % 2 == 1)[:, :, None]  # (h, w, 1)
        fill = np.where(dark, rgb * 0.45, rgb)  # (h, w, 3)
    else:
        fill = rgb
    region = canvas[y0:y1, x0:x1]
    region += alpha * (fill - region)


def render_frames(scene: Scene) -> Iterator[np.ndarray]:
    """Yield the scene's frames, uint8 (H, W, 3) RGB, one per video frame (objects in id order)."""
    halves = [o.halves for o in scene.objects]
    for f in range(scene.num_frames):
        canvas = scene.background.copy()
        for o, h in zip(scene.objects, halves):
            draw_object(canvas, o.shape, o.colour, o.texture, o.centres[f, 0], o.centres[f, 1], h[f])
        yield (np.clip(canvas, 0, 255) + 0.5).astype(np.uint8)


def _place(obj: dict, size: int) -> str:
    boxes = np.asarray(obj["boxes"], np.float64)  # (T, 4)
    on = np.asarray(obj["sounding"], bool)
    cx = ((boxes[:, 0] + boxes[:, 2]) / 2)[on if on.any() else slice(None)].mean()
    return "on the left" if cx < size / 3 else "on the right" if cx >= 2 * size / 3 else "in the centre"


def sounding_seconds(obj: dict) -> float:
    """Total length of an object's segments (ground-truth dict), seconds."""
    return float(sum(end - start for start, end in obj["segments"]))


def caption(objects: Sequence[dict], size: int) -> str:
    """One sentence from the ground-truth object dicts (grammar in the module docstring)."""
    order = sorted(objects, key=lambda o: (-round(sounding_seconds(o), 6), o["id"]))
    clauses = []
    for o in order:
        stripes = "striped " if o["texture"] == "striped" else ""
        act = VERBS[sound_type(o["sound"])] if o["segments"] else "is silent"
        clauses.append(f"a {stripes}{o['colour']} {o['shape']} {_place(o, size)} {act}")
    return clauses[0] + (" while " + " and ".join(clauses[1:]) if len(clauses) > 1 else "")


def ground_truth(scene: Scene) -> dict:
    """The scene's JSON ground truth (format in the module docstring)."""
    objects = []
    for o in scene.objects:
        objects.append({
            "id": o.id, "shape": o.shape, "colour": o.colour, "texture": o.texture, "sound": o.sound,
            "audio": f"{scene.stem}_obj{o.id}.wav",
            "boxes": [[round(float(v), 2) for v in b] for b in o.boxes()],
            "sounding": [bool(s) for s in o.sounding],
            "segments": [[float(s), float(e)] for s, e in o.segments],
        })
    return {
        "version": VERSION, "seed": scene.seed, "index": scene.index, "seconds": scene.seconds,
        "fps": scene.fps, "size": scene.size, "sample_rate": scene.sample_rate,
        "num_frames": scene.num_frames, "video": f"{scene.stem}.mp4",
        "caption": caption(objects, scene.size), "objects": objects,
    }


def write_video(path: str | Path, frames: Iterable[np.ndarray], audio: np.ndarray, *, fps: int,
                sample_rate: int, crf: int = 23, preset: str = "veryfast") -> int:
    """Encode RGB frames uint8 (H, W, 3) and mono audio float32 (S,) into an MP4 with PyAV.

    H.264 (libx264, yuv420p, one thread and no B-frames so reruns are byte-identical) and AAC
    mono, packets interleaved in time. Returns the number of video frames written.
    """
    import av

    audio = np.ascontiguousarray(audio, np.float32)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("write_video needs at least one frame")
    container = av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"})
    try:
        # bframes=0: with B-frames this libx264 (core 165) gave different bytes from run to run on
        # some small frames (64, 96 px; measured) even with one thread; without them it is stable,
        # costs ~10% bytes, and decode order == display order.
        vstream = container.add_stream("libx264", rate=fps, options={
            "crf": str(crf), "preset": preset, "threads": "1", "x264-params": "bframes=0"})
        vstream.height, vstream.width = first.shape[:2]
        vstream.pix_fmt = "yuv420p"
        vstream.codec_context.thread_count = 1
        astream = container.add_stream("aac", rate=sample_rate, layout="mono")
        astream.bit_rate = 64000
        audio_pos, num_frames = 0, 0
        for f, rgb in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = f, Fraction(1, fps)
            container.mux(vstream.encode(frame))
            num_frames += 1
            audio_end = min(audio.size, round((f + 1) * sample_rate / fps))
            while audio_pos + AAC_FRAME <= audio_end:  # audio up to this frame's end, whole AAC frames
                chunk = audio[audio_pos:audio_pos + AAC_FRAME]
                container.mux(astream.encode(_audio_frame(chunk, audio_pos, sample_rate)))
                audio_pos += AAC_FRAME
        while audio_pos < audio.size:  # the rest (the last frame may be short: AAC allows it)
            chunk = audio[audio_pos:audio_pos + AAC_FRAME]
            container.mux(astream.encode(_audio_frame(chunk, audio_pos, sample_rate)))
            audio_pos += chunk.size
        container.mux(vstream.encode(None))
        container.mux(astream.encode(None))
    finally:
        container.close()
    return num_frames


def _audio_frame(chunk: np.ndarray, pts: int, sample_rate: int):
    import av

    frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")  # (1, n)
    frame.sample_rate, frame.pts, frame.time_base = sample_rate, pts, Fraction(1, sample_rate)
    return frame


def write_scene(scene: Scene, out_dir: str | Path) -> dict:
    """Write the scene's WAVs, MP4 and (last, marking completion) JSON into `out_dir`.

    Returns the ground-truth dict.
    """
    out = Path(out_dir)
    gt = ground_truth(scene)
    for o in scene.objects:
        write_wav(out / f"{scene.stem}_obj{o.id}.wav", o.track, scene.sample_rate)
    write_video(out / f"{scene.stem}.mp4", render_frames(scene), scene.mixture(),
                fps=scene.fps, sample_rate=scene.sample_rate)
    (out / f"{scene.stem}.json").write_text(json.dumps(gt) + "\n")
    return gt
