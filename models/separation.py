"""Audio-visual speech separation after Ephrat et al. 2018, "Looking to Listen at the Cocktail Party".

    mixture (B, S) ──STFT──▶ power-law compressed complex spectrogram (B, F, N)
        ──audio stream (dilated 2-D convs)──▶ (B, N, C·F) [──linear──▶ (B, N, P) with audio_proj = P]
    faces (B, K, T, 3, h, w) ──frame CNN──▶ (B, K, T, D) ──dilated temporal convs──▶ (B, K, T, Dv)
        ──nearest upsampling to the STFT frame rate──▶ (B, K, N, Dv)
    fuse (concat per STFT frame) ──BLSTM──FC──▶ one bounded complex ratio mask per speaker (B, K, F, N)
    decode: mask × compressed mixture ──decompress──iSTFT──▶ waveforms (B, K, S)

Departures from the paper, on purpose (what each one measured: BENCHMARKS.md, quality notes):
- Faces: a small CNN over each frame's face crop, trained with the rest, instead of frozen FaceNet
  embeddings (no weight downloads). Its grid is average-pooled (`paper`) or max-pooled (`tiny`:
  "is this object in the picture" is a max).
- Audio width at the fusion: with `audio_proj` (`tiny`: 64) a linear layer + ReLU narrows the C·F
  audio features before they meet the visual ones, so they do not outnumber them fourfold.
- STFT of the `tiny` preset: a 32 ms window every 16 ms (n_fft 512, hop 256) instead of 25 ms every
  10 ms: 0.63x the frames through the full-resolution convolutions and the BLSTM.
- Speaker slots: the head runs once per speaker on [audio, visual_k, mean_j visual_j] and predicts
  that speaker's mask, so output k follows faces[:, k] *by construction* (swapping faces swaps the
  masks bitwise for K=2, to rounding for K=3); the paper predicts all K masks from one head.
- Mask: a complex ratio mask applied to the *compressed* mixture, its real and imaginary parts
  bounded by `mask_bound * tanh(.)` (Williamson et al. 2016). Compressed, ideal masks are tame
  (|S_k/X|^0.3): a bound of 2 covers a mixture 10x quieter than one source.
- Loss: the paper's MSE between compressed clean and estimated spectrograms (PIT-wrapped for the
  audio-only baseline, whose outputs are unordered); with `snr_weight` (`tiny`: 0.1) minus the
  weighted soft-thresholded SNR of each audible estimated waveform (`soft_snr`, Wisdom et al.
  2020), whose gradient stays bounded where the estimate is ~0 (SI-SDR's does not).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as fn
from einops import rearrange
from torch import nn
from torchmetrics.functional.audio import permutation_invariant_training

from models.separation_metrics import audible
from pipelines.spectrogram import SpectrogramConfig, istft, stft

Pair = tuple[int, int]


@dataclass(frozen=True)
class SeparationConfig:
    """AV separator hyper-parameters. Kernels and dilations of the audio stream are (time, freq),
    as in the paper's table; `face_channels` has one stride-2 3x3 conv per entry."""

    num_speakers: int = 2
    audio_only: bool = False
    spec: SpectrogramConfig = field(default_factory=SpectrogramConfig)
    power: float = 0.3
    # audio stream: one (conv, BN, ReLU) per kernel, then a 1x1 conv to `audio_out_channels`
    audio_channels: int = 96
    audio_kernels: tuple[Pair, ...] = ((1, 7), (7, 1)) + ((5, 5),) * 12
    audio_dilations: tuple[Pair, ...] = ((1, 1), (1, 1), (1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (32, 1),
                                         (1, 1), (2, 2), (4, 4), (8, 8), (16, 16), (32, 32))
    audio_out_channels: int = 8
    # visual stream: frame CNN, then dilated temporal convs at the video frame rate
    face_channels: tuple[int, ...] = (32, 64, 128, 256)
    visual_channels: int = 256
    face_pool: str = "avg"  # spatial pooling of the frame CNN's grid: "avg" or "max"
    audio_proj: int = 0  # > 0: a linear layer + ReLU narrows the audio features to this width before fusion
    visual_kernels: tuple[int, ...] = (7, 5, 5, 5, 5, 5)
    visual_dilations: tuple[int, ...] = (1, 1, 2, 4, 8, 16)
    # fusion head
    lstm_hidden: int = 400
    fc_dims: tuple[int, ...] = (600, 600, 600)
    mask_bound: float = 2.0
    eps: float = 1e-8
    snr_weight: float = 0.0  # > 0: the loss also rewards the waveforms' SNR (dB) by this weight,
    snr_max_db: float = 30.0  # the SNR softly capped at this (soft_snr)

    def __post_init__(self) -> None:
        if self.num_speakers < 1:
            raise ValueError("num_speakers must be >= 1")
        if len(self.audio_kernels) != len(self.audio_dilations):
            raise ValueError("audio_kernels and audio_dilations differ in length")
        if len(self.visual_kernels) != len(self.visual_dilations):
            raise ValueError("visual_kernels and visual_dilations differ in length")
        if any(k % 2 == 0 for pair in self.audio_kernels for k in pair) or any(k % 2 == 0 for k in self.visual_kernels):
            raise ValueError("kernel sizes must be odd ('same' padding)")
        if self.audio_proj < 0:
            raise ValueError(f"audio_proj must be >= 0 (0: off), got {self.audio_proj}")
        if self.face_pool not in ("avg", "max"):
            raise ValueError(f"face_pool must be 'avg' or 'max', got {self.face_pool!r}")
        if self.snr_weight < 0:
            raise ValueError(f"snr_weight must be >= 0 (0: the paper's loss), got {self.snr_weight}")
        if self.snr_max_db <= 0:
            raise ValueError(f"snr_max_db must be > 0, got {self.snr_max_db}")
        if not 0.0 < self.power <= 1.0:
            raise ValueError(f"power must be in (0, 1], got {self.power}")


PRESETS: dict[str, SeparationConfig] = {
    "paper": SeparationConfig(),
    # 2 CPU cores: 2 s at 16 kHz, 8 fps crops of 32-48 px; STFT hop 16 ms, window 32 ms (F=257, N=126)
    "tiny": SeparationConfig(
        spec=SpectrogramConfig(n_fft=512, win_length=512, hop_length=256),
        audio_channels=8, audio_kernels=((1, 7), (7, 1), (3, 3), (3, 3)),
        audio_dilations=((1, 1), (1, 1), (2, 1), (4, 2)), audio_out_channels=2,
        audio_proj=64, face_channels=(16, 32, 64), visual_channels=64, face_pool="max",
        visual_kernels=(3, 3), visual_dilations=(1, 2),
        lstm_hidden=64, fc_dims=(128,), snr_weight=0.1,
    ),
}


def compress(spec: torch.Tensor, power: float, eps: float = 1e-8) -> torch.Tensor:
    """Power-law compression of a complex spectrogram: |X|^p e^{i angle X}.

    spec: complex (...) -> complex (...). Magnitudes are clamped at `eps` (finite gradients at 0).
    """
    return spec * spec.abs().clamp_min(eps).pow(power - 1.0)


def decompress(spec: torch.Tensor, power: float, eps: float = 1e-8) -> torch.Tensor:
    """Inverse of `compress`: |Y|^(1/p) e^{i angle Y}. complex (...) -> complex (...)."""
    return spec * spec.abs().clamp_min(eps).pow(1.0 / power - 1.0)


def decode(masks: torch.Tensor, mixture_compressed: torch.Tensor, length: int,
           cfg: SeparationConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masks -> separated spectrograms and waveforms (the model's last stage, public for oracle tests).

    masks: complex (B, K, F, N); mixture_compressed: complex (B, F, N) = compress(stft(mixture)).
    Returns (spec_compressed complex (B, K, F, N), spec complex (B, K, F, N), waveforms float (B, K, length)).
    """
    spec_c = masks * mixture_compressed.unsqueeze(1)  # (B, K, F, N)
    spec = decompress(spec_c, cfg.power, cfg.eps)
    return spec_c, spec, istft(spec, length, cfg.spec)


def _conv_bn_relu(conv: nn.Module, channels: int, bn: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(conv, bn(channels), nn.ReLU(inplace=True))


class AudioStream(nn.Module):
    """Dilated 2-D convs over (time, freq), then with `audio_proj` a linear layer + ReLU per frame:
    compressed complex (B, F, N) -> float (B, N, out_dim), out_dim = audio_proj or C_out·F."""

    def __init__(self, cfg: SeparationConfig) -> None:
        super().__init__()
        layers, c_in = [], 2
        for (kt, kf), (dt, df) in zip(cfg.audio_kernels, cfg.audio_dilations):
            conv = nn.Conv2d(c_in, cfg.audio_channels, (kt, kf), dilation=(dt, df),
                             padding=(dt * (kt - 1) // 2, df * (kf - 1) // 2), bias=False)
            layers.append(_conv_bn_relu(conv, cfg.audio_channels, nn.BatchNorm2d))
            c_in = cfg.audio_channels
        layers.append(_conv_bn_relu(nn.Conv2d(c_in, cfg.audio_out_channels, 1, bias=False),
                                    cfg.audio_out_channels, nn.BatchNorm2d))
        self.net = nn.Sequential(*layers)
        width = cfg.audio_out_channels * cfg.spec.n_freqs
        self.proj = nn.Sequential(nn.Linear(width, cfg.audio_proj), nn.ReLU(inplace=True)) if cfg.audio_proj else None
        self.out_dim = cfg.audio_proj or width

    def forward(self, spec_c: torch.Tensor) -> torch.Tensor:
        x = rearrange(torch.view_as_real(spec_c), "b f n c -> b c n f")  # (B, 2, N, F)
        x = self.net(x)  # (B, C_out, N, F)
        x = rearrange(x, "b c n f -> b n (c f)")  # (B, N, C_out·F)
        return x if self.proj is None else self.proj(x)  # (B, N, out_dim)


class VisualStream(nn.Module):
    """Per-frame face CNN + dilated temporal convs: float (B, K, T, 3, h, w) -> float (B, K, T, Dv)."""

    def __init__(self, cfg: SeparationConfig) -> None:
        super().__init__()
        layers, c_in = [], 3
        for c in cfg.face_channels:
            layers.append(_conv_bn_relu(nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), c, nn.BatchNorm2d))
            c_in = c
        pool = nn.AdaptiveMaxPool2d(1) if cfg.face_pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.frame_cnn = nn.Sequential(*layers, pool, nn.Flatten())
        temporal = []
        for k, d in zip(cfg.visual_kernels, cfg.visual_dilations):
            conv = nn.Conv1d(c_in, cfg.visual_channels, k, dilation=d, padding=d * (k - 1) // 2, bias=False)
            temporal.append(_conv_bn_relu(conv, cfg.visual_channels, nn.BatchNorm1d))
            c_in = cfg.visual_channels
        self.temporal = nn.Sequential(*temporal)
        self.out_dim = c_in

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        b, k, t = faces.shape[:3]
        x = self.frame_cnn(faces.flatten(0, 2) - 0.5)  # (B·K·T, D)
        x = rearrange(x, "(b k t) d -> (b k) d t", b=b, k=k, t=t)  # (B·K, D, T)
        x = self.temporal(x)  # (B·K, Dv, T)
        return rearrange(x, "(b k) d t -> b k t d", b=b, k=k)  # (B, K, T, Dv)


class MaskHead(nn.Module):
    """BLSTM + FC layers -> bounded real/imag mask parts: float (B', N, D) -> float (B', N, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: SeparationConfig) -> None:
        super().__init__()
        self.blstm = nn.LSTM(in_dim, cfg.lstm_hidden, batch_first=True, bidirectional=True)
        fcs, d = [], 2 * cfg.lstm_hidden
        for width in cfg.fc_dims:
            fcs += [nn.Linear(d, width), nn.ReLU(inplace=True)]
            d = width
        self.fc = nn.Sequential(*fcs, nn.Linear(d, out_dim))
        self.bound = cfg.mask_bound

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.blstm(x)  # (B', N, 2H)
        return self.bound * torch.tanh(self.fc(x))  # (B', N, out_dim)


class AVSeparator(nn.Module):
    """Looking-to-Listen separator; `cfg.audio_only` gives the audio-only (PIT) baseline."""

    def __init__(self, cfg: SeparationConfig = PRESETS["tiny"]) -> None:
        super().__init__()
        self.cfg = cfg
        f, k = cfg.spec.n_freqs, cfg.num_speakers
        self.audio = AudioStream(cfg)
        audio_dim = self.audio.out_dim
        if cfg.audio_only:
            self.visual = None
            self.head = MaskHead(audio_dim, k * 2 * f, cfg)  # all K masks from one stream
        else:
            self.visual = VisualStream(cfg)
            self.head = MaskHead(audio_dim + 2 * self.visual.out_dim, 2 * f, cfg)  # one mask per speaker query

    def encode_visual(self, faces: torch.Tensor, num_frames: int) -> torch.Tensor:
        """float (B, K, T, 3, h, w) -> float (B, K, N, Dv), nearest-upsampled to the STFT frame rate."""
        v = self.visual(faces)  # (B, K, T, Dv)
        b = v.shape[0]
        v = fn.interpolate(rearrange(v, "b k t d -> (b k) d t"), size=num_frames, mode="nearest")  # (B·K, Dv, N)
        return rearrange(v, "(b k) d n -> b k n d", b=b)  # (B, K, N, Dv)

    def fuse(self, audio: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """audio (B, N, Da), visual (B, K, N, Dv) | None -> (B·K, N, Da + 2·Dv) or (B, N, Da) audio-only."""
        if visual is None:
            return audio
        k = visual.shape[1]
        context = visual.mean(dim=1, keepdim=True).expand_as(visual)  # (B, K, N, Dv), symmetric in speakers
        x = torch.cat([audio.unsqueeze(1).expand(-1, k, -1, -1), visual, context], dim=-1)  # (B, K, N, D)
        return x.flatten(0, 1)  # (B·K, N, D)

    def estimate_masks(self, fused: torch.Tensor, batch: int) -> torch.Tensor:
        """fused (B·K or B, N, D) -> complex masks (B, K, F, N)."""
        raw = self.head(fused)  # (B·K, N, 2F) or (B, N, K·2F)
        pattern = "b n (k c f) -> b k f n c" if self.cfg.audio_only else "(b k) n (c f) -> b k f n c"
        raw = rearrange(raw, pattern, b=batch, k=self.cfg.num_speakers, c=2)  # (B, K, F, N, 2)
        raw = raw.float()  # complex needs float32: under bf16 autocast the head gives bfloat16
        return torch.complex(raw[..., 0], raw[..., 1])  # (B, K, F, N)

    def forward(self, mixture: torch.Tensor, faces: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Separate K speakers.

        mixture: float (B, S); faces: float (B, K, T, 3, h, w) in [0, 1] (ignored, may be None, when
        audio-only). Returns `masks`, `spec_compressed`, `spec` complex (B, K, F, N) and `waveforms`
        float (B, K, S). AV mode: output k is the speaker of faces[:, k]; audio-only: unordered.
        """
        b, s = mixture.shape
        if not self.cfg.audio_only and (faces is None or faces.shape[:2] != (b, self.cfg.num_speakers)):
            raise ValueError(f"AV mode needs faces (B={b}, K={self.cfg.num_speakers}, T, 3, h, w), "
                             f"got {None if faces is None else tuple(faces.shape)}")
        mix_c = compress(stft(mixture, self.cfg.spec), self.cfg.power, self.cfg.eps)  # (B, F, N)
        audio = self.audio(mix_c)  # encode audio: (B, N, Da)
        visual = None if self.visual is None else self.encode_visual(faces, mix_c.shape[-1])  # encode visual
        fused = self.fuse(audio, visual)  # fuse
        masks = self.estimate_masks(fused, b)  # mask: (B, K, F, N)
        spec_c, spec, waves = decode(masks, mix_c, s, self.cfg)  # decode
        return {"masks": masks, "spec_compressed": spec_c, "spec": spec, "waveforms": waves}


def mix_and_separate_batch(audio: torch.Tensor, faces: torch.Tensor, k: int,
                           generator: torch.Generator | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix-and-separate training examples from a batch of single-speaker clips, on the fly.

    audio: float (B, S); faces: float (B, T, 3, h, w). With a random permutation p of the batch,
    mixture j sums clips p[(j + i) mod B] for i = 0..k-1, so B' = B: every clip appears exactly once
    in each of the k speaker slots, and the k clips of a mixture are distinct (needs B >= k).
    Returns mixture float (B, S), sources float (B, K, S), faces float (B, K, T, 3, h, w).
    """
    b = audio.shape[0]
    if not 1 <= k <= b:
        raise ValueError(f"need 1 <= k <= batch size, got k={k}, B={b}")
    perm = torch.randperm(b, generator=generator).to(audio.device)
    idx = perm[(torch.arange(b, device=audio.device)[:, None] + torch.arange(k, device=audio.device)) % b]  # (B, K)
    sources = audio[idx]  # (B, K, S)
    return sources.sum(dim=1), sources, faces[idx]  # (B, S), (B, K, S), (B, K, T, 3, h, w)


def soft_snr(est: torch.Tensor, ref: torch.Tensor, max_db: float) -> torch.Tensor:
    """SNR in dB with the soft threshold of Wisdom et al. 2020 (mixture invariant training):
    10 log10(|ref|^2 / (|ref - est|^2 + tau |ref|^2)), tau = 10^(-max_db / 10). float (B, S) x2 ->
    float (B,), at most `max_db`. Unlike SI-SDR, its gradient stays bounded where est is ~0, as a
    separator's output is at the start of training; undefined for a silent reference."""
    power = ref.square().sum(dim=-1)
    return 10 * torch.log10(power / ((ref - est).square().sum(dim=-1) + 10 ** (-max_db / 10) * power))


def _pair_loss(est: torch.Tensor, ref: torch.Tensor, bins: int, snr_weight: float, snr_max_db: float) -> torch.Tensor:
    """Loss of one estimate against one reference per example, on packed rows (`_pack`): float
    (B, 2·bins + S) x2 -> float (B,). The complex MSE of the compressed spectrograms (mean over
    the bins of |est - ref|^2), minus `snr_weight` x the waveforms' `soft_snr` (dB) where the
    reference is audible (silent references add nothing)."""
    loss = 2 * (est[:, :2 * bins] - ref[:, :2 * bins]).square().mean(dim=1)  # 2x: mean over (re, im) pairs
    if snr_weight:
        est_w, ref_w = est[:, 2 * bins:], ref[:, 2 * bins:]
        heard = audible(ref_w)
        score = torch.zeros_like(loss)
        if heard.any():
            score[heard] = soft_snr(est_w[heard], ref_w[heard], snr_max_db)
        loss = loss - snr_weight * score
    return loss


def _pack(spec: torch.Tensor, waves: torch.Tensor) -> torch.Tensor:
    """complex (B, K, F, N), float (B, K, S) -> float (B, K, 2·F·N + S): one row per speaker, so that
    PIT (torchmetrics) can pair estimates and references by `_pair_loss`."""
    return torch.cat([torch.view_as_real(spec).flatten(2), waves.float()], dim=-1)


def separation_loss(out: dict[str, torch.Tensor], sources: torch.Tensor, cfg: SeparationConfig) -> torch.Tensor:
    """The paper's loss: MSE between compressed clean and estimated complex spectrograms, a scalar;
    with `cfg.snr_weight` > 0, minus that weight x the soft-thresholded SNR (dB, `soft_snr`) of each
    estimated waveform whose reference is audible (`_pair_loss`), averaged over speakers and examples.

    out: `AVSeparator` output (uses `spec_compressed` complex (B, K, F, N) and `waveforms` (B, K, S));
    sources float (B, K, S). Audio-only: the minimum over output permutations per example (PIT via
    torchmetrics, which builds the K x K pairwise loss matrix and searches all K! pairings, or uses
    scipy's Hungarian solver for K >= 3 when scipy is installed; both exact). The gradient flows
    through the chosen pairing only.
    """
    ref_spec = compress(stft(sources, cfg.spec), cfg.power, cfg.eps)  # (B, K, F, N)
    bins = ref_spec.shape[-2] * ref_spec.shape[-1]
    est, ref = _pack(out["spec_compressed"], out["waveforms"]), _pack(ref_spec, sources)
    if not cfg.audio_only:
        return _pair_loss(est.flatten(0, 1), ref.flatten(0, 1), bins, cfg.snr_weight, cfg.snr_max_db).mean()
    with warnings.catch_warnings():  # "install scipy" hint: for K <= 3 the K! search is 6 pairings at most
        warnings.filterwarnings("ignore", message="In pit metric")
        best, _ = permutation_invariant_training(est, ref, _pair_loss, mode="speaker-wise", eval_func="min",
                                                 bins=bins, snr_weight=cfg.snr_weight, snr_max_db=cfg.snr_max_db)  # (B,)
    return best.mean()
