"""Decode one media file with PyAV into time-aligned clips (no Ray here).

A clip k spans `[k * hop, k * hop + clip_seconds)` media seconds, counted from the container's
start time. Its frames are sampled at `fps` (frame j shows the picture on screen at
`start + j / fps`: the latest decoded frame whose timestamp is <= that time) and resized inside
FFmpeg (`VideoFrame.reformat`, single-threaded: FFmpeg's automatic threading of the scaler
halves its speed); its audio is the resampled mono signal over exactly the same span, placed by
the audio frames' own timestamps. Frames and audio therefore stay in sync whatever the streams'
start offsets, time bases or frame rates (variable rates included).

Memory is bounded by the clips in flight (`ceil(clip / hop)` of them) plus the demuxer's
interleave, never by the file's length: frames are reformatted only when a clip needs them and
audio before the oldest open clip is dropped.

Only local files are opened, and FFmpeg's protocol whitelist is pinned to `file` (plus the
schemes a caller allows explicitly), so a crafted playlist cannot make FFmpeg fetch URLs.
In-memory media (a file object, e.g. an HTTP upload) opens with no protocol at all: it cannot
make FFmpeg open any other file or URL.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

import numpy as np

try:
    import av
except ImportError:  # training from clip Parquet needs no decoder (e.g. a GPU image without PyAV)
    av = None

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# FFmpeg protocols each allowed URI scheme needs underneath it.
# Past this lag (media seconds) between the streams, the lagging one is taken to have ended.
_MAX_AV_LAG = 10.0
# Decoded frames whose timestamps are sorted before use (see MediaReader.clips).
_REORDER_WINDOW = 4
_PROTOCOLS = {"http": "http,tcp", "https": "https,tls,tcp", "rtmp": "rtmp,tcp"}
_NO_PROTOCOL = "none"  # whitelist naming no protocol: media read from a file object opens nothing else


class MediaError(Exception):
    """A file that cannot become clips; `stage` names the step that refused it."""

    stage = "decode"


class UnsupportedSource(MediaError):
    stage = "open"


class UnreadableMedia(MediaError):
    stage = "open"


class NoVideoStream(MediaError):
    stage = "probe"


class MediaTooLarge(MediaError):
    stage = "probe"


class MediaTooLong(MediaError):
    stage = "probe"


class TooShort(MediaError):
    stage = "decode"


class TruncatedMedia(MediaError):
    stage = "decode"


@dataclass(frozen=True)
class DecodeConfig:
    """How files become clips (all times in seconds)."""

    clip_seconds: float = 2.0
    hop_seconds: float | None = None      # None: = clip_seconds (non-overlapping clips)
    fps: float = 8.0
    size: int = 224
    resize: str = "crop"                  # "crop": short side to size, centre crop; "letterbox": long side, pad
    sample_rate: int = 16000
    max_pixels: int = 3840 * 2160         # larger sources become error rows
    max_seconds: float = 4 * 3600.0       # longer sources become error rows
    threads: int = 1                      # FFmpeg decoder threads per file (Ray runs one file per core)
    allowed_schemes: tuple[str, ...] = () # URI schemes besides local paths, e.g. ("https",)

    def __post_init__(self) -> None:
        if self.clip_seconds <= 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if self.hop_seconds is not None and self.hop_seconds <= 0:
            raise ValueError(f"hop_seconds must be > 0, got {self.hop_seconds}")
        if self.fps <= 0 or self.frames_per_clip < 1:
            raise ValueError(f"fps * clip_seconds must give at least one frame (fps={self.fps})")
        if self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")
        if self.resize not in ("crop", "letterbox"):
            raise ValueError(f"resize must be 'crop' or 'letterbox', got {self.resize!r}")
        if self.sample_rate < 1000:
            raise ValueError(f"sample_rate must be >= 1000 Hz, got {self.sample_rate}")
        unknown = set(self.allowed_schemes) - set(_PROTOCOLS)
        if unknown:
            raise ValueError(f"unsupported URI scheme(s) {sorted(unknown)}; known: {sorted(_PROTOCOLS)}")

    @property
    def hop(self) -> float:
        return self.clip_seconds if self.hop_seconds is None else self.hop_seconds

    @property
    def frames_per_clip(self) -> int:
        """T."""
        return int(round(self.clip_seconds * self.fps))

    @property
    def samples_per_clip(self) -> int:
        """S."""
        return int(round(self.clip_seconds * self.sample_rate))


@dataclass(frozen=True)
class MediaInfo:
    """What was found in the file and which streams were used."""

    video_stream: int
    audio_stream: int            # -1: no audio stream (clips carry silence)
    src_width: int               # displayed size, after rotation
    src_height: int
    src_fps: float               # average rate of the video stream, 0.0 if unknown
    rotation: int                # degrees clockwise applied to display the frames
    declared_seconds: float | None

    @property
    def has_audio(self) -> bool:
        return self.audio_stream >= 0


@dataclass
class Clip:
    index: int
    start_s: float
    end_s: float
    frames: np.ndarray  # uint8 (T, H, W, 3)
    audio: np.ndarray   # float32 (S,)


def check_source(path: str, allowed_schemes: tuple[str, ...] = ()) -> str:
    """Return the FFmpeg protocol whitelist for `path`, or raise UnsupportedSource.

    Local paths must be existing regular files; URIs need their scheme in `allowed_schemes`.
    """
    m = _SCHEME.match(path)
    if m and m.group(1).lower() != "file":
        scheme = m.group(1).lower()
        if scheme not in allowed_schemes:
            raise UnsupportedSource(f"URI scheme {scheme!r} is not allowed (local files only; "
                                    f"allow it explicitly with --allow-scheme {scheme})")
        return "file," + _PROTOCOLS[scheme]
    local = path[len("file://"):] if m else path
    if not os.path.isfile(local):
        raise UnsupportedSource(f"not a regular file: {local}" if os.path.exists(local)
                                else f"no such file: {local}")
    return "file"


def _rotation(frame: av.VideoFrame) -> int:
    """Clockwise degrees to display the frame upright (FFmpeg reports counter-clockwise)."""
    return int(round(-frame.rotation)) % 360


def _resize_plan(width: int, height: int, rotation: int, cfg: DecodeConfig) -> tuple[int, int, int, int]:
    """Return (reformat width, reformat height, crop/pad y0, x0) for a coded width x height frame.

    The reformat size is in the coded orientation; after rotating, the displayed image is
    cropped (crop mode, offsets >= 0) or padded (letterbox mode, offsets >= 0) to size x size.
    """
    transposed = rotation in (90, 270)
    dw, dh = (height, width) if transposed else (width, height)
    if cfg.resize == "crop":
        scale = cfg.size / min(dw, dh)
        sw, sh = max(cfg.size, round(dw * scale)), max(cfg.size, round(dh * scale))
    else:
        scale = cfg.size / max(dw, dh)
        sw, sh = max(1, min(cfg.size, round(dw * scale))), max(1, min(cfg.size, round(dh * scale)))
    y0, x0 = abs(sh - cfg.size) // 2, abs(sw - cfg.size) // 2
    return (sh, sw, y0, x0) if transposed else (sw, sh, y0, x0)


def frame_mapping(width: int, height: int, cfg: DecodeConfig) -> tuple[float, float, float, float]:
    """(sx, sy, ox, oy): a point (x, y) of a displayed width x height source lands at
    (x * sx + ox, y * sy + oy) on the decoder's size x size frames. Crop mode cuts the offset away
    (ox, oy <= 0), letterbox pads it on (>= 0); the inverse is ((u - ox) / sx, (v - oy) / sy)."""
    w, h, y0, x0 = _resize_plan(width, height, 0, cfg)
    sign = -1 if cfg.resize == "crop" else 1
    return w / width, h / height, float(sign * x0), float(sign * y0)


class _ClipBuilder:
    """One clip being filled: T target frame times and S audio samples."""

    def __init__(self, index: int, cfg: DecodeConfig) -> None:
        self.index = index
        self.start = index * cfg.hop
        self.end = self.start + cfg.clip_seconds
        self.targets = self.start + np.arange(cfg.frames_per_clip) / cfg.fps
        self.frames = np.empty((cfg.frames_per_clip, cfg.size, cfg.size, 3), dtype=np.uint8)
        self.next_frame = 0
        self.first_sample = int(round(self.start * cfg.sample_rate))

    @property
    def video_done(self) -> bool:
        return self.next_frame == len(self.targets)


def _open(source: str | BinaryIO, cfg: DecodeConfig) -> av.container.InputContainer:
    """Open a path (checked by `check_source`) or a seekable binary file object with PyAV."""
    whitelist = check_source(source, cfg.allowed_schemes) if isinstance(source, str) else _NO_PROTOCOL
    if av is None:
        raise ImportError("decoding media needs PyAV: pip install av")
    try:
        return av.open(source, container_options={"protocol_whitelist": whitelist})
    except av.error.FFmpegError as e:
        raise UnreadableMedia(f"FFmpeg cannot open it: {e.strerror or e}") from e


def _to_rgb(frame: av.VideoFrame, plan: tuple[int, int, int, int], rotation: int, cfg: DecodeConfig) -> np.ndarray:
    """Reformat (in FFmpeg) + rotate + crop/pad one frame by its `_resize_plan`: uint8 (size, size, 3)."""
    w, h, y0, x0 = plan
    img = frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR",
                         threads=1).to_ndarray()  # (h, w, 3)
    if rotation:
        img = np.rot90(img, k=-(rotation // 90))  # clockwise
    if cfg.resize == "crop":
        return img[y0:y0 + cfg.size, x0:x0 + cfg.size]
    out = np.zeros((cfg.size, cfg.size, 3), dtype=np.uint8)
    out[y0:y0 + img.shape[0], x0:x0 + img.shape[1]] = img
    return out


def _check_pixels(width: int, height: int, cfg: DecodeConfig) -> None:
    if width * height > cfg.max_pixels:
        raise MediaTooLarge(f"{width}x{height} exceeds --max-pixels {cfg.max_pixels}")


def read_image(source: str | BinaryIO, cfg: DecodeConfig) -> tuple[np.ndarray, MediaInfo]:
    """The first picture of an image (PNG, JPEG, ...) or video, resized as clips are: uint8
    (size, size, 3), and what was found (no audio stream; displayed size). Raises `MediaError`
    subclasses like `MediaReader`."""
    container = _open(source, cfg)
    with container:
        v = container.streams.best("video")
        if v is None:
            raise NoVideoStream("no picture in it")
        _check_pixels(v.codec_context.width, v.codec_context.height, cfg)
        for frame in container.decode(v):
            rotation = _rotation(frame)
            rgb = _to_rgb(frame, _resize_plan(frame.width, frame.height, rotation, cfg), rotation, cfg)
            info = MediaInfo(video_stream=v.index, audio_stream=-1, src_width=frame.width, src_height=frame.height,
                             src_fps=0.0, rotation=0, declared_seconds=None)
            return rgb, _with_rotation(info, rotation)
    raise TruncatedMedia("no picture could be decoded")


def read_audio(source: str | BinaryIO, cfg: DecodeConfig) -> np.ndarray:
    """The whole audio stream of a file without pictures (WAV, MP3, ...), resampled to
    `cfg.sample_rate` and averaged to mono: float32 (S,). Raises `MediaError` subclasses like
    `MediaReader` (MediaTooLong past `cfg.max_seconds`, measured as it decodes)."""
    container = _open(source, cfg)
    with container:
        a = container.streams.best("audio")
        if a is None:
            raise UnreadableMedia("no audio stream")
        resampler = av.AudioResampler(format="fltp", rate=cfg.sample_rate)
        parts, n = [], 0
        for frame in container.decode(a):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().mean(axis=0))  # (C, n) -> mono mean
                n += parts[-1].size
            if n > cfg.max_seconds * cfg.sample_rate:
                raise MediaTooLong(f"more than --max-seconds {cfg.max_seconds:g} s of audio")
        for out in resampler.resample(None):
            parts.append(out.to_ndarray().mean(axis=0))
    if not parts:
        raise TruncatedMedia("no audio could be decoded")
    return np.concatenate(parts).astype(np.float32)


class MediaReader:
    """Streams `Clip`s out of one file (a path, or a seekable binary file object such as an
    upload held in memory). Use as a context manager; `info` is set on open.

    Raises `MediaError` subclasses for files that cannot give clips and lets PyAV's own
    errors (`av.error.FFmpegError`) through for corrupt data.
    """

    def __init__(self, source: str | BinaryIO, cfg: DecodeConfig) -> None:
        self.path, self.cfg = source if isinstance(source, str) else "<memory>", cfg
        self.container = _open(source, cfg)
        try:
            self.info = self._probe()
        except BaseException:
            self.container.close()
            raise
        self.frames_decoded = 0
        self.media_seconds = 0.0  # length of the decoded video, set when clips() ends

    def __enter__(self) -> "MediaReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.container.close()

    def _probe(self) -> MediaInfo:
        c = self.container
        v = c.streams.best("video")
        if v is None:
            raise NoVideoStream(f"no video stream ({len(c.streams.audio)} audio stream(s))")
        a = c.streams.best("audio")
        self.video, self.audio = v, a
        for s in (v, a):
            if s is not None:
                s.codec_context.thread_count = self.cfg.threads
        width, height = v.codec_context.width, v.codec_context.height
        _check_pixels(width, height, self.cfg)
        declared = None
        if v.duration is not None and v.time_base is not None:
            declared = float(v.duration * v.time_base)
        elif c.duration is not None:
            declared = c.duration / 1e6
        if declared is not None and declared > self.cfg.max_seconds:
            raise MediaTooLong(f"{declared:.1f} s exceeds --max-seconds {self.cfg.max_seconds:g}")
        self.origin = (c.start_time or 0) / 1e6
        rate = float(v.average_rate) if v.average_rate else 0.0
        # Rotation is only known from the first frame's display matrix; patched in `clips()`.
        return MediaInfo(video_stream=v.index, audio_stream=a.index if a is not None else -1,
                         src_width=width, src_height=height, src_fps=rate, rotation=0,
                         declared_seconds=declared)

    def clips(self) -> Iterator[Clip]:
        """Yield complete clips in index order; raise TooShort if the file gives none."""
        cfg = self.cfg
        S, sr, tolerance = cfg.samples_per_clip, cfg.sample_rate, 0.5 / cfg.fps
        open_clips: list[_ClipBuilder] = []
        next_index = 0
        emitted = 0
        # Audio as positioned chunks (first global sample index, samples): gaps stay silent.
        chunks: list[tuple[int, np.ndarray]] = []
        audio_written = 0  # end of the last chunk placed
        resampler = av.AudioResampler(format="fltp", rate=sr) if self.audio else None
        prev_frame: av.VideoFrame | None = None  # the last frame placed on the timeline
        prev_rgb: np.ndarray | None = None
        prev_time = 0.0
        frame_period = 1.0 / (self.info.src_fps or cfg.fps)
        plan = (0, 0, 0, 0)
        rotation = 0

        def open_until(t: float) -> None:
            """Open every clip that starts before media time t."""
            nonlocal next_index
            while next_index * cfg.hop < t:
                if next_index * cfg.hop + cfg.clip_seconds > cfg.max_seconds:
                    err = MediaTooLong(f"media runs past --max-seconds {cfg.max_seconds:g}")
                    err.stage = "decode"  # found while decoding: the container declared no length
                    raise err
                open_clips.append(_ClipBuilder(next_index, cfg))
                next_index += 1

        def assign(until: float) -> None:
            """Show prev_frame at every unfilled target time before `until`."""
            nonlocal prev_rgb
            for b in open_clips:
                while not b.video_done and b.targets[b.next_frame] < until:
                    if prev_rgb is None:
                        prev_rgb = _to_rgb(prev_frame, plan, rotation, cfg)
                    b.frames[b.next_frame] = prev_rgb
                    b.next_frame += 1

        def take_audio(b: _ClipBuilder) -> np.ndarray:
            out = np.zeros(S, dtype=np.float32)
            lo, hi = b.first_sample, b.first_sample + S
            for pos, x in chunks:
                a, z = max(pos, lo), min(pos + len(x), hi)
                if a < z:
                    out[a - lo:z - lo] = x[a - pos:z - pos]
            return out

        def ready(final: bool = False) -> Iterator[Clip]:
            nonlocal chunks, emitted
            while open_clips and open_clips[0].video_done and (
                    final or resampler is None or audio_written >= open_clips[0].first_sample + S
                    or prev_time > open_clips[0].end + _MAX_AV_LAG):  # the audio stream has ended
                b = open_clips.pop(0)
                emitted += 1
                yield Clip(b.index, b.start, b.end, b.frames, take_audio(b))
            keep_from = open_clips[0].first_sample if open_clips else int(round(next_index * cfg.hop * sr))
            chunks = [(p, x) for p, x in chunks if p + len(x) > keep_from]

        def add_audio(samples: np.ndarray, at: int | None) -> None:
            nonlocal audio_written
            pos = at if at is not None and abs(at - audio_written) > sr // 20 else audio_written
            if pos < (prev_time + cfg.clip_seconds + _MAX_AV_LAG) * sr:  # else: video has ended; drop
                chunks.append((pos, samples))
            audio_written = pos + len(samples)

        def add_frame(vf: av.VideoFrame, t: float) -> None:
            nonlocal prev_frame, prev_time, prev_rgb, frame_period, plan, rotation
            if prev_frame is None:
                rotation = _rotation(vf)
                plan = _resize_plan(vf.width, vf.height, rotation, cfg)
                self.info = _with_rotation(self.info, rotation)
            else:
                t = max(t, prev_time + 1e-6)  # duplicate timestamp: the later frame replaces
                open_until(t)
                assign(t)  # targets before the first frame also show the first frame
                frame_period = t - prev_time
            self.frames_decoded += 1
            prev_frame, prev_time, prev_rgb = vf, t, None

        # Decoders emit frames in display order, but some containers (AVI with B-frames) label
        # them with decode-order timestamps: pair output order with timestamps sorted over a
        # short window instead of trusting each label.
        pending: list[av.VideoFrame] = []
        times: list[float] = []
        last_label = -math.inf
        streams = [s for s in (self.video, self.audio) if s is not None]
        for packet in self.container.demux(*streams):
            if packet.stream is self.audio:
                for af in packet.decode():
                    at = None if af.pts is None else int(round((float(af.time) - self.origin) * sr))
                    for out in resampler.resample(af):
                        add_audio(out.to_ndarray().mean(axis=0), at)  # (C, n) -> mono mean
                        at = None
            else:
                for vf in packet.decode():
                    last_label = (float(vf.time) - self.origin if vf.pts is not None
                                  else max(last_label, prev_time) + frame_period)
                    pending.append(vf)
                    heapq.heappush(times, last_label)
                    if len(pending) > _REORDER_WINDOW:
                        add_frame(pending.pop(0), heapq.heappop(times))
            yield from ready()
        while pending:
            add_frame(pending.pop(0), heapq.heappop(times))

        # End of stream: flush the resampler; the last frame lasts its stated duration, else one period.
        if resampler is not None:
            for out in resampler.resample(None):
                add_audio(out.to_ndarray().mean(axis=0), None)
        if prev_frame is None:
            raise TruncatedMedia("no video frame could be decoded")
        last = float(prev_frame.duration * prev_frame.time_base) if prev_frame.duration and prev_frame.time_base else 0.0
        video_end = prev_time + (last if last > 0 else frame_period)
        self.media_seconds = video_end
        declared = self.info.declared_seconds
        if declared is not None and video_end < declared - max(1.0, 0.1 * declared):
            raise TruncatedMedia(f"decoded {video_end:.2f} s of the {declared:.2f} s the container declares")
        # Clips that end within half a target frame period of the video's end are complete.
        open_until(video_end + tolerance - cfg.clip_seconds + 1e-9)
        open_clips[:] = [b for b in open_clips if b.end <= video_end + tolerance]
        assign(math.inf)
        yield from ready(final=True)
        if emitted == 0:
            raise TooShort(f"{video_end:.2f} s of video is shorter than one {cfg.clip_seconds:g} s clip")


def _with_rotation(info: MediaInfo, rotation: int) -> MediaInfo:
    """`info` with the rotation found on the first frame (width/height become displayed size)."""
    w, h = (info.src_height, info.src_width) if rotation in (90, 270) else (info.src_width, info.src_height)
    return dataclasses.replace(info, src_width=w, src_height=h, rotation=rotation)


def decode_file(path: str, cfg: DecodeConfig) -> tuple[MediaInfo, list[Clip]]:
    """Convenience for tests and small files: all clips of `path` in a list."""
    with MediaReader(path, cfg) as reader:
        clips = list(reader.clips())
        return reader.info, clips
