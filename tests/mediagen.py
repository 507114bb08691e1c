"""Small test media files with KNOWN properties, written with PyAV only.

Every writer is deterministic (same arguments -> same bytes: single-threaded
encoders, bit-exact muxer flags, seeded randomness), fast (< 1 s) and small
(< 300 KB), and returns the ``Path`` it wrote. The properties each one
guarantees are in its docstring and asserted in ``tests/test_mediagen.py``.

Default video content (``default_frame``) encodes the frame index twice, so a
decode test can check *which* frame it got, even after resizing:

* a bright white vertical bar (4 px wide) at ``x = i % (W - 3)`` in the top
  3/4 of the frame, over a dim colour gradient, and
* a 10-bit binary code of ``i % 1024`` in the bottom 1/4: ten equal-width
  blocks, most significant bit left, white = 1, black = 0. ``frame_index(rgb)``
  reads it back; it survives lossy coding and resizing down to ~20 px width.

Default audio (``default_audio``) is a quiet sine, 0.1 amplitude, channel c at
``440 * (c + 1)`` Hz, so channel order is testable too.

Conventions that matter for decode tests (measured with PyAV 18.1 / FFmpeg 8):

* Rotation: ``rotation`` arguments follow the legacy ``rotate`` tag that phones
  write (CLOCKWISE degrees to turn the stored picture for display). FFmpeg
  stores it as a display matrix and PyAV reports it on each decoded frame as
  ``frame.rotation``, COUNTER-clockwise in [-180, 180]: a ``rotate=90`` phone
  file decodes with ``frame.rotation == -90`` (see ``frame_rotation_for``).
  The pixels are NOT rotated by the decoder; ``frame.width/height`` stay the
  stored size. ``stream.metadata["rotate"] = "90"`` does nothing in FFmpeg 8
  (mp4/mov drop it; mkv keeps it as a plain ``ROTATE`` tag, not a matrix).
* Timelines as decoded (A/V sync of ``write_flash_click`` holds in all of them;
  "t" is the generator's time, pts are what PyAV returns):
  - mp4/mov: video pts 0; AAC priming (1024 samples) hidden by an edit list,
    so audio pts 0 = t 0. With ``audio_start`` = s > 0 the priming is NOT
    hidden: the audio stream starts at s - 1024/rate (0.436 s for 0.5 at
    16 kHz) with 1024 (near) silent samples, and t = pts still holds.
  - mkv/webm: time base 1/1000; audio starts exactly at ``audio_start``;
    Opus always decodes at 48 kHz whatever rate was encoded.
  - mpegts: every pts is shifted by the muxer by the same amount (+0.08 s =
    the B-frame delay here): t = pts - stream start; relative sync exact.
  - avi: no audio timestamps at all (audio_start must be 0); the encoder
    delay of mp3 (1105 samples at 16 kHz) is compensated at write time so
    decoded sample m is t = m / rate; video pts are frame numbers (1/fps).
* Decoded audio may run past ``seconds`` by < 1 codec frame (padding of the
  last AAC/mp3 frame is not trimmed by every demuxer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np

FrameFn = Callable[[int, float], np.ndarray]  # (i, t) -> uint8 (H, W, 3)
AudioFn = Callable[[np.ndarray], np.ndarray]  # t float64 (n,) -> float32 (C, n)

CODE_BITS = 10  # bits of the frame-index code in default_frame
BAR_WIDTH = 4

# extension -> (default video codec, default audio codec); PyAV picks the muxer
_CONTAINERS: dict[str, tuple[str | None, str]] = {
    ".mp4": ("libx264", "aac"),
    ".m4v": ("libx264", "aac"),
    ".mov": ("libx264", "aac"),
    ".mkv": ("libx264", "aac"),
    ".ts": ("libx264", "aac"),
    ".webm": ("libvpx", "libopus"),
    ".avi": ("mpeg4", "libmp3lame"),
    ".m4a": (None, "aac"),
    ".mp3": (None, "libmp3lame"),
    ".wav": (None, "pcm_s16le"),
    ".ogg": (None, "libopus"),
}
# containers whose muxer writes a display matrix (rotation)
_ROTATION_OK = {".mp4", ".m4v", ".mov", ".mkv", ".webm"}


# --------------------------------------------------------------------------- content


def default_frame(i: int, t: float, width: int, height: int) -> np.ndarray:
    """Frame ``i``: dim gradient + white bar at x = i % (W-3) + 10-bit code of i.

    Returns uint8 (H, W, 3). Pure function of (i, width, height); ``t`` unused.
    """
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (40 + 100 * xs / max(width - 1, 1)).astype(np.uint8)  # red ramps with x
    img[..., 1] = (40 + 100 * ys / max(height - 1, 1)).astype(np.uint8)  # green ramps with y
    img[..., 2] = 90
    code_top = height - height // 4
    x0 = i % (width - BAR_WIDTH + 1)
    img[:code_top, x0 : x0 + BAR_WIDTH] = 255
    code = i % (1 << CODE_BITS)
    edges = np.linspace(0, width, CODE_BITS + 1).round().astype(int)
    for b in range(CODE_BITS):
        bit = (code >> (CODE_BITS - 1 - b)) & 1
        img[code_top:, edges[b] : edges[b + 1]] = 255 * bit
    return img


def frame_index(rgb: np.ndarray) -> int:
    """Read back the 10-bit frame index (i % 1024) from a decoded ``default_frame``.

    ``rgb``: uint8 (H, W, 3), any size >= ~20 x 8 (resized frames are fine).
    """
    h, w = rgb.shape[:2]
    gray = rgb.astype(np.float32).mean(axis=2)
    top = h - h // 4
    rows = gray[top + (h // 4) // 4 : h - (h // 4) // 4 or h]  # middle of the code strip
    if rows.size == 0:
        rows = gray[top:]
    edges = np.linspace(0, w, CODE_BITS + 1)
    code = 0
    for b in range(CODE_BITS):
        lo, hi = edges[b], edges[b + 1]
        pad = (hi - lo) / 4  # centre half of the block, away from ringing at edges
        block = rows[:, int(round(lo + pad)) : max(int(round(hi - pad)), int(round(lo + pad)) + 1)]
        code = (code << 1) | int(block.mean() > 127)
    return code


def default_audio(t: np.ndarray, channels: int = 1) -> np.ndarray:
    """Quiet sine: channel c is 0.1 * sin(2 pi 440 (c+1) t). float32 (C, n)."""
    f = 440.0 * (np.arange(channels, dtype=np.float64)[:, None] + 1)
    return (0.1 * np.sin(2 * np.pi * f * t[None, :])).astype(np.float32)


def frame_times(seconds: float, fps: float, vfr: bool = False) -> np.ndarray:
    """Presentation times (s, float64) of the frames ``write_video`` writes.

    CFR: ``i / fps`` for every i with ``i / fps < seconds`` (``ceil(seconds*fps)``
    frames, within float tolerance). VFR: durations cycle 0.5, 1.5, 1.0, 0.25,
    1.75 frame periods (mean = 1 period), frames while the start time < seconds.
    """
    if not vfr:
        n = int(math.ceil(seconds * fps - 1e-9))
        return np.arange(n, dtype=np.float64) / fps
    pattern = np.array([0.5, 1.5, 1.0, 0.25, 1.75]) / fps
    times, t, k = [], 0.0, 0
    while t < seconds - 1e-9:
        times.append(t)
        t += pattern[k % len(pattern)]
        k += 1
    return np.array(times, dtype=np.float64)


def frame_rotation_for(rotation: int) -> int:
    """``frame.rotation`` PyAV 18.1 reports for a file written with ``rotation``
    (clockwise ``rotate`` tag): 0 -> 0, 90 -> -90, 180 -> -180, 270 -> 90 (measured)."""
    r = (-rotation) % 360
    return r - 360 if r >= 180 else r


# --------------------------------------------------------------------------- writer


@dataclass
class _VideoSpec:
    width: int
    height: int
    fps: float | Fraction
    seconds: float
    codec: str
    frame_fn: FrameFn | None = None
    vfr: bool = False
    time_base: Fraction | None = None
    rotation: int = 0  # clockwise, like the legacy `rotate` tag
    options: dict = field(default_factory=dict)


@dataclass
class _AudioSpec:
    sample_rate: int
    channels: int
    seconds: float
    codec: str
    audio_fn: AudioFn | None = None
    start: float = 0.0  # time of the first encoded sample; nothing is encoded before it


def _fps_fraction(fps: float | Fraction) -> Fraction:
    """25.0 -> 25, 29.97 -> 2997/100; pass Fraction(30000, 1001) for NTSC."""
    return fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(10000)


def _video_options(codec: str, extra: dict) -> dict[str, str]:
    opts: dict[str, str] = {}
    if codec == "libx264":
        # mbtree=0: with macroblock-tree rate control this libx264 build writes
        # different bytes from run to run even with threads=1 (measured)
        opts = {"preset": "veryfast", "crf": "28", "x264-params": "mbtree=0"}
    elif codec in ("libvpx", "libvpx-vp9"):
        opts = {"deadline": "realtime", "cpu-used": "8", "b": "200k"}
    elif codec == "mpeg4":
        opts = {"qscale": "6"}
    opts.update({k: str(v) for k, v in extra.items()})
    return opts


def _open_video(c: av.container.OutputContainer, spec: _VideoSpec):
    fps = _fps_fraction(spec.fps)
    s = c.add_stream(spec.codec, rate=fps)
    s.width, s.height = spec.width, spec.height
    s.pix_fmt = "yuv420p"
    cc = s.codec_context
    cc.thread_count = 1
    cc.flags |= int(av.codec.context.Flags.bitexact)
    cc.options = _video_options(spec.codec, spec.options)
    tb = spec.time_base if spec.time_base is not None else (Fraction(1, 90000) if spec.vfr else None)
    if tb is not None:  # frames get pts in this time base; the muxer may still change it
        cc.time_base = tb
        s.time_base = tb
    else:
        cc.time_base = 1 / fps
    if spec.rotation:
        # set_display_rotation takes COUNTER-clockwise degrees (== frame.rotation on read)
        s.set_display_rotation(frame_rotation_for(spec.rotation))
    return s, frame_times(spec.seconds, float(fps), spec.vfr)


def _layout(channels: int) -> str:
    return {1: "mono", 2: "stereo"}.get(channels, f"{channels}c")


def _setup_audio_ctx(cc, spec: _AudioSpec) -> None:
    cc.sample_rate = spec.sample_rate
    cc.layout = _layout(spec.channels)
    fmts = [f.name for f in cc.codec.audio_formats or []]
    cc.format = next((f for f in ("fltp", "flt", "s16p", "s16") if f in fmts), fmts[0] if fmts else "fltp")
    cc.time_base = Fraction(1, spec.sample_rate)
    cc.thread_count = 1
    cc.flags |= int(av.codec.context.Flags.bitexact)
    if spec.codec in ("libopus", "aac", "libmp3lame"):
        cc.bit_rate = 32000 * spec.channels


def _encoder_delay(spec: _AudioSpec) -> int:
    """Samples of encoder delay (= -pts of the first packet), by a dry run."""
    cc = av.CodecContext.create(spec.codec, "w")
    _setup_audio_ctx(cc, spec)
    cc.open()
    n = cc.frame_size or 1024
    f = av.AudioFrame.from_ndarray(np.zeros((spec.channels, n), np.float32), format="fltp", layout=_layout(spec.channels))
    f.sample_rate, f.pts, f.time_base = spec.sample_rate, 0, Fraction(1, spec.sample_rate)
    packets = list(cc.encode(f)) + list(cc.encode(None))
    return max(0, -int(packets[0].pts)) if packets and packets[0].pts is not None else 0


def _open_audio(c: av.container.OutputContainer, spec: _AudioSpec, ext: str):
    s = c.add_stream(spec.codec, rate=spec.sample_rate)
    _setup_audio_ctx(s.codec_context, spec)
    s.time_base = Fraction(1, spec.sample_rate)
    # AVI has no audio timestamps and no edit list: decoders play the codec
    # delay (mp3: 1105 samples at 16 kHz = 69 ms) as if it were signal. Feed the
    # encoder the signal `lead` samples early so the DECODED timeline is right.
    lead = _encoder_delay(spec) if ext == ".avi" else 0
    return s, lead


def _write(
    path: Path,
    videos: list[_VideoSpec],
    audios: list[_AudioSpec],
    container_options: dict | None,
    order: list[str] | None = None,
) -> Path:
    """Encode and interleave any number of video and audio streams into ``path``.

    ``order``: "v"/"a" per stream, the order of stream creation (= stream
    index); default all videos, then all audios.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ext = path.suffix.lower()
    opts = {"fflags": "+bitexact"}
    if ext == ".avi":
        # the avi muxer's default shift for the mp3 encoder delay (negative
        # pts) leaves a 2-frame hole after video frame 0; AVI is CFR anyway
        opts["avoid_negative_ts"] = "disabled"
    opts.update(container_options or {})
    # container_options, not options: PyAV passes `options` to every codec too
    with av.open(str(path), "w", container_options=opts) as c:
        vstreams, astreams = [], []
        vi, ai = iter(videos), iter(audios)
        for kind in order or ["v"] * len(videos) + ["a"] * len(audios):
            if kind == "v":
                vstreams.append(_open_video(c, next(vi)))
            else:
                astreams.append(_open_audio(c, next(ai), ext))
        c.start_encoding()

        # events (time, kind, stream number, item), encoded in presentation order
        events: list[tuple[float, int, int, int]] = []
        for k, (_, times) in enumerate(vstreams):
            events += [(float(t), 0, k, i) for i, t in enumerate(times)]
        for k, (spec, (s, _)) in enumerate(zip(audios, astreams)):
            step = s.codec_context.frame_size or 1024
            n_total = int(round((spec.seconds - spec.start) * spec.sample_rate))
            events += [(spec.start + n0 / spec.sample_rate, 1, k, n0) for n0 in range(0, max(n_total, 0), step)]
        events.sort()

        for t, kind, k, item in events:
            if kind == 0:
                v = videos[k]
                s, _ = vstreams[k]
                img = v.frame_fn(item, t) if v.frame_fn else default_frame(item, t, v.width, v.height)
                img = np.ascontiguousarray(img, dtype=np.uint8)
                if img.shape != (v.height, v.width, 3):
                    raise ValueError(f"frame_fn returned {img.shape}, want {(v.height, v.width, 3)}")
                # convert here with 1 thread, not in the encoder (threaded swscale)
                frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p", threads=1)
                tb = s.codec_context.time_base
                frame.pts = int(round(t / tb))
                frame.time_base = tb
            else:
                a = audios[k]
                s, lead = astreams[k]
                sr = a.sample_rate
                n_total = int(round((a.seconds - a.start) * sr))
                n = min(s.codec_context.frame_size or 1024, n_total - item)
                first = int(round(a.start * sr)) + item  # sample number on the timeline
                ts = (first + lead + np.arange(n, dtype=np.float64)) / sr
                data = a.audio_fn(ts) if a.audio_fn else default_audio(ts, a.channels)
                data = np.ascontiguousarray(data, dtype=np.float32).reshape(a.channels, n)
                frame = av.AudioFrame.from_ndarray(data, format="fltp", layout=_layout(a.channels))
                frame.sample_rate = sr
                frame.pts = first
                frame.time_base = Fraction(1, sr)
            for p in s.encode(frame):
                c.mux(p)
        for s, _ in vstreams + astreams:
            for p in s.encode(None):
                c.mux(p)
    return path


def write_video(
    path: str | Path,
    *,
    seconds: float = 2.0,
    width: int = 96,
    height: int = 64,
    fps: float = 25.0,
    sample_rate: int = 16000,
    audio_channels: int = 1,
    video: bool = True,
    audio: bool = True,
    video_codec: str | None = None,
    audio_codec: str | None = None,
    frame_fn: FrameFn | None = None,
    audio_fn: AudioFn | None = None,
    rotation: int = 0,
    vfr: bool = False,
    time_base: Fraction | None = None,
    audio_start: float = 0.0,
    container_options: dict | None = None,
    video_options: dict | None = None,
) -> Path:
    """Write a small audio-visual file; the container follows the extension.

    Codecs by extension when ``video_codec``/``audio_codec`` are None:
    .mp4/.m4v/.mov/.mkv/.ts -> libx264 + aac, .webm -> libvpx (VP8) + libopus,
    .avi -> mpeg4 + libmp3lame; audio only (video=False): .m4a aac, .mp3,
    .wav pcm_s16le, .ogg libopus.

    Guarantees:
      * video: ``len(frame_times(seconds, fps, vfr))`` frames (CFR:
        ``ceil(seconds * fps)``) of ``width x height`` (even sizes), yuv420p,
        frame i = ``frame_fn(i, t_i)`` (default ``default_frame``, whose index
        ``frame_index`` reads back) with pts ``round(t_i / time_base)``.
        libx264: veryfast, crf 28, B-frames on, 1 thread.
      * audio: ``round((seconds - audio_start) * sample_rate)`` samples per
        channel of ``audio_fn(t)`` (default ``default_audio``), the first at
        ``t = audio_start`` (pts ``round(audio_start * sample_rate)`` in
        1/rate); nothing is encoded before it. Fed in codec-sized frames
        (AAC 1024) with exact pts.
      * ``rotation`` (0/90/180/270, CLOCKWISE like the phone ``rotate`` tag) is
        written as a display matrix; every decoded frame reports
        ``frame.rotation == frame_rotation_for(rotation)`` (90 -> -90).
        mp4/mov/mkv/webm only.
      * ``vfr``: frame durations cycle 0.5/1.5/1.0/0.25/1.75 periods (see
        ``frame_times``), in a 1/90000 time base unless ``time_base`` is given.
      * ``time_base`` (codec and stream): kept exactly by mp4/mov for 1/N with
        N >= 10000; the mov muxer keeps only the denominator (1001/30000 ->
        1/30000 with pts multiples of 1001) and doubles N below 10000
        (1/1000 -> 1/16000). mkv/webm always store 1/1000, mpegts 1/90000.
      * Deterministic: same arguments -> same bytes.
      * ``container_options`` go to the muxer (e.g. ``{"movflags": "faststart"}``),
        ``video_options`` to the video encoder (e.g. ``{"crf": "35"}``).
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in _CONTAINERS:
        raise ValueError(f"unsupported extension {ext!r}; one of {sorted(_CONTAINERS)}")
    vdef, adef = _CONTAINERS[ext]
    if video and vdef is None and video_codec is None:
        raise ValueError(f"{ext} is audio-only; pass video=False")
    if rotation % 360 and ext not in _ROTATION_OK:
        raise ValueError(f"rotation is not stored by {ext}; use one of {sorted(_ROTATION_OK)}")
    if ext == ".avi" and (vfr or time_base is not None):
        raise ValueError("AVI stores one frame per tick of 1/fps: no vfr or time_base")
    if ext == ".avi" and audio and audio_start:
        raise ValueError("AVI has no audio start time: audio_start must be 0")
    if rotation % 90:
        raise ValueError("rotation must be a multiple of 90")
    if not video and not audio:
        raise ValueError("need video or audio")
    videos = []
    if video:
        videos.append(
            _VideoSpec(
                width, height, fps, seconds, video_codec or vdef, frame_fn, vfr, time_base, rotation % 360,
                dict(video_options or {}),
            )
        )
    audios = []
    if audio:
        audios.append(_AudioSpec(sample_rate, audio_channels, seconds, audio_codec or adef, audio_fn, audio_start))
    return _write(path, videos, audios, container_options)


# --------------------------------------------------------------------------- A/V sync


def write_flash_click(
    path: str | Path,
    *,
    seconds: float = 3.0,
    fps: float = 25.0,
    sample_rate: int = 16000,
    flash_time: float = 1.2,
    width: int = 64,
    height: int = 48,
    audio_start: float = 0.0,
    click_seconds: float = 0.005,
    click_amplitude: float = 0.8,
    **kw,
) -> Path:
    """Black video with ONE white frame, silent audio with ONE click, in sync.

    * video: frame ``floor(flash_time * fps)`` (the frame whose display
      interval contains ``flash_time``) is white (255), every other is black.
    * audio: zero except a burst of ``click_seconds`` (5 ms) of amplitude
      ``click_amplitude`` (a 2 kHz square wave, +-0.8), its first sample at
      ``flash_time`` exactly (sample ``round(flash_time * sample_rate)`` of
      the timeline). With ``audio_start`` > 0 the audio stream begins at that
      time (first pts = audio_start, nothing encoded before it; in mp4/mov
      the decoded stream starts 1024 priming samples earlier, see the module
      docstring). Not for .avi (no audio start time there).
    Decoded with plain PyAV (``measure_flash_click``), flash and click agree
    within 1 ms in mp4/mov/mkv/ts/avi and 0.5 ms in webm (Opus pre-skip in
    ms); mpegts shifts both by the same +0.08 s.
    Extra keyword arguments go to ``write_video`` (e.g. ``container_options``).
    """
    k = int(math.floor(flash_time * fps + 1e-9))
    if not audio_start <= flash_time < seconds:
        raise ValueError("need audio_start <= flash_time < seconds")

    def frame_fn(i: int, t: float) -> np.ndarray:
        return np.full((height, width, 3), 255 if i == k else 0, np.uint8)

    def audio_fn(t: np.ndarray) -> np.ndarray:
        half = 0.5 / sample_rate
        on = (t >= flash_time - half) & (t < flash_time + click_seconds - half)
        square = np.where(np.floor((t - flash_time + half) * 4000) % 2 == 0, 1.0, -1.0)  # 2 kHz
        return (click_amplitude * on * square)[None, :].astype(np.float32)

    return write_video(
        path, seconds=seconds, width=width, height=height, fps=fps, sample_rate=sample_rate,
        audio_channels=1, frame_fn=frame_fn, audio_fn=audio_fn, audio_start=audio_start, **kw,
    )


def measure_flash_click(path: str | Path, threshold: float = 0.3) -> tuple[float, float]:
    """(flash time, click time) in seconds as plain PyAV decoding sees them.

    Flash = pts time of the brightest video frame; click = time of the first
    audio sample with |x| > threshold, from its audio frame's pts + offset.
    """
    with av.open(str(path)) as c:
        best, flash_t = -1.0, float("nan")
        for f in c.decode(video=0):
            m = float(f.to_ndarray(format="gray").mean())
            if m > best:
                best, flash_t = m, float(f.pts * f.time_base)
    with av.open(str(path)) as c:
        click_t = float("nan")
        for f in c.decode(audio=0):
            x = f.to_ndarray()  # (C, n) planar or (1, n*C) packed
            x = x.reshape(-1, f.samples) if f.format.is_planar else x.reshape(f.samples, -1).T
            hit = np.flatnonzero(np.abs(x).max(axis=0) > threshold)
            if hit.size:
                click_t = float(f.pts * f.time_base) + hit[0] / f.sample_rate
                break
    return flash_t, click_t


# --------------------------------------------------------------------------- other shapes


def write_audio_only(path: str | Path, seconds: float = 2.0, sample_rate: int = 16000, **kw) -> Path:
    """A file with ONE audio stream and NO video stream.

    Codec by extension: .m4a/.mp4 aac, .mp3 libmp3lame, .wav pcm_s16le,
    .ogg libopus, .mkv aac. Content: ``default_audio`` (0.1 * sin 440 Hz),
    ``round(seconds * sample_rate)`` samples. Extra keywords go to ``write_video``.
    """
    return write_video(path, seconds=seconds, sample_rate=sample_rate, video=False, audio=True, **kw)


def write_two_streams(path: str | Path, seconds: float = 2.0) -> Path:
    """Two video and two audio streams, like shared/media/video/nasa_13013.mp4.

    Stream order and properties (index: what):
      0: h264 96x64 at 25 fps, ``default_frame`` content (index code readable)
      1: aac 8 kHz mono, 0.1 * sin(2 pi 440 t)
      2: h264 64x48 at 30000/1001 fps, ``default_frame`` content
      3: aac 16 kHz mono, 0.1 * sin(2 pi 880 t)
    Each stream lasts ``seconds``; all start at 0. Container by extension
    (.mp4, .mkv, .mov, .ts).
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".mp4", ".m4v", ".mkv", ".mov", ".ts"):
        raise ValueError("write_two_streams writes h264 + aac: use .mp4, .mkv, .mov or .ts")
    videos = [
        _VideoSpec(96, 64, Fraction(25), seconds, "libx264"),
        _VideoSpec(64, 48, Fraction(30000, 1001), seconds, "libx264"),
    ]
    audios = [
        _AudioSpec(8000, 1, seconds, "aac", lambda t: (0.1 * np.sin(2 * np.pi * 440 * t))[None].astype(np.float32)),
        _AudioSpec(16000, 1, seconds, "aac", lambda t: (0.1 * np.sin(2 * np.pi * 880 * t))[None].astype(np.float32)),
    ]
    # stream indices follow creation order; create them interleaved v, a, v, a
    return _write_ordered(path, [("v", videos[0]), ("a", audios[0]), ("v", videos[1]), ("a", audios[1])])


def _write_ordered(path: Path, specs: list[tuple[str, _VideoSpec | _AudioSpec]]) -> Path:
    # _write adds all videos then all audios; here the order of add_stream matters
    videos = [s for k, s in specs if k == "v"]
    audios = [s for k, s in specs if k == "a"]
    order = [k for k, _ in specs]
    return _write(path, videos, audios, None, order=order)


def write_large(
    path: str | Path, width: int = 1920, height: int = 1080, seconds: float = 1.0, fps: float = 10, **kw
) -> Path:
    """A full-HD (default 1920x1080) file that is still small (~40 KB) and quick.

    ``ceil(seconds * fps)`` frames of ``default_frame`` (smooth gradient, a bar,
    the index code), libx264 ``ultrafast`` at crf 35, plus the default audio.
    Extra keywords go to ``write_video``.
    """
    opts = {"preset": "ultrafast", "crf": "35"}
    opts.update(kw.pop("video_options", None) or {})
    return write_video(path, width=width, height=height, seconds=seconds, fps=fps, video_options=opts, **kw)


# --------------------------------------------------------------------------- broken files


def make_corrupt_corpus(good: str | Path, out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write damaged copies of ``good`` into ``out_dir``; return {name: path}.

    Names (the suffix is that of ``good``, e.g. ``truncated_10.mp4``):
      truncated_10 / truncated_50 / truncated_90: the first 10 / 50 / 90 % of
        the bytes (``len * p // 100``);
      flipped: 2 % of the bytes in the middle 80 % XOR 0xFF (seeded positions);
      header_flipped: the first 64 bytes replaced by seeded random bytes;
      empty: zero bytes;
      text: a short UTF-8 text.
    """
    good, out_dir = Path(good), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = good.read_bytes()
    n = len(data)
    ext = good.suffix
    rng = np.random.default_rng(seed)
    out: dict[str, bytes] = {}
    for pct in (10, 50, 90):
        out[f"truncated_{pct}"] = data[: n * pct // 100]
    buf = np.frombuffer(data, np.uint8).copy()
    lo, hi = n // 10, n - n // 10
    idx = rng.choice(np.arange(lo, hi), size=max(1, (hi - lo) // 50), replace=False)
    buf[idx] ^= 0xFF
    out["flipped"] = buf.tobytes()
    out["header_flipped"] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes() + data[64:]
    out["empty"] = b""
    out["text"] = b"This is not a video file.\nIt is plain text saved with a video extension.\n" * 4
    paths = {}
    for name, blob in out.items():
        p = out_dir / f"{name}{ext}"
        p.write_bytes(blob)
        paths[name] = p
    return paths


@dataclass
class DecodeReport:
    """What plain PyAV does with a file (see ``probe_decode``)."""

    open_error: str | None = None  # exception class name if av.open raised
    error: str | None = None  # first exception after opening, class name
    error_stage: str | None = None  # "demux" or "decode"
    message: str = ""
    video_frames: int = 0  # decoded before the first exception / EOF
    audio_samples: int = 0
    corrupt_frames: int = 0  # frames with frame.is_corrupt
    video_frames_tolerant: int = 0  # decoding on after per-packet errors
    audio_samples_tolerant: int = 0
    errors_tolerant: int = 0
    container_duration: float | None = None  # seconds
    stream_durations: list[float | None] = field(default_factory=list)  # seconds, per stream
    stream_frames: list[int] = field(default_factory=list)
    stream_types: list[str] = field(default_factory=list)
    last_video_time: float | None = None  # pts time of the last decoded video frame

    def row(self) -> str:
        return (
            f"open={self.open_error or 'ok'} err={self.error or '-'}@{self.error_stage or '-'} "
            f"v={self.video_frames} a={self.audio_samples} corrupt={self.corrupt_frames} "
            f"tolerant v={self.video_frames_tolerant} a={self.audio_samples_tolerant} errs={self.errors_tolerant} "
            f"streams={self.stream_types} dur={self.container_duration} sdur={self.stream_durations} frames={self.stream_frames} "
            f"last_v={self.last_video_time}"
        )


def _decode_all(path: Path, tolerant: bool) -> tuple[int, int, int, int, str | None, str | None, str, float | None]:
    """Decode every stream in file order. Returns (video frames, audio samples,
    corrupt frames, errors, first error class, stage, message, last video time)."""
    v = a = corrupt = errors = 0
    first: tuple[str | None, str | None, str] = (None, None, "")
    last_v = None
    with av.open(str(path)) as c:
        # audio/video only: a truncated moov can leave a "data" stream, and
        # packet.decode() on it raises AttributeError in PyAV 18.1
        streams = [s for s in c.streams if s.type in ("video", "audio")]
        it = c.demux(streams) if streams else iter(())
        while True:
            try:
                packet = next(it)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001 - characterising, any class counts
                errors += 1
                if first[0] is None:
                    first = (type(e).__name__, "demux", str(e))
                break  # a demuxer error ends the iterator
            try:
                frames = packet.decode()
            except Exception as e:  # noqa: BLE001
                errors += 1
                if first[0] is None:
                    first = (type(e).__name__, "decode", str(e))
                if not tolerant:
                    break
                continue
            for f in frames:
                corrupt += bool(getattr(f, "is_corrupt", False))
                if isinstance(f, av.VideoFrame):
                    v += 1
                    if f.pts is not None:
                        last_v = float(f.pts * f.time_base)
                elif isinstance(f, av.AudioFrame):
                    a += f.samples
    return v, a, corrupt, errors, first[0], first[1], first[2], last_v


def probe_decode(path: str | Path) -> DecodeReport:
    """Characterise how plain PyAV opens and decodes ``path`` (all streams).

    Strict pass: stop at the first exception. Tolerant pass: skip packets whose
    decode raises and go on (a demux exception still ends it).
    """
    path = Path(path)
    r = DecodeReport()
    try:
        with av.open(str(path)) as c:
            r.container_duration = None if c.duration is None else c.duration / 1e6
            r.stream_durations = [None if s.duration is None else float(s.duration * s.time_base) for s in c.streams]
            r.stream_frames = [s.frames for s in c.streams]
            r.stream_types = [s.type for s in c.streams]
    except Exception as e:  # noqa: BLE001
        r.open_error, r.message = type(e).__name__, str(e)
        return r
    v, a, corrupt, _, r.error, r.error_stage, r.message, r.last_video_time = _decode_all(path, tolerant=False)
    r.video_frames, r.audio_samples, r.corrupt_frames = v, a, corrupt
    r.video_frames_tolerant, r.audio_samples_tolerant, _, r.errors_tolerant, *_ = _decode_all(path, tolerant=True)
    return r
