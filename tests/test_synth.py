"""`avray synth`: files, ground truth, decodability, A/V consistency, determinism, captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import jobs.cli as cli
from tests.conftest import SHARED_MEDIA
from pipelines.synth import caption, draw_object, make_scene, render_frames, sounding_seconds
from pipelines.synth_audio import (COLOURS, SOUND_TABLE, read_wav, segments_frames, sound_type,
                                   synth_sound, write_wav)

SPEECH_DIR = SHARED_MEDIA / "speech"
SMALL = ["--seconds", "2", "--size", "64", "--fps", "10"]


def synth(out: Path, *args: str) -> int:
    return cli.main(["synth", "--out", str(out), *args])


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert synth(out, "--videos", "2", "--seed", "3", *SMALL) == 0
    return out


def load(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("scene_*.json"))]


def test_cli_writes_scenes_and_ground_truth(media):
    assert sorted(p.name for p in media.glob("*.mp4")) == ["scene_00000.mp4", "scene_00001.mp4"]
    scenes = load(media)
    assert [s["index"] for s in scenes] == [0, 1]
    wavs = {o["audio"] for s in scenes for o in s["objects"]}
    assert {p.name for p in media.glob("*.wav")} == wavs
    assert len(list(media.iterdir())) == 5 + len(wavs)  # 2 mp4 + 2 json + manifest.jsonl + wavs
    manifest = [json.loads(line) for line in (media / "manifest.jsonl").read_text().splitlines()]
    assert [m["path"] for m in manifest] == ["scene_00000.mp4", "scene_00001.mp4"]
    assert [m["caption"] for m in manifest] == [s["caption"] for s in scenes]
    assert [json.loads(m["ground_truth"]) for m in manifest] == scenes
    for s in scenes:
        assert set(s) == {"version", "seed", "index", "seconds", "fps", "size", "sample_rate", "num_frames",
                          "video", "caption", "objects"}
        assert (s["version"], s["seed"], s["seconds"], s["fps"], s["size"], s["sample_rate"]) == (1, 3, 2.0, 10, 64, 16000)
        assert s["num_frames"] == 20 and s["video"] == f"scene_{s['index']:05d}.mp4"
        assert 1 <= len(s["objects"]) <= 3
        for k, o in enumerate(s["objects"]):
            assert set(o) == {"id", "shape", "colour", "texture", "sound", "audio", "boxes", "sounding", "segments"}
            assert o["id"] == k and o["audio"] == f"scene_{s['index']:05d}_obj{k}.wav"
            assert o["sound"] == SOUND_TABLE[(o["shape"], o["colour"])]
            assert len(o["boxes"]) == len(o["sounding"]) == s["num_frames"] == 20
            boxes = np.asarray(o["boxes"])  # (T, 4)
            assert boxes.min() >= 0 and boxes.max() <= 64
            assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
            side = boxes[:, 2] - boxes[:, 0]
            assert np.all((side >= 0.18 * 64 - 0.02) & (side <= 0.30 * 1.15 * 64 + 0.02))
            for start, end in o["segments"]:
                assert 0 <= start < end <= 2.0
            assert o["sounding"] == segments_frames(o["segments"], 20, 10).tolist()
            audio, rate = read_wav(media / o["audio"])
            assert rate == 16000 and audio.shape == (2 * 16000,) and audio.dtype == np.float32
            assert (np.abs(audio) > 0).any() == bool(o["segments"])


def test_video_decodes_with_mixture_audio(media):
    av = pytest.importorskip("av")
    for s in load(media):
        with av.open(str(media / s["video"])) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert (v.codec_context.name, a.codec_context.name) == ("h264", "aac")
            assert a.sample_rate == 16000 and a.layout.name == "mono" and len(a.layout.channels) == 1
            assert abs(c.duration / 1e6 - 2.0) <= 0.1
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        with av.open(str(media / s["video"])) as c:
            audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        assert len(frames) == 20 and all(f.shape == (64, 64, 3) for f in frames)
        mix = np.sum([read_wav(media / o["audio"])[0] for o in s["objects"]], axis=0)
        n = min(audio.size, mix.size)
        assert n >= 2 * 16000 - 1024
        assert np.corrcoef(audio[:n], mix[:n])[0, 1] > 0.9


def test_deterministic_per_seed_and_index(media, tmp_path):
    assert synth(tmp_path / "again", "--videos", "2", "--seed", "3", *SMALL) == 0
    for p in sorted(media.iterdir()):
        assert (tmp_path / "again" / p.name).read_bytes() == p.read_bytes(), p.name  # mp4 too (1 encoder thread)
    assert synth(tmp_path / "other", "--videos", "2", "--seed", "4", *SMALL) == 0
    assert load(tmp_path / "other") != load(media)
    # scene i does not depend on how many scenes are written
    assert synth(tmp_path / "one", "--videos", "1", "--seed", "3", *SMALL) == 0
    assert (tmp_path / "one" / "scene_00000.json").read_bytes() == (media / "scene_00000.json").read_bytes()


def test_kinds_distinct_and_caption_names_dominant_first(media):
    for s in load(media):
        objs = s["objects"]
        assert len({(o["shape"], o["colour"], o["texture"]) for o in objs}) == len(objs)
        dominant = max(objs, key=lambda o: (round(sounding_seconds(o), 6), -o["id"]))
        first = s["caption"].split(" while ")[0]
        assert s["caption"].startswith("a ")
        words = first.split()
        assert dominant["colour"] in words and dominant["shape"] in words
        assert first.endswith({"tone": "hums", "noise": "hisses", "clicks": "clicks"}[sound_type(dominant["sound"])])
        assert s["caption"] == caption(objs, s["size"])


def test_caption_grammar():
    def obj(i, shape, colour, texture, sound, x, segments):
        return {"id": i, "shape": shape, "colour": colour, "texture": texture, "sound": sound,
                "boxes": [[x - 5, 10, x + 5, 20]] * 4, "sounding": [bool(segments)] * 4, "segments": segments}
    objs = [obj(0, "square", "blue", "striped", "tone_294", 90, []),
            obj(1, "circle", "red", "solid", "tone_220", 10, [[0.0, 0.5]]),
            obj(2, "triangle", "green", "solid", "speech:x.wav", 50, [[0.0, 1.5]])]
    assert caption(objs, 99) == ("a green triangle in the centre talks while a red circle on the left hums "
                                 "and a striped blue square on the right is silent")
    assert caption(objs[:1], 99) == "a striped blue square on the right is silent"


def test_scene_constraints():
    for i in range(20):
        scene = make_scene(7, i, seconds=3.0, size=96, fps=10, sample_rate=8000)
        on = np.stack([o.sounding for o in scene.objects])  # (K, T)
        assert on.mean(axis=1).max() >= 0.3 and np.any(on.sum(axis=0) == 1)
        assert len({(o.shape, o.colour) for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            assert o.track.shape == (24000,) and np.all(o.envelope[~o.sounding] == 0)
            boxes = o.boxes()
            assert boxes.min() >= 0 and boxes.max() <= 96
        assert np.abs(scene.mixture()).max() <= 0.9 + 1e-6


def test_drawn_area_follows_envelope():
    for shape in ("circle", "square", "triangle"):
        areas = []
        for half in (10.0, 11.5):  # envelope 0 and 1: half * (1 + 0.15 * env)
            canvas = np.zeros((48, 48, 3), np.float32)
            draw_object(canvas, shape, "red", "solid", 24.0, 24.0, half)
            areas.append(canvas[..., 0].sum() / COLOURS["red"][0])
        assert areas[1] > 1.2 * areas[0] > 0, shape
    # in a rendered scene: the object covers more pixels on its loudest frame than when silent
    for i in range(50):
        scene = make_scene(11, i, seconds=3.0, size=64, fps=10, max_objects=1)
        (o,) = scene.objects
        if o.sounding.any() and not o.sounding.all():
            break
    frames = np.stack(list(render_frames(scene))).astype(np.float32)  # (T, H, W, 3)
    covered = (np.abs(frames - scene.background).sum(axis=-1) > 60).sum(axis=(1, 2))  # (T,)
    loud, silent = int(np.argmax(o.envelope)), int(np.flatnonzero(~o.sounding)[0])
    assert o.envelope[loud] == 1.0
    assert covered[loud] > 1.15 * covered[silent]
    widths = o.boxes()[:, 2] - o.boxes()[:, 0]
    assert widths[loud] == pytest.approx(2 * o.half * 1.15) and widths[silent] == pytest.approx(2 * o.half)


def test_sounds_distinct_and_wav_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    assert len(set(SOUND_TABLE.values())) == len(SOUND_TABLE) == 12
    for sound in SOUND_TABLE.values():
        x = synth_sound(sound, 8000, 16000, rng)
        assert x.shape == (8000,) and x.dtype == np.float32 and np.isfinite(x).all() and np.abs(x).max() > 0.05
    x = rng.standard_normal(101).astype(np.float32)
    write_wav(tmp_path / "x.wav", x, 22050)
    y, rate = read_wav(tmp_path / "x.wav")
    assert rate == 22050 and np.array_equal(x, y)


@pytest.mark.parametrize("args, word", [(["--videos", "0"], "videos"), (["--seconds", "0"], "seconds"),
                                        (["--size", "16"], "size"), (["--size", "65"], "size"),
                                        (["--sample-rate", "12345"], "sample-rate"),
                                        (["--max-objects", "0"], "max-objects")])
def test_bad_arguments_exit_2(tmp_path, capsys, args, word):
    assert synth(tmp_path, *args) == 2
    assert word in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_missing_speech_dir_exit_2(tmp_path, capsys):
    assert synth(tmp_path / "o", "--videos", "1", "--speech-dir", str(tmp_path / "nope"), *SMALL) == 2
    assert "speech" in capsys.readouterr().err


def test_speech_dir_makes_talking_circles(tmp_path):
    if not SPEECH_DIR.is_dir():
        pytest.skip(f"no speech recordings at {SPEECH_DIR}")
    assert synth(tmp_path, "--videos", "3", "--seed", "0", "--speech-dir", str(SPEECH_DIR), *SMALL) == 0
    talking = [o for s in load(tmp_path) for o in s["objects"] if o["sound"].startswith("speech:")]
    assert talking and all(o["shape"] == "circle" for o in talking)
    names = {p.name for p in SPEECH_DIR.iterdir()}
    for o in talking:
        assert o["sound"].removeprefix("speech:") in names
        audio, _ = read_wav(tmp_path / o["audio"])
        assert audio.shape == (32000,) and (np.abs(audio) > 0).any() == bool(o["segments"])
