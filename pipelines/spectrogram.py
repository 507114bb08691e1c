"""Spectrograms with torch / torchaudio: log-mel for the audio encoders, complex STFT and its
inverse for separation. Pure functions over batched tensors plus thin `nn.Module` wrappers;
every function accepts any leading batch shape `(..., S)`, and a batch gives the same result
as stacking single calls (tested).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torchaudio


@dataclass(frozen=True)
class SpectrogramConfig:
    """STFT / mel parameters shared by ingest (stored log-mel) and the models (recomputed STFT)."""

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float | None = None
    log_eps: float = 1e-6

    def __post_init__(self) -> None:
        if not (0 < self.win_length <= self.n_fft):
            raise ValueError(f"win_length must be in (0, n_fft={self.n_fft}], got {self.win_length}")
        if self.hop_length <= 0 or self.n_mels <= 0 or self.sample_rate <= 0:
            raise ValueError("sample_rate, hop_length and n_mels must be positive")

    @property
    def n_freqs(self) -> int:
        """F: one-sided frequency bins of the STFT."""
        return self.n_fft // 2 + 1

    def num_frames(self, num_samples: int) -> int:
        """N: STFT frames for S samples (centred, reflect-padded, as torch.stft(center=True))."""
        return num_samples // self.hop_length + 1


@functools.lru_cache(maxsize=8)
def _mel_transform(cfg: SpectrogramConfig) -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length,
        hop_length=cfg.hop_length, f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels,
        power=2.0, center=True, pad_mode="reflect", norm=None, mel_scale="htk",
    )


@functools.lru_cache(maxsize=8)
def _window(win_length: int) -> torch.Tensor:
    return torch.hann_window(win_length)


def log_mel(audio: torch.Tensor, cfg: SpectrogramConfig = SpectrogramConfig()) -> torch.Tensor:
    """Natural-log mel power spectrogram.

    audio: float32 (..., S) -> float32 (..., M, N) with M = cfg.n_mels, N = S // hop + 1.
    """
    mel = _mel_transform(cfg).to(audio.device)(audio)  # (..., M, N)
    return torch.log(mel + cfg.log_eps)


def stft(audio: torch.Tensor, cfg: SpectrogramConfig = SpectrogramConfig()) -> torch.Tensor:
    """Complex STFT with a Hann window.

    audio: float32 (..., S) -> complex64 (..., F, N) with F = n_fft // 2 + 1.
    """
    lead = audio.shape[:-1]
    flat = audio.reshape(-1, audio.shape[-1])  # (B', S)
    spec = torch.stft(flat, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                      window=_window(cfg.win_length).to(audio.device), center=True,
                      pad_mode="reflect", return_complex=True)  # (B', F, N)
    return spec.reshape(*lead, *spec.shape[-2:])  # (..., F, N)


def istft(spec: torch.Tensor, length: int, cfg: SpectrogramConfig = SpectrogramConfig()) -> torch.Tensor:
    """Inverse of `stft`.

    spec: complex (..., F, N) -> float32 (..., length).
    """
    lead = spec.shape[:-2]
    flat = spec.reshape(-1, *spec.shape[-2:])  # (B', F, N)
    wave = torch.istft(flat, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                       window=_window(cfg.win_length).to(spec.device), center=True, length=length)  # (B', S)
    return wave.reshape(*lead, length)  # (..., S)


class LogMel(torch.nn.Module):
    """`log_mel` as a module: float32 (..., S) -> float32 (..., M, N)."""

    def __init__(self, cfg: SpectrogramConfig = SpectrogramConfig()) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return log_mel(audio, self.cfg)
