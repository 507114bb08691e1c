"""Per-clip targets from a synthetic scene's ground truth (the `ground_truth` column that
`avray synth`'s manifest carries into every clip row).

The scene gives boxes and sounding flags per *source* frame in *source* pixels; a clip shows
frames sampled at its own fps, resized and cropped (or letterboxed) by the decoder. These
functions map one onto the other with the decoder's own resize plan, so a box drawn on a
stored clip frame covers the same object as in the source video.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.decode import DecodeConfig, frame_mapping


@dataclass(frozen=True)
class ClipTargets:
    boxes: np.ndarray       # float32 (T, K, 4): xyxy in output pixels, clipped to [0, size]
    sounding: np.ndarray    # bool (T, K): object k sounds at sampled frame t
    shapes: list[str]       # K
    colours: list[str]      # K
    sounds: list[str]       # K
    caption: str

    @property
    def dominant(self) -> int:
        """Index of the object sounding in most sampled frames, -1 if none sounds."""
        counts = self.sounding.sum(axis=0)  # (K,)
        return int(np.argmax(counts)) if counts.size and counts.max() > 0 else -1


def source_to_output_boxes(boxes: np.ndarray, src_w: int, src_h: int, cfg: DecodeConfig) -> np.ndarray:
    """Boxes in source pixels (..., 4) xyxy -> the same boxes on the decoder's output frames."""
    sx, sy, ox, oy = frame_mapping(src_w, src_h, cfg)
    scale = np.array([sx, sy, sx, sy], dtype=np.float32)
    shift = np.array([ox, oy, ox, oy], dtype=np.float32)
    return np.clip(boxes * scale + shift, 0, cfg.size).astype(np.float32)


def clip_targets(ground_truth: str | dict[str, Any], start_s: float, num_frames: int,
                 cfg: DecodeConfig) -> ClipTargets:
    """Targets for the clip starting at `start_s` whose frames were sampled with `cfg`.

    Sampled frame j shows source frame floor((start_s + j / cfg.fps) * scene fps), as the
    decoder does for a constant-rate source.
    """
    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    times = start_s + np.arange(num_frames) / cfg.fps  # (T,)
    src = np.clip(np.floor(times * gt["fps"] + 1e-6).astype(int), 0, gt["num_frames"] - 1)  # (T,)
    objs = gt["objects"]
    boxes = np.asarray([o["boxes"] for o in objs], dtype=np.float32)[:, src]  # (K, T, 4)
    sounding = np.asarray([o["sounding"] for o in objs], dtype=bool)[:, src]  # (K, T)
    out = source_to_output_boxes(boxes.transpose(1, 0, 2), gt["size"], gt["size"], cfg)  # (T, K, 4)
    return ClipTargets(boxes=out, sounding=sounding.T.copy(), shapes=[o["shape"] for o in objs],
                       colours=[o["colour"] for o in objs], sounds=[o["sound"] for o in objs],
                       caption=gt["caption"])


def clip_caption(ground_truth: str | dict[str, Any], start_s: float, end_s: float) -> str:
    """The scene grammar's caption for the span [start_s, end_s) only: each object's boxes,
    sounding flags and segments are cut to the frames and times of the clip, so the caption
    names what sounds in the clip (the video-level caption names what sounds longest overall)."""
    from pipelines.synth import caption

    gt = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    lo = min(int(np.floor(start_s * gt["fps"] + 1e-6)), gt["num_frames"] - 1)
    hi = max(lo + 1, min(int(np.ceil(end_s * gt["fps"] - 1e-6)), gt["num_frames"]))
    objs = []
    for o in gt["objects"]:
        segs = [[max(a, start_s), min(b, end_s)] for a, b in o["segments"] if min(b, end_s) > max(a, start_s)]
        objs.append({**o, "boxes": o["boxes"][lo:hi], "sounding": o["sounding"][lo:hi], "segments": segs})
    return caption(objs, gt["size"])


def scene_of(ground_truth: str | dict[str, Any], parsed: dict[str, Any]) -> dict[str, Any]:
    """A clip row's scene ground truth as a dict, its JSON parsed once per `parsed` cache (every
    clip of a scene carries the same JSON: a batch parses it once)."""
    if not isinstance(ground_truth, str):
        return ground_truth
    if ground_truth not in parsed:
        parsed[ground_truth] = json.loads(ground_truth)
    return parsed[ground_truth]


def clip_captions_or_none(batch: dict[str, Any]) -> list[str | None]:
    """Caption of each clip row: from the scene ground truth for the clip's own span when the row
    has one (synthetic scenes), else the carried `caption` column (e.g. a dataset manifest), else None."""
    gts = batch.get("ground_truth")
    caps = batch.get("caption")
    parsed: dict[str, Any] = {}
    out: list[str | None] = []
    for i in range(len(batch["video_id"])):
        if gts is not None and gts[i] is not None:
            gt = scene_of(gts[i], parsed)
            out.append(clip_caption(gt, float(batch["start_s"][i]), float(batch["end_s"][i])))
        else:
            out.append(str(caps[i]) if caps is not None and caps[i] is not None else None)
    return out


def clip_captions(batch: dict[str, Any]) -> list[str]:
    """`clip_captions_or_none`, for training targets: a clip without a caption is a ValueError."""
    out = clip_captions_or_none(batch)
    for vid, c in zip(batch["video_id"], out):
        if c is None:
            raise ValueError(f"clip of video {vid} has neither ground_truth nor caption")
    return out
