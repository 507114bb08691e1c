"""SoundNet: a visual teacher teaches an audio student to name what sounds, without audio labels.

Classes. On synthetic scenes, the 12 object kinds (colour, shape) of `SOUND_TABLE`; a clip's
label is the kind of its dominant sounding object (`ClipTargets.dominant`: the object sounding
in most of the clip's sampled frames). A clip where nothing sounds, or without ground truth (real
video), has label -1: it is left out of every cross-entropy and every accuracy (a "silence"
class would be a 13th kind that no teacher can see), but the distilled student still trains on
it, since distillation reads no label at all. With a torchvision ImageNet teacher the classes
are its 1,000 categories and the clips carry no label: only the student-teacher agreement scores.

Three runs of `avray train --task soundnet` (models/soundnet.py):

1. `--preset tiny-teacher`: the visual teacher, trained with the labels on frames;
2. `--preset tiny --teacher-weights RUN1/model.pt`: the student on audio, KL to the frozen
   teacher's softened distribution (the model holds the teacher; only the student serves);
3. `--preset tiny-supervised`: the same student trained with the labels: the upper bound.

`evaluate` scores every mode on labelled clips; for a student also a linear probe of its
frozen features (a logistic regression fitted on the clips of half the videos, by video id,
scored on the other half). The served route classifies an upload's sound, clip by clip.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from jobs.tasks.base import Answer, Route, Task, channels_first, chunked, joined, save_figure, to_model
from models.soundnet import PRESETS, SoundNet, SoundNetConfig, linear_probe, soundnet_loss, teacher_log_probs
from pipelines.clipsettings import ClipSettings
from pipelines.decode import DecodeConfig
from pipelines.groundtruth import clip_targets
from pipelines.schema import decode_clip_batch

TOP = 5  # classes per answer


def clip_labels(batch: dict[str, Any], classes: tuple[str, ...]) -> np.ndarray:
    """int64 (B,): the index in `classes` of each clip's dominant sounding object's kind
    ("<colour> <shape>"), -1 where nothing sounds, the kind is not a class, or there is no ground truth."""
    gts = batch.get("ground_truth")
    index = {c: i for i, c in enumerate(classes)}
    out = np.full(len(batch["video_id"]), -1, np.int64)
    parsed: dict[str, Any] = {}  # every clip of a scene carries its JSON: parse it once per batch
    for i in range(len(out)):
        if gts is None or gts[i] is None:
            continue
        gt = gts[i]
        if isinstance(gt, str):
            gt = parsed.setdefault(gt, json.loads(gt))
        T = int(batch["frames_shape"][i][0])
        t = clip_targets(gt, float(batch["start_s"][i]), T, DecodeConfig(fps=float(batch["fps"][i]), size=gt["size"]))
        k = t.dominant
        if k >= 0:
            out[i] = index.get(f"{t.colours[k]} {t.shapes[k]}", -1)
    return out


def video_groups(video_ids: Any) -> np.ndarray:
    """int64 (B,): the first 8 hex digits of each video id (the linear probe splits by them)."""
    return np.asarray([int(str(v)[:8], 16) for v in video_ids], np.int64)


class SoundNetTask(Task):
    name = "soundnet"
    config, model, presets = SoundNetConfig, SoundNet, PRESETS
    columns = ("video_id", "start_s", "fps", "frames", "frames_shape", "logmel", "logmel_shape", "ground_truth")
    deployment = "SoundClassifier"
    route = Route(
        "/v1/classify-sound", upload="sound (wav, mp3, ...) or video with sound", audio_ok=True,
        summary="What sounds: the top-5 classes of the upload's sound alone (the audio student), overall "
                "(the clips' mean distribution) and per clip; the pictures are not looked at.")

    def prepare(self, batch: dict[str, Any], cfg: SoundNetConfig, targets: bool = True,
                sound_only: bool = False) -> dict[str, np.ndarray]:
        """-> logmel float (B, M, N) (modes distill, supervised), frames uint8 (B, T', 3, H, W) (modes
        teacher, distill, unless `sound_only`: every teacher.frame_stride-th frame, T' = ceil(T / stride))
        and, with `targets`, label int64 (B,) (`clip_labels`) and group int64 (B,) (`video_groups`).
        Only the columns used are decoded."""
        media = {"logmel": cfg.uses_audio, "frames": cfg.uses_frames and not sound_only}
        keep = {k: v for k, v in batch.items()
                if not any(k in (m, f"{m}_shape") for m, used in media.items() if not used)}
        b = decode_clip_batch(keep, frames=slice(None, None, cfg.teacher.frame_stride))
        out: dict[str, np.ndarray] = {}
        if cfg.uses_audio:
            out["logmel"] = np.ascontiguousarray(b["logmel"])
        if media["frames"]:
            out["frames"] = channels_first(b["frames"])
        if targets:
            out["label"] = clip_labels(batch, cfg.classes)
            out["group"] = video_groups(batch["video_id"])
        return out

    def step(self, model, batch, cfg, gen=None) -> dict[str, torch.Tensor]:
        return soundnet_loss(model, batch, cfg)

    @torch.no_grad()
    def outputs(self, model, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Over all clips: label, group (N,), and what the model has: teacher / student log-probs
        (N, C) at τ = 1, student features (N, D)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in batches:
            got = {"label": batch["label"], "group": batch["group"]}
            if model.teacher is not None:
                got["teacher"] = teacher_log_probs(model.teacher_logits(batch["frames"]))
            if model.student is not None:
                feats = model.features(batch["logmel"])
                got["features"], got["student"] = feats.float(), F.log_softmax(model.head(feats).float(), dim=-1)
            for k, v in got.items():
                parts.setdefault(k, []).append(v.cpu())
        return {k: torch.cat(v) for k, v in parts.items()}

    def evaluate(self, model, batches: Iterable[dict[str, torch.Tensor]], cfg) -> dict[str, float]:
        """On the labelled clips (label >= 0): `teacher_acc` (from frames), `student_acc` and
        `student_top5_acc` (from sound alone), `chance` (1 / classes) and `prior_acc` (always the most
        frequent label); on all clips `agreement` (student top-1 == teacher top-1) and `kl_teacher_student`
        (τ = 1); `probe_acc`: a linear probe of the student's features fitted on the labelled clips of
        the videos whose group is even, scored on the others (`probe_clips` of them)."""
        o = self.outputs(model, batches)
        n = len(o.get("label", ()))
        labelled = o["label"] >= 0 if n else torch.zeros(0, dtype=torch.bool)
        res = {"clips": float(n), "labelled_clips": float(labelled.sum()), "chance": 1.0 / len(cfg.classes)}
        if n and "teacher" in o and "student" in o:  # every clip: an ImageNet teacher's real video has no labels
            res["agreement"] = float((o["student"].argmax(1) == o["teacher"].argmax(1)).float().mean())
            res["kl_teacher_student"] = float(F.kl_div(o["student"], o["teacher"], reduction="batchmean", log_target=True))
        if not labelled.any():
            return res
        y = o["label"][labelled]
        res["prior_acc"] = float(torch.bincount(y).max()) / len(y)
        if "teacher" in o:
            res["teacher_acc"] = float((o["teacher"][labelled].argmax(1) == y).float().mean())
        if "student" in o:
            s = o["student"][labelled]
            res["student_acc"] = float((s.argmax(1) == y).float().mean())
            res["student_top5_acc"] = float((s.topk(min(TOP, s.shape[1]), dim=1).indices == y[:, None]).any(1).float().mean())
            fit = (o["group"][labelled] % 2) == 0
            if fit.any() and (~fit).any():
                x = o["features"][labelled]
                res["probe_acc"] = linear_probe(x[fit], y[fit], x[~fit], y[~fit], len(cfg.classes))
                res["probe_clips"] = float((~fit).sum())
        return res

    def headline(self, metrics: dict[str, float]) -> str:
        if "student_acc" in metrics:
            return (f"names the sounding object from sound alone in {metrics['student_acc']:.0%} of clips "
                    f"(chance {metrics['chance']:.0%}; linear probe {metrics.get('probe_acc', float('nan')):.0%}; "
                    f"{int(metrics['labelled_clips'])} labelled clips)")
        if "teacher_acc" in metrics:
            return (f"visual teacher: names the sounding object from frames in {metrics['teacher_acc']:.0%} of clips "
                    f"(chance {metrics['chance']:.0%}; {int(metrics['labelled_clips'])} labelled clips)")
        if "agreement" in metrics:  # no labels (real video and an ImageNet teacher): only agreement
            return (f"agrees with its visual teacher on {metrics['agreement']:.0%} of clips "
                    f"(KL {metrics['kl_teacher_student']:.2f}; {int(metrics['clips'])} clips, none labelled)")
        return f"too few clips to score ({int(metrics.get('labelled_clips', 0))})"

    @torch.no_grad()
    def figure(self, model, batch: dict[str, torch.Tensor], cfg, path: str, n: int = 4) -> None:
        """Per clip: the log-mel (or the middle frame for a teacher) and the class distributions
        of the teacher and the student beside the label."""
        import matplotlib.pyplot as plt

        n = min(n, len(batch["label"]))
        o = self.outputs(model, [{k: v[:n] for k, v in batch.items()}])
        names = list(cfg.classes)
        show = len(names) <= 40  # ImageNet's 1,000 classes: the 5 most likely instead
        fig, axes = plt.subplots(n, 2, figsize=(10, 2.6 * n), squeeze=False)
        for i in range(n):
            label = int(o["label"][i])
            a = axes[i, 0]
            if "logmel" in batch:
                a.imshow(batch["logmel"][i].float().cpu().numpy(), origin="lower", aspect="auto", cmap="magma")
            else:
                a.imshow(batch["frames"][i, batch["frames"].shape[1] // 2].permute(1, 2, 0).cpu().numpy())
            a.set_title(f"label: {names[label] if label >= 0 else 'none'}", fontsize=8)
            a.axis("off")
            b = axes[i, 1]
            for key, off in (("teacher", -0.2), ("student", 0.2)):
                if key in o:
                    p = o[key][i].exp().numpy()
                    idx = np.arange(len(names)) if show else np.argsort(-p)[:TOP]
                    b.bar(np.arange(len(idx)) + off, p[idx], width=0.4, label=key)
                    if not show:
                        b.set_xticks(np.arange(len(idx)), [names[j][:14] for j in idx], fontsize=6, rotation=30)
            if show:
                b.set_xticks(np.arange(len(names)), names, fontsize=6, rotation=45, ha="right")
                if label >= 0:
                    b.axvline(label, color="black", linewidth=0.8, linestyle="--")
            b.set_ylim(0, 1)
            b.legend(fontsize=7)
        save_figure(fig, path)

    # -- serving ----------------------------------------------------------------------------

    def request(self, rows, cfg, settings: ClipSettings, options):
        """Item: logmel (C, M, N) of the upload's clips (its pictures are not decoded)."""
        if not cfg.uses_audio:
            raise ValueError("a soundnet teacher checkpoint (mode 'teacher') has no audio student to serve")
        return {"logmel": self.prepare(rows, cfg, targets=False, sound_only=True)["logmel"]}, {"classes": cfg.classes}

    @torch.no_grad()
    def infer(self, model, items, device):
        """Result per item: class probabilities float32 (C, classes) of each clip, from its sound."""
        mel, counts = joined(items, "logmel")  # (n, M, N)
        probs = chunked(lambda m: model(to_model({"logmel": m.to(device)})["logmel"]).float().softmax(-1).cpu(),
                        self.max_rows, mel)
        return [p.numpy() for p in probs.split(counts)]

    def answer(self, result, meta, options) -> Answer:
        classes = meta["classes"]

        def top(p: np.ndarray) -> list[dict[str, Any]]:
            order = np.argsort(-p, kind="stable")[:TOP]
            return [{"class": classes[j], "probability": round(float(p[j]), 4)} for j in order]

        span = meta["frames_per_clip"] / meta["fps"]
        return Answer({"top5": top(result.mean(axis=0)),
                       "clips": [{"start_s": s, "end_s": s + span, "top5": top(p)}
                                 for s, p in zip(meta["starts"], result)]})


TASK = SoundNetTask()
