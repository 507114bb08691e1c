"""The task table: every registered task through build -> step (fp32 and bf16 autocast) -> save ->
load -> evaluate -> figure -> serve (upload -> prepare -> infer -> answer), on clips ingested from
synthetic scenes; serving prepares exactly what training feeds; uploads are decoded with the
checkpoint's own clip settings (letterbox included) and localization peaks map back to source
pixels through that resize."""
import io
import json
import re
import wave
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.tasks import TASKS, builders, get, load_checkpoint, served_config
from jobs.tasks.base import Task
from models.checkpoint import save_checkpoint
from pipelines.clipsettings import ClipSettings
from pipelines.clipstore import ClipStore
from pipelines.ingest import IngestConfig, ingest_file
from pipelines.schema import clip_schema, numpy_batch
from pipelines.sources import carried_schema, list_sources
from tests.mediagen import write_video

# odd small sizes: 1 s clips at 5 fps (T = 5), 56 px frames
SETTINGS = ClipSettings(clip_seconds=1.0, fps=5.0, size=56)
LIMITS = {"max_pixels": 1920 * 1080, "max_seconds": 60.0}


def ingest(inputs: list[str], out: Path, settings: ClipSettings) -> dict:
    """Clip rows of `inputs` as avray preprocess writes them (pipelines.ingest.ingest_file, no Ray),
    read back as training reads them: a numpy batch, ordered by video then clip."""
    sources = list_sources(inputs)
    store = ClipStore(str(out))
    store.create()
    icfg = IngestConfig(decode=settings.decode_config(), spectrogram=settings.spectrogram_config())
    schema = clip_schema(carried_schema(sources))
    for src in sources.to_pylist():
        assert ingest_file(src, store, icfg, schema)["status"] == "ok"
    table = pq.read_table(out / "clips").sort_by([("video_id", "ascending"), ("clip_index", "ascending")])
    return numpy_batch(table)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict:
    from pipelines.synth import make_scene, write_scene

    d = tmp_path_factory.mktemp("task-scenes")
    rows = []
    for i in range(2):
        gt = write_scene(make_scene(3, i, seconds=2.0, size=64), d)
        rows.append({"path": gt["video"], "ground_truth": json.dumps(gt)})
    (d / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"rows": ingest([str(d / "manifest.jsonl")], d / "out", SETTINGS), "video": d / rows[0]["path"]}


def test_the_table_lists_every_task_once_and_each_module_is_complete():
    assert {"localization", "separation", "captioning"} <= set(TASKS)
    assert all(module == f"jobs.tasks.{name}" for name, module in TASKS.items())
    tasks = [get(n) for n in TASKS]
    assert [t.name for t in tasks] == list(TASKS) and all(isinstance(t, Task) for t in tasks)
    assert len({t.route.path for t in tasks}) == len({t.deployment for t in tasks}) == len(tasks)
    assert builders() == {t.name: (t.config, t.model) for t in tasks}
    assert all("tiny" in t.presets and "paper" in t.presets for t in tasks)
    with pytest.raises(KeyError, match=re.escape(f"unknown task 'nope'; known tasks: {sorted(TASKS)}")):
        get("nope")


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_trains_saves_loads_evaluates_and_serves(name, scenes, tmp_path):
    task, rows = get(name), scenes["rows"]
    assert len(rows["video_id"]) == 4  # 2 scenes x 2 clips
    cfg = task.fit(task.presets["tiny"], lambda cols: {c: rows[c] for c in cols if c in rows})
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = task.model(cfg)
    batch = task.collate(rows, cfg)
    assert all(len(v) == len(next(iter(batch.values()))) for v in batch.values())
    for autocast in (False, True):  # fp32 as on a CPU, bf16 autocast as avray train runs on a GPU
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = task.step(model, batch, cfg, gen)["loss"]
        loss.backward()
        assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)

    model.eval()
    path = save_checkpoint(tmp_path / "model.pt", name, model, cfg, extra={"epoch": 0, "clip_settings": SETTINGS.to_dict()})
    loaded, ckpt = load_checkpoint(path, task=name)
    assert type(loaded) is task.model and loaded.cfg == cfg and ckpt["model"] == name
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    metrics = task.evaluate(loaded, [batch], cfg)
    assert metrics and all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    line = task.headline(metrics)  # one line, from these metrics
    assert line and "\n" not in line and len(line) <= 140, line
    assert task.headline({}) in ("no clip with a sounding object to score", "no mixture of audible clips to score",
                                 "too few clips to score (0)", "too few clips to rank (0)")  # evaluate had nothing to score
    task.figure(loaded, batch, cfg, str(tmp_path / "figure.png"), n=2)
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    t, served_cfg, trained = served_config(path, task=name)
    assert t is task and served_cfg == cfg and trained == SETTINGS
    options = {o.name: o.default for o in task.route.options}
    item, meta = task.from_upload(scenes["video"].read_bytes(), served_cfg, trained, options=options, **LIMITS)
    assert meta["starts"] == [0.0, 1.0] and meta["fps"] == 5.0 and meta["frames_per_clip"] == 5
    assert meta["source"] == {"width": 64, "height": 64}
    results = task.infer(loaded, [item, item], torch.device("cpu"))  # two requests in one batch
    assert len(results) == 2
    answer = task.answer(results[0], meta, options)
    body = json.loads(json.dumps(answer.body)) if isinstance(answer.body, dict) else answer.body
    assert body and answer.media_type in ("application/json", "application/zip")


def test_an_incomplete_task_cannot_be_instantiated():
    class HalfTask(Task):
        def prepare(self, batch, cfg):
            return {}

    with pytest.raises(TypeError, match="abstract"):
        HalfTask()


# -- one preparation path ---------------------------------------------------------------------


def test_served_inputs_are_the_training_inputs_bit_for_bit(scenes):
    """For the same video, what each task's request hands its model (item) is what `prepare` gives
    training from the Parquet clips of that video, array for array."""
    rows = scenes["rows"]
    mine = rows["source_path"] == str(scenes["video"].resolve())
    first = {k: v[mine] for k, v in rows.items()}  # the two clips of the scene uploaded below
    data = scenes["video"].read_bytes()
    assert len(set(first["video_id"])) == 1 and list(first["clip_index"]) == [0, 1]
    T = 5

    loc = get("localization")
    cfg = loc.presets["tiny"]
    item, _ = loc.from_upload(data, cfg, SETTINGS, options={"overlay": None}, **LIMITS)
    train = loc.prepare(first, cfg)
    assert item["frame"].shape == (2 * T, 3, 56, 56) and item["frame"].dtype == np.uint8
    np.testing.assert_array_equal(item["frame"][T // 2::T], train["frame"])  # the middle frame of each clip
    np.testing.assert_array_equal(item["logmel"][T // 2::T], train["logmel"])  # the sound around it
    assert train["logmel"].shape == (2, 64, 50)  # 0.5 s of the 1 s clip's 101 log-mel frames

    sep = get("separation")
    cfg = sep.presets["tiny"]
    whole = json.dumps([[0, 0, 64, 64], [0, 0, 64, 64]])  # both speakers' boxes: the whole picture
    item, meta = sep.from_upload(data, cfg, SETTINGS, options={"boxes": whole, "format": "zip"}, **LIMITS)
    train = sep.prepare(first, cfg)
    assert item["faces"].shape == (2, 2, T, 3, 48, 48) and meta["boxes"] == [[0.0, 0.0, 64.0, 64.0]] * 2
    np.testing.assert_array_equal(item["audio"], train["audio"])
    np.testing.assert_array_equal(item["faces"][:, 0], train["faces"])
    np.testing.assert_array_equal(item["faces"][:, 1], train["faces"])

    cap = get("captioning")
    cfg = cap.presets["tiny"]
    item, meta = cap.from_upload(data, cfg, SETTINGS, options={"beam_size": 1, "sound": True}, **LIMITS)
    train = cap.prepare(first, cfg, targets=False)
    assert meta["audio_used"] is True and set(item) == {"frames", "logmel", "beam_size"}
    np.testing.assert_array_equal(item["frames"], train["frames"])
    np.testing.assert_array_equal(item["logmel"], train["logmel"])
    muted, meta = cap.from_upload(data, cfg, SETTINGS, options={"beam_size": 1, "sound": False}, **LIMITS)
    assert meta["audio_used"] is False and muted["logmel"] is None
    np.testing.assert_array_equal(muted["frames"], train["frames"])


def test_localization_serves_letterboxed_clips_letterboxed_and_maps_peaks_to_source(tmp_path):
    """A checkpoint trained on --resize letterbox clips of a 96 x 64 video: uploads are decoded
    letterboxed (the frames equal the stored clips', black bars included), and a peak at frame
    pixel (u, v) maps to source pixel ((u + 0.5) / 0.5, (v + 0.5 - 8) / 0.5): scale 48 / 96, the
    picture 48 x 32 padded by 8 rows above."""
    video = write_video(tmp_path / "wide.mp4", seconds=1.0, width=96, height=64, fps=10.0)
    boxed = ClipSettings(clip_seconds=1.0, fps=5.0, size=48, resize="letterbox")
    stored = ingest([str(video)], tmp_path / "out", boxed)
    loc = get("localization")
    cfg = loc.presets["tiny"]
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "loc.pt", "localization", loc.model(cfg), cfg,
                           extra={"epoch": 0, "clip_settings": boxed.to_dict()})
    _, served_cfg, trained = served_config(path)
    assert trained.resize == "letterbox" and loc.clip_settings(trained) == trained
    item, meta = loc.from_upload(video.read_bytes(), served_cfg, trained, options={"overlay": None}, **LIMITS)
    frames = np.moveaxis(item["frame"], 1, -1)  # (T, H, W, 3)
    np.testing.assert_array_equal(frames, np.frombuffer(stored["frames"][0], np.uint8).reshape(5, 48, 48, 3))
    assert frames[:, :8].max() == 0 and frames[:, 40:].max() == 0 and frames[:, 8:40].max() > 0  # bars: rows 0-7, 40-47

    result = {"grid": np.zeros((5, 6, 6), np.float32), "peak": np.array([[10, 20], [0, 0], [47, 47], [47, 8], [20, 39]])}
    body = loc.answer(result, meta, {"overlay": None}).body
    assert body["view"] == {"x0": 0.0, "y0": 0.0, "x1": 96.0, "y1": 64.0}  # letterbox: the model sees all of it
    assert [f["peak"] for f in body["frames"]] == [
        {"x": 21.0, "y": 25.0}, {"x": 1.0, "y": 0.0}, {"x": 95.0, "y": 64.0}, {"x": 95.0, "y": 1.0}, {"x": 41.0, "y": 63.0}]

    cropped = replace(boxed, resize="crop")  # the same video centre-cropped: 72 x 48, 12 columns cut each side
    _, meta = loc.from_upload(video.read_bytes(), served_cfg, cropped, options={"overlay": None}, **LIMITS)
    body = loc.answer(result, meta, {"overlay": None}).body
    assert body["view"] == {"x0": 16.0, "y0": 0.0, "x1": 80.0, "y1": 64.0}
    assert body["frames"][0]["peak"] == {"x": round((10.5 + 12) * 96 / 72, 1), "y": round(20.5 * 64 / 48, 1)}


def test_separation_is_served_letterboxed_whatever_its_clips():
    sep = get("separation")
    crop = ClipSettings(size=96, resize="crop")
    assert sep.clip_settings(crop) == replace(crop, resize="letterbox")
    assert get("captioning").clip_settings(crop) == crop


def test_answers_are_what_the_routes_promise(scenes):
    sep = get("separation")
    meta = {"sample_rate": 16000, "boxes": [[0.0, 0.0, 32.0, 64.0], [32.0, 0.0, 64.0, 64.0]]}
    tracks = np.stack([np.full(160, 0.5, np.float32), np.full(160, -2.0, np.float32)])  # (K, C·S)
    z = sep.answer(tracks, meta, {"format": "zip"})
    assert z.media_type == "application/zip"
    with zipfile.ZipFile(io.BytesIO(z.body)) as f:
        assert f.namelist() == ["speaker_0.wav", "speaker_1.wav", "boxes.json"]
        with wave.open(io.BytesIO(f.read("speaker_1.wav"))) as w:
            assert (w.getframerate(), w.getnframes()) == (16000, 160)
            assert set(np.frombuffer(w.readframes(160), "<i2").tolist()) == {-32767}  # clipped at -1
    j = sep.answer(tracks, meta, {"format": "json"}).body
    assert j["seconds"] == 0.01 and [s["box"] for s in j["speakers"]] == meta["boxes"]

    cap = get("captioning")
    meta = {"frames_per_clip": 5, "fps": 5.0, "starts": [0.0, 1.0], "audio_used": False}
    assert cap.answer(["a red circle hums", "a blue square clicks"], meta, {"beam_size": 2}).body == {
        "caption": "a red circle hums", "audio_used": False, "beam_size": 2,
        "clips": [{"start_s": 0.0, "end_s": 1.0, "caption": "a red circle hums"},
                  {"start_s": 1.0, "end_s": 2.0, "caption": "a blue square clicks"}]}


def test_checkpoints_without_clip_settings_are_not_served_and_clips_without_them_not_trained(tmp_path):
    from jobs.train import TrainConfig, run

    loc = get("localization")
    cfg = loc.presets["tiny"]
    path = save_checkpoint(tmp_path / "bare.pt", "localization", loc.model(cfg), cfg, extra={"epoch": 0})
    with pytest.raises(ValueError, match="carries no clip settings"):
        served_config(path)
    with pytest.raises(ValueError, match="holds a localization model, not captioning"):
        served_config(path, task="captioning")
    (tmp_path / "data" / "clips").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="_config.json: avray train needs the clip settings"):
        run(TrainConfig(task="localization", data=str(tmp_path / "data" / "clips"), out=str(tmp_path / "run")))


def test_loading_a_checkpoint_imports_only_its_own_task(tmp_path):
    """builders() imports a task's module when its entry is read: an `avray embed` actor loading a
    retrieval checkpoint does not import separation's torchmetrics and scipy."""
    import subprocess
    import sys

    code = f"""
import sys
from jobs.tasks import get, load_checkpoint
from models.checkpoint import save_checkpoint
t = get("retrieval")
save_checkpoint({str(tmp_path / "r.pt")!r}, "retrieval", t.model(t.presets["tiny"]), t.presets["tiny"], extra={{"epoch": 0}})
model, _ = load_checkpoint({str(tmp_path / "r.pt")!r}, task="retrieval")
print(type(model).__name__, sorted(m for m in sys.modules if m.startswith("jobs.tasks.")), "torchmetrics" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split("\n")[-2]
    assert out == "JointEmbedder ['jobs.tasks.base', 'jobs.tasks.retrieval'] False"
    with pytest.raises(KeyError, match="nope"):
        builders()["nope"]
