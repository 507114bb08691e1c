"""Uploads -> clip rows: the ingest decoder's rows from bytes in memory, still images as one silent
clip, and the decoder's errors for bad media."""
import io

import numpy as np
import pytest
from PIL import Image

from pipelines.clipsettings import ClipSettings
from pipelines.decode import MediaTooLong, TooShort, UnreadableMedia
from pipelines.schema import CLIP_SCHEMA, decode_clip_batch
from pipelines.upload import decode_upload
from tests.mediagen import write_video

SETTINGS = ClipSettings(clip_seconds=1.0, hop_seconds=0.25, fps=5.0, size=40)
LIMITS = {"max_pixels": 640 * 480, "max_seconds": 30.0}


def test_a_video_becomes_back_to_back_clip_rows(tmp_path):
    video = write_video(tmp_path / "v.mp4", seconds=3.0, width=96, height=64)
    rows, info = decode_upload(video.read_bytes(), SETTINGS, **LIMITS)
    assert set(rows) == set(CLIP_SCHEMA.names)
    assert rows["start_s"].tolist() == [0.0, 1.0, 2.0]  # the training hop (0.25 s) does not apply
    assert (info.src_width, info.src_height, info.has_audio) == (96, 64, True)
    b = decode_clip_batch(rows)
    assert b["frames"].shape == (3, 5, 40, 40, 3) and b["audio"].shape == (3, 16000) and b["logmel"].shape == (3, 64, 101)
    assert len(set(rows["video_id"])) == 1 and len(rows["video_id"][0]) == 16


def test_a_still_image_is_one_silent_clip_only_where_allowed(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 50, 3), 200, np.uint8)).save(buf, format="PNG")
    with pytest.raises(TooShort):
        decode_upload(buf.getvalue(), SETTINGS, **LIMITS)
    rows, info = decode_upload(buf.getvalue(), SETTINGS, image_ok=True, **LIMITS)
    b = decode_clip_batch(rows)
    assert b["frames"].shape == (1, 5, 40, 40, 3) and (b["frames"] == b["frames"][:, :1]).all()
    assert rows["has_audio"].tolist() == [False] and not b["audio"].any()
    assert (info.src_width, info.src_height) == (50, 30)


def test_bad_media_raises_the_decoders_errors(tmp_path):
    with pytest.raises(UnreadableMedia):
        decode_upload(b"not a video at all" * 20, SETTINGS, **LIMITS)
    long = write_video(tmp_path / "long.mp4", seconds=3.0, width=32, height=32)
    with pytest.raises(MediaTooLong, match="max-seconds 2"):
        decode_upload(long.read_bytes(), SETTINGS, max_pixels=LIMITS["max_pixels"], max_seconds=2.0)
