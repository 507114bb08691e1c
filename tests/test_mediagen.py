"""The test-media generator writes files whose properties are exactly as documented."""

from __future__ import annotations

import math
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests import mediagen as mg

MAX_BYTES = 300_000


def _decode_video(path: Path) -> list[av.VideoFrame]:
    with av.open(str(path)) as c:
        return list(c.decode(video=0))


def _video_indices(frames, **kw) -> list[int]:
    return [mg.frame_index(f.to_ndarray(format="rgb24", **kw)) for f in frames]


def _audio_samples(path: Path, stream: int = 0) -> tuple[int, int]:
    """(decoded samples per channel, decoded sample rate)."""
    with av.open(str(path)) as c:
        frames = list(c.decode(audio=stream))
    return sum(f.samples for f in frames), frames[0].sample_rate


# ----------------------------------------------------------------------------- write_video


EXPECTED_CODECS = {
    ".mp4": ("h264", {"aac"}),
    ".mov": ("h264", {"aac"}),
    ".mkv": ("h264", {"aac"}),
    ".ts": ("h264", {"aac"}),
    ".webm": ("vp8", {"opus", "libopus"}),
    ".avi": ("mpeg4", {"mp3", "mp3float"}),
}


@pytest.mark.parametrize("ext", sorted(EXPECTED_CODECS))
def test_write_video_containers(tmp_path, ext):
    t0 = time.perf_counter()
    p = mg.write_video(tmp_path / f"a{ext}")
    assert time.perf_counter() - t0 < 3.0  # ~0.02 s (small) and ~0.25 s (1080p) measured; slack for load
    assert p == tmp_path / f"a{ext}" and 0 < p.stat().st_size < MAX_BYTES
    vcodec, acodecs = EXPECTED_CODECS[ext]
    with av.open(str(p)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"]
        v, a = c.streams.video[0], c.streams.audio[0]
        assert v.codec_context.name == vcodec and a.codec_context.name in acodecs
        assert (v.codec_context.width, v.codec_context.height) == (96, 64)
        assert a.codec_context.channels == 1
    frames = _decode_video(p)
    assert len(frames) == 50  # ceil(2.0 s * 25 fps)
    assert {(f.width, f.height) for f in frames} == {(96, 64)}
    assert _video_indices(frames) == list(range(50))
    pts = np.array([f.pts for f in frames])
    assert len(set(np.diff(pts))) == 1  # constant frame rate
    assert float(frames[1].time - frames[0].time) == pytest.approx(1 / 25, abs=1e-3)
    n, rate = _audio_samples(p)
    if ext == ".webm":  # Opus always decodes at 48 kHz
        assert rate == 48000 and n == 96000
    else:
        # + < one codec frame of padding; AVI also decodes the 1105-sample mp3
        # delay, mpegts the 1024-sample AAC priming (no edit list)
        slack = {".avi": 1105 + 576, ".ts": 1024 + 1024}.get(ext, 1024)
        assert rate == 16000 and 32000 <= n < 32000 + slack


def test_write_video_mp4_exact_header_values(tmp_path):
    p = mg.write_video(tmp_path / "a.mp4", seconds=1.0, width=64, height=48, fps=10, audio_channels=2)
    with av.open(str(p)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert c.duration == 1_000_000
        assert v.frames == 10 and v.average_rate == 10 and v.start_time == 0
        assert v.duration * v.time_base == 1
        assert a.time_base == Fraction(1, 16000) and a.duration == 16000 and a.start_time == 0
        assert a.codec_context.channels == 2
    with av.open(str(p)) as c:
        x = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)  # (2, S) fltp
    # channel 0 is 440 Hz, channel 1 is 880 Hz (0.1 amplitude)
    spec = np.abs(np.fft.rfft(x[:, 2048:2048 + 8000], axis=1))
    freqs = np.fft.rfftfreq(8000, 1 / 16000)
    assert freqs[spec.argmax(axis=1)].tolist() == [440.0, 880.0]
    assert 0.08 < np.abs(x[:, 2048:-2048]).max() < 0.13


def test_write_video_is_deterministic(tmp_path):
    for ext in (".mp4", ".mkv", ".avi"):
        a = mg.write_video(tmp_path / f"a{ext}").read_bytes()
        b = mg.write_video(tmp_path / f"b{ext}").read_bytes()
        assert a == b, ext


def test_frame_fn_and_audio_fn_are_used(tmp_path):
    def frame_fn(i, t):
        return np.full((32, 48, 3), 10 * i, np.uint8)

    def audio_fn(t):
        return np.zeros((1, t.size), np.float32)

    p = mg.write_video(tmp_path / "a.mkv", seconds=0.4, width=48, height=32, fps=10,
                       frame_fn=frame_fn, audio_fn=audio_fn)
    frames = _decode_video(p)
    means = [f.to_ndarray(format="gray").mean() for f in frames]
    assert len(frames) == 4
    assert np.allclose(means, [0, 10, 20, 30], atol=3)
    with av.open(str(p)) as c:
        assert max(np.abs(f.to_ndarray()).max() for f in c.decode(audio=0)) < 1e-3


def test_frame_index_survives_resize(tmp_path):
    p = mg.write_video(tmp_path / "a.mp4", seconds=0.6, width=160, height=96, audio=False)
    frames = _decode_video(p)
    assert _video_indices(frames, width=32, height=24, threads=1) == list(range(15))
    assert _video_indices(frames, width=224, height=224, threads=1) == list(range(15))


@pytest.mark.parametrize("ext", [".mp4", ".mov", ".mkv", ".webm"])
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_reported_per_frame(tmp_path, ext, rotation):
    p = mg.write_video(tmp_path / f"r{ext}", rotation=rotation, seconds=0.2, audio=False)
    frames = _decode_video(p)
    expected = {90: -90, 180: -180, 270: 90}[rotation]  # counter-clockwise, FFmpeg convention
    assert mg.frame_rotation_for(rotation) == expected
    assert {f.rotation for f in frames} == {expected}
    assert {(f.width, f.height) for f in frames} == {(96, 64)}  # pixels are not rotated
    matrices = [sd for sd in frames[0].side_data if sd.type.name == "DISPLAYMATRIX"]
    assert len(matrices) == 1 and len(bytes(matrices[0])) == 36  # 3x3 int32


def test_no_rotation_means_zero_and_unsupported_containers_refuse(tmp_path):
    assert {f.rotation for f in _decode_video(mg.write_video(tmp_path / "a.mp4", seconds=0.2))} == {0}
    with pytest.raises(ValueError):
        mg.write_video(tmp_path / "a.ts", rotation=90)
    with pytest.raises(ValueError):
        mg.write_video(tmp_path / "a.avi", vfr=True)
    with pytest.raises(ValueError):
        mg.write_video(tmp_path / "a.avi", audio_start=0.5)


@pytest.mark.parametrize("ext,tb", [(".mp4", Fraction(1, 90000)), (".mov", Fraction(1, 90000)),
                                    (".mkv", Fraction(1, 1000)), (".webm", Fraction(1, 1000))])
def test_vfr_pts_are_irregular_and_exact(tmp_path, ext, tb):
    p = mg.write_video(tmp_path / f"v{ext}", vfr=True)
    times = mg.frame_times(2.0, 25.0, vfr=True)
    frames = _decode_video(p)
    with av.open(str(p)) as c:
        assert c.streams.video[0].time_base == tb
    pts = [f.pts for f in frames]
    assert pts == [round(t / tb) for t in times]
    assert len(frames) == len(times) == 50
    assert len(set(np.diff(pts))) == 5  # durations 0.5, 1.5, 1.0, 0.25, 1.75 periods
    assert _video_indices(frames) == list(range(50))


def test_frame_times():
    assert np.allclose(mg.frame_times(0.2, 25), [0, 0.04, 0.08, 0.12, 0.16])
    assert len(mg.frame_times(1.0, Fraction(30000, 1001))) == 30
    vfr = mg.frame_times(2.0, 25, vfr=True)
    assert np.allclose(np.diff(vfr)[:5] * 25, [0.5, 1.5, 1.0, 0.25, 1.75])


@pytest.mark.parametrize("ext,tb,stored", [
    (".mp4", Fraction(1, 90000), Fraction(1, 90000)),
    (".mp4", Fraction(1, 12345), Fraction(1, 12345)),
    (".mp4", Fraction(1001, 30000), Fraction(1, 30000)),
    (".mp4", Fraction(1, 1000), Fraction(1, 16000)),
    (".mkv", Fraction(1, 90000), Fraction(1, 1000)),
    (".ts", Fraction(1, 30000), Fraction(1, 90000)),
])
def test_time_base_kept_or_changed_by_muxer(tmp_path, ext, tb, stored):
    p = mg.write_video(tmp_path / f"t{ext}", time_base=tb, seconds=0.4, audio=False)
    with av.open(str(p)) as c:
        assert c.streams.video[0].time_base == stored
    frames = _decode_video(p)
    assert len(frames) == 10
    if ext == ".mp4":
        assert [f.pts * stored for f in frames] == [round(Fraction(i, 25) / tb) * tb for i in range(10)]


def test_ntsc_rate_and_odd_time_base(tmp_path):
    p = mg.write_video(tmp_path / "n.mp4", fps=Fraction(30000, 1001), seconds=1.0, audio=False)
    with av.open(str(p)) as c:
        v = c.streams.video[0]
        assert v.average_rate == Fraction(30000, 1001) and v.time_base == Fraction(1, 30000)
        assert [f.pts for f in c.decode(v)][:4] == [0, 1001, 2002, 3003]


# ----------------------------------------------------------------------------- A/V sync


FLASH_CASES = [(ext, start) for ext in (".mp4", ".mov", ".mkv", ".webm", ".ts", ".avi")
               for start in (0.0, 0.5) if not (ext == ".avi" and start)]


@pytest.mark.parametrize("ext,audio_start", FLASH_CASES)
def test_flash_click_in_sync(tmp_path, ext, audio_start):
    p = mg.write_flash_click(tmp_path / f"fc{ext}", audio_start=audio_start)
    assert p.stat().st_size < MAX_BYTES
    frames = _decode_video(p)
    means = np.array([f.to_ndarray(format="gray").mean() for f in frames])
    assert len(frames) == 75 and (frames[0].width, frames[0].height) == (64, 48)
    assert (means > 200).sum() == 1 and (means < 30).sum() == 74
    assert means.argmax() == math.floor(1.2 * 25) == 30
    flash_t, click_t = mg.measure_flash_click(p)
    assert abs(click_t - flash_t) < 1 / 25  # within one frame
    assert abs(click_t - flash_t) < 0.002  # in fact, much closer
    with av.open(str(p)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        v0 = float(v.start_time * v.time_base)
        a0 = float(a.start_time * a.time_base)
    assert flash_t - v0 == pytest.approx(1.2, abs=1e-3)  # video starts the timeline
    expected_a0 = {".mp4": audio_start - 1024 / 16000 if audio_start else 0.0,
                   ".mov": audio_start - 1024 / 16000 if audio_start else 0.0,
                   ".mkv": audio_start, ".webm": audio_start + 0.013,  # opus pre-skip 312/48000 s
                   ".ts": audio_start - 1024 / 16000, ".avi": 0.0}[ext]
    assert a0 - v0 == pytest.approx(expected_a0, abs=1.5e-3)


def test_flash_click_other_times(tmp_path):
    p = mg.write_flash_click(tmp_path / "fc.mp4", flash_time=0.77, seconds=1.0, fps=10)
    flash_t, click_t = mg.measure_flash_click(p)
    assert flash_t == pytest.approx(0.7) and click_t == pytest.approx(0.77, abs=1e-3)


# ----------------------------------------------------------------------------- other shapes


@pytest.mark.parametrize("ext,codecs,samples", [
    (".m4a", {"aac"}, None), (".mp4", {"aac"}, None), (".wav", {"pcm_s16le"}, 32000),
    (".mp3", {"mp3", "mp3float"}, None), (".ogg", {"opus", "libopus"}, None),
])
def test_write_audio_only(tmp_path, ext, codecs, samples):
    p = mg.write_audio_only(tmp_path / f"a{ext}")
    assert p.stat().st_size < MAX_BYTES
    with av.open(str(p)) as c:
        assert [s.type for s in c.streams] == ["audio"]
        assert len(c.streams.video) == 0
        assert c.streams.audio[0].codec_context.name in codecs
    n, rate = _audio_samples(p)
    if samples is not None:
        assert n == samples and rate == 16000
    else:
        assert n * 16000 // rate >= 32000 - 1152


def test_write_two_streams(tmp_path):
    p = mg.write_two_streams(tmp_path / "two.mp4")
    assert p.stat().st_size < MAX_BYTES
    with av.open(str(p)) as c:
        assert [s.type for s in c.streams] == ["video", "audio", "video", "audio"]
        v0, v1 = c.streams.video
        a0, a1 = c.streams.audio
        assert (v0.codec_context.width, v0.codec_context.height) == (96, 64)
        assert (v1.codec_context.width, v1.codec_context.height) == (64, 48)
        assert v0.average_rate == 25 and v1.average_rate == Fraction(30000, 1001)
        assert (a0.codec_context.sample_rate, a1.codec_context.sample_rate) == (8000, 16000)
        assert (v0.frames, v1.frames) == (50, 60)
    with av.open(str(p)) as c:
        assert _video_indices(list(c.decode(video=1))) == list(range(60))
    assert _audio_samples(p, 1)[0] >= 32000


def test_write_large(tmp_path):
    t0 = time.perf_counter()
    p = mg.write_large(tmp_path / "big.mp4")
    assert time.perf_counter() - t0 < 3.0  # ~0.02 s (small) and ~0.25 s (1080p) measured; slack for load
    assert p.stat().st_size < MAX_BYTES
    frames = _decode_video(p)
    assert len(frames) == 10
    assert {(f.width, f.height) for f in frames} == {(1920, 1080)}
    assert _video_indices(frames, width=96, height=54, threads=1) == list(range(10))


# ----------------------------------------------------------------------------- corrupt corpus


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrupt")
    out = {}
    for name, opts in (("normal", None), ("faststart", {"movflags": "faststart"})):
        good = mg.write_video(d / f"good_{name}.mp4", container_options=opts)
        out[name] = (good, mg.make_corrupt_corpus(good, d / name))
    return out


def test_corrupt_corpus_bytes(corpora):
    good, files = corpora["normal"]
    data = good.read_bytes()
    n = len(data)
    assert set(files) == {"truncated_10", "truncated_50", "truncated_90", "flipped",
                          "header_flipped", "empty", "text"}
    assert all(p.suffix == ".mp4" for p in files.values())
    for pct in (10, 50, 90):
        assert files[f"truncated_{pct}"].read_bytes() == data[: n * pct // 100]
    assert files["empty"].stat().st_size == 0
    hdr = files["header_flipped"].read_bytes()
    assert len(hdr) == n and hdr[64:] == data[64:] and hdr[:64] != data[:64]
    flipped = np.frombuffer(files["flipped"].read_bytes(), np.uint8)
    diff = np.flatnonzero(flipped != np.frombuffer(data, np.uint8))
    assert diff.min() >= n // 10 and diff.max() < n - n // 10
    assert len(diff) == (n - 2 * (n // 10)) // 50  # 2 % of the middle 80 %
    assert np.all(flipped[diff] ^ np.frombuffer(data, np.uint8)[diff] == 0xFF)
    assert b"not a video" in files["text"].read_bytes()


def test_corrupt_corpus_characterisation(corpora):
    _, normal = corpora["normal"]
    _, fast = corpora["faststart"]
    # moov at the end: any truncation loses the index -> av.open fails
    for k in ("truncated_10", "truncated_50", "truncated_90", "header_flipped", "empty", "text"):
        assert mg.probe_decode(normal[k]).open_error == "InvalidDataError", k
    # moov at the start: a bad header, a cut inside the moov, or flips in the moov fail too
    for k in ("truncated_10", "flipped", "header_flipped", "empty", "text"):
        assert mg.probe_decode(fast[k]).open_error == "InvalidDataError", k
    # faststart: opens, declares the full length, decodes a prefix, then the
    # partial last packet raises InvalidDataError from avcodec_send_packet
    r = mg.probe_decode(fast["truncated_50"])
    assert r.open_error is None and r.error == "InvalidDataError" and r.error_stage == "decode"
    assert r.container_duration == 2.0 and r.stream_frames == [50, 33]
    assert 0 < r.video_frames < 50 and r.video_frames_tolerant > r.video_frames
    # 2 % flipped bytes: the file opens but the video cannot be decoded
    r = mg.probe_decode(normal["flipped"])
    assert r.open_error is None and r.video_frames_tolerant == 0 and r.errors_tolerant > 0


def test_faststart_truncated_at_packet_boundary_is_a_clean_prefix(corpora, tmp_path):
    good, _ = corpora["faststart"]
    data = good.read_bytes()
    with av.open(str(good)) as c:
        ends = sorted(p.pos + p.size for p in c.demux() if p.size)
    cut = ends[len(ends) // 2]
    p = tmp_path / "cut.mp4"
    p.write_bytes(data[:cut])
    r = mg.probe_decode(p)
    # no exception at all: only the declared length tells it was truncated
    assert r.open_error is None and r.error is None and r.errors_tolerant == 0
    assert r.container_duration == 2.0 and r.stream_frames[0] == 50
    assert 0 < r.video_frames < 50 and r.last_video_time < 1.9


def test_truncated_mkv_is_a_silent_clean_prefix(tmp_path):
    good = mg.write_video(tmp_path / "good.mkv")
    files = mg.make_corrupt_corpus(good, tmp_path / "mkv")
    assert files["truncated_50"].name == "truncated_50.mkv"
    r = mg.probe_decode(files["truncated_50"])
    # Matroska: no exception at all, the header still declares the full length
    assert r.open_error is None and r.error is None and r.errors_tolerant == 0
    assert r.container_duration == pytest.approx(2.064)
    assert 0 < r.video_frames < 50 and 0 < r.audio_samples < 32000
