"""The decoder's seek path (DecodeConfig.seek / keyframes_only): exactly the full decode's clips
(frames bit for bit, audio, spans, errors) from far fewer decoded frames; keyframes only."""

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from pipelines.decode import (DecodeConfig, MediaError, MediaReader, TooShort, TruncatedMedia, _AUTO_SEEK_RATIO,
                              decode_file)
from tests import mediagen

# Letterbox at the source width keeps the whole picture (and its frame-index code) readable.
LETTERBOX = dict(resize="letterbox", size=96)
# H.264 with B-frames (3, pyramid) and one keyframe every 150 frames (6 s at 25 fps)
LONG_GOP = {"g": "150", "bf": "3"}


def _decode(path, **kw):
    """(clips, frames decoded, seek path taken, media seconds, info) of one decode."""
    with MediaReader(str(path), DecodeConfig(**kw)) as r:
        clips = list(r.clips())
        return clips, r.frames_decoded, r.seek_path, r.media_seconds, r.info


def _assert_same(full, seek) -> None:
    (a, _, a_seek, a_end, a_info), (b, _, b_seek, b_end, b_info) = full, seek
    assert not a_seek and b_seek
    assert [(c.index, c.start_s, c.end_s) for c in a] == [(c.index, c.start_s, c.end_s) for c in b]
    for x, y in zip(a, b):
        assert x.frames.dtype == y.frames.dtype == np.uint8 and np.array_equal(x.frames, y.frames), x.index
        assert np.array_equal(x.audio, y.audio), x.index
    assert (a_end, a_info) == (b_end, b_info)


def _indices(frames: np.ndarray) -> list[int]:
    return [mediagen.frame_index(f[16:80]) for f in frames]


def _keyframe_times(path) -> np.ndarray:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return np.array(sorted(float(p.pts * v.time_base) for p in c.demux(v) if p.size and p.is_keyframe))


@pytest.mark.parametrize("name, kw, fps, clip, hop, decoded", [
    # (a) variable frame rate: durations cycle 0.5 / 1.5 / 1 / 0.25 / 1.75 periods
    ("vfr.mkv", dict(seconds=6.0, vfr=True), 1, 2.0, None, 72),
    # (b) odd time bases: 1/90000, and NTSC 30000/1001 fps in 1001/30000 (mov keeps 1/30000)
    ("tb.mp4", dict(seconds=6.0, time_base=Fraction(1, 90000)), 1, 2.0, None, 72),
    ("ntsc.mov", dict(seconds=6.0, fps=Fraction(30000, 1001), time_base=Fraction(1001, 30000)), 1, 2.0, None, 84),
    # (c) audio starting 0.7 s after the video, overlapping clips
    ("late.mp4", dict(seconds=6.0, audio_start=0.7), 2, 1.5, 0.75, 103),
    ("late.mkv", dict(seconds=6.0, audio_start=0.7), 1, 2.0, None, 72),
    # (d) B-frames and a 6 s GOP at 1 and 0.5 fps
    ("gop.mp4", dict(seconds=12.0, video_options=LONG_GOP), 1, 2.0, None, 145),
    ("gop.mp4", dict(seconds=12.0, video_options=LONG_GOP), 0.5, 4.0, 2.0, 111),
])
def test_seek_path_gives_the_full_decodes_clips_from_fewer_frames(tmp_path, name, kw, fps, clip, hop, decoded):
    p = mediagen.write_video(tmp_path / name, fps=kw.pop("fps", 25), **kw)
    cfg = dict(fps=fps, clip_seconds=clip, hop_seconds=hop, sample_rate=8000, **LETTERBOX)
    full, seek = _decode(p, seek="never", **cfg), _decode(p, seek="always", **cfg)
    _assert_same(full, seek)
    n_frames = len(mediagen.frame_times(kw["seconds"], 30000 / 1001 if name == "ntsc.mov" else 25, kw.get("vfr", False)))
    assert full[1] == n_frames
    # measured (FFmpeg 8.1, libx264 as mediagen writes it): the pictures the instants need are the
    # reference chain from their keyframe (non-reference B-frames are skipped) plus the decoder's delay
    assert seek[1] == decoded and decoded < 0.7 * n_frames
    # the samples really are the frames on screen at start + j / fps
    times = mediagen.frame_times(kw["seconds"], 30000 / 1001 if name == "ntsc.mov" else 25, kw.get("vfr", False))
    for c in seek[0]:
        targets = c.start_s + np.arange(len(c.frames)) / fps
        assert _indices(c.frames) == [int(np.searchsorted(times, t + 1e-6, side="right") - 1) for t in targets]


def test_a_slow_source_keeps_its_audio_on_the_seek_path(tmp_path):
    """A 1 fps source (slides, a still with a podcast) sampled at 0.25 fps: the seek path's
    16-packet window spans 16 s, more than the audio lag allowed past the placed video; the
    audio must still be the full decode's, clip for clip."""
    p = mediagen.write_video(tmp_path / "slides.mp4", seconds=40.0, fps=1)
    cfg = dict(fps=0.25, clip_seconds=4.0, sample_rate=8000, **LETTERBOX)
    full, seek = _decode(p, seek="never", **cfg), _decode(p, **cfg)  # auto: 1 fps >= 4 x 0.25
    _assert_same(full, seek)
    assert len(seek[0]) == 10 and all(np.abs(c.audio).max() > 0.05 for c in seek[0])


def test_seek_lands_on_keyframes_and_decodes_only_what_the_instants_need(tmp_path):
    # a keyframe every second (25 frames), instants every 2 s on keyframes: a few pictures each
    p = mediagen.write_video(tmp_path / "g25.mp4", seconds=8.0, video_options={"g": "25", "bf": "3"})
    assert list(_keyframe_times(p)) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    cfg = dict(fps=0.5, clip_seconds=4.0, hop_seconds=2.0, sample_rate=8000, **LETTERBOX)
    full, seek = _decode(p, seek="never", **cfg), _decode(p, seek="always", **cfg)
    _assert_same(full, seek)
    assert [_indices(c.frames) for c in seek[0]] == [[0, 50], [50, 100], [100, 150]]
    assert full[1] == 200 and seek[1] == 4  # 4 instants, each its own keyframe: 4 pictures decoded


def test_frame_threads_give_the_same_frames(tmp_path):
    p = mediagen.write_video(tmp_path / "gop.mp4", seconds=12.0, video_options=LONG_GOP)
    cfg = dict(fps=1, clip_seconds=2.0, sample_rate=8000, **LETTERBOX)
    _assert_same(_decode(p, seek="never", **cfg), _decode(p, seek="always", threads=2, **cfg))


def test_keyframes_only_shows_the_latest_keyframe_at_or_before_each_instant(tmp_path):
    p = mediagen.write_video(tmp_path / "g25.mp4", seconds=6.0, video_options={"g": "25", "bf": "3"})
    keys = _keyframe_times(p)
    assert list(keys) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    cfg = dict(fps=4, clip_seconds=2.0, sample_rate=8000, **LETTERBOX)
    full, kf = _decode(p, seek="never", **cfg), _decode(p, keyframes_only=True, **cfg)
    assert kf[2] and kf[1] == len(keys)  # each keyframe decoded once, nothing else
    assert [(c.index, c.start_s, c.end_s) for c in kf[0]] == [(c.index, c.start_s, c.end_s) for c in full[0]]
    assert kf[3] == full[3] == 6.0  # the video still ends where its last frame ends
    for a, b in zip(full[0], kf[0]):
        targets = a.start_s + np.arange(8) / 4
        latest = [keys[np.searchsorted(keys, t + 1e-9, side="right") - 1] for t in targets]
        assert _indices(b.frames) == [int(round(k * 25)) for k in latest]
        for j, t in enumerate(targets):
            if t in keys:  # on a keyframe instant: the very pixels of the full decode
                assert np.array_equal(b.frames[j], a.frames[j])
        assert np.array_equal(a.audio, b.audio)


def test_errors_are_the_full_paths(tmp_path):
    short = mediagen.write_video(tmp_path / "short.mp4", seconds=1.0)
    for seek in ("never", "always"):
        with pytest.raises(TooShort, match=r"^1\.00 s of video is shorter than one 2 s clip$"):
            decode_file(str(short), DecodeConfig(clip_seconds=2.0, seek=seek))
    good = mediagen.write_video(tmp_path / "long.mkv", seconds=6.0)
    cut = mediagen.make_corrupt_corpus(good, tmp_path / "mkv")["truncated_50"]
    messages = []
    for seek in ("never", "always"):
        with pytest.raises(TruncatedMedia, match=r"decoded \d\.\d\d s of the 6\.\d\d s the container declares") as e:
            decode_file(str(cut), DecodeConfig(clip_seconds=1.0, seek=seek, fps=1))
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    good = mediagen.write_video(tmp_path / "fast.mp4", seconds=4.0, container_options={"movflags": "faststart"})
    cut = mediagen.make_corrupt_corpus(good, tmp_path / "fast")["truncated_50"]
    for seek in ("never", "always"):
        with pytest.raises(av.error.InvalidDataError):
            decode_file(str(cut), DecodeConfig(clip_seconds=1.0, seek=seek, fps=1))


def test_auto_seeks_when_the_source_rate_is_well_above_the_sampling_rate(tmp_path):
    assert _AUTO_SEEK_RATIO == 4.0
    p = mediagen.write_video(tmp_path / "v.mp4", seconds=2.0)  # 25 fps
    assert _decode(p, fps=25 / 4, clip_seconds=0.8, size=16)[2]
    assert not _decode(p, fps=8, clip_seconds=1.0, size=16)[2]
    assert not _decode(p, fps=1, clip_seconds=1.0, size=16, seek="never")[2]
    # containers without a timestamp on every packet, and file objects, decode fully even with "always"
    ts = mediagen.write_video(tmp_path / "v.ts", seconds=2.0)
    assert not _decode(ts, fps=1, clip_seconds=1.0, size=16, seek="always")[2]
    with MediaReader(io.BytesIO(p.read_bytes()), DecodeConfig(fps=1, clip_seconds=1.0, size=16, seek="always")) as r:
        assert len(list(r.clips())) == 2 and not r.seek_path


def test_config_errors():
    with pytest.raises(ValueError, match=r"^seek must be one of \('auto', 'always', 'never'\), got 'sometimes'$"):
        DecodeConfig(seek="sometimes")
    with pytest.raises(ValueError, match=r"^keyframes_only must be True or False, got 1$"):
        DecodeConfig(keyframes_only=1)
    with pytest.raises(ValueError, match=r"^keyframes_only decodes keyframes on the seek path: it cannot be "
                                         r"combined with seek='never'$"):
        DecodeConfig(keyframes_only=True, seek="never")
    assert issubclass(TooShort, MediaError)


def test_keyframes_only_on_a_file_the_seek_path_cannot_take_decodes_every_frame_and_says_so(caplog):
    from tests.conftest import FIXTURES

    path = str(FIXTURES / "grid_brbk7n.mpg")  # MPEG-PS: not a seek-path format
    cfg = dict(clip_seconds=1.0, fps=5.0, size=32)
    with caplog.at_level("WARNING", logger="pipelines.decode"):
        kf = _decode(path, keyframes_only=True, **cfg)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: keyframes-only decoding needs the seek path, and its format mpeg is not one of mov, mp4, "
        "matroska, webm: decoding every frame instead"]
    (kf_clips, kf_decoded, kf_seek, *_), (clips, decoded, _, *_) = kf, _decode(path, seek="never", **cfg)
    assert (kf_seek, kf_decoded, len(kf_clips)) == (False, decoded, len(clips)) and len(clips) == 3
    assert all(np.array_equal(a.frames, b.frames) for a, b in zip(kf_clips, clips))


def test_cli_plumbs_the_options_as_per_run_decode_settings():
    from jobs import cli
    from jobs.preprocess import PreprocessConfig, _ingest_config

    clip, icfg = _ingest_config(PreprocessConfig(inputs=("x.mp4",), out="o", fps=1, seek="always",
                                                 keyframes_only=True))
    assert (icfg.decode.seek, icfg.decode.keyframes_only, icfg.decode.fps) == ("always", True, 1)
    assert "seek" not in clip.to_dict() and "keyframes_only" not in clip.to_dict()
    parser = cli.build_parser()
    ns = parser.parse_args(["preprocess", "x.mp4", "--out", "o", "--seek", "never", "--keyframes-only"])
    assert (ns.seek, ns.keyframes_only) == ("never", True)
    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["preprocess"].format_help().split())
    assert "APPROXIMATE in time" in text and "--seek {auto,always,never}" in text


def test_ingest_falls_back_to_the_full_decode_when_the_seek_path_cannot_be_exact(tmp_path, monkeypatch):
    """A file the seek path refuses (here: every video packet 'lacks' a timestamp) is decoded in
    full under seek="auto", with the full path's clips; with seek="always" it is an error row."""
    import pyarrow.parquet as pq

    import pipelines.decode as decode
    from pipelines.clipstore import ClipStore
    from pipelines.ingest import IngestConfig, ingest_file
    from pipelines.schema import CLIP_SCHEMA
    from pipelines.spectrogram import SpectrogramConfig

    p = mediagen.write_video(tmp_path / "v.mp4", seconds=4.0, fps=25)

    refused = []

    def refuse(self, packet, timeline):
        refused.append(packet.pts)
        raise decode.SeekUnsupported("a video packet without a timestamp (packet 0): decode it with --seek never")

    monkeypatch.setattr(decode._SeekVideo, "packet", refuse)
    src = {"video_id": "v", "path": str(p)}
    spec = SpectrogramConfig(sample_rate=8000)
    rows = {}
    for seek in ("auto", "never", "always"):
        store = ClipStore(str(tmp_path / seek))
        store.create()
        cfg = IngestConfig(decode=DecodeConfig(fps=2, sample_rate=8000, seek=seek, **LETTERBOX), spectrogram=spec)
        rows[seek] = ingest_file(src, store, cfg, CLIP_SCHEMA)
        refused.append(seek)
    assert refused == [0, "auto", "never", 0, "always"]  # auto tried the seek path once, never did not
    assert rows["auto"]["status"] == rows["never"]["status"] == "ok" and rows["auto"]["clips"] == rows["never"]["clips"] == 2
    a, n = (pq.read_table(tmp_path / s / "clips") for s in ("auto", "never"))
    assert a.column("frames").to_pylist() == n.column("frames").to_pylist()
    assert a.column("audio").to_pylist() == n.column("audio").to_pylist()
    assert (rows["always"]["status"], rows["always"]["clips"], rows["always"]["error_type"]) == ("failed", 0, "SeekUnsupported")
    assert rows["always"]["message"] == "a video packet without a timestamp (packet 0): decode it with --seek never"
    assert not (tmp_path / "always" / "clips").exists() or not list((tmp_path / "always" / "clips").iterdir())
