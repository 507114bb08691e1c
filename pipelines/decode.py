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

The seek path (`DecodeConfig.seek`, local mp4/mov/mkv/webm files) gives the same clips bit for bit
from fewer decoded pictures: it places frames by their packets' timestamps and decodes only the
pictures some sampled instant shows, from their keyframe, skipping pictures nothing references.
`keyframes_only` decodes keyframes alone: each instant shows the latest keyframe at or before it
(approximate in time, by up to a keyframe interval).

A segment (`MediaReader(segment=(start, end))`) gives the clips `start + k * hop` that end by
`end`, in the file's own times: on mp4/mov/mkv/webm the demuxer seeks to the keyframe before
`start - _SEGMENT_PREROLL` and stops after the last clip, so a 10 s segment of an hour costs about
10 s of decoding. Measured on generated files: frames and audio bit for bit the whole file's clips
(H.264 + AAC in mp4/mkv); Opus audio in webm comes out 1 ms later after a seek.

Only local files are opened, and FFmpeg's protocol whitelist is pinned to `file` (plus the
schemes a caller allows explicitly), so a crafted playlist cannot make FFmpeg fetch URLs.
Object-store URIs (`s3://`, `gs://`, ..., `_FS_SCHEMES`), when allowed, are read through
`pyarrow.fs` (ranged reads, credentials from pyarrow's usual environment: AWS_* for S3) and handed
to FFmpeg as a file object, so they too open with no protocol at all.
In-memory media (a file object, e.g. an HTTP upload) opens with no protocol at all: it cannot
make FFmpeg open any other file or URL.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
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
# URI schemes read through pyarrow.fs (object stores) rather than FFmpeg's network protocols.
_FS_SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")
_NO_PROTOCOL = "none"  # whitelist naming no protocol: media read from a file object opens nothing else
# FFmpeg's read size on an object-store file: every read is one ranged GET (pyarrow's S3 file does
# not buffer). Demuxing a 1.3 MB webm took 42 reads at PyAV's default 32 KiB, 4 at 1 MiB.
_OBJECT_BUFFER = 1 << 20
SEEK_MODES = ("auto", "always", "never")
# seek="auto" takes the seek path when the source rate is at least this many times the sampling
# rate (measured: see MediaReader._use_seek).
_AUTO_SEEK_RATIO = 4.0
# Containers whose every video packet carries its presentation timestamp and whose seek lands on
# the keyframe asked for (FFmpeg demuxer names): the seek path is exact on these only.
_SEEK_FORMATS = ("mov", "mp4", "matroska", "webm")
# Codecs whose decoders skip exactly the pictures no other picture references under
# skip_frame="NONREF"; other codecs decode every packet from the keyframe on (still exact).
_NONREF_CODECS = {"h264", "hevc", "mpeg4", "mpeg1video", "mpeg2video", "vp8", "vp9"}
# Packets whose presentation times the seek path sorts before use: at least the decoders'
# deepest reordering (an H.264 / HEVC picture buffer holds at most 16 pictures).
_SEEK_REORDER_WINDOW = 16
# A segment's demux starts this many seconds before the segment (on the keyframe at or before
# that): the audio decoder and resampler have run in by the segment's first sample.
_SEGMENT_PREROLL = 1.0


class MediaError(Exception):
    """A file that cannot become clips; `stage` names the step that refused it."""

    stage = "decode"


class UnsupportedSource(MediaError):
    stage = "open"


class MissingFile(UnsupportedSource):
    """A local path that does not exist (a download that is missing, not a broken file)."""

    stage = "missing"


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


class BadSegment(MediaError):
    """A segment (`MediaReader(segment=...)`) that cannot give clips: negative, empty, shorter than
    a clip, or past the end of the video."""

    stage = "segment"


class SeekUnsupported(MediaError):
    """A file the seek path cannot decode exactly (timestamps missing or repeating, a frame or
    keyframe not found again); the full decode can: `ingest_file` retries it so under seek="auto"."""

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
    threads: int = 1                      # FFmpeg decoder threads per file (ingest: more when files < CPUs)
    allowed_schemes: tuple[str, ...] = () # URI schemes besides local paths, e.g. ("https",)
    seek: str = "auto"                    # "auto" | "always" | "never": the seek path (see MediaReader.clips)
    keyframes_only: bool = False          # show the latest keyframe at or before each instant (approximate)

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
        if self.seek not in SEEK_MODES:
            raise ValueError(f"seek must be one of {SEEK_MODES}, got {self.seek!r}")
        if not isinstance(self.keyframes_only, bool):
            raise ValueError(f"keyframes_only must be True or False, got {self.keyframes_only!r}")
        if self.keyframes_only and self.seek == "never":
            raise ValueError("keyframes_only decodes keyframes on the seek path: it cannot be combined with seek='never'")
        unknown = set(self.allowed_schemes) - set(_PROTOCOLS) - set(_FS_SCHEMES)
        if unknown:
            raise ValueError(f"unsupported URI scheme(s) {sorted(unknown)}; known: {sorted([*_PROTOCOLS, *_FS_SCHEMES])}")

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


def _seconds(x: float) -> str:
    """12.0 -> '12', 3600.125 -> '3600.125' (shortest exact form)."""
    return repr(float(x)).removesuffix(".0")


def segment_label(start: float | None, end: float | None) -> str:
    """How messages name a segment: 'segment 12 to 20 s', 'segment from 12 s', 'segment to 20 s';
    'whole file' when it starts at 0 (or none) and has no end."""
    if end is None and not start:  # start None or 0
        return "whole file"
    if start is None:
        return f"segment to {_seconds(end)} s"
    return f"segment {_seconds(start)} to {_seconds(end)} s" if end is not None else f"segment from {_seconds(start)} s"


def check_segment(start: float | None, end: float | None, cfg: DecodeConfig) -> tuple[float, int | None]:
    """(offset of the first clip in media seconds, number of clips or None: to the end of the file)
    of the segment [start, end) (None: the file's start / end); raises BadSegment for a negative
    or empty segment, or one shorter than a clip. Clip k spans start + k * hop + [0, clip)."""
    label = segment_label(start, end)
    if start is not None and not start >= 0:
        raise BadSegment(f"{label}: segment_start_s is negative")
    a = 0.0 if start is None else float(start)
    if end is None:
        return a, None
    if not end > a:
        raise BadSegment(f"{label}: segment_end_s is not after segment_start_s")
    if end - a < cfg.clip_seconds - 1e-9:
        raise BadSegment(f"{label} is shorter than one {cfg.clip_seconds:g} s clip")
    return a, math.floor((end - a - cfg.clip_seconds) / cfg.hop + 1e-9) + 1


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
        return _NO_PROTOCOL if scheme in _FS_SCHEMES else "file," + _PROTOCOLS[scheme]
    local = path[len("file://"):] if m else path
    if not os.path.isfile(local):
        if not os.path.exists(local):
            raise MissingFile(f"no such file: {local}")
        raise UnsupportedSource(f"not a regular file: {local}")
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

    def __init__(self, index: int, cfg: DecodeConfig, offset: float = 0.0) -> None:
        self.index = index
        self.start = offset + index * cfg.hop
        self.end = self.start + cfg.clip_seconds
        self.targets = self.start + np.arange(cfg.frames_per_clip) / cfg.fps
        self.frames = np.empty((cfg.frames_per_clip, cfg.size, cfg.size, 3), dtype=np.uint8)
        self.next_frame = 0
        self.first_sample = int(round(self.start * cfg.sample_rate))

    @property
    def video_done(self) -> bool:
        return self.next_frame == len(self.targets)


def open_object(uri: str, allowed_schemes: tuple[str, ...]) -> BinaryIO:
    """A seekable file object of an object-store URI (`_FS_SCHEMES`, which must be in
    `allowed_schemes`), read through pyarrow.fs. Raises UnsupportedSource for a scheme not allowed
    or an unreachable store, MissingFile when there is no such object."""
    import pyarrow.fs as pafs

    check_source(uri, allowed_schemes)
    if "?" in uri or "#" in uri:  # pyarrow reads endpoint_override, scheme, keys from a URI's query
        raise UnsupportedSource(f"object URIs with a query or fragment are refused (they could choose the "
                                f"endpoint and credentials): {uri}")
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError / ArrowInvalid
        raise UnsupportedSource(f"cannot reach {uri}: {e}") from e
    if info.type == pafs.FileType.NotFound:
        raise MissingFile(f"no such object: {uri}")
    if info.type != pafs.FileType.File:
        raise UnsupportedSource(f"not a file: {uri}")
    return fs.open_input_file(path)


def is_object_uri(path: str) -> bool:
    """Whether `path` is a URI of an object store read through pyarrow.fs (`_FS_SCHEMES`)."""
    m = _SCHEME.match(path)
    return m is not None and m.group(1).lower() in _FS_SCHEMES


def _open(source: str | BinaryIO, cfg: DecodeConfig, buffer_size: int = 32768) -> av.container.InputContainer:
    """Open a path (checked by `check_source`) or a seekable binary file object with PyAV, which
    reads a file object `buffer_size` bytes at a time."""
    whitelist = check_source(source, cfg.allowed_schemes) if isinstance(source, str) else _NO_PROTOCOL
    if av is None:
        raise ImportError("decoding media needs PyAV: pip install av")
    try:
        return av.open(source, container_options={"protocol_whitelist": whitelist}, buffer_size=buffer_size)
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


def _set_threads(cc: av.codec.context.CodecContext, threads: int) -> None:
    """`threads` decoder threads, frame and slice threading both (PyAV's default thread type is
    SLICE only, which gives nothing on one-slice H.264: 720p30 decoded in 1.04 s with 2 slice
    threads and 1.05 s with one, 0.62 s with 2 AUTO threads, measured)."""
    cc.thread_count = threads
    if threads > 1:
        cc.thread_type = "AUTO"


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

    `segment` (start, end) in media seconds (None: the file's start / end) limits the clips to
    that span: clip k spans `start + k * hop + [0, clip_seconds)` in the file's own times, the
    last one ends at or before `end`. Unless `cfg.seek` is "never", the demuxer of an
    mp4/mov/mkv/webm file seeks to the keyframe before the segment (`_SEGMENT_PREROLL`) instead
    of decoding from 0, and stops once the segment's last clip is out. A segment that cannot
    give its clips raises `BadSegment`.

    Raises `MediaError` subclasses for files that cannot give clips and lets PyAV's own
    errors (`av.error.FFmpegError`) through for corrupt data.
    """

    def __init__(self, source: str | BinaryIO, cfg: DecodeConfig,
                 segment: tuple[float | None, float | None] = (None, None)) -> None:
        self.path, self.cfg = source if isinstance(source, str) else "<memory>", cfg
        self._source = source if isinstance(source, str) else None  # the seek path opens it again
        self.segment = segment
        self.seg_start, self.max_clips = check_segment(*segment, cfg)  # before opening: bad metadata first
        self.seeked_to = 0.0  # media time the demuxer started from (a segment's keyframe)
        # an object-store URI: read through pyarrow.fs, FFmpeg gets the file object (closed on exit)
        self._object = open_object(source, cfg.allowed_schemes) if isinstance(source, str) and is_object_uri(source) else None
        try:
            self.container = (_open(source, cfg) if self._object is None
                              else _open(self._object, cfg, buffer_size=_OBJECT_BUFFER))
        except BaseException:
            self._close_object()
            raise
        try:
            self.info = self._probe()
        except BaseException:
            self.container.close()
            self._close_object()
            raise
        self.frames_decoded = 0
        self.media_seconds = 0.0  # length of the decoded video, set when clips() ends
        self.seek_path = False  # whether clips() took the seek path (set when it starts)

    def __enter__(self) -> "MediaReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.container.close()
        self._close_object()

    def _close_object(self) -> None:
        if self._object is not None:
            self._object.close()

    def _probe(self) -> MediaInfo:
        c = self.container
        v = c.streams.best("video")
        if v is None:
            raise NoVideoStream(f"no video stream ({len(c.streams.audio)} audio stream(s))")
        a = c.streams.best("audio")
        self.video, self.audio = v, a
        for s in (v, a):
            if s is not None:
                _set_threads(s.codec_context, self.cfg.threads)
        width, height = v.codec_context.width, v.codec_context.height
        _check_pixels(width, height, self.cfg)
        declared = None
        if v.duration is not None and v.time_base is not None:
            declared = float(v.duration * v.time_base)
        elif c.duration is not None:
            declared = c.duration / 1e6
        if declared is not None and declared > self.cfg.max_seconds:
            raise MediaTooLong(f"{declared:.1f} s exceeds --max-seconds {self.cfg.max_seconds:g}")
        if declared is not None and self.seg_start > 0 and self.seg_start >= declared:
            raise BadSegment(f"{segment_label(*self.segment)} starts past the end of the video ({declared:.2f} s)")
        self.origin = (c.start_time or 0) / 1e6
        rate = float(v.average_rate) if v.average_rate else 0.0
        # Rotation is only known from the first frame's display matrix; patched in `clips()`.
        return MediaInfo(video_stream=v.index, audio_stream=a.index if a is not None else -1,
                         src_width=width, src_height=height, src_fps=rate, rotation=0,
                         declared_seconds=declared)

    def _use_seek(self) -> bool:
        """Whether `clips()` takes the seek path (see DecodeConfig.seek / keyframes_only).

        Only local paths in `_SEEK_FORMATS` qualify (the decoder opens the file a second time to
        seek in it; a file object cannot be shared). seek="auto" also needs the source rate to be
        at least `_AUTO_SEEK_RATIO` times `fps`. Measured once on a loaded 2-core machine (60 s of
        720p30 H.264 veryfast, B-frames, a keyframe every 2 s, AAC stereo; size 224, 16 kHz, one
        process, media s/s): full decode 12.7 at fps 1 and 10.8 at fps 7.5; seek 31.5 at fps 1,
        22.1 at 2, 17.6 at 4, 15.3 at 7.5 (skipping non-reference pictures still pays at a ratio
        of 4); keyframes only 122 at fps 1. Ratios below 4 were not measured, so "auto" stops there.
        """
        cfg = self.cfg
        if cfg.seek == "never":
            return False
        if self._source is None or (_SCHEME.match(self._source) and not self._source.startswith("file://")):
            why = "it is a file object or URL"  # a second handle could not seek over HTTP or share a file object
        elif not set(self.container.format.name.split(",")) & set(_SEEK_FORMATS):
            why = f"its format {self.container.format.name} is not one of {', '.join(_SEEK_FORMATS)}"
        else:
            return cfg.seek == "always" or cfg.keyframes_only or self.info.src_fps >= _AUTO_SEEK_RATIO * cfg.fps
        if cfg.keyframes_only:  # exact frames instead of keyframes: right, but not what was asked, so say it
            logging.getLogger(__name__).warning("%s: keyframes-only decoding needs the seek path, and %s: decoding "
                                                "every frame instead", self.path, why)
        return False

    def _seek_segment(self) -> bool:
        """Seek the demuxer to the keyframe at or before `_SEGMENT_PREROLL` s before the segment,
        where that is exact (`_SEEK_FORMATS`, not seek="never"; a seekable file object too, e.g. an
        object-store file: only the segment's byte ranges are read); whether it did."""
        t = self.seg_start - _SEGMENT_PREROLL
        if (t <= 0 or self.cfg.seek == "never"
                or not set(self.container.format.name.split(",")) & set(_SEEK_FORMATS)):
            return False
        self.container.seek(int((t + self.origin) / self.video.time_base), backward=True, stream=self.video)
        self.seeked_to = t
        return True

    def clips(self) -> Iterator[Clip]:
        """Yield complete clips in index order; raise TooShort if the file gives none.

        Two video paths feed one `_Timeline` (clip windows, audio placement, end of stream):
        the full path decodes every video packet; the seek path (`DecodeConfig.seek`) reads the
        video packets' timestamps from the same demux pass and decodes, in a second handle on
        the file, only the frames some sampled instant shows (`_SeekDecoder`). Both give the same
        clips, bit for bit, on the files the seek path takes (`_use_seek`); audio is decoded from
        the one demux pass either way.
        """
        seek = self._use_seek()
        landed = not self._seek_segment()  # whether the first video packet was checked
        video: _FullVideo | _SeekVideo
        if seek:
            video = _SeekVideo(self, _SeekDecoder(self._source, self.cfg, self.video, self.cfg.keyframes_only))
        else:
            video = _FullVideo(self)
        self.seek_path = seek
        try:
            timeline = _Timeline(self, video.resolve)
            streams = [s for s in (self.video, self.audio) if s is not None]
            for packet in self.container.demux(*streams):
                if packet.stream is not self.audio and not landed and packet.size:
                    landed = True
                    if packet.pts is None or float(packet.pts * self.video.time_base) - self.origin > self.seg_start + 1e-6:
                        raise SeekUnsupported(f"seeking to the {segment_label(*self.segment)} did not land at or "
                                              "before its start: decode it with --seek never")
                if packet.stream is self.audio:
                    timeline.add_audio(packet)
                elif isinstance(video, _SeekVideo) and not video.takes(packet):
                    # decided on the first video packet, before any frame is placed: the full
                    # path from here gives what it gives from the start
                    video.close()
                    video, self.seek_path = _FullVideo(self), False
                    timeline.resolve = video.resolve
                    video.packet(packet, timeline)
                else:
                    video.packet(packet, timeline)
                yield from timeline.ready()
                if timeline.done:  # a segment's last clip is out: the rest of the file is not read
                    self.media_seconds = self.segment[1] - self.seg_start
                    return
            video.flush(timeline)
            yield from timeline.finish(*video.end(timeline))
        finally:
            video.close()


class _Timeline:
    """What both video paths share: the clips being filled, audio placed by its own timestamps,
    and the end of stream. Video enters as `add_frame(ref, t)` in display order, `ref` being
    whatever `resolve(ref)` turns into the `av.VideoFrame` (decoded only when a target shows it)."""

    def __init__(self, reader: MediaReader, resolve) -> None:
        cfg = reader.cfg
        self.reader, self.cfg, self.resolve = reader, cfg, resolve
        self.S, self.sr, self.tolerance = cfg.samples_per_clip, cfg.sample_rate, 0.5 / cfg.fps
        self.open_clips: list[_ClipBuilder] = []
        self.offset, self.max_clips = reader.seg_start, reader.max_clips  # the segment's clips
        self.next_index = 0
        self.emitted = 0
        # Audio as positioned chunks (first global sample index, samples): gaps stay silent.
        self.chunks: list[tuple[int, np.ndarray]] = []
        self.audio_written = 0  # end of the last chunk placed
        self.resampler = av.AudioResampler(format="fltp", rate=self.sr) if reader.audio else None
        self.prev_ref = None  # the last frame placed on the timeline
        self.prev_rgb: np.ndarray | None = None
        self.prev_time = 0.0
        self.clock = reader.seeked_to  # media time the video has reached (= prev_time unless frames are left out)
        self.frame_period = 1.0 / (reader.info.src_fps or cfg.fps)
        self.plan: tuple[int, int, int, int] | None = None
        self.rotation = 0

    def open_until(self, t: float) -> None:
        """Open every clip that starts before media time t."""
        cfg = self.cfg
        while (self.max_clips is None or self.next_index < self.max_clips) and self.offset + self.next_index * cfg.hop < t:
            if self.offset + self.next_index * cfg.hop + cfg.clip_seconds > cfg.max_seconds:
                err = MediaTooLong(f"media runs past --max-seconds {cfg.max_seconds:g}")
                err.stage = "decode"  # found while decoding: the container declared no length
                raise err
            self.open_clips.append(_ClipBuilder(self.next_index, cfg, self.offset))
            self.next_index += 1

    @property
    def done(self) -> bool:
        """Every clip of a segment with an end has been emitted."""
        return self.max_clips is not None and self.emitted == self.max_clips

    def assign(self, until: float) -> None:
        """Show the previous frame at every unfilled target time before `until`."""
        for b in self.open_clips:
            while not b.video_done and b.targets[b.next_frame] < until:
                if self.prev_rgb is None:
                    vf = self.resolve(self.prev_ref)
                    if self.plan is None:
                        self.rotation = _rotation(vf)
                        self.plan = _resize_plan(vf.width, vf.height, self.rotation, self.cfg)
                        self.reader.info = _with_rotation(self.reader.info, self.rotation)
                    self.prev_rgb = _to_rgb(vf, self.plan, self.rotation, self.cfg)
                b.frames[b.next_frame] = self.prev_rgb
                b.next_frame += 1

    def add_frame(self, ref, t: float) -> None:
        if self.prev_ref is not None:
            t = max(t, self.prev_time + 1e-6)  # duplicate timestamp: the later frame replaces
            self.open_until(t)
            self.assign(t)  # targets before the first frame also show the first frame
            self.frame_period = t - self.prev_time
        self.clock = t if self.prev_ref is None else max(self.clock, t)
        self.prev_ref, self.prev_time, self.prev_rgb = ref, t, None

    def tick(self, t: float) -> None:
        """The video reached media time t without a frame placed (keyframes only)."""
        self.clock = max(self.clock, t)

    def take_audio(self, b: _ClipBuilder) -> np.ndarray:
        out = np.zeros(self.S, dtype=np.float32)
        lo, hi = b.first_sample, b.first_sample + self.S
        for pos, x in self.chunks:
            a, z = max(pos, lo), min(pos + len(x), hi)
            if a < z:
                out[a - lo:z - lo] = x[a - pos:z - pos]
        return out

    def ready(self, final: bool = False) -> Iterator[Clip]:
        oc = self.open_clips
        while oc and oc[0].video_done and (
                final or self.resampler is None or self.audio_written >= oc[0].first_sample + self.S
                or self.clock > oc[0].end + _MAX_AV_LAG):  # the audio stream has ended
            b = oc.pop(0)
            self.emitted += 1
            yield Clip(b.index, b.start, b.end, b.frames, self.take_audio(b))
        keep_from = oc[0].first_sample if oc else int(round((self.offset + self.next_index * self.cfg.hop) * self.sr))
        self.chunks = [(p, x) for p, x in self.chunks if p + len(x) > keep_from]

    def _place(self, samples: np.ndarray, at: int | None) -> None:
        sr = self.sr
        pos = at if at is not None and abs(at - self.audio_written) > sr // 20 else self.audio_written
        if pos < (self.clock + self.cfg.clip_seconds + _MAX_AV_LAG) * sr:  # else: video has ended; drop
            self.chunks.append((pos, samples))
        self.audio_written = pos + len(samples)

    def add_audio(self, packet: av.Packet) -> None:
        """Decode, resample to mono and place one audio packet."""
        origin, sr = self.reader.origin, self.sr
        for af in packet.decode():
            at = None if af.pts is None else int(round((float(af.time) - origin) * sr))
            for out in self.resampler.resample(af):
                self._place(out.to_ndarray().mean(axis=0), at)  # (C, n) -> mono mean
                at = None

    def finish(self, last_duration: float, video_end: float | None = None) -> Iterator[Clip]:
        """End of stream: flush the resampler; the last frame lasts `last_duration` (else one
        period) unless the path knows `video_end` itself; yield the clips that are complete."""
        cfg, reader = self.cfg, self.reader
        if self.resampler is not None:
            for out in self.resampler.resample(None):
                self._place(out.to_ndarray().mean(axis=0), None)
        if self.prev_ref is None:
            raise TruncatedMedia("no video frame could be decoded")
        if video_end is None:
            video_end = self.prev_time + (last_duration if last_duration > 0 else self.frame_period)
        reader.media_seconds = video_end - self.offset
        declared = reader.info.declared_seconds
        if declared is not None and video_end < declared - max(1.0, 0.1 * declared):
            raise TruncatedMedia(f"decoded {video_end:.2f} s of the {declared:.2f} s the container declares")
        # Clips that end within half a target frame period of the video's end are complete.
        self.open_until(video_end + self.tolerance - cfg.clip_seconds + 1e-9)
        self.open_clips[:] = [b for b in self.open_clips if b.end <= video_end + self.tolerance]
        label = segment_label(*reader.segment)
        if self.offset > 0 and video_end <= self.offset:
            raise BadSegment(f"{label} starts past the end of the video ({video_end:.2f} s)")
        if self.max_clips is not None and self.emitted + len(self.open_clips) < self.max_clips:
            raise BadSegment(f"{label} ends past the end of the video ({video_end:.2f} s)")
        self.assign(math.inf)
        yield from self.ready(final=True)
        if self.emitted == 0:
            seconds = f"{video_end - self.offset:.2f} s of video"
            raise TooShort(f"{label}: {seconds} is shorter than one {cfg.clip_seconds:g} s clip" if self.offset > 0
                           else f"{seconds} is shorter than one {cfg.clip_seconds:g} s clip")


def _frame_seconds(frame_or_packet) -> float:
    """Duration in seconds of a decoded frame or a packet, 0.0 if unknown."""
    d, tb = frame_or_packet.duration, frame_or_packet.time_base
    return float(d * tb) if d and tb else 0.0


class _FullVideo:
    """The full-decode path: every video packet is decoded; frames enter in output order."""

    def __init__(self, reader: MediaReader) -> None:
        self.reader = reader
        # Decoders emit frames in display order, but some containers (AVI with B-frames) label
        # them with decode-order timestamps: pair output order with timestamps sorted over a
        # short window instead of trusting each label.
        self.pending: list[av.VideoFrame] = []
        self.times: list[float] = []
        self.last_label = -math.inf

    @staticmethod
    def resolve(vf: av.VideoFrame) -> av.VideoFrame:
        return vf

    def _add(self, timeline: _Timeline) -> None:
        timeline.add_frame(self.pending.pop(0), heapq.heappop(self.times))
        self.reader.frames_decoded += 1

    def packet(self, packet: av.Packet, timeline: _Timeline) -> None:
        origin = self.reader.origin
        for vf in packet.decode():
            self.last_label = (float(vf.time) - origin if vf.pts is not None
                               else max(self.last_label, timeline.prev_time) + timeline.frame_period)
            self.pending.append(vf)
            heapq.heappush(self.times, self.last_label)
            if len(self.pending) > _REORDER_WINDOW:
                self._add(timeline)

    def flush(self, timeline: _Timeline) -> None:
        while self.pending:
            self._add(timeline)

    def end(self, timeline: _Timeline) -> tuple[float]:
        return (_frame_seconds(timeline.prev_ref) if timeline.prev_ref is not None else 0.0,)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _PacketRef:
    """A video frame known from its packet: the seek path decodes it only if a target shows it."""

    pts: int
    seq: int       # the packet's place in decode order
    key_pts: int   # the keyframe to decode it from: the latest one before it in decode order, shown no later


class _SeekVideo:
    """The seek path's side of the demux pass: video packets are read, not decoded; their
    presentation times (sorted over `_SEEK_REORDER_WINDOW` packets, which the decoders' own
    reordering never exceeds) place frames on the timeline exactly where the full path does, and
    `_SeekDecoder` decodes the frames the timeline asks for. With `keyframes_only`, only
    keyframes are placed: each instant shows the latest keyframe at or before it."""

    def __init__(self, reader: MediaReader, decoder: "_SeekDecoder") -> None:
        self.reader, self.decoder = reader, decoder
        self.keyframes_only = reader.cfg.keyframes_only
        tb = reader.video.time_base
        self.num, self.den = tb.numerator, tb.denominator
        self.heap: list[tuple[float, int, int, bool, float]] = []  # (t, pts, seq, keyframe, duration)
        self.seq = 0
        self.first_key = 0  # pts of the first packet (a keyframe)
        self.keys: list[tuple[int, int]] = []  # (pts, seq) of keyframes not yet behind the decoder
        self.last = (-math.inf, None, 0.0)  # (t, pts, duration) of the latest packet placed, in display order

    def takes(self, packet: av.Packet) -> bool:
        """False for a first video packet the seek path cannot start from (no timestamp, not a
        keyframe): the file is then decoded fully."""
        return bool(self.seq or packet.size == 0 or (packet.pts is not None and packet.is_keyframe))

    def packet(self, packet: av.Packet, timeline: _Timeline) -> None:
        if packet.size == 0:  # the demuxer's end-of-stream marker
            return
        if packet.pts is None:
            raise SeekUnsupported(f"a video packet without a timestamp (packet {self.seq}): decode it with --seek never")
        if not self.seq:
            self.first_key = packet.pts
        # the same arithmetic as av.Frame.time, so that times equal the full path's bit for bit
        t = float(packet.pts) * self.num / self.den - self.reader.origin
        if packet.is_keyframe:
            self.keys.append((packet.pts, self.seq))
        heapq.heappush(self.heap, (t, packet.pts, self.seq, packet.is_keyframe, _frame_seconds(packet)))
        self.seq += 1
        if len(self.heap) > _SEEK_REORDER_WINDOW:
            self._place(heapq.heappop(self.heap), timeline)
        # the video has reached t, though the window holds its last packets back: audio up to
        # clip + _MAX_AV_LAG past it is kept (on a 1 fps source the window spans 16 s)
        timeline.tick(t)

    def _place(self, item: tuple[float, int, int, bool, float], timeline: _Timeline) -> None:
        t, pts, seq, key, duration = item
        if t <= self.last[0]:
            raise SeekUnsupported("video timestamps repeat or reorder beyond the seek path's window: "
                                  "decode it with --seek never")
        self.last = (t, pts, duration)
        if self.keyframes_only and not key:
            timeline.tick(t)
            return
        # none: a frame shown before the first keyframe decodes from the start, as in the full path
        key_pts = next((k for k, s in reversed(self.keys) if s <= seq and k <= pts), self.first_key)
        timeline.add_frame(_PacketRef(pts, seq, key_pts), t)

    def resolve(self, ref: _PacketRef) -> av.VideoFrame:
        # keyframes before the one this frame decodes from are not needed again (requests come in
        # display order, and a later frame never decodes from an earlier keyframe)
        while len(self.keys) > 1 and self.keys[0][0] < ref.key_pts:
            self.keys.pop(0)
        vf = self.decoder.get(ref.pts, ref.key_pts)
        self.reader.frames_decoded = self.decoder.frames
        return vf

    def flush(self, timeline: _Timeline) -> None:
        while self.heap:
            self._place(heapq.heappop(self.heap), timeline)

    def end(self, timeline: _Timeline) -> tuple[float, float | None]:
        t, _, duration = self.last
        if not self.keyframes_only or timeline.prev_ref is None:
            return (duration, None)
        # the video lasts until its last frame ends, keyframe or not: clips span what the full path's do
        return (duration, t + (duration if duration > 0 else timeline.frame_period))

    def close(self) -> None:
        self.reader.frames_decoded = self.decoder.frames
        self.decoder.close()


class _SeekDecoder:
    """Decodes the frames asked for (by pts, in display order) from a second handle on the file.

    To reach a frame it seeks to the keyframe it decodes from, unless the decoder already went
    past that keyframe, then decodes forward; packets before the target are decoded with
    skip_frame="NONREF" (pictures nothing references are dropped: the frames that remain are
    bit-identical to a full decode), the target with "DEFAULT". The decoder returns frames in
    display order with the delay of its reordering, so decoding goes on past the target until it
    comes out; frames behind it are cached, and a target found skipped (a later frame came out
    first) is decoded again from its keyframe. With `keyframes_only`, only keyframe packets are
    sent to the decoder.
    """

    def __init__(self, source: str, cfg: DecodeConfig, video: av.video.stream.VideoStream,
                 keyframes_only: bool) -> None:
        self.container = _open(source, cfg)
        try:
            self.stream = next(s for s in self.container.streams if s.index == video.index)
            self.cc = self.stream.codec_context
            _set_threads(self.cc, cfg.threads)
        except BaseException:
            self.container.close()
            raise
        self.keyframes_only = keyframes_only
        self.skip = "NONREF" if self.cc.name in _NONREF_CODECS else "DEFAULT"
        self.packets: Iterator[av.Packet] | None = None  # None: the decoder must be positioned first
        self.next_packet: av.Packet | None = None  # read after a seek, not yet decoded
        self.last_key: int | None = None  # pts of the last keyframe decoded since the last seek
        self.cache: dict[int, av.VideoFrame] = {}  # frames that came out after the one asked for
        self.frames = 0  # frames the decoder returned

    def close(self) -> None:
        self.cache.clear()
        self.container.close()

    def get(self, pts: int, key_pts: int) -> av.VideoFrame:
        for k in [k for k in self.cache if k < pts]:
            del self.cache[k]
        if pts in self.cache:
            return self.cache.pop(pts)
        for attempt in range(2):
            if (attempt or self.packets is None or self.last_key is None
                    or (key_pts > self.last_key and not self.keyframes_only)):  # keyframes: read on
                self._seek(key_pts)
            vf = self._decode_until(pts)
            if vf is not None:
                return vf
        raise SeekUnsupported(f"the frame at pts {pts} could not be decoded on the seek path: "
                              "decode it with --seek never")

    def _seek(self, key_pts: int) -> None:
        """Position the demuxer on the keyframe at `key_pts` (its packet is the next decoded)."""
        self.cache.clear()
        for target in (key_pts, None):  # None: from the start, if seeking lands past the keyframe
            if target is None:
                self.container.seek(0, backward=True)
            else:
                self.container.seek(target, backward=True, stream=self.stream)  # also flushes the decoder
            self.packets = self.container.demux(self.stream)
            for p in self.packets:
                if p.size == 0 or p.pts is None:
                    break
                if p.is_keyframe and p.pts > key_pts:
                    break  # landed past it
                if p.is_keyframe and p.pts == key_pts:
                    self.next_packet, self.last_key = p, None
                    return
        raise SeekUnsupported(f"the keyframe at pts {key_pts} could not be found again: decode it with --seek never")

    def _next(self) -> av.Packet | None:
        """The next packet of the demuxer (not a generator wrapping it: closing a wrapper would
        close the demuxer's own generator)."""
        if self.next_packet is not None:
            p, self.next_packet = self.next_packet, None
            return p
        return next(self.packets, None)

    def _decode_until(self, pts: int) -> av.VideoFrame | None:
        """Decode forward until the frame at `pts` comes out; None if it was skipped."""
        found: av.VideoFrame | None = None
        fed_target = False
        while (p := self._next()) is not None:
            if p.size == 0:  # end of the stream: drain the decoder, which must be positioned anew
                frames = self.cc.decode(None)
                self.packets = None
            else:
                if self.keyframes_only and not p.is_keyframe:
                    continue
                if p.is_keyframe:
                    self.last_key = p.pts
                target = p.pts == pts
                fed_target |= target
                skip = "DEFAULT" if target or fed_target else self.skip
                if self.cc.skip_frame != skip:
                    self.cc.skip_frame = skip
                frames = self.cc.decode(p)
            for f in frames:
                self.frames += 1
                if f.pts == pts and found is None:
                    found = f
                elif f.pts is not None and f.pts > pts:
                    if found is None:  # the frame asked for was skipped: decode it again
                        self.cache[f.pts] = f
                        return None
                    self.cache[f.pts] = f
            if found is not None or self.packets is None:
                return found
        self.packets = None
        return found


def _with_rotation(info: MediaInfo, rotation: int) -> MediaInfo:
    """`info` with the rotation found on the first frame (width/height become displayed size)."""
    w, h = (info.src_height, info.src_width) if rotation in (90, 270) else (info.src_width, info.src_height)
    return dataclasses.replace(info, src_width=w, src_height=h, rotation=rotation)


def decode_file(path: str, cfg: DecodeConfig) -> tuple[MediaInfo, list[Clip]]:
    """Convenience for tests and small files: all clips of `path` in a list."""
    with MediaReader(path, cfg) as reader:
        clips = list(reader.clips())
        return reader.info, clips
