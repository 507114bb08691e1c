"""Captioning (Show, Attend and Tell over a clip's frames, with its audio): what happens here?

The vocabulary is fitted on the training captions (`fit`) and stored in the model config, so a
checkpoint carries its words. A clip's target caption comes from its scene's ground truth for the
clip's own span (synthetic scenes), else from a `caption` column carried from a dataset manifest.
Served uploads are captioned per clip; a video without sound, or a still image, is captioned
without audio (the model's learned "no audio" embedding, trained by its audio dropout).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from jobs.tasks.base import (Answer, CaptionVocabulary, Option, Route, Task, channels_first, chunked, per_item,
                             save_figure, to_model)
from models.captioning import PRESETS, Captioner, CaptioningConfig, caption_loss
from models.text import PAD, decode, encode_batch
from models.caption_metrics import bleu4, cider, sounding_object_accuracy
from pipelines.clipsettings import ClipSettings
from pipelines.groundtruth import clip_captions
from pipelines.schema import decode_clip_batch

TARGET_IDS = 24  # training targets: <bos> words <eos> <pad>..., truncated or padded to this many ids
MAX_BEAM = 10


class Captioning(CaptionVocabulary, Task):
    name = "captioning"
    config, model, presets = CaptioningConfig, Captioner, PRESETS
    columns = ("video_id", "start_s", "end_s", "frames", "frames_shape", "logmel", "logmel_shape",
               "ground_truth", "caption")
    deployment = "Captioner"
    route = Route(
        "/v1/caption", upload="video or image", image_ok=True, needs_audio=False,
        summary="What happens: one caption per clip (a still image is one clip, captioned without sound).",
        options=(Option("beam_size", int, 1, "1: greedy decoding", checks={"ge": 1, "le": MAX_BEAM}),
                 Option("sound", bool, True, "false: caption as if the video were silent (what the pictures alone say)")))

    def prepare(self, batch: dict[str, Any], cfg: CaptioningConfig, targets: bool = True) -> dict[str, np.ndarray]:
        """-> frames uint8 (B, T, 3, H, W), logmel float (B, M, N) and, with `targets`, tokens int64
        (B, TARGET_IDS): <bos> ... <eos> <pad>... Every row is as wide, so that rows prepared in
        different Ray Data tasks make one batch (a shuffled batch mixes them)."""
        b = decode_clip_batch(batch)
        out = {"frames": channels_first(b["frames"]), "logmel": np.ascontiguousarray(b["logmel"])}
        if targets:
            tokens = encode_batch(clip_captions(batch), cfg.vocab, TARGET_IDS)  # (B, L <= TARGET_IDS)
            out["tokens"] = F.pad(tokens, (0, TARGET_IDS - tokens.shape[1]), value=PAD).numpy()
        return out

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

    def headline(self, metrics: dict[str, float]) -> str:
        if "sounding_object_acc_audio" not in metrics:
            return f"too few clips to score ({int(metrics.get('captions', 0))})"
        return (f"names the sounding object in {metrics['sounding_object_acc_audio']:.0%} of captions with sound, "
                f"{metrics['sounding_object_acc_no_audio']:.0%} without; CIDEr {metrics['cider_audio']:.2f} "
                f"({int(metrics['captions'])} clips)")

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
        save_figure(fig, path)

    # -- serving ----------------------------------------------------------------------------

    def request(self, rows, cfg, settings: ClipSettings, options):
        """Item: frames uint8 (C, T, 3, H, W), logmel (C, M, N) or None (no sound), beam_size."""
        x = self.prepare(rows, cfg, targets=False)
        heard = bool(rows["has_audio"].all()) and bool(options["sound"])
        return ({"frames": x["frames"], "logmel": x["logmel"] if heard else None, "beam_size": int(options["beam_size"])},
                {"audio_used": heard})

    @torch.no_grad()
    def infer(self, model, items, device):
        """Result per item: one caption per clip. Items with the same beam size and audio presence
        run as one batch."""
        results: list[list[str] | None] = [None] * len(items)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it["beam_size"], it["logmel"] is None), []).append(i)

        def run(beam: int, frames: torch.Tensor, mel: torch.Tensor | None) -> list[str]:
            x = to_model({"frames": frames.to(device), **({} if mel is None else {"logmel": mel.to(device)})})
            ids = (model.greedy(x["frames"], x.get("logmel")) if beam == 1
                   else model.beam_search(x["frames"], x.get("logmel"), beam))
            return [decode(t, model.cfg.vocab) for t in ids]

        for (beam, silent), idx in groups.items():
            frames = torch.cat([torch.from_numpy(items[i]["frames"]) for i in idx])  # uint8 (n, T, 3, H, W)
            mel = None if silent else torch.cat([torch.from_numpy(items[i]["logmel"]) for i in idx])  # (n, M, N)
            caps = chunked(lambda f, m: run(beam, f, m), self.max_rows, frames, mel)
            for i, clips in zip(idx, per_item(caps, (len(items[i]["frames"]) for i in idx))):
                results[i] = clips
        return results

    def answer(self, result, meta, options) -> Answer:
        span = meta["frames_per_clip"] / meta["fps"]
        return Answer({"caption": result[0], "audio_used": meta["audio_used"], "beam_size": options["beam_size"],
                       "clips": [{"start_s": s, "end_s": s + span, "caption": c} for s, c in zip(meta["starts"], result)]})


TASK = Captioning()
