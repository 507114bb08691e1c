"""Matching (joint embedding, CLIP-style): find clips by text, by sound or by picture.

Each clip's frames, sound and caption are embedded into one space (models/retrieval.py) and
trained together with symmetric InfoNCE. A clip's caption comes from its scene's ground truth for
the clip's own span (synthetic scenes), else from a `caption` column carried from a manifest;
the vocabulary is fitted on the training captions (`fit`). Evaluation ranks every held-out clip
against every other in the six directions between text, video and audio (`evaluate`). `avray
embed` writes every clip's embeddings to Parquet and `avray search` ranks them for a query; the
served route embeds a text or an upload.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from jobs.tasks.base import (Answer, CaptionVocabulary, RequestError, Route, Task, channels_first, joined, save_figure,
                             to_model)
from models.retrieval import MAX_LOGIT_SCALE, PRESETS, JointEmbedder, RetrievalConfig, fuse, retrieval_loss
from models.retrieval_metrics import retrieval_scores
from models.text import PAD, decode, encode_batch, skipgram_vectors, tokenize
from pipelines.clipsettings import ClipSettings
from pipelines.groundtruth import clip_captions
from pipelines.schema import decode_clip_batch

MAX_TEXT_CHARS = 1000  # longer query texts are refused (422)
DIRECTIONS = (("text", "video"), ("video", "text"), ("text", "audio"), ("audio", "text"),
              ("audio", "video"), ("video", "audio"))


def text_tokens(texts: list[str], cfg: RetrievalConfig) -> np.ndarray:
    """Texts -> int64 (B, cfg.max_len): <bos> words <eos> <pad>..., every row as wide so that rows
    of different Ray Data tasks make one batch; words past max_len - 2 are cut."""
    tokens = encode_batch(texts, cfg.vocab, cfg.max_len)  # (B, L <= max_len)
    return F.pad(tokens, (0, cfg.max_len - tokens.shape[1]), value=PAD).numpy()


def check_text(text: str, cfg: RetrievalConfig) -> None:
    """A query text the model can embed, or RequestError(422) saying why not: empty, too long, or
    no word the model knows (its vocabulary is that of its training captions)."""
    if not text.strip():
        raise RequestError(422, "empty text")
    if len(text) > MAX_TEXT_CHARS:
        raise RequestError(422, f"text longer than {MAX_TEXT_CHARS} characters")
    words = tokenize(text)
    if not words or all(w not in cfg.vocab for w in words):
        raise RequestError(422, f"none of the words of {text!r} is in the model's vocabulary of {len(cfg.vocab) - 4} "
                                f"words (e.g. {', '.join(cfg.vocab[4:10])})")


class Retrieval(CaptionVocabulary, Task):
    name = "retrieval"
    config, model, presets = RetrievalConfig, JointEmbedder, PRESETS
    columns = ("video_id", "start_s", "end_s", "frames", "frames_shape", "logmel", "logmel_shape",
               "ground_truth", "caption")
    deployment = "Embedder"
    route = Route(
        "/v1/embed", upload="video or sound (or send `text` instead)", needs_audio=False, audio_ok=True, text=True,
        summary="Embeddings in the joint space: of a text (form field `text`), or of each clip of an upload "
                "(video, audio and the fused clip embedding).")

    def fit_words(self, cfg: RetrievalConfig, captions: list[str]) -> RetrievalConfig:
        """With `cfg.word2vec`, skip-gram vectors of the vocabulary's words over the training
        captions (models.text.skipgram_vectors) initialise the text encoder's word embeddings."""
        if not cfg.word2vec:
            return cfg
        return dataclasses.replace(cfg, word_vectors=skipgram_vectors(captions, cfg.vocab, cfg.text_dim))

    def prepare(self, batch: dict[str, Any], cfg: RetrievalConfig, targets: bool = True) -> dict[str, np.ndarray]:
        """-> frames uint8 (B, T, 3, H, W), logmel float (B, M, N) and, with `targets`, tokens int64
        (B, cfg.max_len) of the clips' captions."""
        b = decode_clip_batch(batch)
        out = {"frames": channels_first(b["frames"]), "logmel": np.ascontiguousarray(b["logmel"])}
        if targets:
            out["tokens"] = text_tokens(clip_captions(batch), cfg)
        return out

    def step(self, model, batch, cfg, gen=None) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        tokens = tokens[:, : int((tokens != PAD).sum(dim=1).max())]  # the batch's longest caption
        return retrieval_loss(model(batch["frames"], batch["logmel"], tokens, reversed_audio=cfg.reversed_negatives), cfg)

    @torch.no_grad()
    def embed(self, model, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """video, audio, text (N, D) of every clip of `batches`, and their `tokens` (N, max_len)."""
        parts: dict[str, list[torch.Tensor]] = {"video": [], "audio": [], "text": [], "tokens": []}
        for batch in batches:
            out = model(batch["frames"], batch["logmel"], batch["tokens"])
            for k in ("video", "audio", "text"):
                parts[k].append(out[k].float())
            parts["tokens"].append(batch["tokens"])
        return {k: torch.cat(v) for k, v in parts.items()}

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, torch.Tensor]], cfg) -> dict[str, float]:
        """Over all clips of `batches` at once (N of them): R@1, R@5, R@10 and the median rank in the
        six directions between text, video and audio (`<query>_to_<gallery>_<metric>`), a query's
        own clip the one correct answer; `*_same_caption`: text directions where every clip with
        an identical caption counts (synthetic captions repeat); `shuffled_audio_to_video_*`: each
        clip asked with the audio of another clip (8 offsets between N/4 and 3N/4, averaged), which must score at chance (`chance_r1` =
        1/N, `chance_r10` = 10/N); `text_to_fused_*`: text queries against the fused clip embedding
        (text_to_video / text_to_audio are the video-only and audio-only ones)."""
        e = self.embed(model, batches)
        n = len(e["video"])
        if n < 2:
            return {"clips": float(n)}
        e["fused"] = fuse(e["video"], e["audio"])
        res: dict[str, float] = {"clips": float(n), "chance_r1": 1.0 / n, "chance_r10": min(1.0, 10.0 / n)}
        captions = [decode(t, cfg.vocab) for t in e["tokens"]]
        same = torch.tensor([[a == b for b in captions] for a in captions])  # (N, N)
        for q, g in DIRECTIONS + (("text", "fused"),):
            sim = e[q] @ e[g].T  # (N, N)
            res.update({f"{q}_to_{g}_{k}": v for k, v in retrieval_scores(sim).items()})
            if "text" in (q, g):
                res.update({f"{q}_to_{g}_same_caption_{k}": v for k, v in retrieval_scores(sim, same).items()})
        # clip i asked with the audio of clip i - k, for 8 offsets k between n/4 and 3n/4 (far from the
        # clip's own video, whose clips are adjacent), the scores averaged: one offset alone hits ~1 of N
        offsets = sorted({int(round(n * f)) % n for f in np.linspace(0.25, 0.75, 8)} - {0})
        per = [retrieval_scores(e["audio"].roll(k, dims=0) @ e["video"].T) for k in offsets]
        res.update({f"shuffled_audio_to_video_{k}": float(np.mean([p[k] for p in per])) for k in per[0]})
        res["temperature"] = float((-model.logit_scale.clamp(max=MAX_LOGIT_SCALE)).exp())
        return res

    def headline(self, metrics: dict[str, float]) -> str:
        if "text_to_video_r10" not in metrics:
            return f"too few clips to rank ({int(metrics.get('clips', 0))})"
        return (f"text->video R@10 {metrics['text_to_video_r10']:.2f}, audio->video R@1 {metrics['audio_to_video_r1']:.2f} "
                f"(chance {metrics['chance_r1']:.3f}) among {int(metrics['clips'])} clips")

    @torch.no_grad()
    def figure(self, model, batch: dict[str, torch.Tensor], cfg, path: str, n: int = 4) -> None:
        """Text-to-video similarities of the batch's clips, and the top 5 clips (middle frames with
        their scores) for the first n distinct captions."""
        import matplotlib.pyplot as plt

        e = self.embed(model, [batch])
        sim = (e["text"] @ e["video"].T).cpu()  # (B, B)
        captions = [decode(t, cfg.vocab) for t in e["tokens"]]
        first = {c: i for i, c in reversed(list(enumerate(captions)))}  # caption -> its first clip
        queries = sorted(first.values())[:n]
        frames = batch["frames"][:, batch["frames"].shape[1] // 2].permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        top = min(5, len(captions))
        fig = plt.figure(figsize=(3 + 1.6 * top, 3 + 1.7 * len(queries)))
        grid = fig.add_gridspec(1 + len(queries), top)
        ax = fig.add_subplot(grid[0, :])
        ax.imshow(sim.numpy(), cmap="viridis", aspect="auto")
        ax.set_title(f"text (rows) x video (columns) cosine similarity, the {len(captions)} clips of one batch", fontsize=8)
        ax.set_xlabel("clip")
        ax.set_ylabel("caption")
        for r, qi in enumerate(queries):
            scores, order = sim[qi].topk(top)
            for c, (s, j) in enumerate(zip(scores.tolist(), order.tolist())):
                a = fig.add_subplot(grid[1 + r, c])
                a.imshow(frames[j])
                a.set_title(f"{s:.2f}" + (" (own)" if j == qi else ""), fontsize=7)
                a.axis("off")
            fig.axes[-top].set_title(f"{captions[qi]}\n{scores[0]:.2f}" + (" (own)" if order[0] == qi else ""),
                                     fontsize=6, loc="left")
        save_figure(fig, path)

    # -- serving ----------------------------------------------------------------------------

    def request(self, rows, cfg, settings: ClipSettings, options):
        """Item: frames uint8 (C, T, 3, H, W) and logmel (C, M, N) of an upload's clips, or the
        tokens (1, max_len) of `options["text"]`."""
        if rows is None:
            text = options["text"]
            check_text(text, cfg)
            unknown = [w for w in tokenize(text) if w not in cfg.vocab]
            return {"tokens": text_tokens([text], cfg)}, {"text": text, "unknown_words": unknown}
        x = self.prepare(rows, cfg, targets=False)
        return {"frames": x["frames"], "logmel": x["logmel"]}, {"pictures": bool(rows["video_stream"][0] >= 0),
                                                                 "sound": bool(rows["has_audio"][0])}

    @torch.no_grad()
    def infer(self, model, items, device):
        """Result per item: {"text": (1, D)} for a text, {"video", "audio", "clip"} (C, D) each for
        an upload; float32, unit norm. `answer` leaves out what the upload lacks (pictures or sound)."""
        out: list[dict[str, np.ndarray] | None] = [None] * len(items)
        texts = [i for i, it in enumerate(items) if "tokens" in it]
        media = [i for i, it in enumerate(items) if "tokens" not in it]
        if texts:
            tokens, counts = joined([items[i] for i in texts], "tokens")
            emb = model.encode_text(tokens.to(device)).cpu()
            for i, e in zip(texts, emb.split(counts)):
                out[i] = {"text": e.numpy()}
        if media:
            frames, counts = joined([items[i] for i in media], "frames")
            mel, _ = joined([items[i] for i in media], "logmel")
            parts = {"video": [], "audio": []}
            for s in range(0, len(frames), self.max_rows):
                x = to_model({"frames": frames[s:s + self.max_rows].to(device), "logmel": mel[s:s + self.max_rows].to(device)})
                parts["video"].append(model.encode_video(x["frames"]).cpu())
                parts["audio"].append(model.encode_audio(x["logmel"]).cpu())
            v, a = torch.cat(parts["video"]), torch.cat(parts["audio"])
            c = fuse(v, a)
            for i, vv, aa, cc in zip(media, v.split(counts), a.split(counts), c.split(counts)):
                out[i] = {"video": vv.numpy(), "audio": aa.numpy(), "clip": cc.numpy()}
        return out

    def answer(self, result, meta, options) -> Answer:
        if "text" in result:
            return Answer({"text": meta["text"], "unknown_words": meta["unknown_words"], "dim": int(result["text"].shape[1]),
                           "embedding": np.round(result["text"][0].astype(np.float64), 6).tolist()})
        span = meta["frames_per_clip"] / meta["fps"]
        kinds = [k for k, ok in (("clip", meta["pictures"] and meta["sound"]), ("video", meta["pictures"]),
                                 ("audio", meta["sound"])) if ok]
        return Answer({"dim": int(result["audio"].shape[1]), "embeddings": kinds,
                       "clips": [{"start_s": s, "end_s": s + span,
                                  **{k: np.round(result[k][j].astype(np.float64), 6).tolist() for k in kinds}}
                                 for j, s in enumerate(meta["starts"])]})


TASK = Retrieval()
