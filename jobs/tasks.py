"""What each training task does with a batch of clip rows (plain PyTorch; used inside Ray Train
workers by jobs/train.py, by jobs/evaluate.py and by benchmarks). A plain dict, TASKS, maps
task names to them.

A task adapter has:
- `model`: the model name in models.checkpoint.BUILDERS; `configs`: preset name -> config;
- `columns`: the clip-table columns it reads (others are never loaded);
- `prepare(batch)`: numpy batch of clip rows (as Ray Data gives it) -> dict of numpy arrays
  the model reads. The CPU work (decoding the tensor blobs, ground-truth masks, resizing,
  tokenising) happens here; `avray train` runs it in Ray Data tasks (`map_batches`), off the
  training worker. Images stay uint8, channels first: they travel as bytes and become floats
  on the training device (`to_model`);
- `collate(batch)`: prepare + tensors + `to_model` in one process (evaluation, benchmarks);
- `step(model, batch, cfg, gen)`: forward + loss dict {"loss": scalar, ...};
- `evaluate(model, batches, cfg)`: validation metrics over an iterable of collated batches;
- `figure(model, batch, cfg, path, n)`: a PNG of n examples from one collated batch.

Synthetic scenes carry their ground truth per clip row (`ground_truth` column, from
`avray synth`'s manifest); boxes are mapped onto the stored frames with the decoder's resize
plan, which for square scenes is the same in crop and letterbox mode.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from models.caption_metrics import bleu4, cider, sounding_object_accuracy
from models.captioning import PAD, PRESETS as CAP_PRESETS, caption_loss, decode, encode_batch
from models.localization import PRESETS as LOC_PRESETS, audio_window, heatmap, localization_loss
from models.metrics import auc_success, ciou, ciou_at
from models.separation import PRESETS as SEP_PRESETS, mix_and_separate_batch, separation_loss
from models.separation_metrics import audible, si_sdr_improvement, sdr_improvement
from pipelines.decode import DecodeConfig
from pipelines.groundtruth import clip_caption, clip_targets
from pipelines.schema import decode_clip_batch


def _channels_first(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> uint8 (..., 3, H, W), contiguous."""
    return np.ascontiguousarray(np.moveaxis(frames, -1, -3))


def to_model(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prepared batch as the model takes it: uint8 tensors (images) become float in [0, 1],
    the rest is unchanged. Run after moving the batch to its device (images move as bytes)."""
    return {k: v.float().div_(255.0) if v.dtype == torch.uint8 else v for k, v in batch.items()}


def as_tensors(prepared: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A prepared numpy batch as tensors (no copy), as `iter_torch_batches` gives it."""
    return {k: torch.from_numpy(v) for k, v in prepared.items()}


class Task:
    """The shared part of the task adapters: `collate` = the subclass's `prepare`, `as_tensors`,
    `to_model`; `lr_schedule`, avray train's default --lr-schedule for the task."""

    lr_schedule = "cosine"

    def collate(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """numpy batch of clip rows -> the model's tensors, in this process."""
        return to_model(as_tensors(self.prepare(batch)))


def _log_spec(x: torch.Tensor) -> np.ndarray:
    from pipelines.spectrogram import SpectrogramConfig, stft
    return (20 * torch.log10(stft(x.float().cpu(), SpectrogramConfig()).abs() + 1e-5)).numpy()  # (F, N) dB


class LocalizationTask(Task):
    """Senocak et al. / EZ-VSL: the middle frame of each clip against the clip's log-mel."""

    model = "localization"
    configs = LOC_PRESETS
    # cosine decay to 0 let the tiny model lean on the picture: cIoU@0.5 with silenced audio 0.545
    # (own audio 0.836) against 0.174 (own 0.798) at a constant rate (BENCHMARKS.md, quality)
    lr_schedule = "constant"
    columns = ["video_id", "start_s", "fps", "frames", "frames_shape", "logmel", "logmel_shape", "ground_truth"]

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """-> frame uint8 (B, 3, H, W) (the clip's middle frame), logmel float (B, M, N), box_mask
        bool (B, H, W) (union of the boxes of the objects sounding in that frame), has_box bool
        (B,), frame_centre float (B,) (the frame's time as a fraction of the clip) and
        clip_seconds float (B,). Clips of one batch must have the same number of frames."""
        lengths = {int(s[0]) for s in batch["frames_shape"]}
        if len(lengths) != 1:
            raise ValueError(f"clips of one batch have different frame counts: {sorted(lengths)}")
        T = lengths.pop()
        mid = T // 2
        b = decode_clip_batch(batch, frames=mid)  # only the middle frame of each clip is copied
        B, H, W = b["frames"].shape[:3]
        masks = np.zeros((B, H, W), bool)
        has_box = np.zeros(B, bool)
        gts = b.get("ground_truth")
        for i in range(B):
            if gts is None or gts[i] is None:
                continue
            cfg = DecodeConfig(fps=float(b["fps"][i]), size=H)
            t = clip_targets(gts[i], float(b["start_s"][i]), T, cfg)
            for k in np.flatnonzero(t.sounding[mid]):
                x0, y0, x1, y1 = t.boxes[mid, k]
                masks[i, int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
            has_box[i] = bool(t.sounding[mid].any())
        return {"frame": _channels_first(b["frames"]), "logmel": np.ascontiguousarray(b["logmel"]),
                "box_mask": masks, "has_box": has_box, "frame_centre": np.full(B, (mid + 0.5) / T, np.float32),
                "clip_seconds": (T / b["fps"].astype(np.float64)).astype(np.float32)}

    @staticmethod
    def mel(batch: dict[str, torch.Tensor], cfg) -> torch.Tensor:
        """The log-mel the model hears for the batch's frame: `cfg.audio_window_s` around it."""
        return audio_window(batch["logmel"], batch["frame_centre"], cfg.audio_window_s, batch["clip_seconds"])

    def step(self, model, batch, cfg, gen=None) -> dict[str, torch.Tensor]:
        out = model(batch["frame"], self.mel(batch, cfg))
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
            frame, mel, gt = batch["frame"][keep], self.mel(batch, cfg)[keep], batch["box_mask"][keep]
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
        frame, mel, box = batch["frame"][keep], self.mel(batch, cfg)[keep], batch["box_mask"][keep]
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
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


class SeparationTask(Task):
    """Looking to Listen, trained by mix-and-separate: K clips' soundtracks are summed and each
    clip's own frames must pull its own soundtrack out (audio-only: PIT, frames unused)."""

    model = "separation"
    # at the tiny preset's short horizon a cosine decay to 0 slowed it: 4.1 dB SI-SDRi after 1,750
    # steps of batch 8 against 5.0 at a constant rate (BENCHMARKS.md, quality notes)
    lr_schedule = "constant"
    configs = {**SEP_PRESETS, **{f"{k}-audio-only": replace(v, audio_only=True) for k, v in SEP_PRESETS.items()}}
    columns = ["video_id", "frames", "frames_shape", "audio", "audio_shape", "has_audio"]
    face_size = 48  # frames are downsampled to this side for the visual stream

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """-> audio float (B, S), faces uint8 (B, T, 3, s, s): every frame area-downsampled to
        s = face_size."""
        b = decode_clip_batch(batch)
        frames = torch.from_numpy(_channels_first(b["frames"]))  # uint8 (B, T, 3, H, W)
        B, T = frames.shape[:2]
        faces = F.interpolate(frames.flatten(0, 1).float(), size=(self.face_size, self.face_size), mode="area")
        faces = faces.round_().to(torch.uint8).reshape(B, T, 3, self.face_size, self.face_size)
        return {"audio": np.ascontiguousarray(b["audio"]), "faces": faces.numpy()}

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

    @torch.no_grad()
    def figure(self, model, batch: dict[str, torch.Tensor], cfg, path: str, n: int = 2) -> None:
        """Log spectrograms of mixture, estimate and reference for each speaker of n mixtures."""
        import matplotlib.pyplot as plt

        mixture, sources, faces = self._mix(batch, cfg, torch.Generator().manual_seed(0))
        mixture, sources, faces = mixture[:n], sources[:n], faces[:n]
        est = model(mixture, None if cfg.audio_only else faces)["waveforms"]
        K = sources.shape[1]
        fig, axes = plt.subplots(len(mixture), 1 + 2 * K, figsize=(3 * (1 + 2 * K), 2.6 * len(mixture)), squeeze=False)
        for i in range(len(mixture)):
            panels = [("mixture", mixture[i])] + [p for k in range(K) for p in
                                                 ((f"estimate {k}", est[i, k]), (f"reference {k}", sources[i, k]))]
            for ax, (name, wave) in zip(axes[i], panels):
                ax.imshow(_log_spec(wave), origin="lower", aspect="auto", cmap="magma", vmin=-100, vmax=0)
                ax.set_title(name, fontsize=9)
                ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


def clip_captions(batch: dict[str, Any]) -> list[str]:
    """Target caption of each clip row: from the scene ground truth for the clip's own span when
    the row has one (synthetic scenes), else the carried `caption` column (e.g. a dataset manifest)."""
    gts = batch.get("ground_truth")
    caps = batch.get("caption")
    out = []
    for i in range(len(batch["video_id"])):
        if gts is not None and gts[i] is not None:
            out.append(clip_caption(gts[i], float(batch["start_s"][i]), float(batch["end_s"][i])))
        elif caps is not None and caps[i] is not None:
            out.append(str(caps[i]))
        else:
            raise ValueError(f"clip of video {batch['video_id'][i]} has neither ground_truth nor caption")
    return out


class CaptioningTask(Task):
    """Show, Attend and Tell over a clip's frames (temporal + spatial attention) with its audio.
    Presets are functions of the vocabulary, which train.run builds from the training captions."""

    model = "captioning"
    configs = CAP_PRESETS
    columns = ["video_id", "start_s", "end_s", "frames", "frames_shape", "logmel", "logmel_shape",
               "ground_truth", "caption"]

    def __init__(self, vocab: tuple[str, ...] = (), max_len: int = 24) -> None:
        self.vocab, self.max_len = vocab, max_len

    def prepare(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """-> frames uint8 (B, T, 3, H, W), logmel float (B, M, N), tokens int64 (B, max_len):
        <bos> ... <eos> <pad>... Every row is max_len wide, so that rows prepared in different
        Ray Data tasks make one batch (a shuffled batch mixes them)."""
        b = decode_clip_batch(batch)
        tokens = encode_batch(clip_captions(batch), self.vocab, self.max_len)  # (B, L <= max_len)
        tokens = F.pad(tokens, (0, self.max_len - tokens.shape[1]), value=PAD)
        return {"frames": _channels_first(b["frames"]), "logmel": np.ascontiguousarray(b["logmel"]),
                "tokens": tokens.numpy()}

    def step(self, model, batch, cfg, gen=None) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        tokens = tokens[:, : int((tokens != PAD).sum(dim=1).max())]  # the batch's longest caption
        out = model(batch["frames"], batch["logmel"], tokens[:, :-1])
        return caption_loss(out, tokens[:, 1:], cfg)

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, torch.Tensor]], cfg) -> dict[str, float]:
        """BLEU-4, CIDEr and sounding-object accuracy of greedy captions, with and without audio.
        References are the target captions as the vocabulary spells them."""
        refs: list[str] = []
        hyps: dict[str, list[str]] = {"audio": [], "no_audio": []}
        for batch in batches:
            refs += [decode(t, cfg.vocab) for t in batch["tokens"]]
            for name, mel in (("audio", batch["logmel"]), ("no_audio", None)):
                hyps[name] += [decode(t, cfg.vocab) for t in model.greedy(batch["frames"], mel)]
        res: dict[str, float] = {"captions": float(len(refs))}
        if len(refs) >= 2:  # CIDEr's idf needs a corpus
            for name, h in hyps.items():
                res[f"bleu4_{name}"] = bleu4(h, [[r] for r in refs])
                res[f"cider_{name}"] = cider(h, [[r] for r in refs])
                res[f"sounding_object_acc_{name}"] = sounding_object_accuracy(h, refs)
        return res

    @torch.no_grad()
    def figure(self, model, batch: dict[str, torch.Tensor], cfg, path: str, n: int = 4) -> None:
        """Middle frame of n clips with the reference caption and greedy captions with / without audio."""
        import matplotlib.pyplot as plt

        frames, mel = batch["frames"][:n], batch["logmel"][:n]
        with_audio = [decode(t, cfg.vocab) for t in model.greedy(frames, mel)]
        without = [decode(t, cfg.vocab) for t in model.greedy(frames, None)]
        fig, axes = plt.subplots(len(frames), 1, figsize=(7, 3.2 * len(frames)), squeeze=False)
        for i, ax in enumerate(axes[:, 0]):
            ax.imshow(frames[i, frames.shape[1] // 2].permute(1, 2, 0).cpu().numpy())
            ax.set_title(f"reference: {decode(batch['tokens'][i], cfg.vocab)}\nwith audio: {with_audio[i]}\n"
                         f"without audio: {without[i]}", fontsize=7, loc="left")
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)


TASKS: dict[str, Any] = {"localization": LocalizationTask(), "separation": SeparationTask(),
                         "captioning": CaptioningTask()}

