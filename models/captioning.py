"""Video captioning with audio after Show, Attend and Tell (Xu et al. ICML 2015, soft attention).

    frames (B, T, 3, H, W) ─VisualEncoder per frame─▶ grid (B, T, D, h, w)
        ─[D; cell x, y] → linear + time embedding[t]─▶ annotations a (B, P = T*h*w, D')
    logmel (B, M, N) ─AudioEncoder → linear─▶ audio embedding (B, Da)   (or the learned "no audio" one)
    LSTM decoder, one word per step t:
        e_ti = w·tanh(W_a a_i + W_h h_{t-1}),  alpha_t = softmax_i(e_t)              (paper eq. 4-5)
        z_t = beta_t Σ_i alpha_ti a_i,  beta_t = sigmoid(f_beta(h_{t-1}))           (paper §4.2.1)
        h_t = LSTM([E y_{t-1}; z_t; audio], h_{t-1});  h_0, c_0 = MLPs of [mean_i a_i; audio]
        p(y_t) ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z z_t))                            (deep output, eq. 7)

Attention runs jointly over time and space (all cells of all frames). The cell coordinates enter
the annotations (CoordConv-style, any grid size) so the soft-attention context, a weighted SUM
that otherwise forgets where it looked, can say "on the left"; the time embedding lets the model
tell frames apart. The vocabulary lives in the config (`CaptioningConfig.vocab`), so a checkpoint
rebuilds the model with its words. `caption_loss` adds the doubly stochastic penalty (eq. 14).

The tiny preset's encoder sees every 8th frame of a clip (`frame_stride`): each decoder step
attends over all T*h*w cells, so at every frame the decoder, not the CNN, set the pace, and more
epochs in the time budget outweighed the lost frames (BENCHMARKS.md, quality notes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from models.encoders import AudioEncoder, AudioEncoderConfig, VisualEncoder, VisualEncoderConfig
from models.text import BOS, EOS, PAD, SPECIALS

@dataclass(frozen=True)
class CaptioningConfig:
    """Captioner. `vocab`: the words, SPECIALS first; `feature_dim`: D', annotation width;
    `audio_dim`: Da; `embed_dim`, `hidden_dim`, `attention_dim`: word embedding, LSTM and attention
    MLP widths; `max_len`: caption ids incl. <bos>/<eos> for training and generated ids at
    inference; `max_frames`: size of the time embedding (T <= max_frames); `doubly_stochastic`: λ of
    eq. 14; `audio_dropout`: in training, the fraction of samples whose audio embedding is replaced
    by the learned "no audio" one (so captioning with `audio=None` is trained too);
    `image_size`: the frame side the data pipeline resizes to (the model accepts any size);
    `frame_stride`: the encoder sees every `frame_stride`-th frame of a clip (frames 0, k, 2k, ...),
    so attention runs over ceil(T / k) frames' cells."""

    vocab: tuple[str, ...] = SPECIALS
    visual: VisualEncoderConfig = field(default_factory=lambda: VisualEncoderConfig(arch="tiny", width=16))
    audio: AudioEncoderConfig = field(default_factory=lambda: AudioEncoderConfig(arch="tiny", width=8))
    use_audio: bool = True
    feature_dim: int = 128
    audio_dim: int = 64
    embed_dim: int = 64
    hidden_dim: int = 128
    attention_dim: int = 64
    max_len: int = 20
    max_frames: int = 16
    dropout: float = 0.1
    doubly_stochastic: float = 0.01
    audio_dropout: float = 0.2
    image_size: int = 64
    frame_stride: int = 1

    def __post_init__(self) -> None:
        if tuple(self.vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with {SPECIALS}, got {tuple(self.vocab[:4])}")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocab has duplicate words")
        if min(self.feature_dim, self.audio_dim, self.embed_dim, self.hidden_dim, self.attention_dim,
               self.max_frames, self.frame_stride) <= 0 or self.max_len < 2:
            raise ValueError("widths, max_frames and frame_stride must be positive and max_len >= 2")
        if not (0 <= self.dropout < 1 and 0 <= self.audio_dropout <= 1 and self.doubly_stochastic >= 0):
            raise ValueError("dropout must be in [0, 1), audio_dropout in [0, 1], doubly_stochastic >= 0")


PRESETS: dict[str, CaptioningConfig] = {
    # 0.39 M parameters (389,932 + 129 per word); 64 px frames -> 8 x 8 cells per frame; trains on 2 CPU cores.
    # Every 8th frame (a 16-frame clip at 8 fps -> 2 frames, 128 cells): 8x fewer attention cells per
    # decoder step and 8x fewer frames through the CNN than every frame (see the module docstring).
    "tiny": CaptioningConfig(frame_stride=8),
    # 27.8 M parameters (27,834,116 + 1,025 per word). ResNet-18 trunk at 224 px (7 x 7 x 512
    # annotations per frame; the paper used VGG conv5_4, 14 x 14 x 512), word embedding and
    # attention 512, LSTM 1024; VGGish audio with a 128-d embedding; λ = 1 (common reimplementations).
    "paper": CaptioningConfig(
        visual=VisualEncoderConfig(arch="resnet18"), audio=AudioEncoderConfig(arch="vggish"),
        feature_dim=512, audio_dim=128, embed_dim=512, hidden_dim=1024, attention_dim=512, max_len=32,
        max_frames=32, dropout=0.5, doubly_stochastic=1.0, audio_dropout=0.2, image_size=224),
}
"""Presets with the special tokens as their only words: training fits the vocabulary (`build_vocab`)."""


@dataclass
class _Memory:
    """Encoder output: annotations (B, P, D'), their attention projection (B, P, A), audio (B, Da)."""

    ann: torch.Tensor
    att: torch.Tensor
    audio: torch.Tensor

    def rows(self, idx: torch.Tensor) -> "_Memory":
        return _Memory(self.ann[idx], self.att[idx], self.audio[idx])


class Captioner(nn.Module):
    """Frames (+ log-mel) -> caption word logits with per-step soft attention over all cells."""

    def __init__(self, cfg: CaptioningConfig = CaptioningConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        V, Dp, Da, E, Hd, A = (len(cfg.vocab), cfg.feature_dim, cfg.audio_dim, cfg.embed_dim, cfg.hidden_dim,
                               cfg.attention_dim)
        self.visual = VisualEncoder(cfg.visual)
        self.cell_proj = nn.Linear(self.visual.out_dim + 2, Dp)  # [feature; x; y] -> D'
        self.time_embed = nn.Embedding(cfg.max_frames, Dp)
        if cfg.use_audio:
            self.audio = AudioEncoder(cfg.audio)
            self.audio_proj = nn.Linear(self.audio.out_dim, Da)
        self.no_audio = nn.Parameter(torch.zeros(Da))
        self.embed = nn.Embedding(V, E, padding_idx=PAD)
        self.att_feat, self.att_hid, self.att_out = nn.Linear(Dp, A), nn.Linear(Hd, A), nn.Linear(A, 1)
        self.f_beta = nn.Linear(Hd, 1)
        self.init_h, self.init_c = nn.Linear(Dp + Da, Hd), nn.Linear(Dp + Da, Hd)
        self.lstm = nn.LSTMCell(E + Dp + Da, Hd)
        self.out_h, self.out_z = nn.Linear(Hd, E), nn.Linear(Dp, E)
        self.out = nn.Linear(E, V)
        self.drop = nn.Dropout(cfg.dropout)

    # --- encoder -----------------------------------------------------------------------------
    def annotations(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: float (B, T, 3, H, W) in [0, 1] (or (B, 3, H, W) for T = 1) -> annotation vectors
        float (B, T'*h*w, D') of frames 0, k, 2k, ... (k = `cfg.frame_stride`, T' = ceil(T / k)),
        ordered frame-major then row-major over cells."""
        if frames.dim() == 4:
            frames = frames.unsqueeze(1)  # (B, 1, 3, H, W)
        cells = self.visual.frame_cells(frames[:, :: self.cfg.frame_stride], self.cfg.max_frames)  # (B, T', h*w, D + 2)
        ann = self.cell_proj(cells)  # (B, T', h*w, D')
        ann = ann + self.time_embed.weight[:cells.shape[1], None, :]  # time embedding broadcast over cells
        return rearrange(ann, "b t p d -> b (t p) d")  # (B, T*h*w, D')

    def audio_embedding(self, logmel: torch.Tensor | None, batch: int) -> torch.Tensor:
        """logmel float (B, M, N) or None -> float (B, Da). None (or `use_audio=False`) gives the
        learned "no audio" embedding; in training, `audio_dropout` of the samples get it too."""
        no_audio = self.no_audio.expand(batch, -1)  # (B, Da)
        if logmel is None or not self.cfg.use_audio:
            return no_audio
        emb = self.audio_proj(self.audio(logmel))  # (B, Da)
        if self.training and self.cfg.audio_dropout > 0:
            drop = torch.rand(batch, 1, device=emb.device) < self.cfg.audio_dropout  # (B, 1)
            emb = torch.where(drop, no_audio, emb)
        return emb

    def _encode(self, frames: torch.Tensor, logmel: torch.Tensor | None) -> _Memory:
        ann = self.annotations(frames)  # (B, P, D')
        return _Memory(ann, self.att_feat(ann), self.audio_embedding(logmel, ann.shape[0]))

    # --- decoder -----------------------------------------------------------------------------
    def _init_state(self, mem: _Memory) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([mem.ann.mean(dim=1), mem.audio], dim=-1)  # (B, D' + Da)
        return torch.tanh(self.init_h(x)), torch.tanh(self.init_c(x))

    def _step(self, words: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], mem: _Memory
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One decoder step: words long (B,) = y_{t-1}; returns logits (B, V), alpha (B, P), state."""
        h, c = state
        e = self.att_out(torch.tanh(mem.att + self.att_hid(h)[:, None, :]))[..., 0]  # (B, P)
        alpha = torch.softmax(e, dim=-1)
        z = torch.sigmoid(self.f_beta(h)) * einsum(alpha, mem.ann, "b p, b p d -> b d")  # (B, D')
        emb = self.embed(words)  # (B, E)
        h, c = self.lstm(torch.cat([emb, z, mem.audio], dim=-1), (h, c))
        logits = self.out(self.drop(emb + self.out_h(self.drop(h)) + self.out_z(z)))  # (B, V)
        return logits, alpha, (h, c)

    @staticmethod
    def _no_specials(logits: torch.Tensor) -> torch.Tensor:
        """Inference never emits PAD or BOS: their logits (B, V) become -inf."""
        return logits.index_fill(-1, torch.tensor([PAD, BOS], device=logits.device), float("-inf"))

    def forward(self, frames: torch.Tensor, logmel: torch.Tensor | None,
                captions_in: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced decoding. frames: float (B, T, 3, H, W) in [0, 1]; logmel: float (B, M, N)
        or None; captions_in: long (B, L), starting with BOS. Returns float `logits` (B, L, V) and
        `alphas` (B, L, T'*h*w) (each row sums to 1 over the cells; T' = ceil(T / cfg.frame_stride))."""
        mem = self._encode(frames, logmel)
        state = self._init_state(mem)
        logits, alphas = [], []
        for t in range(captions_in.shape[1]):
            step_logits, alpha, state = self._step(captions_in[:, t], state, mem)
            logits.append(step_logits)
            alphas.append(alpha)
        return {"logits": torch.stack(logits, dim=1), "alphas": torch.stack(alphas, dim=1)}

    @torch.no_grad()
    def greedy(self, frames: torch.Tensor, logmel: torch.Tensor | None, max_len: int | None = None) -> torch.Tensor:
        """Greedy decoding (call `.eval()` first). Returns long (B, L') generated ids without BOS,
        each row ending at its EOS (PAD after it); L' <= max_len (default `cfg.max_len`)."""
        max_len = self.cfg.max_len if max_len is None else max_len
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        mem = self._encode(frames, logmel)
        state = self._init_state(mem)
        words = torch.full((mem.ann.shape[0],), BOS, dtype=torch.long, device=mem.ann.device)
        done = torch.zeros_like(words, dtype=torch.bool)
        out = []
        for _ in range(max_len):
            logits, _, state = self._step(words, state, mem)
            words = self._no_specials(logits).argmax(dim=-1).masked_fill(done, PAD)  # (B,)
            out.append(words)
            done = done | (words == EOS)
            if bool(done.all()):
                break
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def beam_search(self, frames: torch.Tensor, logmel: torch.Tensor | None, beam_size: int = 3,
                    max_len: int | None = None) -> list[list[int]]:
        """Beam search per sample (call `.eval()` first), scored by the length-normalised log-prob
        (sum of log-probs / number of generated ids, EOS included). A hypothesis that emits EOS
        leaves the beam, which then shrinks; search ends when none is left or after `max_len` ids.
        Returns per sample the best id list without BOS (ending with EOS unless cut at max_len);
        beam_size=1 gives the `greedy` rows."""
        max_len = self.cfg.max_len if max_len is None else max_len
        if beam_size < 1 or max_len < 1:
            raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size} and {max_len}")
        mem_all = self._encode(frames, logmel)
        results = []
        for b in range(mem_all.ann.shape[0]):
            mem = mem_all.rows(torch.tensor([b], device=mem_all.ann.device))  # one hypothesis to start
            state = self._init_state(mem)
            words = torch.full((1,), BOS, dtype=torch.long, device=mem.ann.device)
            scores = torch.zeros(1, device=mem.ann.device)
            seqs: list[list[int]] = [[]]
            finished: list[tuple[float, list[int]]] = []
            for _ in range(max_len):
                logits, _, state = self._step(words, state, mem)
                cand = (scores[:, None] + torch.log_softmax(self._no_specials(logits), dim=-1)).flatten()  # (k * V,)
                top, idx = cand.topk(min(beam_size - len(finished), cand.numel()))
                src, tok = idx // logits.shape[-1], idx % logits.shape[-1]
                keep = tok != EOS
                for s, i, t in zip(top[~keep].tolist(), src[~keep].tolist(), tok[~keep].tolist()):
                    finished.append((s / (len(seqs[i]) + 1), seqs[i] + [t]))
                if not bool(keep.any()):
                    seqs = []
                    break
                src, tok, scores = src[keep], tok[keep], top[keep]
                seqs = [seqs[i] + [t] for i, t in zip(src.tolist(), tok.tolist())]
                state = (state[0][src], state[1][src])
                mem = mem.rows(torch.zeros_like(src))
                words = tok
            finished += [(s / len(q), q) for s, q in zip(scores.tolist(), seqs)]
            results.append(max(finished, key=lambda f: f[0])[1])
        return results


def caption_loss(out: dict[str, torch.Tensor], targets: torch.Tensor,
                 cfg: CaptioningConfig) -> dict[str, torch.Tensor]:
    """Show-Attend-Tell objective (eq. 14) for `Captioner.forward` output `out` and targets long
    (B, L) (the decoder input shifted by one; PAD where there is no word):

    - `xent`: mean cross-entropy over non-PAD targets;
    - `attention_reg`: Σ_i (1 − Σ_t α_ti)² over the cells i, with t over non-PAD steps, mean over B;
    - `loss` = xent + cfg.doubly_stochastic * attention_reg. All float scalars."""
    logits, alphas = out["logits"], out["alphas"]
    mask = targets != PAD  # (B, L)
    if bool(mask.any()):
        xent = F.cross_entropy(rearrange(logits, "b l v -> (b l) v"), targets.flatten(), ignore_index=PAD)
    else:
        xent = logits.sum() * 0.0
    coverage = einsum(alphas, mask.to(alphas.dtype), "b l p, b l -> b p")  # (B, P): Σ_t α_ti
    reg = (1.0 - coverage).pow(2).sum(dim=-1).mean()
    return {"loss": xent + cfg.doubly_stochastic * reg, "xent": xent, "attention_reg": reg}
