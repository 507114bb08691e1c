"""A segment of a file (MediaReader(segment=...), a manifest's segment_start_s / segment_end_s):
clips in the file's own times, the full decode's frames and audio, A/V sync, a demux that starts
at the segment's keyframe and stops after its last clip, and clear errors for bad segments."""

import numpy as np
import pytest

from pipelines.decode import (BadSegment, DecodeConfig, MediaReader, MissingFile, SeekUnsupported, TooShort,
                              UnsupportedSource, check_segment, segment_label)
from tests import mediagen

# Letterbox at the source width keeps the whole picture (and its frame-index code) readable.
LETTERBOX = dict(resize="letterbox", size=96)
G50 = {"g": "50"}  # a keyframe every 2 s at 25 fps


def _decode(path, segment=(None, None), **kw):
    """(clips, frames decoded, media seconds, seek path taken) of one decode."""
    with MediaReader(str(path), DecodeConfig(**kw), segment) as r:
        clips = list(r.clips())
        return clips, r.frames_decoded, r.media_seconds, r.seek_path


@pytest.fixture(scope="module")
def long_mp4(tmp_path_factory):
    return mediagen.write_video(tmp_path_factory.mktemp("seg") / "v.mp4", seconds=24.0, video_options=G50)


# frames decoded, measured (FFmpeg 8.1, libx264 as mediagen writes it): the demux stops once the
# last clip (18-20 s) is out, a few frames past 20 s (the decoder's reordering delay)
@pytest.mark.parametrize("seek, fps, seek_path, decoded", [
    ("never", 5, False, 497),  # every frame from 0 to the segment's end
    ("auto", 8, False, 248),   # every frame from the keyframe at 10 s (the one before 12 - 1 s) on
    ("auto", 5, True, 141),    # the seek path from there: the pictures the instants need
    ("always", 1, True, 61),
])
def test_a_segment_gives_the_full_decodes_clips_in_the_files_times(long_mp4, seek, fps, seek_path, decoded):
    cfg = dict(clip_seconds=2.0, fps=fps, sample_rate=8000, **LETTERBOX)
    full = {c.start_s: c for c in _decode(long_mp4, seek="never", **cfg)[0]}
    clips, n, seconds, took_seek = _decode(long_mp4, (12.0, 20.0), seek=seek, **cfg)
    assert [(c.index, c.start_s, c.end_s) for c in clips] == [(0, 12.0, 14.0), (1, 14.0, 16.0), (2, 16.0, 18.0),
                                                              (3, 18.0, 20.0)]
    for c in clips:  # bit for bit the whole file's clip at the same time (AAC in mp4)
        assert np.array_equal(c.frames, full[c.start_s].frames) and np.array_equal(c.audio, full[c.start_s].audio)
        assert [mediagen.frame_index(f[16:80]) for f in c.frames] == [int(np.floor((c.start_s + j / fps) * 25 + 1e-6))
                                                                      for j in range(len(c.frames))]
    assert (n, seconds, took_seek) == (decoded, 8.0, seek_path)


def test_open_ended_and_unaligned_segments(long_mp4):
    cfg = dict(clip_seconds=2.0, fps=5, sample_rate=8000, **LETTERBOX)
    clips, _, seconds, _ = _decode(long_mp4, (12.3, None), hop_seconds=1.5, **cfg)
    assert [c.start_s for c in clips] == [12.3 + k * 1.5 for k in range(7)]  # the last ends at 23.3 <= 24
    assert seconds == pytest.approx(24.0 - 12.3)
    assert [c.start_s for c in _decode(long_mp4, (None, 5.0), **cfg)[0]] == [0.0, 2.0]  # 4-6 would pass the end
    assert [c.start_s for c in _decode(long_mp4, (0.0, None), **cfg)[0]] == [2.0 * k for k in range(12)]


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm", "avi"])
def test_av_sync_in_a_segment(tmp_path, ext):
    """Flash and click at 8.2 s, segment 7-10 s (demuxed from the keyframe before 6 s on mp4 /
    mkv / webm, decoded from 0 on avi): both 0.2 s into the clip at 8 s, within a frame."""
    fps, sr = 25.0, 16000
    p = mediagen.write_flash_click(tmp_path / f"fc.{ext}", seconds=12.0, fps=fps, sample_rate=sr, flash_time=8.2)
    clips, _, _, _ = _decode(p, (7.0, 10.0), clip_seconds=1.0, fps=fps, size=16, sample_rate=sr)
    assert [c.start_s for c in clips] == [7.0, 8.0, 9.0]
    c = clips[1]
    flash = int(np.argmax(c.frames.reshape(len(c.frames), -1).mean(axis=1)))
    click = int(np.argmax(np.abs(c.audio) > 0.3))
    assert flash == 5 and abs(click / sr - 0.2) <= 0.0015  # Opus after a seek: 1 ms late (measured)
    assert np.abs(clips[0].audio).max() < 0.05 and np.abs(clips[2].audio).max() < 0.05


def test_bad_segments_are_refused_with_what_is_wrong(long_mp4):
    cases = {
        (-1.0, 5.0): (BadSegment, "segment -1 to 5 s: segment_start_s is negative"),
        (12.0, 12.0): (BadSegment, "segment 12 to 12 s: segment_end_s is not after segment_start_s"),
        (None, -3.0): (BadSegment, "segment to -3 s: segment_end_s is not after segment_start_s"),
        (12.0, 13.5): (BadSegment, "segment 12 to 13.5 s is shorter than one 2 s clip"),
        (30.0, 40.0): (BadSegment, "segment 30 to 40 s starts past the end of the video (24.00 s)"),  # declared
        (20.0, 26.5): (BadSegment, "segment 20 to 26.5 s ends past the end of the video (24.00 s)"),  # decoded
        (23.0, None): (TooShort, "segment from 23 s: 1.00 s of video is shorter than one 2 s clip"),
    }
    for segment, (error, message) in cases.items():
        for seek in ("auto", "never"):
            with pytest.raises(error) as e:
                _decode(long_mp4, segment, clip_seconds=2.0, fps=5, size=16, seek=seek)
            assert (str(e.value), e.value.stage) == (message, "segment" if error is BadSegment else "decode"), seek
    cfg = DecodeConfig(clip_seconds=2.0, fps=5, size=16)
    assert check_segment(12.0, 20.0, cfg) == (12.0, 4) and check_segment(None, None, cfg) == (0.0, None)
    assert check_segment(12.3, 20.0, DecodeConfig(clip_seconds=2.0, hop_seconds=1.5)) == (12.3, 4)
    assert segment_label(3600.125, None) == "segment from 3600.125 s"


def test_a_seek_that_lands_past_the_segment_is_refused_for_the_full_decode(long_mp4, monkeypatch):
    """The demuxer's seek must land at or before the segment: if not, SeekUnsupported (which
    `ingest_file` answers with a full decode under seek="auto")."""
    import av

    real_seek = av.container.InputContainer.seek

    def late_seek(self, offset, **kw):
        return real_seek(self, offset + int(4 / kw["stream"].time_base), **kw)  # 4 s too late

    monkeypatch.setattr(av.container.InputContainer, "seek", late_seek)
    with pytest.raises(SeekUnsupported, match=r"^seeking to the segment 12 to 20 s did not land at or before its "
                                              r"start: decode it with --seek never$"):
        _decode(long_mp4, (12.0, 20.0), clip_seconds=2.0, fps=8, size=16)


def test_a_missing_file_is_its_own_error(tmp_path):
    with pytest.raises(MissingFile, match=r"^no such file: .*gone\.mp4$") as e:
        MediaReader(str(tmp_path / "gone.mp4"), DecodeConfig())
    assert e.value.stage == "missing" and isinstance(e.value, UnsupportedSource)
    (tmp_path / "dir.mp4").mkdir()
    with pytest.raises(UnsupportedSource, match="not a regular file") as e:
        MediaReader(str(tmp_path / "dir.mp4"), DecodeConfig())
    assert e.value.stage == "open"


def test_a_file_object_seeks_to_its_segment_too(long_mp4):
    """An open file (an upload, an object-store file) is demuxed from the segment's keyframe as
    a path is: the same clips from the same 248 decoded frames."""
    import io

    cfg = dict(clip_seconds=2.0, fps=8, size=32)
    path, n = _decode(long_mp4, (12.0, 20.0), **cfg)[:2]
    with MediaReader(io.BytesIO(long_mp4.read_bytes()), DecodeConfig(**cfg), (12.0, 20.0)) as r:
        clips = list(r.clips())
        assert (r.seeked_to, r.frames_decoded, n) == (11.0, 248, 248)
    assert [c.start_s for c in clips] == [12.0, 14.0, 16.0, 18.0]
    assert all(np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio) for a, b in zip(path, clips))
