"""Sounds of the synthetic scenes (`pipelines/synth.py`): the kind -> sound table, the sound
generators, on/off segments, loudness envelopes, real speech loading and float WAV I/O.

Every sound is a property of an object's (shape, colour) (`SOUND_TABLE`), so a model can
learn "what sounds like what". Sound names say what they are:

- `tone_<f0>`: a harmonic tone (4 harmonics, 1/h amplitudes) at f0 Hz, with a slow tremolo;
- `noise_<lo>_<hi>`: noise band-limited to lo..hi Hz (clamped below Nyquist), slow tremolo;
- `clicks_<rate>hz`: a train of short damped 2 kHz clicks at `rate` per second;
- `speech:<file name>`: a real recording (only with a speech folder: circles talk).

Each type is spread over the shapes and colours, so neither shape nor colour alone gives
the sound type. Tones, noise and speech are normalised to RMS 0.1 while sounding, clicks to
a peak of 0.6 (RMS-normalised sparse clicks would peak far above 1).
"""

from __future__ import annotations

import functools
import logging
import struct
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {  # well separated in RGB, bright on the dark background
    "red": (225, 45, 45),
    "green": (40, 200, 70),
    "blue": (55, 110, 240),
    "yellow": (235, 215, 40),
}
TEXTURES: tuple[str, ...] = ("solid", "striped")

# (shape, colour) -> sound. Type cycles with (shape index + colour index) % 3, so every shape
# has every type; parameters are distinct within a type.
SOUND_TABLE: dict[tuple[str, str], str] = {
    ("circle", "red"): "tone_220",
    ("circle", "green"): "noise_200_500",
    ("circle", "blue"): "clicks_2hz",
    ("circle", "yellow"): "tone_392",
    ("square", "red"): "noise_600_1200",
    ("square", "green"): "clicks_4hz",
    ("square", "blue"): "tone_294",
    ("square", "yellow"): "noise_1500_3000",
    ("triangle", "red"): "clicks_7hz",
    ("triangle", "green"): "tone_523",
    ("triangle", "blue"): "noise_3500_7000",
    ("triangle", "yellow"): "clicks_12hz",
}
SPEECH_SHAPE = "circle"  # with a speech folder, objects of this shape talk
SPEECH_SUFFIXES = (".wav", ".mp3", ".flac")

# sound type -> verb of the caption grammar
VERBS: dict[str, str] = {"tone": "hums", "noise": "hisses", "clicks": "clicks", "speech": "talks"}

RMS_TARGET = 0.1
CLICK_PEAK = 0.6
RAMP_S = 0.01  # raised-cosine fade at each segment edge (no clicks from gating)


def sound_type(sound: str) -> str:
    """'tone_220' -> 'tone', 'speech:x.wav' -> 'speech'."""
    return sound.split(":", 1)[0] if sound.startswith("speech:") else sound.split("_", 1)[0]


def _tremolo(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Slow random amplitude modulation in [0.3, 1] so loudness (and the drawn size) varies."""
    rate = rng.uniform(0.5, 3.0)
    phase = rng.uniform(0, 2 * np.pi)
    return 0.65 + 0.35 * np.sin(2 * np.pi * rate * t + phase)


def _rms_normalise(x: np.ndarray) -> np.ndarray:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    return x * (RMS_TARGET / rms) if rms > 0 else x


def synth_sound(sound: str, num_samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic sound (not speech), continuous over the scene.

    Returns float32 (S,) with S = num_samples, before on/off gating.
    """
    kind, *params = sound.split("_")
    t = np.arange(num_samples, dtype=np.float64) / sample_rate
    nyquist = sample_rate / 2
    if kind == "tone":
        f0 = float(params[0])
        x = np.zeros(num_samples)
        for h in range(1, 5):
            if h * f0 < 0.45 * sample_rate:
                x += np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 2 * np.pi)) / h
        x = _rms_normalise(x * _tremolo(rng, t))
    elif kind == "noise":
        lo, hi = float(params[0]), min(float(params[1]), 0.95 * nyquist)
        lo = min(lo, 0.5 * hi)
        spec = np.fft.rfft(rng.standard_normal(num_samples))
        freqs = np.fft.rfftfreq(num_samples, 1.0 / sample_rate)
        spec[(freqs < lo) | (freqs > hi)] = 0
        x = _rms_normalise(np.fft.irfft(spec, n=num_samples) * _tremolo(rng, t))
    elif kind == "clicks":
        rate = float(params[0].removesuffix("hz"))
        n_k = max(1, int(0.015 * sample_rate))
        tk = np.arange(n_k) / sample_rate
        kernel = np.sin(2 * np.pi * min(2000.0, 0.4 * sample_rate) * tk) * np.exp(-tk / 0.002)
        impulses = np.zeros(num_samples + n_k)
        onsets = np.arange(rng.uniform(0, 1 / rate), num_samples / sample_rate, 1 / rate)
        impulses[np.round(onsets * sample_rate).astype(np.int64)] = 1.0
        x = np.convolve(impulses, kernel)[:num_samples]
        peak = np.abs(x).max()
        x = x * (CLICK_PEAK / peak) if peak > 0 else x
    else:
        raise ValueError(f"unknown sound {sound!r}")
    return x.astype(np.float32)


def list_speech_files(speech_dir: str | Path) -> list[Path]:
    """Audio files (.wav/.mp3/.flac) directly in `speech_dir`, sorted by name (deterministic)."""
    d = Path(speech_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"speech folder {str(d)!r} does not exist")
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in SPEECH_SUFFIXES)


@functools.lru_cache(maxsize=64)
def load_speech(path: str, sample_rate: int) -> np.ndarray:
    """Decode a recording with PyAV, resampled inside FFmpeg to `sample_rate` mono.

    Returns read-only float32 (S,) (cached: scenes reuse the few recordings).
    """
    import av

    chunks = []
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        for frame in container.decode(stream):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    x = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if x.size == 0 or not np.any(x):
        raise ValueError(f"speech file {path} has no audio")
    x.setflags(write=False)
    return x


def speech_sound(path: str | Path, num_samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A random `num_samples` segment of a recording (looped when short), RMS-normalised over
    its voiced part (frames within 40 dB of the loudest). Returns float32 (S,)."""
    src = load_speech(str(path), sample_rate)
    high = src.size - num_samples + 1 if src.size >= num_samples else src.size
    start = int(rng.integers(0, high))
    x = np.take(src, (start + np.arange(num_samples)) % src.size).astype(np.float64)
    hop = max(1, sample_rate // 50)
    frames = x[: x.size // hop * hop].reshape(-1, hop) if x.size >= hop else x.reshape(1, -1)  # (N, hop)
    energy = np.mean(frames ** 2, axis=1)
    voiced = energy[energy >= energy.max() * 1e-4] if energy.max() > 0 else energy
    rms = float(np.sqrt(voiced.mean())) if voiced.size else 0.0
    return (x * (RMS_TARGET / rms) if rms > 0 else x).astype(np.float32)


def sample_segments(rng: np.random.Generator, seconds: float, p_on: float = 0.6,
                    min_len: float = 0.5, max_len: float = 2.0) -> list[list[float]]:
    """Sounding intervals [[start_s, end_s], ...]: consecutive pieces of 0.5-2 s, each on with
    probability `p_on`; boundaries on a 1 ms grid, touching pieces merged."""
    segments: list[list[float]] = []
    t = 0.0
    while t < seconds:
        end = round(min(seconds, t + rng.uniform(min_len, max_len)), 3)
        if rng.random() < p_on:
            if segments and segments[-1][1] == t:
                segments[-1][1] = end
            else:
                segments.append([t, end])
        t = end
    return segments


def segments_gate(segments: list[list[float]], num_samples: int, sample_rate: int) -> np.ndarray:
    """0/1 gate float32 (S,) from segments, with RAMP_S raised-cosine fades inside each edge."""
    gate = np.zeros(num_samples, np.float32)
    ramp_n = int(RAMP_S * sample_rate)
    for start, end in segments:
        i0, i1 = round(start * sample_rate), min(num_samples, round(end * sample_rate))
        if i1 <= i0:
            continue
        gate[i0:i1] = 1.0
        r = min(ramp_n, (i1 - i0) // 2)
        if r > 0:
            fade = (0.5 - 0.5 * np.cos(np.pi * (np.arange(r) + 0.5) / r)).astype(np.float32)
            gate[i0:i0 + r] = fade
            gate[i1 - r:i1] = fade[::-1]
    return gate


def segments_frames(segments: list[list[float]], num_frames: int, fps: float) -> np.ndarray:
    """bool (T,): frame f sounds when the middle of its period, (f + 0.5) / fps, is in a segment."""
    mid = (np.arange(num_frames) + 0.5) / fps
    out = np.zeros(num_frames, bool)
    for start, end in segments:
        out |= (mid >= start) & (mid < end)
    return out


def frame_envelope(track: np.ndarray, num_frames: int, fps: float, sample_rate: int) -> np.ndarray:
    """RMS of `track` (S,) over each video frame's period, divided by its maximum.

    Returns float32 (T,) in [0, 1] (all zeros for a silent track).
    """
    edges = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64).clip(0, track.size)
    sq = np.concatenate([[0.0], np.cumsum(np.square(track, dtype=np.float64))])
    counts = np.maximum(edges[1:] - edges[:-1], 1)
    rms = np.sqrt(np.maximum(sq[edges[1:]] - sq[edges[:-1]], 0) / counts)
    peak = rms.max() if rms.size else 0.0
    return (rms / peak if peak > 0 else np.zeros(num_frames)).astype(np.float32)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono float32 (S,) as a 32-bit IEEE-float WAV.

    Hand-written header: the stdlib `wave` module writes only integer PCM, and these bytes
    must be identical across runs and library versions (no encoder tags)."""
    data = np.ascontiguousarray(audio, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sample_rate, sample_rate * 4, 4, 32)  # IEEE float, mono
    fact = struct.pack("<I", audio.size)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"fact" + struct.pack("<I", 4) + fact
            + b"data" + struct.pack("<I", len(data)) + data)
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a WAV written by `write_wav` (float32 or 16-bit PCM, mono). Returns ((S,) float32, rate)."""
    raw = Path(path).read_bytes()
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise ValueError(f"{path}: not a WAV file")
    pos, fmt, data = 12, None, None
    while pos + 8 <= len(raw):
        cid, size = raw[pos:pos + 4], struct.unpack("<I", raw[pos + 4:pos + 8])[0]
        if cid == b"fmt ":
            fmt = struct.unpack("<HHIIHH", raw[pos + 8:pos + 24])
        elif cid == b"data":
            data = raw[pos + 8:pos + 8 + size]
        pos += 8 + size + (size & 1)
    if fmt is None or data is None:
        raise ValueError(f"{path}: WAV without fmt or data chunk")
    tag, channels, rate, _, _, bits = fmt
    if channels != 1 or (tag, bits) not in ((3, 32), (1, 16)):
        raise ValueError(f"{path}: only mono float32 or int16 WAV is supported")
    x = np.frombuffer(data, "<f4" if tag == 3 else "<i2").astype(np.float32)
    return (x if tag == 3 else x / 32768.0), rate
