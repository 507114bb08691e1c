"""What a clip contains: one settings object from `avray preprocess` to the checkpoint to `avray serve`.

    avray preprocess ──writes──▶ OUT/_config.json ──avray train copies──▶ checkpoint extra["clip_settings"]
                                                   ──avray serve reads──▶ uploads decoded exactly so

`ClipSettings` holds the settings that change a clip's content (span, frames, audio, log-mel);
limits (pixels, duration, URI schemes), threading and the seek path (`seek`: the same frames,
decoded faster; `keyframes_only`: a per-run speed/accuracy trade) are per run and live in
`DecodeConfig` only. `to_dict` / `from_dict` are its one serialised form (plain JSON types, the keys of
_config.json besides `jobs.train.RUN_KEYS`: `carried_columns`, and `keyframes_only` when it was set,
so that a rerun into the same OUT cannot mix approximate and exact clips).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipelines.decode import DecodeConfig
from pipelines.spectrogram import SpectrogramConfig

_DECODE, _SPEC = DecodeConfig(), SpectrogramConfig()


@dataclass(frozen=True)
class ClipSettings:
    """Clip span (`clip_seconds`, `hop_seconds`: None = back to back), frames (`fps`, `size`,
    `resize`: crop | letterbox), audio (`sample_rate`, mono) and the stored log-mel (`n_mels`,
    `n_fft`, `hop_length`, `win_length`). Defaults: DecodeConfig's and SpectrogramConfig's."""

    clip_seconds: float = _DECODE.clip_seconds
    hop_seconds: float | None = _DECODE.hop_seconds
    fps: float = _DECODE.fps
    size: int = _DECODE.size
    resize: str = _DECODE.resize
    sample_rate: int = _DECODE.sample_rate
    n_mels: int = _SPEC.n_mels
    n_fft: int = _SPEC.n_fft
    hop_length: int = _SPEC.hop_length
    win_length: int = _SPEC.win_length

    def __post_init__(self) -> None:
        self.decode_config()  # the decoder's and the spectrogram's own checks, at construction
        self.spectrogram_config()

    def decode_config(self, **run: Any) -> DecodeConfig:
        """The decoder settings that make such clips; `run`: per-run DecodeConfig fields
        (max_pixels, max_seconds, threads, allowed_schemes, seek, keyframes_only)."""
        return DecodeConfig(clip_seconds=self.clip_seconds, hop_seconds=self.hop_seconds, fps=self.fps,
                            size=self.size, resize=self.resize, sample_rate=self.sample_rate, **run)

    def spectrogram_config(self) -> SpectrogramConfig:
        """The log-mel settings of the clips' `logmel` column."""
        return SpectrogramConfig(sample_rate=self.sample_rate, n_fft=self.n_fft, win_length=self.win_length,
                                 hop_length=self.hop_length, n_mels=self.n_mels)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClipSettings":
        """Inverse of `to_dict`. Unknown keys raise ValueError (a typo must not fall back to a default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown clip settings {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_fields(cls, obj: Any) -> "ClipSettings":
        """The settings named the same way on `obj` (e.g. avray preprocess's options)."""
        return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})
