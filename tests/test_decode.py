"""Decode one file into clips: exact shapes and counts, which source frame each sample shows,
A/V sync, and the real-world edge cases (streams, rotation, VFR, time bases, limits)."""

import io
import tracemalloc
from dataclasses import replace
from fractions import Fraction

import av
import numpy as np
import pytest

from pipelines.decode import (DecodeConfig, MediaReader, MediaTooLarge, MediaTooLong, NoVideoStream, TooShort, TruncatedMedia,
                              UnsupportedSource, check_source, decode_file)
from tests import mediagen
from tests.conftest import FIXTURES, SHARED_MEDIA

# Letterbox at the source width keeps the whole picture (and its frame-index code) readable.
LETTERBOX = dict(resize="letterbox", size=96)


def _indices(frames: np.ndarray, y0: int = 16, h: int = 64) -> list[int]:
    return [mediagen.frame_index(f[y0:y0 + h]) for f in frames]


def test_exact_clip_shapes_counts_and_spans(tmp_path):
    p = mediagen.write_video(tmp_path / "v.mp4", seconds=5.0, fps=25)
    cfg = DecodeConfig(clip_seconds=2.0, fps=5, size=33, sample_rate=11025)
    info, clips = decode_file(str(p), cfg)
    assert [c.index for c in clips] == [0, 1]  # 5 s holds two whole 2 s clips
    assert [(c.start_s, c.end_s) for c in clips] == [(0.0, 2.0), (2.0, 4.0)]
    for c in clips:
        assert c.frames.shape == (10, 33, 33, 3) and c.frames.dtype == np.uint8
        assert c.audio.shape == (22050,) and c.audio.dtype == np.float32
    assert info.has_audio and info.src_width == 96 and info.src_height == 64 and info.rotation == 0
    # overlapping clips: hop 1 s -> starts 0, 1, 2, 3
    _, clips = decode_file(str(p), DecodeConfig(clip_seconds=2.0, hop_seconds=1.0, fps=5, size=33))
    assert [c.start_s for c in clips] == [0.0, 1.0, 2.0, 3.0]


def test_each_sample_shows_the_frame_on_screen_at_its_time(tmp_path):
    p = mediagen.write_video(tmp_path / "v.mkv", seconds=4.0, fps=25)
    _, clips = decode_file(str(p), DecodeConfig(clip_seconds=1.5, hop_seconds=1.25, fps=6, **LETTERBOX))
    assert [c.start_s for c in clips] == [0.0, 1.25, 2.5]  # the last ends exactly at 4.0 s
    for c in clips:
        expected = [int(np.floor((c.start_s + j / 6) * 25 + 1e-6)) for j in range(9)]
        assert _indices(c.frames) == expected


@pytest.mark.parametrize("audio_start", [0.0, 0.5])
def test_av_sync_flash_and_click_within_one_frame(tmp_path, audio_start):
    fps, sr = 25.0, 16000
    p = mediagen.write_flash_click(tmp_path / "fc.mp4", seconds=3.0, fps=fps, sample_rate=sr, flash_time=1.2,
                                   audio_start=audio_start)
    _, clips = decode_file(str(p), DecodeConfig(clip_seconds=1.0, fps=fps, size=16, sample_rate=sr))
    assert len(clips) == 3
    c = clips[1]  # [1, 2): flash and click 0.2 s in
    flash = int(np.argmax(c.frames.reshape(len(c.frames), -1).mean(axis=1)))
    click = int(np.argmax(np.abs(c.audio) > 0.3))
    assert abs(flash / fps - click / sr) <= 1 / fps
    assert abs(click / sr - 0.2) <= 1 / fps
    assert np.abs(clips[0].audio).max() < 0.05  # silence (and late-start padding) elsewhere


def test_no_audio_stream_gives_silence(tmp_path):
    p = mediagen.write_video(tmp_path / "mute.mp4", seconds=2.0, audio=False)
    info, clips = decode_file(str(p), DecodeConfig(clip_seconds=1.0, size=16))
    assert not info.has_audio and info.audio_stream == -1
    assert len(clips) == 2 and all(c.audio.shape == (16000,) and not c.audio.any() for c in clips)


def test_no_video_stream_is_refused(tmp_path):
    p = mediagen.write_audio_only(tmp_path / "a.m4a", seconds=2.0)
    with pytest.raises(NoVideoStream, match=r"no video stream \(1 audio stream\(s\)\)"):
        decode_file(str(p), DecodeConfig())


def test_multiple_streams_take_ffmpeg_best_and_record_it(tmp_path):
    p = mediagen.write_two_streams(tmp_path / "two.mp4", seconds=2.0)
    with av.open(str(p)) as c:
        best_v, best_a = c.streams.best("video").index, c.streams.best("audio").index
    info, clips = decode_file(str(p), DecodeConfig(clip_seconds=1.0, size=16))
    assert (info.video_stream, info.audio_stream) == (best_v, best_a)
    assert len(clips) == 2


def test_variable_frame_rate_samples_by_timestamp(tmp_path):
    p = mediagen.write_video(tmp_path / "vfr.mkv", seconds=3.0, fps=25, vfr=True)
    times = mediagen.frame_times(3.0, 25, vfr=True)
    _, clips = decode_file(str(p), DecodeConfig(clip_seconds=1.0, fps=10, **LETTERBOX))
    assert len(clips) == 3
    for c in clips:
        targets = c.start_s + np.arange(10) / 10
        expected = [int(np.searchsorted(times, t + 1e-6, side="right") - 1) for t in targets]
        assert _indices(c.frames) == expected


def _on_screen(path, targets) -> list[int]:
    """Reference: index of the frame on screen at each target time, from PyAV's own timestamps."""
    with av.open(str(path)) as c:
        origin = c.start_time / 1e6
        times = np.array([float(f.time) - origin for f in c.decode(video=0)])
    return [max(0, int(np.searchsorted(times, t + 1e-6, side="right") - 1)) for t in targets]


@pytest.mark.parametrize("name, time_base", [("tb.mp4", Fraction(1, 90000)), ("tb.ts", None), ("tb.mov", None)])
def test_odd_time_bases_and_containers(tmp_path, name, time_base):
    # MPEG-TS starts video 80 ms after the container start: samples follow the file's own clock
    p = mediagen.write_video(tmp_path / name, seconds=2.0, fps=25, time_base=time_base)
    _, clips = decode_file(str(p), DecodeConfig(clip_seconds=1.0, fps=5, **LETTERBOX))
    assert [c.start_s for c in clips] == [0.0, 1.0]
    assert _indices(clips[1].frames) == _on_screen(p, 1.0 + np.arange(5) / 5)
    if name != "tb.ts":
        assert _indices(clips[1].frames) == [25, 30, 35, 40, 45]


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    plain = mediagen.write_video(tmp_path / "plain.mp4", seconds=1.0)
    rotated = mediagen.write_video(tmp_path / "rot.mp4", seconds=1.0, rotation=rotation)
    cfg = DecodeConfig(clip_seconds=1.0, fps=4, **LETTERBOX)
    _, (a,) = decode_file(str(plain), cfg)
    info, (b,) = decode_file(str(rotated), cfg)
    assert (info.rotation, info.src_width, info.src_height) == (rotation, 64, 96)
    # letterboxed portrait: 64 px wide picture centred in 96, black bars left and right
    assert b.frames[:, :, :16].max() == 0 and b.frames[:, :, 80:].max() == 0
    upright = np.rot90(a.frames[:, 16:80], k=-rotation // 90, axes=(1, 2))  # (T, 96, 64, 3)
    diff = np.abs(b.frames[:, :, 16:80].astype(int) - upright.astype(int)).mean()
    assert diff < 6, diff


def test_limits_on_pixels_and_duration(tmp_path):
    big = mediagen.write_large(tmp_path / "big.mp4", width=1920, height=1080, seconds=1.0, fps=10)
    with pytest.raises(MediaTooLarge, match="1920x1080 exceeds --max-pixels 2073599"):
        decode_file(str(big), DecodeConfig(max_pixels=1920 * 1080 - 1))
    _, clips = decode_file(str(big), DecodeConfig(clip_seconds=1.0, size=64))
    assert len(clips) == 1 and clips[0].frames.shape == (8, 64, 64, 3)
    p = mediagen.write_video(tmp_path / "3s.mp4", seconds=3.0)
    with pytest.raises(MediaTooLong, match=r"3\.0 s exceeds --max-seconds 2"):
        decode_file(str(p), DecodeConfig(max_seconds=2.0))


def test_shorter_than_one_clip(tmp_path):
    p = mediagen.write_video(tmp_path / "short.mp4", seconds=1.0)
    with pytest.raises(TooShort, match=r"1\.00 s of video is shorter than one 2 s clip"):
        decode_file(str(p), DecodeConfig(clip_seconds=2.0))


def test_only_local_files_or_allowed_schemes(tmp_path):
    with pytest.raises(UnsupportedSource, match="URI scheme 'http' is not allowed"):
        check_source("http://example.com/v.mp4")
    with pytest.raises(UnsupportedSource, match="URI scheme 'concat' is not allowed"):
        check_source("concat://a.mp4|b.mp4")
    assert check_source("https://example.com/v.mp4", ("https",)) == "file,https,tls,tcp"
    with pytest.raises(UnsupportedSource, match="no such file"):
        check_source(str(tmp_path / "none.mp4"))
    with pytest.raises(UnsupportedSource, match="not a regular file"):
        check_source(str(tmp_path))
    p = mediagen.write_video(tmp_path / "v.mp4", seconds=1.0)
    assert check_source(f"file://{p}") == "file"
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        DecodeConfig(allowed_schemes=("gopher",))


@pytest.mark.parametrize("seek, fps, video_options", [("never", 25, None), ("always", 2, {"g": "25"})])
def test_memory_is_bounded_by_a_clip_not_the_file(tmp_path, seek, fps, video_options):
    """Peak traced memory of a 40 s decode within 1.2x a 4 s one plus a clip, on both video paths."""

    cfg = DecodeConfig(clip_seconds=1.0, fps=fps, size=96, seek=seek)

    def peak(seconds: float) -> int:
        p = mediagen.write_video(tmp_path / f"{seconds}.mp4", seconds=seconds, fps=25, video_options=video_options)
        tracemalloc.start()
        with MediaReader(str(p), cfg) as r:
            n = sum(1 for _ in r.clips())
            assert r.seek_path == (seek == "always")
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert n == int(seconds)
        return top

    short, long = peak(4.0), peak(40.0)
    clip_bytes = fps * 96 * 96 * 3 + 16000 * 4
    assert long < 1.2 * short + clip_bytes, (short, long)


@pytest.mark.parametrize("name, clips, has_audio", [
    ("grid_brbk7n.mpg", 1, True),          # MPEG-PS, 2.98 s, 44.1 kHz stereo
    ("kinetics_test.avi", 3, True),         # AVI with B-frames: decode-order timestamps
    ("no_duration.webm", 2, True),          # VP9 + Opus, the container declares no duration
])
def test_real_fixture_files(name, clips, has_audio):
    info, got = decode_file(str(FIXTURES / name), DecodeConfig())
    assert len(got) == clips and info.has_audio == has_audio
    assert all(c.frames.shape == (16, 224, 224, 3) and c.audio.shape == (32000,) for c in got)
    if name != "no_duration.webm":  # its soundtrack is digital silence
        assert max(np.abs(c.audio).max() for c in got) > 0.05  # real sound, not silence
    if name == "no_duration.webm":
        assert info.declared_seconds is None


@pytest.mark.parametrize("name, clips, streams", [
    ("nasa_13013.mp4", 6, (3, 4)),          # two video + two audio + subtitles: FFmpeg's best
    ("big_buck_bunny_0_30.webm", 15, (0, 1)),
])
def test_real_shared_files(name, clips, streams):
    path = SHARED_MEDIA / "video" / name
    if not path.exists():
        pytest.skip("../shared/media is absent")
    info, got = decode_file(str(path), DecodeConfig())
    assert len(got) == clips and (info.video_stream, info.audio_stream) == streams


def test_truncated_files_are_caught(tmp_path):
    # faststart mp4 (index first): opens, then a partial packet fails the decode
    good = mediagen.write_video(tmp_path / "fast.mp4", seconds=4.0, container_options={"movflags": "faststart"})
    cut = mediagen.make_corrupt_corpus(good, tmp_path / "fast")
    with pytest.raises(av.error.InvalidDataError):
        decode_file(str(cut["truncated_50"]), DecodeConfig(clip_seconds=1.0))
    # Matroska cut in half decodes a clean prefix without any error: the declared length tells
    good = mediagen.write_video(tmp_path / "long.mkv", seconds=6.0)
    cut = mediagen.make_corrupt_corpus(good, tmp_path / "mkv")
    with pytest.raises(TruncatedMedia, match=r"decoded \d\.\d\d s of the 6\.\d\d s the container declares"):
        decode_file(str(cut["truncated_50"]), DecodeConfig(clip_seconds=1.0))


def test_undeclared_length_is_capped_while_decoding():
    # no_duration.webm declares no length: the cap is found while decoding, not at probe
    with pytest.raises(MediaTooLong, match="media runs past --max-seconds 3") as e:
        decode_file(str(FIXTURES / "no_duration.webm"), DecodeConfig(clip_seconds=1.0, max_seconds=3.0))
    assert e.value.stage == "decode"


def test_object_uris_with_a_query_are_refused_before_any_request():
    """pyarrow.fs reads endpoint_override / scheme / keys from a URI's query: a manifest row must not
    choose where the node's credentials go."""
    from pipelines.decode import UnsupportedSource, open_object

    uri = "s3://b/k.mp4?endpoint_override=169.254.169.254:80&scheme=http"
    with pytest.raises(UnsupportedSource, match=r"^object URIs with a query or fragment are refused"):
        open_object(uri, ("s3",))
    with pytest.raises(UnsupportedSource, match=r"^URI scheme 's3' is not allowed"):
        open_object(uri, ())


def test_object_store_files_are_read_a_mebibyte_at_a_time(monkeypatch):
    """Each read of an object-store file is a ranged GET: FFmpeg reads it in 1 MiB pieces, not
    PyAV's default 32 KiB (a 100 MB video: ~100 requests, not ~3,200). Measured on this MPEG-PS
    file at 32 KiB: 13 reads to the end, then its probe seeks back and reads 650 kB again (1.05 MB
    read for 0.4 MB); at 1 MiB one read of the whole file. The clips are the local file's."""
    import pipelines.decode as decode

    path = FIXTURES / "grid_brbk7n.mpg"  # 399,360 bytes
    reads: list[int] = []

    class Counting(io.RawIOBase):  # stands for pyarrow's S3 file: counts FFmpeg's read calls
        def __init__(self):
            self.f = open(path, "rb")

        def read(self, n=-1):
            data = self.f.read(n)
            if data:  # FFmpeg asks again at the end of the file: those return b"" (no request)
                reads.append(len(data))
            return data

        def seek(self, offset, whence=0):
            return self.f.seek(offset, whence)

        def tell(self):
            return self.f.tell()

        def seekable(self):
            return True

        def readable(self):
            return True

        def close(self):
            self.f.close()
            super().close()

    monkeypatch.setattr(decode, "open_object", lambda uri, schemes: Counting())
    cfg = DecodeConfig(clip_seconds=1.0, fps=5.0, size=32, allowed_schemes=("s3",))
    info, clips = decode_file("s3://bucket/grid_brbk7n.mpg", cfg)
    _, local = decode_file(str(path), replace(cfg, allowed_schemes=()))
    assert reads == [399_360]  # every byte once, in one read
    assert len(clips) == len(local) == 3
    assert all(np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio) for a, b in zip(clips, local))
