"""Audio-visual question answering: the classic VQA design (Antol et al. ICCV 2015, "deeper LSTM Q
+ norm I") with a sound stream fused the same way, and question-guided attention over the grid
(multimodal low-rank bilinear attention, MLB: Kim et al. ICLR 2017, parallel glimpses, here guided by
question AND audio), next to the mean over the cells.

    frames (B, T', 3, H, W) ─VisualEncoder per frame─▶ grid ─[D; cell x, y] → linear + time embedding[t]
        ─▶ cells v_i (B, P = T'*h*w, D)
    logmel (B, M, N) ─AudioEncoder─▶ grid (B, Da, m, n) ─mean over mel, `audio_bins` time bins─▶
        linear, tanh ─▶ a (B, D)          (time order kept: "which sounds first?")
    questions (B, Q, L) ─the n non-empty slots; embedding, LSTM (last hidden state)─▶ linear, tanh ─▶ q (n, D)
    attention (glimpses G >= 1): g = q ⊙ a;  e_i = W_e (tanh(W_v v_i) ⊙ tanh(W_g g)) (G logits per cell);
        α_k = softmax_i(e_ik);  v = tanh(W_o [mean_i v_i; Σ_i α_i1 v_i; ...; Σ_i α_iG v_i])
        (the product lets a cell's look be matched against the sound: which object is heard, where it
        is, which one is not; the mean keeps what every cell says: how many objects there are)
    no attention (glimpses = 0): v = tanh(W_o mean_i v_i)
    fused = v ⊙ q ⊙ a  (Hadamard, per question) ─MLP─▶ logits over the answer vocabulary (B, Q, A)

A clip's Q questions share one pass of its encoders; empty slots are not computed (their logits are 0). Without audio (`logmel=None`) or without
video (`frames=None`), a learned "no audio" / "no video" vector stands in for a or v; training
replaces them at random (`audio_dropout`, `video_dropout`), so the question-only, no-audio and
no-video ablations are the same model asked with a stream taken away. The vocabularies (question
words, answers, question types) live in the config, so a checkpoint carries them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from models.encoders import AudioEncoder, AudioEncoderConfig, VisualEncoder, VisualEncoderConfig
from models.text import PAD, SPECIALS

NO_ANSWER = -1  # an empty question slot: no loss, not scored
UNKNOWN_ANSWER = -2  # an answer outside the vocabulary: no loss, scored wrong


@dataclass(frozen=True)
class VQAConfig:
    """AV question answerer. `vocab`: question words, SPECIALS first; `answers`: the answer classes;
    `types`: the question types (evaluation reports accuracy per type); `dim`: D, the fused width;
    `embed_dim`, `hidden_dim`: word embedding and question LSTM widths; `audio_bins`: time bins
    of the audio grid kept in order; `glimpses`: parallel attention glimpses over
    the cells, next to their mean (0: the mean only, the classic VQA fusion); `attention_dim`: the
    bilinear attention's rank; `frame_stride`: the data
    pipeline keeps frames 0, k, 2k, ... of a clip; `max_frames`: time embedding size (T' <= it);
    `audio_dropout` / `video_dropout`: training share of samples whose stream is replaced by its
    learned "absent" vector; `image_size`: the frame side the data is made at (any size works)."""

    vocab: tuple[str, ...] = SPECIALS
    answers: tuple[str, ...] = ("yes", "no")
    types: tuple[str, ...] = ("user",)
    visual: VisualEncoderConfig = field(default_factory=lambda: VisualEncoderConfig(arch="tiny", width=16))
    audio: AudioEncoderConfig = field(default_factory=lambda: AudioEncoderConfig(arch="tiny", width=16))
    dim: int = 256
    embed_dim: int = 64
    hidden_dim: int = 128
    audio_bins: int = 8
    glimpses: int = 2
    attention_dim: int = 128
    frame_stride: int = 8
    max_frames: int = 16
    dropout: float = 0.1
    audio_dropout: float = 0.25
    video_dropout: float = 0.25
    image_size: int = 64

    def __post_init__(self) -> None:
        if tuple(self.vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}, got {tuple(self.vocab[:4])}")
        for name in ("vocab", "answers", "types"):
            values = getattr(self, name)
            if len(set(values)) != len(values) or not values:
                raise ValueError(f"{name} must be non-empty without duplicates")
        if min(self.dim, self.embed_dim, self.hidden_dim, self.audio_bins, self.attention_dim, self.frame_stride,
               self.max_frames) <= 0 or self.glimpses < 0:
            raise ValueError("widths, audio_bins, frame_stride and max_frames must be positive, glimpses >= 0")
        if not (0 <= self.dropout < 1 and 0 <= self.audio_dropout <= 1 and 0 <= self.video_dropout <= 1):
            raise ValueError("dropout must be in [0, 1), audio_dropout and video_dropout in [0, 1]")


PRESETS: dict[str, VQAConfig] = {
    # 64 px frames, every 8th frame (a 16-frame clip -> 2 frames, 2 x 8 x 8 cells), two bilinear
    # glimpses guided by question and audio next to the mean of the cells.
    "tiny": VQAConfig(),
    # ResNet-18 at 224 px (7 x 7 x 512 per frame), VGGish audio, word embedding 300 and LSTM 512 as
    # the VQA paper's deeper LSTM Q (one layer here), fused width 1024, two glimpses.
    "paper": VQAConfig(visual=VisualEncoderConfig(arch="resnet18"), audio=AudioEncoderConfig(arch="vggish"),
                       dim=1024, embed_dim=300, hidden_dim=512, audio_bins=8, glimpses=2, attention_dim=512,
                       frame_stride=4, max_frames=32, dropout=0.5, image_size=224),
}
"""Presets with the special tokens as their only words: training fits the vocabularies."""


def hadamard(*xs: torch.Tensor) -> torch.Tensor:
    """Point-wise product of same-shape (broadcastable) tensors: the VQA fusion."""
    out = xs[0]
    for x in xs[1:]:
        out = out * x
    return out


class AVQuestionAnswerer(nn.Module):
    """Frames + log-mel + questions -> answer logits (module docstring)."""

    def __init__(self, cfg: VQAConfig = VQAConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.visual = VisualEncoder(cfg.visual)
        self.cell_proj = nn.Linear(self.visual.out_dim + 2, D)  # [feature; x; y] -> D
        self.time_embed = nn.Embedding(cfg.max_frames, D)
        self.audio = AudioEncoder(cfg.audio)
        self.audio_proj = nn.Linear(self.audio.out_dim * cfg.audio_bins, D)
        self.embed = nn.Embedding(len(cfg.vocab), cfg.embed_dim, padding_idx=PAD)
        self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, batch_first=True)
        self.question_proj = nn.Linear(cfg.hidden_dim, D)
        if cfg.glimpses:
            self.att_cells = nn.Linear(D, cfg.attention_dim)
            self.att_query = nn.Linear(D, cfg.attention_dim)
            self.att_out = nn.Linear(cfg.attention_dim, cfg.glimpses)
        self.visual_out = nn.Linear((cfg.glimpses + 1) * D, D)  # [mean; glimpses] -> D
        self.no_audio = nn.Parameter(torch.zeros(D))
        self.no_video = nn.Parameter(torch.zeros(D))
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(D, D), nn.ReLU(inplace=True),
                                        nn.Dropout(cfg.dropout), nn.Linear(D, len(cfg.answers)))

    # --- encoders ----------------------------------------------------------------------------
    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames float (B, T', 3, H, W) in [0, 1] (or (B, 3, H, W)) -> cells float (B, T'*h*w, D),
        frame-major then row-major."""
        cells = self.visual.frame_cells(frames, self.cfg.max_frames)  # (B, T, h*w, Dv + 2)
        v = self.cell_proj(cells) + self.time_embed.weight[:cells.shape[1], None, :]  # (B, T, h*w, D)
        return rearrange(v, "b t p d -> b (t p) d")  # (B, P, D)

    def encode_audio(self, logmel: torch.Tensor) -> torch.Tensor:
        """logmel float (B, M, N) -> a float (B, D) in (-1, 1): `audio_bins` time bins in order."""
        grid = self.audio.forward_features(logmel).mean(dim=2)  # (B, Da, n): mean over mel
        bins = F.adaptive_avg_pool1d(grid, self.cfg.audio_bins)  # (B, Da, bins)
        return torch.tanh(self.audio_proj(rearrange(bins, "b d n -> b (n d)")))  # (B, D)

    def encode_questions(self, ids: torch.Tensor) -> torch.Tensor:
        """ids long (n, L) word ids (<bos> words <eos> <pad>...) -> q float (n, D) in (-1, 1): the
        LSTM's state at each question's last id (the pads after the longest question are not run)."""
        lengths = (ids != PAD).sum(dim=1).clamp_min(1)  # (n,)
        out, _ = self.lstm(self.embed(ids[:, : int(lengths.max())]))  # (n, L', H)
        h = out[torch.arange(len(ids), device=ids.device), lengths - 1]  # (n, H)
        return torch.tanh(self.question_proj(h))  # (n, D)

    def attend(self, cells: torch.Tensor, clip: torch.Tensor, guide: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cells (B, P, D) of the clips; clip long (n,): each question's clip; guide (n, D) -> v (n, D)
        in (-1, 1) and α (n, P): the glimpses' weights over the cells, averaged (uniform without glimpses)."""
        mean = cells.mean(dim=1)[clip]  # (n, D)
        if not self.cfg.glimpses:
            return torch.tanh(self.visual_out(mean)), cells.new_full((len(clip), cells.shape[1]), 1 / cells.shape[1])
        keys = torch.tanh(self.att_cells(cells))[clip]  # (n, P, A)
        e = self.att_out(keys * torch.tanh(self.att_query(guide))[:, None])  # (n, P, G)
        alpha = torch.softmax(e, dim=1)  # over the cells, per glimpse
        z = einsum(alpha, cells[clip], "n p g, n p d -> n g d")  # (n, G, D)
        v = torch.tanh(self.visual_out(torch.cat([mean, rearrange(z, "n g d -> n (g d)")], dim=-1)))  # (n, D)
        return v, alpha.mean(dim=-1)

    # --- forward -----------------------------------------------------------------------------
    def _absent(self, x: torch.Tensor | None, absent: nn.Parameter, rate: float, batch: int) -> torch.Tensor:
        """x (B, D) of the clips or None -> x with the learned absent vector where the stream is
        missing (or, in training, dropped for a `rate` share of the clips)."""
        if x is None:
            return absent.expand(batch, -1)
        if self.training and rate > 0:
            drop = torch.rand(batch, 1, device=x.device) < rate  # (B, 1)
            x = torch.where(drop, absent.expand(batch, -1), x)
        return x

    def forward(self, frames: torch.Tensor | None, logmel: torch.Tensor | None,
                questions: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames float (B, T', 3, H, W) in [0, 1] or None (no video); logmel float (B, M, N) or
        None (no audio); questions long (B, Q, L), an empty slot all PAD. Returns float `logits`
        (B, Q, A) and `attention` (B, Q, P): the glimpses' mean weights over the cells, each row
        summing to 1 (P = 1 without video). Only the non-empty slots are computed; empty ones are 0."""
        B, Q, L = questions.shape
        asked = questions[:, :, 0] != PAD  # (B, Q)
        clip = torch.arange(B, device=questions.device)[:, None].expand(B, Q)[asked]  # (n,): each question's clip
        q = self.encode_questions(questions[asked])  # (n, D)
        a = None if logmel is None else self.encode_audio(logmel)  # (B, D)
        a = self._absent(a, self.no_audio, self.cfg.audio_dropout, B)[clip]  # (n, D)
        if frames is None:
            v, alpha = None, q.new_ones(len(q), 1)
        else:
            v, alpha = self.attend(self.encode_video(frames), clip, hadamard(q, a))  # (n, D), (n, P)
        if v is None:
            v = self.no_video.expand(len(q), -1)
        elif self.training and self.cfg.video_dropout > 0:
            drop = torch.rand(B, 1, device=q.device)[clip] < self.cfg.video_dropout  # (n, 1): per clip
            v = torch.where(drop, self.no_video.expand_as(v), v)
        logits = self.classifier(hadamard(v, q, a))  # (n, A)
        out = logits.new_zeros(B, Q, logits.shape[-1])
        out[asked] = logits
        att = alpha.new_zeros(B, Q, alpha.shape[-1])
        att[asked] = alpha
        return {"logits": out, "attention": att}


def vqa_loss(logits: torch.Tensor, answers: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy of logits float (B, Q, A) against answers long (B, Q) over the slots that hold
    a question with an answer in the vocabulary (>= 0); `loss` and `accuracy` float scalars."""
    flat, target = rearrange(logits, "b q a -> (b q) a"), answers.flatten()
    keep = target >= 0
    if not bool(keep.any()):
        zero = logits.sum() * 0.0
        return {"loss": zero, "accuracy": zero.detach()}
    loss = F.cross_entropy(flat[keep].float(), target[keep])
    acc = (flat[keep].argmax(dim=-1) == target[keep]).float().mean()
    return {"loss": loss, "accuracy": acc}
