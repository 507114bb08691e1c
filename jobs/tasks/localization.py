"""Sound source localization (Senocak et al. / EZ-VSL): where in the picture does the sound come from?

Training and evaluation localize each clip's middle frame against the sound around it; the
served route localizes every sampled frame of an upload the same way (`prepare(every_frame=True)`).
Synthetic scenes carry their ground truth per clip row (`ground_truth` column, from `avray
synth`'s manifest): the boxes of the objects sounding in a frame, mapped onto the stored frames
with the decoder's own resize plan (crop or letterbox), are the training and evaluation targets.
Dataset benchmarks (VGG-SS, Flickr-SoundNet; `avray manifest`) carry a `gt_boxes` column
instead (pipelines/datasets.py): normalised source-frame boxes of one annotated frame, mapped the
same way, as a consensus map min(1, boxes covering a pixel / votes), scored by the same cIoU/AUC.
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from jobs.tasks.base import Answer, Option, Route, Task, channels_first, chunked, joined, save_figure, to_model
from models.localization import (PRESETS, LocalizationConfig, SoundLocalizer, audio_window, heatmap,
                                 localization_loss)
from models.metrics import auc_success, ciou, ciou_at
from pipelines.clipsettings import ClipSettings
from pipelines.decode import DecodeConfig, frame_mapping
from pipelines.groundtruth import clip_targets, source_to_output_boxes
from pipelines.schema import decode_clip_batch


class Localization(Task):
    name = "localization"
    config, model, presets = LocalizationConfig, SoundLocalizer, PRESETS
    # cosine decay to 0 let the tiny model lean on the picture (BENCHMARKS.md, quality notes)
    lr_schedule = "constant"
    columns = ("video_id", "start_s", "fps", "frames", "frames_shape", "logmel", "logmel_shape", "ground_truth",
               "gt_boxes", "src_width", "src_height", "resize")
    deployment = "Localizer"
    route = Route(
        "/v1/localize", upload="video with sound",
        summary="Where the sound comes from: per sampled frame, a heatmap grid in [0, 1] and its peak, in "
                "source pixels; `view` is the part of the source that the model sees.",
        options=(Option("overlay", str | None, None, "png: heatmaps over frames as an animated PNG",
                        checks={"pattern": "^png$"}),))

    def prepare(self, batch: dict[str, Any], cfg: LocalizationConfig, every_frame: bool = False) -> dict[str, np.ndarray]:
        """-> frame uint8 (R, 3, H, W), logmel float (R, M, n): the `cfg.audio_window_s` seconds
        of the clip's log-mel around the frame (`audio_window`), box_mask bool (R, H, W): the union
        of the boxes of the objects sounding in that frame, has_box bool (R,). R = B: each clip's
        middle frame; with `every_frame`, R = B·T: every frame, clip by clip. Clips of one batch
        must have the same number of frames."""
        lengths = {int(s[0]) for s in batch["frames_shape"]}
        if len(lengths) != 1:
            raise ValueError(f"clips of one batch have different frame counts: {sorted(lengths)}")
        T = lengths.pop()
        ts = list(range(T)) if every_frame else [T // 2]
        b = decode_clip_batch(batch, frames=slice(ts[0], ts[-1] + 1))  # only these frames are copied
        B, n, H, W = b["frames"].shape[:4]  # (B, n, H, W, 3)
        boxes = b.get("gt_boxes")
        boxed = boxes is not None and any(x is not None for x in boxes)
        masks = np.zeros((B, n, H, W), np.float32 if boxed else bool)  # float: a consensus map in [0, 1]
        has_box = np.zeros((B, n), bool)
        gts = b.get("ground_truth")
        fitted = b.get("resize")  # how each clip's frames were fitted (clips made before the column: crop)
        for i in range(B):
            dcfg = DecodeConfig(fps=float(b["fps"][i]), size=H,
                                resize="crop" if fitted is None or fitted[i] is None else str(fitted[i]))
            if (gts is None or gts[i] is None) and boxed and boxes[i] is not None:
                m = box_mask(boxes[i], float(b["start_s"][i]), T / float(b["fps"][i]), int(b["src_width"][i]),
                             int(b["src_height"][i]), dcfg)
                if m is not None:
                    masks[i, :] = m
                    has_box[i, :] = True
                continue
            if gts is None or gts[i] is None:
                continue
            t = clip_targets(gts[i], float(b["start_s"][i]), T, dcfg)
            for j, f in enumerate(ts):
                for k in np.flatnonzero(t.sounding[f]):
                    x0, y0, x1, y1 = t.boxes[f, k]
                    masks[i, j, int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
                has_box[i, j] = bool(t.sounding[f].any())
        mel = torch.from_numpy(np.ascontiguousarray(b["logmel"])).repeat_interleave(n, dim=0)  # (B·n, M, N)
        centres = torch.from_numpy(np.tile((np.asarray(ts) + 0.5) / T, B))  # (B·n,): each frame's time in the clip
        heard = audio_window(mel, centres, cfg.audio_window_s, torch.from_numpy(np.repeat(T / b["fps"].astype(np.float64), n)))
        return {"frame": channels_first(b["frames"]).reshape(B * n, 3, H, W),  # (B·n, 3, H, W)
                "logmel": heard.numpy(), "box_mask": masks.reshape(B * n, H, W), "has_box": has_box.reshape(B * n)}

    def step(self, model, batch, cfg, gen=None) -> dict[str, torch.Tensor]:
        out = model(batch["frame"], batch["logmel"])
        grid_hw = out["attention"].shape[-2:]
        cell_masks = F.adaptive_avg_pool2d(batch["box_mask"][:, None].float(), grid_hw)[:, 0]  # (B, h, w)
        return localization_loss(out, cfg, cell_masks, batch["has_box"])

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, torch.Tensor]], cfg) -> dict[str, float]:
        """cIoU@0.5 and AUC against the sounding objects' boxes, with the clip's own audio, with
        another clip's audio (batch rolled by half its size) and with silence. `ciou50_*` / `auc_*`:
        Senocak's rule (the localization map `heatmap`, min-max normalised, > 0.5); `*_lvs`: the
        LVS/EZ-VSL rule (the same map > its median); `*_attention`: Senocak's rule on the softmax
        attention map (sharper by 1 / temperature). See models/metrics.py."""
        rules = {"": ("sim", "value"), "_lvs": ("sim", "quantile"), "_attention": ("attention", "value")}
        scores: dict[tuple[str, str], list[torch.Tensor]] = {
            (name, suffix): [] for name in ("own", "other", "silent") for suffix in rules}
        for batch in batches:
            keep = batch["has_box"]
            if not keep.any():
                continue
            frame, mel, gt = batch["frame"][keep], batch["logmel"][keep], batch["box_mask"][keep]
            silence = torch.full_like(mel, float(mel.min()))
            # another clip's audio: half a batch away (clips of one video are adjacent in the files)
            variants = {"own": mel, "other": mel.roll(max(1, len(mel) // 2), dims=0), "silent": silence}
            if len(mel) < 2:
                variants.pop("other")
            for name, m in variants.items():
                out = model(frame, m)
                for suffix, (source, rule) in rules.items():
                    scores[(name, suffix)].append(ciou(heatmap(out, frame.shape[-2:], source), gt, 0.5, binarize=rule))
        res: dict[str, float] = {}
        for (name, suffix), parts in scores.items():
            if parts:
                c = torch.cat(parts)
                res[f"ciou50_{name}_audio{suffix}"] = ciou_at(c, 0.5)
                res[f"auc_{name}_audio{suffix}"] = auc_success(c)
        res["clips_with_box"] = float(sum(len(p) for p in scores[("own", "")]))
        return res

    @torch.no_grad()
    def figure(self, model, batch: dict[str, torch.Tensor], cfg, path: str, n: int = 4) -> None:
        """Frames with the heatmap for the clip's own audio and for silence; the sounding boxes outlined."""
        import matplotlib.pyplot as plt

        keep = torch.nonzero(batch["has_box"]).flatten()[:n]
        if len(keep) == 0:
            keep = torch.arange(min(n, len(batch["frame"])))
        frame, mel, box = batch["frame"][keep], batch["logmel"][keep], batch["box_mask"][keep]
        maps = {"own audio": heatmap(model(frame, mel), frame.shape[-2:]),
                "silence": heatmap(model(frame, torch.full_like(mel, float(mel.min()))), frame.shape[-2:])}
        fig, axes = plt.subplots(len(keep), 2, figsize=(6, 3 * len(keep)), squeeze=False)
        for i in range(len(keep)):
            for j, (name, m) in enumerate(maps.items()):
                ax = axes[i, j]
                ax.imshow(frame[i].permute(1, 2, 0).cpu().numpy())
                ax.imshow(m[i].cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
                if box[i].any():
                    ax.contour(box[i].float().cpu().numpy(), levels=[0.5], colors="white", linewidths=1)
                ax.set_title(name, fontsize=9)
                ax.axis("off")
        save_figure(fig, path)

    def headline(self, metrics: dict[str, float]) -> str:
        if "ciou50_own_audio" not in metrics:
            return "no clip with a sounding object to score"
        return (f"cIoU@0.5 {metrics['ciou50_own_audio']:.2f} with the clip's sound, {metrics['ciou50_silent_audio']:.2f} "
                f"with silence ({int(metrics['clips_with_box'])} clips with a sounding object)")

    # -- serving ----------------------------------------------------------------------------

    def request(self, rows, cfg, settings: ClipSettings, options):
        """Item: frame uint8 (C·T, 3, H, W), logmel (C·T, M, n): every sampled frame with the sound
        around it, as `prepare` gives training its middle frames. Meta: `mapping` (frame pixels
        -> source pixels, for the upload's resize mode), and the frames when an overlay is asked for."""
        x = self.prepare(rows, cfg, every_frame=True)
        w, h = int(rows["src_width"][0]), int(rows["src_height"][0])
        meta: dict[str, Any] = {"mapping": frame_mapping(w, h, settings.decode_config()), "size": settings.size}
        if options.get("overlay") == "png":
            meta["frames"] = np.moveaxis(x["frame"], 1, -1)  # (C·T, H, W, 3)
        return {"frame": x["frame"], "logmel": x["logmel"]}, meta

    @torch.no_grad()
    def infer(self, model, items, device):
        """Result per item: grid float32 (C·T, h, w), the audio-visual similarity per cell min-max
        normalised per frame; peak (C·T, 2): (x, y) frame pixel of the heatmap's maximum at frame
        resolution."""
        def run(frame: torch.Tensor, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = to_model({"frame": frame.to(device), "logmel": mel.to(device)})
            out = model(x["frame"], x["logmel"])
            sim = out["sim"]  # (n, h, w)
            lo, hi = sim.amin(dim=(1, 2), keepdim=True), sim.amax(dim=(1, 2), keepdim=True)
            full = heatmap(out, x["frame"].shape[-2:])  # (n, H, W)
            flat = full.flatten(1).argmax(dim=1)  # (n,)
            W = full.shape[-1]
            return (sim - lo) / (hi - lo).clamp_min(1e-12), torch.stack([flat % W, flat // W], dim=1)  # (n, h, w), (n, 2)

        frame, counts = joined(items, "frame")  # uint8 (n, 3, H, W)
        mel, _ = joined(items, "logmel")  # (n, M, n')
        grid, peak = chunked(run, self.max_rows, frame, mel)
        return [{"grid": g.cpu().numpy(), "peak": p.cpu().numpy()} for g, p in zip(grid.split(counts), peak.split(counts))]

    def answer(self, result, meta, options) -> Answer:
        if options.get("overlay") == "png":
            return Answer(overlay_png(meta["frames"], result["grid"], meta["fps"]), "image/png")
        sx, sy, ox, oy = meta["mapping"]
        W, H = meta["source"]["width"], meta["source"]["height"]

        def src(u: float, v: float) -> dict[str, float]:  # frame pixel -> source pixel, inside the source
            return {"x": round(min(max((u - ox) / sx, 0.0), W), 1), "y": round(min(max((v - oy) / sy, 0.0), H), 1)}

        lo, hi = src(0, 0), src(meta["size"], meta["size"])
        times = [s + j / meta["fps"] for s in meta["starts"] for j in range(meta["frames_per_clip"])]
        return Answer({
            "fps": meta["fps"], "frames_sampled": len(times), "grid": list(result["grid"].shape[1:]),
            "source": meta["source"], "view": {"x0": lo["x"], "y0": lo["y"], "x1": hi["x"], "y1": hi["y"]},
            "frames": [{"t": round(t, 4), "heatmap": np.round(g.astype(np.float64), 3).tolist(),
                        "peak": src(float(p[0]) + 0.5, float(p[1]) + 0.5)}
                       for t, g, p in zip(times, result["grid"], result["peak"])]})


def box_mask(gt_boxes: str | dict[str, Any], start_s: float, seconds: float, src_w: int, src_h: int,
             cfg: DecodeConfig) -> np.ndarray | None:
    """A dataset's box ground truth (`gt_boxes`, pipelines/datasets.py: normalised xyxy boxes on
    the displayed source frame, `votes`, `time_s`) on the decoder's output frames: float32
    (size, size), min(1, number of boxes covering the pixel / votes). None when the clip
    [start_s, start_s + seconds) does not show the annotated time (`time_s` null: every clip)."""
    gt = json.loads(gt_boxes) if isinstance(gt_boxes, str) else gt_boxes
    t = gt.get("time_s")
    if t is not None and not start_s <= float(t) < start_s + seconds:
        return None
    norm = np.asarray(gt["boxes"], dtype=np.float32).reshape(-1, 4)  # (K, 4) in [0, 1]
    px = source_to_output_boxes(norm * np.array([src_w, src_h, src_w, src_h], np.float32), src_w, src_h, cfg)  # (K, 4)
    count = np.zeros((cfg.size, cfg.size), np.float32)
    for x0, y0, x1, y1 in px:
        count[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] += 1.0
    return np.minimum(count / float(gt.get("votes", 1)), 1.0)


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


TASK = Localization()
