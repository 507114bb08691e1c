"""Uploads (media bytes held in memory) -> clip rows, made by the ingest decoder exactly as
`avray preprocess` makes them, so that a served model reads what it was trained on.

`decode_upload` runs `MediaReader` on the bytes with the checkpoint's clip settings, then
`pipelines.ingest.clip_rows` (the same rows, log-mel included, that preprocess writes) and
returns them as the columnar numpy batch that training reads from Parquet
(`pipelines.schema.numpy_batch`). A still image, where allowed, is one clip whose frames all show
it, with silence and `has_audio` false. Only the bytes are read: in-memory media opens no file
or URL (see pipelines.decode).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.clipsettings import ClipSettings
from pipelines.decode import (Clip, MediaError, MediaInfo, MediaReader, NoVideoStream, TooShort, UnreadableMedia,
                              read_audio, read_image)
from pipelines.ingest import IngestConfig, clip_rows
from pipelines.schema import CLIP_SCHEMA, numpy_batch


def decode_upload(data: bytes, settings: ClipSettings, *, max_pixels: int, max_seconds: float,
                  image_ok: bool = False, audio_ok: bool = False) -> tuple[dict[str, Any], MediaInfo]:
    """Upload bytes -> (its clip rows as a numpy batch, what was found in it).

    The batch has every clip-table column (`pipelines.schema.CLIP_SCHEMA`; tensor columns as
    blobs + shapes, which `decode_clip_batch` turns into arrays); C rows, one per clip, back to back
    from the start whatever hop the training set used. Raises `MediaError` subclasses:
    MediaTooLarge / MediaTooLong past the limits, UnreadableMedia for corrupt data, TooShort for
    media shorter than a clip (and not an allowed image), NoVideoStream for sound alone unless
    `audio_ok`: then its clips have black frames (`video_stream` -1), the last one padded with
    silence when the sound is shorter than one clip.
    """
    back_to_back = dataclasses.replace(settings, hop_seconds=None)
    icfg = IngestConfig(decode=back_to_back.decode_config(max_pixels=max_pixels, max_seconds=max_seconds),
                        spectrogram=settings.spectrogram_config())
    try:
        try:
            with MediaReader(io.BytesIO(data), icfg.decode) as reader:
                clips = list(reader.clips())
                info = reader.info
        except TooShort:
            if not image_ok:
                raise
            clips, info = _still(data, icfg)
        except NoVideoStream:
            if not audio_ok:
                raise
            clips, info = _sound(data, icfg)
    except MediaError:
        raise
    except Exception as e:  # PyAV / FFmpeg errors on corrupt data
        raise UnreadableMedia(f"corrupt or unsupported media: {e}") from e
    vid = hashlib.sha1(data).hexdigest()[:16]
    rows = clip_rows(clips, vid, "<upload>", info, icfg, {})
    return numpy_batch(pa.Table.from_pylist(rows, schema=CLIP_SCHEMA)), info


def _still(data: bytes, icfg: IngestConfig) -> tuple[list[Clip], MediaInfo]:
    """A still image as one silent clip of T identical frames."""
    dec = icfg.decode
    img, info = read_image(io.BytesIO(data), dec)  # (H, W, 3)
    frames = np.repeat(img[None], dec.frames_per_clip, axis=0)  # (T, H, W, 3)
    clip = Clip(index=0, start_s=0.0, end_s=dec.clip_seconds, frames=frames,
                audio=np.zeros(dec.samples_per_clip, np.float32))
    return [clip], info


def _sound(data: bytes, icfg: IngestConfig) -> tuple[list[Clip], MediaInfo]:
    """Sound alone as back-to-back clips of black frames; a partial tail is dropped unless it is
    all there is (then padded with silence to one clip)."""
    dec = icfg.decode
    audio = read_audio(io.BytesIO(data), dec)  # (S,)
    S = dec.samples_per_clip
    n = max(1, len(audio) // S)
    audio = np.pad(audio, (0, max(0, n * S - len(audio))))[: n * S].reshape(n, S)  # (C, S)
    black = np.zeros((dec.frames_per_clip, dec.size, dec.size, 3), np.uint8)
    clips = [Clip(index=k, start_s=k * dec.clip_seconds, end_s=(k + 1) * dec.clip_seconds, frames=black,
                  audio=audio[k]) for k in range(n)]
    info = MediaInfo(video_stream=-1, audio_stream=0, src_width=0, src_height=0, src_fps=0.0, rotation=0,
                     declared_seconds=len(audio) / dec.sample_rate)
    return clips, info
