"""`avray train` on the session's local Ray: checkpoints, metrics, resume, and recovery from a
worker killed after its first checkpoint."""
import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.preprocess import PreprocessConfig
from jobs.preprocess import run as preprocess
from jobs.evaluate import EvaluateConfig
from jobs.evaluate import run as evaluate
from jobs.train import TrainConfig, run
from jobs.tasks import load_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clips(ray_local, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    assert main(["synth", "--out", str(root / "media"), "--videos", "8", "--seed", "2", "--seconds", "2",
                 "--size", "64", "--fps", "10"]) == 0
    # Video ids hash the files' paths, so which videos a run holds out changes with the temporary
    # folder. Keep the scenes in which each 1 s clip has an object sounding at its middle frame
    # (4 fps: frame 2), so that any held-out video gives separation a mixture of two audible clips
    # and localization two clips with boxes; seed 2's scene 3 is silent in its first second.
    rows = [json.loads(line) for line in (root / "media" / "manifest.jsonl").read_text().splitlines()]

    def sounding_mid_frames(row: dict) -> bool:
        gt = json.loads(row["ground_truth"])
        return all(any(o["sounding"][int((start + 0.5) * gt["fps"])] for o in gt["objects"]) for start in (0.0, 1.0))

    kept = [r for r in rows if sounding_mid_frames(r)]
    assert [r["path"] for r in rows if r not in kept] == ["scene_00003.mp4"]
    (root / "media" / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert preprocess(PreprocessConfig(inputs=(str(root / "media" / "kept.jsonl"),), out=str(root / "data"),
                                       clip_seconds=1.0, fps=4.0, size=64)) == 0
    return root / "data" / "clips"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _evaluate(task: str, run_dir: Path, clips: Path, out: Path) -> dict:
    """avray evaluate on the held-out videos of the run: metrics.json and a PNG figure."""
    assert evaluate(EvaluateConfig(task=task, checkpoint=str(run_dir / "model.pt"), data=str(clips), out=str(out),
                                   split="val", val_fraction=0.25, batch_size=4, examples=2)) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == task and report["split"] == "val" and report["clips"] >= 2
    assert (out / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report["metrics"]


def test_train_localization_checkpoints_and_resume(clips, tmp_path):
    out = tmp_path / "loc"
    cfg = TrainConfig(task="localization", data=str(clips), out=str(out), epochs=2, batch_size=4, val_fraction=0.25,
                      lr_schedule="cosine")  # localization's default (auto) is constant
    assert run(cfg) == 0
    rows = _metrics(out)
    assert [(r["epoch"], r["start_epoch"]) for r in rows] == [(0, 0), (1, 0)]
    assert all(r["steps"] >= 1 and r["train_loss"] > 0 and 0 <= r["data_wait_fraction"] <= 1 for r in rows)
    assert [r["torch_threads"] for r in rows] == [1, 1]  # a 1-CPU worker's default
    # cosine schedule, per step: half the peak after the first of two equal epochs, 0 at the end
    assert rows[0]["steps"] == rows[1]["steps"]
    assert rows[0]["lr"] == pytest.approx(0.5e-3) and rows[1]["lr"] == 0.0
    assert {"val_ciou50_own_audio", "val_auc_own_audio", "val_ciou50_silent_audio"} <= set(rows[-1])
    model, ckpt = load_checkpoint(out / "model.pt")
    assert ckpt["model"] == "localization" and ckpt["extra"]["epoch"] == 1
    # how the clips were made travels with the model (avray serve decodes uploads the same way)
    assert {k: ckpt["extra"]["clip_settings"][k] for k in ("clip_seconds", "fps", "size", "sample_rate", "n_mels")} == {
        "clip_seconds": 1.0, "fps": 4.0, "size": 64, "sample_rate": 16000, "n_mels": 64}
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        run(cfg)
    assert run(TrainConfig(**{**cfg.__dict__, "epochs": 3, "resume": True})) == 0
    rows = _metrics(out)
    assert [(r["epoch"], r["start_epoch"]) for r in rows] == [(0, 0), (1, 0), (2, 2)]  # only epoch 2 trained
    assert rows[2]["lr"] == 0.0  # the schedule resumed at its step (2 of 3 epochs done), now over 3 epochs
    assert load_checkpoint(out / "model.pt")[1]["extra"]["epoch"] == 2
    metrics = _evaluate("localization", out, clips, tmp_path / "eval")
    assert set(metrics) >= {"ciou50_own_audio", "auc_other_audio", "ciou50_silent_audio", "clips_with_box"}
    with pytest.raises(ValueError, match="holds a localization model, not separation"):
        evaluate(EvaluateConfig(task="separation", checkpoint=str(out / "model.pt"), data=str(clips),
                                out=str(tmp_path / "bad")))


def test_train_separation_audio_visual(clips, tmp_path):
    out = tmp_path / "sep"
    assert run(TrainConfig(task="separation", data=str(clips), out=str(out), epochs=1, batch_size=4,
                           val_fraction=0.25, torch_threads=2, lr_schedule="constant", lr=2e-3)) == 0
    (row,) = _metrics(out)
    assert row["val_mixtures"] >= 1
    assert row["torch_threads"] == 2 and row["lr"] == 2e-3
    assert {"val_si_sdri", "val_sdri", "val_si_sdri_wrong_visual"} <= set(row)
    assert load_checkpoint(out / "model.pt")[0].cfg.audio_only is False
    assert {"si_sdri", "sdri", "si_sdri_wrong_visual", "mixtures"} <= set(_evaluate("separation", out, clips, tmp_path / "eval"))


def test_killed_worker_resumes_from_last_checkpoint(clips, tmp_path):
    import ray._private.state as ray_state  # the GCS actor table: needs no dashboard

    out = tmp_path / "killed"
    killed: list[int] = []

    earlier = set(ray_state.actors())  # other tests' workers, dead or dying

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 300
        pids: list[int] = []
        while time.monotonic() < deadline and not pids:  # find the worker first: the kill must not wait on the GCS
            pids = [a["Pid"] for i, a in ray_state.actors().items() if i not in earlier
                    and a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"]
            time.sleep(0.05)
        snapshot = out / "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered
        while time.monotonic() < deadline and pids and not killed:
            try:
                registered = json.loads(snapshot.read_text())["checkpoint_results"]
            except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
                registered = []
            if registered:
                os.kill(pids[0], signal.SIGKILL)  # a process this test's Ray run started
                killed.append(pids[0])
            time.sleep(0.01)

    t = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    t.start()
    # an epoch of this tiny set takes about a second: enough of them that the kill lands mid-run
    assert run(TrainConfig(task="localization", data=str(clips), out=str(out), epochs=10, batch_size=4,
                           val_fraction=0.25, max_failures=1)) == 0
    t.join()
    assert killed, "no worker was killed"
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == list(range(10))
    assert rows[0]["start_epoch"] == 0 and rows[-1]["start_epoch"] >= 1  # resumed, not restarted
    assert {r["lr"] for r in rows} == {1e-3}  # --lr-schedule auto: constant for localization


def test_train_captioning_builds_vocab_from_clip_captions(clips, tmp_path):
    out = tmp_path / "cap"
    assert run(TrainConfig(task="captioning", data=str(clips), out=str(out), epochs=1, batch_size=4,
                           val_fraction=0.25)) == 0
    (row,) = _metrics(out)
    assert row["val_captions"] >= 2 and row["lr"] == 0.0  # --lr-schedule auto: cosine for captioning
    assert {"val_bleu4_audio", "val_cider_audio", "val_sounding_object_acc_audio", "val_cider_no_audio"} <= set(row)
    model, ckpt = load_checkpoint(out / "model.pt")
    vocab = ckpt["config"]["vocab"]
    assert tuple(vocab[:4]) == ("<pad>", "<bos>", "<eos>", "<unk>") and {"while", "is", "silent"} <= set(vocab)
    assert tuple(vocab) == model.cfg.vocab
    metrics = _evaluate("captioning", out, clips, tmp_path / "eval")
    assert {"bleu4_audio", "cider_no_audio", "sounding_object_acc_audio"} <= set(metrics)


def test_train_retrieval_and_evaluate_every_direction(clips, tmp_path):
    from jobs.tasks.retrieval import DIRECTIONS

    out = tmp_path / "ret"
    assert run(TrainConfig(task="retrieval", data=str(clips), out=str(out), epochs=1, batch_size=4,
                           val_fraction=0.25)) == 0
    (row,) = _metrics(out)
    assert {"val_audio_to_video_r1", "val_text_to_video_r10", "val_shuffled_audio_to_video_r1", "val_chance_r1"} <= set(row)
    model, ckpt = load_checkpoint(out / "model.pt")
    assert {"hums", "clicks", "while"} & set(model.cfg.vocab) and model.cfg.vocab == tuple(ckpt["config"]["vocab"])
    metrics = _evaluate("retrieval", out, clips, tmp_path / "eval")
    for q, g in DIRECTIONS:
        assert {f"{q}_to_{g}_r1", f"{q}_to_{g}_r5", f"{q}_to_{g}_r10", f"{q}_to_{g}_median_rank"} <= set(metrics)
    assert metrics["chance_r1"] == 1 / metrics["clips"]


@pytest.mark.parametrize("name", ["localization", "separation", "captioning"])
def test_ray_data_prepares_the_batches_collate_gives(clips, name):
    """avray train runs task.prepare in Ray Data tasks (clip_dataset) and the worker only makes
    tensors and floats (to_model): the same batch as task.collate in one process. Images travel
    as uint8, channels first."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from functools import partial

    from jobs.data import Split, clip_dataset
    from jobs.tasks import get
    from jobs.tasks.base import to_model
    from pipelines.schema import decode_clip_batch

    task = get(name)
    cfg = task.presets["tiny"]
    if name == "captioning":
        cfg = replace(cfg, vocab=("<pad>", "<bos>", "<eos>", "<unk>", "a", "red"))
    files = tuple(sorted(str(p) for p in clips.glob("*.parquet"))[:2])
    cols = [c for c in task.columns if c in pq.read_schema(files[0]).names]
    table = pa.concat_tables([pq.read_table(f, columns=cols) for f in files])
    rows = table.num_rows
    split = Split(files, tuple(pq.read_metadata(f).num_rows for f in files), rows)
    (from_ray,) = list(clip_dataset(split, cols, partial(task.prepare, cfg=cfg), rows).iter_torch_batches(batch_size=rows))
    numpy_batch = {c: table.column(c).combine_chunks().to_numpy(zero_copy_only=False) for c in cols}
    mine = task.collate(numpy_batch, cfg)
    got = to_model(from_ray)
    assert list(got) == list(mine)
    for k in mine:
        assert got[k].dtype == mine[k].dtype and torch.equal(got[k], mine[k]), k
    frames = decode_clip_batch(numpy_batch)["frames"]  # uint8 (B, T, H, W, 3)
    B, T = frames.shape[:2]
    as_float = torch.from_numpy(np.moveaxis(frames, -1, -3).astype(np.float32) / 255)  # (B, T, 3, H, W)
    if name == "localization":
        assert from_ray["frame"].dtype == torch.uint8 and tuple(from_ray["frame"].shape) == (B, 3, 64, 64)
        assert torch.equal(mine["frame"], as_float[:, T // 2])
        # the 0.5 s of log-mel around the middle frame (tiny preset), cut in the Ray Data task
        assert tuple(from_ray["logmel"].shape) == (B, 64, 50)
    elif name == "separation":
        assert from_ray["faces"].dtype == torch.uint8 and tuple(from_ray["faces"].shape) == (B, T, 3, 48, 48)
        area = torch.nn.functional.interpolate(as_float.flatten(0, 1), size=(48, 48), mode="area")
        assert (mine["faces"].flatten(0, 1) - area).abs().max() <= 0.5 / 255 + 1e-6  # rounded to uint8
    else:
        assert from_ray["frames"].dtype == torch.uint8 and torch.equal(mine["frames"], as_float)
        from pipelines.groundtruth import clip_captions
        from models.text import tokenize

        # <bos> words <eos> padded to 24 ids whatever the captions, so that rows prepared
        # by different Ray Data tasks (different captions) stack into one batch
        assert from_ray["tokens"].dtype == torch.int64 and tuple(from_ray["tokens"].shape) == (B, 24)
        lengths = [min(24, len(tokenize(c)) + 2) for c in clip_captions(numpy_batch)]
        assert (from_ray["tokens"] != 0).sum(dim=1).tolist() == lengths
