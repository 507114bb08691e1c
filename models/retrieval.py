"""Matching: video, sound and text in one normalised embedding space (CLIP-style joint embedding).

    frames (B, T, 3, H, W) ─VisualEncoder per frame (every k-th)─▶ (B, T', Dv)
        ─TemporalPool─▶ (B, K·Dv) ─linear─L2─▶ video (B, D)
    logmel (B, M, N) ─AudioEncoder grid, pooled over frequency─▶ (B, S, Da) (S time steps)
        ─TemporalPool─▶ (B, K·Da) ─linear─L2─▶ audio (B, D)
    tokens (B, L) ─word + position embedding─▶ Transformer encoder (padding masked)
        ─mean over the words─▶ linear ─L2─▶ text (B, D)
    clip embedding (search by text or example): fuse(video, audio) = L2(video + audio)

Trained with the symmetric InfoNCE of CLIP (Radford et al. 2021) on each pair, video-text,
audio-text and video-audio (`retrieval_loss`, weights in the config), with one learned
temperature (`logit_scale` = log(1 / tau), clamped at log 100 as CLIP does). Losses are
functions of the forward output, outside `forward`.

TemporalPool is attention pooling over time with K learned queries on features plus a time
embedding: each query can pick out a different part of the clip, so the embedding keeps *when*
things happen, not only what is seen or heard. That is what tells two clips of one scene apart
(the same objects and sounds, sounding at other times); one query (K = 1) averages it away.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.encoders import AudioEncoder, AudioEncoderConfig, VisualEncoder, VisualEncoderConfig
from models.text import PAD, SPECIALS

MAX_LOGIT_SCALE = math.log(100.0)
PAIRS = ("video_text", "audio_text", "video_audio")


@dataclass(frozen=True)
class RetrievalConfig:
    """Joint embedder. `vocab`: the words, SPECIALS first (fitted on the training captions);
    `embed_dim`: D, the joint space; `text_dim`, `text_layers`, `text_heads`: the text encoder;
    `max_len`: token ids per text incl. <bos>/<eos>; `max_frames`: size of the video time embedding
    (frames after the stride); `frame_stride`: the video encoder sees frames 0, k, 2k, ...;
    `audio_steps`: the time steps the audio grid is pooled to; `pool_queries`: K of TemporalPool;
    `temporal_layers`: self-attention layers over the time steps before pooling; `word2vec`: the
    task's `fit` adds `word_vectors`, skip-gram vectors of the vocabulary over the training captions
    (one row of text_dim per word; SPECIALS and unseen words all zeros: random), the word embeddings'
    start; `reversed_negatives`: train with each clip's audio played backwards as a negative of its video (`retrieval_loss`);
    `temperature`: tau at initialisation, learned when `learn_temperature`; `pair_weights`: the loss
    weight of each pair in PAIRS order (video-text, audio-text, video-audio); `image_size`: the
    frame side the data pipeline resizes to (the model accepts any size)."""

    vocab: tuple[str, ...] = SPECIALS
    visual: VisualEncoderConfig = field(default_factory=lambda: VisualEncoderConfig(arch="tiny", width=16))
    audio: AudioEncoderConfig = field(default_factory=lambda: AudioEncoderConfig(arch="tiny", width=16, pool="max"))
    embed_dim: int = 64
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_len: int = 24
    max_frames: int = 16
    frame_stride: int = 2
    audio_steps: int = 16
    pool_queries: int = 4
    temporal_layers: int = 0
    reversed_negatives: bool = False
    word2vec: bool = False
    word_vectors: tuple[tuple[float, ...], ...] = ()
    temperature: float = 0.07
    learn_temperature: bool = True
    pair_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    image_size: int = 64

    def __post_init__(self) -> None:
        if tuple(self.vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}, got {tuple(self.vocab[:4])}")
        if min(self.embed_dim, self.text_dim, self.text_layers, self.text_heads, self.max_frames,
               self.frame_stride, self.audio_steps, self.pool_queries) <= 0 or self.max_len < 2:
            raise ValueError("widths, layers, heads, max_frames, frame_stride, audio_steps and pool_queries "
                             "must be positive and max_len >= 2")
        if self.text_dim % self.text_heads:
            raise ValueError(f"text_dim {self.text_dim} is not a multiple of text_heads {self.text_heads}")
        if not 0 < self.temperature <= 1:
            raise ValueError(f"temperature must be in (0, 1], got {self.temperature}")
        if self.word_vectors and (len(self.word_vectors) != len(self.vocab)
                                  or any(len(v) != self.text_dim for v in self.word_vectors)):
            raise ValueError(f"word_vectors: one row of text_dim={self.text_dim} per word of the {len(self.vocab)}-word "
                             f"vocab, got {len(self.word_vectors)} rows")
        if len(self.pair_weights) != len(PAIRS) or min(self.pair_weights) < 0 or sum(self.pair_weights) <= 0:
            raise ValueError(f"weights: one >= 0 per pair {PAIRS}, not all 0; got {self.pair_weights}")


_TINY = RetrievalConfig(pool_queries=8, temporal_layers=1, pair_weights=(1.0, 1.0, 4.0), image_size=32)
PRESETS: dict[str, RetrievalConfig] = {
    # 0.37 M parameters (with 40 words). 8 pooling queries and a temporal self-attention layer on each side,
    # the video-audio pair weighted 4x, 32 px frames: held-out audio -> video R@1 after 7 min on one core
    # 0.20; 0.19 without the temporal layer; 0.12 at 64 px (2.6x slower a step); BENCHMARKS.md, retrieval.
    "tiny": _TINY,
    # the same, its word embeddings initialised by skip-gram vectors of the training captions (`word2vec`)
    "tiny-word2vec": replace(_TINY, word2vec=True),
    # ResNet-18 visual trunk at 224 px (local ImageNet weights via `visual.weights`), ResNet-18 audio,
    # a 4-layer text transformer, D = 256: for a GPU.
    "paper": RetrievalConfig(
        visual=VisualEncoderConfig(arch="resnet18"), audio=AudioEncoderConfig(arch="resnet18", pool="max"),
        embed_dim=256, text_dim=256, text_layers=4, text_heads=4, max_len=32, max_frames=32, frame_stride=4,
        pool_queries=8, temporal_layers=1, pair_weights=(1.0, 1.0, 4.0), image_size=224),
}
"""Presets with the special tokens as their only words: training fits the vocabulary."""


class TemporalPool(nn.Module):
    """Attention pooling over time with `queries` learned queries: x float (B, T, d) plus a learned
    time embedding (T <= max_steps) -> float (B, queries·d), per query the softmax(q·x_t / sqrt(d))-
    weighted mean of the time steps, the queries' results side by side."""

    def __init__(self, dim: int, max_steps: int, queries: int, layers: int = 0, heads: int = 4) -> None:
        super().__init__()
        self.time_embed = nn.Embedding(max_steps, dim)
        nn.init.normal_(self.time_embed.weight, std=0.1)
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.1)
        self.mix = None
        if layers:
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
            self.mix = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if T > self.time_embed.num_embeddings:
            raise ValueError(f"{T} time steps exceed {self.time_embed.num_embeddings}")
        x = x + self.time_embed.weight[:T]  # (B, T, d)
        if self.mix is not None:  # self-attention across the time steps: each step sees the others
            x = self.mix(x)
        weights = torch.softmax(torch.einsum("btd,kd->bkt", x, self.queries) / math.sqrt(x.shape[-1]), dim=-1)
        return torch.einsum("bkt,btd->bkd", weights, x).flatten(1)  # (B, K·d)


class JointEmbedder(nn.Module):
    """Video, audio and text encoders into one L2-normalised D-dimensional space."""

    def __init__(self, cfg: RetrievalConfig = RetrievalConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        D, E = cfg.embed_dim, cfg.text_dim
        K = cfg.pool_queries
        self.visual = VisualEncoder(cfg.visual)
        self.video_pool = TemporalPool(self.visual.out_dim, cfg.max_frames, K, cfg.temporal_layers)
        self.video_proj = nn.Linear(K * self.visual.out_dim, D)
        self.audio = AudioEncoder(cfg.audio)
        self.audio_pool = TemporalPool(self.audio.out_dim, cfg.audio_steps, K, cfg.temporal_layers)
        self.audio_proj = nn.Linear(K * self.audio.out_dim, D)
        self.word_embed = nn.Embedding(len(cfg.vocab), E, padding_idx=PAD)
        if cfg.word_vectors:  # skip-gram initialisation: the rows that are not all zeros
            with torch.no_grad():
                init = torch.tensor(cfg.word_vectors, dtype=self.word_embed.weight.dtype)  # (V, E)
                known = init.abs().sum(dim=1) > 0
                self.word_embed.weight[known] = init[known]
        self.pos_embed = nn.Embedding(cfg.max_len, E)
        layer = nn.TransformerEncoderLayer(E, cfg.text_heads, dim_feedforward=2 * E, dropout=0.1, batch_first=True)
        self.text = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.text_proj = nn.Linear(E, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)),
                                        requires_grad=cfg.learn_temperature)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: float (B, T, 3, H, W) in [0, 1] -> float (B, D), unit norm. Frames 0, k, 2k, ...
        (k = `frame_stride`) are encoded one by one and pooled over time (TemporalPool)."""
        frames = frames[:, :: self.cfg.frame_stride]  # (B, T', 3, H, W)
        B, T = frames.shape[:2]
        if T > self.cfg.max_frames:
            raise ValueError(f"{T} frames exceed max_frames={self.cfg.max_frames}")
        feats = self.visual(rearrange(frames, "b t c h w -> (b t) c h w"))  # (B·T', Dv)
        pooled = self.video_pool(rearrange(feats, "(b t) d -> b t d", b=B))  # (B, K·Dv)
        return F.normalize(self.video_proj(pooled), dim=-1)

    def encode_audio(self, logmel: torch.Tensor) -> torch.Tensor:
        """logmel: float (B, M, N) -> float (B, D), unit norm: the encoder's grid pooled over
        frequency (max or mean, as `audio.pool` says), averaged to `audio_steps` steps over the
        clip's time, then TemporalPool."""
        grid = self.audio.forward_features(logmel)  # (B, Da, m, n)
        grid = grid.amax(dim=2) if self.cfg.audio.pool == "max" else grid.mean(dim=2)  # (B, Da, n)
        steps = F.adaptive_avg_pool1d(grid, self.cfg.audio_steps).transpose(1, 2)  # (B, S, Da)
        return F.normalize(self.audio_proj(self.audio_pool(steps)), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: long (B, L <= max_len), <bos> ... <eos> then <pad> -> float (B, D), unit norm:
        the mean of the transformer's outputs over the non-pad positions."""
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"{tokens.shape[1]} token ids exceed max_len={self.cfg.max_len}")
        pad = tokens == PAD  # (B, L)
        x = self.word_embed(tokens) + self.pos_embed.weight[: tokens.shape[1]]  # (B, L, E)
        x = self.text(x, src_key_padding_mask=pad)  # (B, L, E)
        keep = (~pad).unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        mean = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)  # (B, E)
        return F.normalize(self.text_proj(mean), dim=-1)

    def forward(self, frames: torch.Tensor, logmel: torch.Tensor, tokens: torch.Tensor,
                reversed_audio: bool = False) -> dict[str, torch.Tensor]:
        """frames float (B, T, 3, H, W) in [0, 1], logmel float (B, M, N), tokens long (B, L) ->
        `video`, `audio`, `text` float (B, D), each row of unit norm, and `logit_scale` (a scalar,
        log(1 / tau) clamped at log 100). With `reversed_audio`, also `audio_reversed` (B, D): the
        embedding of each clip's log-mel played backwards (the training loss's sync negatives)."""
        out = {"video": self.encode_video(frames), "text": self.encode_text(tokens),
               "logit_scale": self.logit_scale.clamp(max=MAX_LOGIT_SCALE)}
        if reversed_audio:
            out["audio"], out["audio_reversed"] = self.encode_audio(torch.cat([logmel, logmel.flip(-1)])).chunk(2)
        else:
            out["audio"] = self.encode_audio(logmel)
        return out


def fuse(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
    """The clip embedding: L2(video + audio), both float (B, D) of unit norm -> float (B, D)."""
    return F.normalize(video + audio, dim=-1)


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
             b_negatives: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: row i of `a` and row i of `b` (float (B, D), unit norm) are the
    positive pair, every other row a negative; logits = exp(logit_scale) a b^T. `b_negatives`
    (K, D): more candidates for the a -> b direction, negatives of every row of `a`. Returns the
    mean of the a->b and b->a cross-entropies (a float scalar)."""
    scale = logit_scale.exp()
    target = torch.arange(len(a), device=a.device)
    candidates = b if b_negatives is None else torch.cat([b, b_negatives])
    return 0.5 * (F.cross_entropy(scale * a @ candidates.T, target) + F.cross_entropy(scale * b @ a.T, target))


def retrieval_loss(out: dict[str, torch.Tensor], cfg: RetrievalConfig) -> dict[str, torch.Tensor]:
    """`JointEmbedder.forward` output -> {"loss": the weighted sum of the pairs' InfoNCE, one entry
    per pair of PAIRS, "temperature": the current tau}; all float scalars. With `audio_reversed` in
    `out`, those embeddings are extra negatives of every video in the video -> audio direction: the
    clip's own sound played backwards has the same content, so only *when* it sounds tells them apart."""
    scale = out["logit_scale"]
    terms = {name: info_nce(out[name.split("_")[0]], out[name.split("_")[1]], scale,
                            out.get("audio_reversed") if name == "video_audio" else None) for name in PAIRS}
    loss = sum(w * terms[name] for w, name in zip(cfg.pair_weights, PAIRS)) / sum(cfg.pair_weights)
    return {"loss": loss, **terms, "temperature": (-scale).exp().detach()}
