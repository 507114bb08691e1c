"""Quality bars of the tiny models on held-out synthetic scenes, plus separation of real speech.

One run (or `--only TASK`) does, under --workdir (default bench-out/quality/):

1. Data, with the real CLI: `avray synth` scenes for training (--train-seed, default 0) and a
   held-out set from a DIFFERENT seed (--heldout-seed, default 1), each `avray preprocess`ed to
   its own clip folder (96 px, 8 fps, clips of 2 s). No held-out scene is ever seen in training
   (different seed; `avray train` only splits its own training folder for validation).
2. Training with `avray train` (Ray Train, 1 worker, this machine's CPUs), timed wall clock
   (the whole command: Ray start-up, every epoch's validation and checkpoint).
3. Evaluation with `avray evaluate` (jobs/evaluate.py: the task code of jobs/tasks.py) on ALL
   clips of the held-out folder; metrics.json and the figure land in workdir/eval/<run>/.
4. The bars of issue 3, each PASS/FAIL against the measured value:
   - localization: cIoU@0.5 >= 0.5 (Senocak's rule, see models/metrics.py) and >= 2x the same
     model with silenced audio;
   - separation: SI-SDRi >= 6 dB; AV >= audio-only + 1 dB; wrong visual stream >= 3 dB worse than AV;
   - captioning: CIDEr >= 1.0; sounding object named first correctly in >= 80 % of the captions,
     and fewer without audio;
   - retrieval: audio->video R@1 >= 0.5; text->video R@10 >= 0.5 and >= 10x chance; audio of
     shuffled clips at chance (R@1 within 2x of 1/N);
   - vqa: mean accuracy of the 7 sound-dependent question types >= 0.80 with audio, >= 25 points
     lower without; question only within 10 points of the majority answer; training <= 15 min;
   - soundnet: the distilled audio student >= 0.80x the supervised audio classifier and >= 5x
     chance; each of its three trainings <= 15 min;
   - speech (no bar, a report): audio-only separation trained on mixtures of real recordings and
     scored on 2-speaker mixtures of speakers never seen in training (`SPEECH_TRAIN` / `SPEECH_TEST`).

Results of each experiment are kept in workdir/results/<name>.json; `--write BENCHMARKS.md`
rewrites the section between `<!-- quality:start -->` and `<!-- quality:end -->` from all results
present, so `--only` re-runs one experiment and keeps the others' last figures.

    python benchmarks/quality.py --write BENCHMARKS.md
    python benchmarks/quality.py --only separation --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_section  # noqa: E402
from models.retrieval import PRESETS as RET_PRESETS  # noqa: E402

AVRAY = str(Path(sys.executable).parent / "avray")
TASKS = ("localization", "separation", "captioning", "retrieval", "speech", "vqa", "soundnet")
BUDGET_S = 15 * 60  # the training budget per model on this machine

# Real speech (../shared/media/speech, see its README, plus Debian's asterisk prompts when
# installed: `apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-es-wav
# asterisk-core-sounds-fr-wav`). Speaker -> files (globs relative to the folder). The en and es
# prompts are both read by Allison Smith: one speaker. arctic_a0010.wav (speaker not stated in
# its source) is used on neither side.
SHARED_SPEECH = ROOT.parent / "shared" / "media" / "speech"
ASTERISK = Path("/usr/share/asterisk/sounds")
SPEECH_TRAIN: dict[str, list[str]] = {
    "asterisk_allison": [str(ASTERISK / "en_US_f_Allison" / "**" / "*.wav"),
                         str(ASTERISK / "es_MX_f_Allison" / "**" / "*.wav")],
    "asterisk_june": [str(ASTERISK / "fr_CA_f_June" / "**" / "*.wav")],
    "librispeech_1320": [str(SHARED_SPEECH / "1320_00000.mp3")],
    "librispeech_3575": [str(SHARED_SPEECH / "3575_00000.mp3")],
    "vctk_p240": [str(SHARED_SPEECH / "p240_00000.mp3")],
    "arctic_aew": [str(SHARED_SPEECH / "cmu_arctic_us_aew_a000*.wav")],
}
SPEECH_TEST: dict[str, list[str]] = {
    "librispeech_6829": [str(SHARED_SPEECH / "6829_00000.mp3")],
    "librispeech_8230": [str(SHARED_SPEECH / "8230_00000.mp3")],
    "vctk_p260": [str(SHARED_SPEECH / "p260_00000.mp3")],
    "arctic_axb": [str(SHARED_SPEECH / "cmu_arctic_us_axb_a000*.wav")],
}


def sh(cmd: list[str], log: Path) -> float:
    """Run a command (output appended to `log`), raise on failure; returns wall seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise RuntimeError(f"command failed ({res.returncode}), see {log}: {' '.join(cmd)}")
    return wall


def rel(p: Path) -> str:
    """A path as the commands in BENCHMARKS.md show it (relative to the repository)."""
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


# --- data -------------------------------------------------------------------------------------

def synth_data(work: Path, split: str, videos: int, seed: int, args) -> tuple[Path, list[str]]:
    """`avray synth` + `avray preprocess` into work/media-<split>, work/data-<split>; reused when
    made with the same settings. Returns (clip folder, the commands)."""
    media, data = work / f"media-{split}", work / f"data-{split}"
    settings = {"videos": videos, "seed": seed, "seconds": args.seconds, "size": args.size, "fps": args.fps,
                "max_objects": args.max_objects}
    cmds = [[AVRAY, "synth", "-o", rel(media), "--videos", str(videos), "--seed", str(seed),
             "--seconds", f"{args.seconds:g}", "--size", str(args.size), "--max-objects", str(args.max_objects)],
            [AVRAY, "preprocess", rel(media / "manifest.jsonl"), "--out", rel(data), "--size", str(args.size),
             "--fps", f"{args.fps:g}", "--num-cpus", "2"]]
    stamp = work / f"data-{split}.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == settings and (data / "clips").is_dir()):
        shutil.rmtree(media, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
        for c in cmds:
            sh(c, work / "data.log")
        stamp.write_text(json.dumps(settings))
    return data / "clips", [" ".join(["avray"] + c[1:]) for c in cmds]


def resized_data(work: Path, split: str, size: int, fps: float) -> tuple[Path, str]:
    """The same scenes (work/media-<split>) preprocessed again at `size` px into
    work/data-<split>-<size>px (the tiny captioner is built for 64 px frames). Returns (clips, command)."""
    media, data = work / f"media-{split}", work / f"data-{split}-{size}px"
    cmd = [AVRAY, "preprocess", rel(media / "manifest.jsonl"), "--out", rel(data), "--size", str(size),
           "--fps", f"{fps:g}", "--num-cpus", "2"]
    stamp = work / f"data-{split}-{size}px.json"
    source = json.loads((work / f"data-{split}.json").read_text())
    if not (stamp.exists() and json.loads(stamp.read_text()) == source and (data / "clips").is_dir()):
        shutil.rmtree(data, ignore_errors=True)
        sh(cmd, work / "data.log")
        stamp.write_text(json.dumps(source))
    return data / "clips", " ".join(["avray"] + cmd[1:])


def _trim(x, rel_level: float = 0.02):
    """Cut leading/trailing samples quieter than rel_level x the recording's peak (prompt silence)."""
    import numpy as np
    loud = np.flatnonzero(np.abs(x) > rel_level * np.abs(x).max())
    return x[loud[0]: loud[-1] + 1] if loud.size else x[:0]


def speech_recordings(speakers: dict[str, list[str]], sample_rate: int = 16000,
                      chunk_s: float = 30.0, rms: float = 0.05) -> dict[str, list]:
    """Per speaker: its files (sorted, decoded with PyAV at `sample_rate`, silence trimmed, 0.15 s
    gaps) concatenated and cut into recordings of <= chunk_s, each RMS-normalised to `rms`.
    Returns speaker -> [(float32 (S,), [source files])]."""
    import glob

    import numpy as np

    from pipelines.synth_audio import load_speech

    out: dict[str, list] = {}
    gap = np.zeros(int(0.15 * sample_rate), np.float32)
    for spk, patterns in speakers.items():
        files = sorted({f for p in patterns for f in glob.glob(p, recursive=True)})
        if not files:
            continue
        pieces, names, length, chunks = [], [], 0, []
        for f in files:
            x = _trim(np.asarray(load_speech(f, sample_rate)))
            if x.size < 0.3 * sample_rate:
                continue
            pieces += [x, gap]
            names.append(f)
            length += x.size + gap.size
            if length >= chunk_s * sample_rate:
                chunks.append((np.concatenate(pieces), names))
                pieces, names, length = [], [], 0
        if pieces:
            chunks.append((np.concatenate(pieces), names))
        out[spk] = [((y * (rms / max(float(np.sqrt(np.mean(y.astype(np.float64) ** 2))), 1e-9))).astype(np.float32), n)
                    for y, n in chunks]
    return out


def speech_data(work: Path, split: str, speakers: dict[str, list[str]], hop: float) -> tuple[Path, dict]:
    """MP4s (a still 48 px frame, the speech as AAC) of each speaker's recordings + a manifest with
    a `speaker` column, then `avray preprocess` (clips of 2 s every `hop` s). Returns (clips, info)."""
    import numpy as np

    from pipelines.synth import write_video

    media, data = work / f"media-speech-{split}", work / f"data-speech-{split}"
    stamp = work / f"data-speech-{split}.json"
    settings = {"speakers": speakers, "hop": hop, "version": 2}
    cmd = [AVRAY, "preprocess", rel(media / "manifest.jsonl"), "--out", rel(data), "--size", "48",
           "--fps", "8", "--hop-seconds", f"{hop:g}", "--num-cpus", "2"]
    if stamp.exists() and json.loads(stamp.read_text())["settings"] == settings and (data / "clips").is_dir():
        return data / "clips", json.loads(stamp.read_text())["info"]
    shutil.rmtree(media, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    media.mkdir(parents=True)
    recs = speech_recordings(speakers)
    frame = np.full((48, 48, 3), 40, np.uint8)
    rows, info = [], {}
    for spk, chunks in recs.items():
        files = sorted({n for _, names in chunks for n in names})
        info[spk] = {"files": len(files), "seconds": round(sum(len(y) for y, _ in chunks) / 16000, 1),
                     "examples": [rel(Path(f)) for f in files[:2]]}
        for k, (y, _) in enumerate(chunks):
            name = f"{spk}_{k:03d}.mp4"
            n_frames = int(np.ceil(len(y) / 16000 * 8))
            write_video(media / name, (frame for _ in range(n_frames)), y, fps=8, sample_rate=16000)
            rows.append({"path": name, "speaker": spk})
    (media / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sh(cmd, work / "data.log")
    info = {"speakers": info, "command": " ".join(["avray"] + cmd[1:])}
    stamp.write_text(json.dumps({"settings": settings, "info": info}))
    return data / "clips", info


# --- train / evaluate ----------------------------------------------------------------------------

REUSE: dict[str, dict] = {}  # --eval-only: run name -> its training record from workdir/results/


def train(work: Path, run: str, task: str, preset: str, data: Path, epochs: int, batch: int, lr: float,
          val_fraction: float = 0.1, torch_threads: int = 0, lr_schedule: str | None = None,
          extra: tuple[str, ...] = ()) -> dict:
    if REUSE:
        if run not in REUSE:
            raise FileNotFoundError(f"--eval-only: no earlier training record of {run} in {work / 'results'}")
        return {**REUSE[run], "checkpoint": Path(REUSE[run]["checkpoint"])}
    out = work / "runs" / run
    shutil.rmtree(out, ignore_errors=True)
    cmd = [AVRAY, "train", "--task", task, "--data", rel(data), "--out", rel(out), "--preset", preset,
           "--epochs", str(epochs), "--batch-size", str(batch), "--lr", f"{lr:g}", "--val-fraction", f"{val_fraction:g}",
           "--use-gpu", "no", "--address", "local"]  # a Ray of its own, even when another one runs on the machine
    if torch_threads:
        cmd += ["--torch-threads", str(torch_threads)]
    if lr_schedule:
        cmd += ["--lr-schedule", lr_schedule]
    cmd += list(extra)  # task options (soundnet: --teacher-weights)
    wall = sh(cmd, work / f"{run}.log")
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {"command": " ".join(["avray"] + cmd[1:]), "wall_s": wall, "epochs": len(rows),
            "train_loss": [round(r["train_loss"], 4) for r in rows],
            "samples_per_s": rows[-1]["samples_per_s"], "checkpoint": out / "model.pt"}


def evaluate(work: Path, run: str, task: str, checkpoint: Path, data: Path) -> dict:
    out = work / "eval" / run
    shutil.rmtree(out, ignore_errors=True)
    cmd = [AVRAY, "evaluate", "--task", task, "--checkpoint", rel(checkpoint), "--data", rel(data),
           "--out", rel(out)]
    sh(cmd, work / f"{run}.log")
    report = json.loads((out / "metrics.json").read_text())
    return {"command": " ".join(["avray"] + cmd[1:]), "metrics": report["metrics"], "clips": report["clips"],
            "figure": rel(out / f"{task}.png")}


def bar(name: str, value: float, target: str, ok: bool, shown: str | None = None) -> dict:
    return {"bar": name, "value": value, "target": target, "pass": bool(ok), "shown": shown}


def run_localization(work: Path, args, train_clips: Path, held: Path) -> dict:
    t = train(work, "localization", "localization", args.loc_preset, train_clips, args.loc_epochs, 32, args.loc_lr,
              torch_threads=args.torch_threads, lr_schedule=args.loc_lr_schedule)
    e = evaluate(work, "localization", "localization", t["checkpoint"], held)
    m = e["metrics"]
    own, silent = m["ciou50_own_audio"], m["ciou50_silent_audio"]
    bars = [bar("cIoU@0.5 (Senocak), own audio", own, ">= 0.5", own >= 0.5),
            bar("cIoU@0.5 own audio vs silenced audio", own / silent if silent else float("inf"), ">= 2x",
                own >= 2 * silent and own > 0, f"{own:.3f} vs {silent:.3f}"),
            bar("training wall minutes", t["wall_s"] / 60, "<= 15", t["wall_s"] <= BUDGET_S)]
    return {"train": t, "eval": e, "bars": bars}


def run_separation(work: Path, args, train_clips: Path, held: Path) -> dict:
    jobs = {"separation-av": args.sep_preset, "separation-audio-only": f"{args.sep_preset}-audio-only"}

    def one(run: str) -> tuple[dict, dict]:
        t = train(work, run, "separation", jobs[run], train_clips, args.sep_epochs, args.sep_batch_size, args.sep_lr, args.val_fraction,
                  torch_threads=args.torch_threads)
        return t, evaluate(work, run, "separation", t["checkpoint"], held)

    if args.parallel:  # both trainings at once, one core each (each wall time is then an upper bound)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(2) as pool:
            (av, e_av), (ao, e_ao) = pool.map(one, list(jobs))
    else:
        (av, e_av), (ao, e_ao) = one("separation-av"), one("separation-audio-only")
    v_av, v_ao = e_av["metrics"]["si_sdri"], e_ao["metrics"]["si_sdri"]
    v_wrong = e_av["metrics"]["si_sdri_wrong_visual"]
    bars = [bar("SI-SDRi, AV (dB)", v_av, ">= 6", v_av >= 6),
            bar("AV − audio-only SI-SDRi (dB)", v_av - v_ao, ">= 1", v_av - v_ao >= 1),
            bar("AV − wrong-visual SI-SDRi (dB)", v_av - v_wrong, ">= 3", v_av - v_wrong >= 3),
            bar("training wall minutes, AV", av["wall_s"] / 60, "<= 15", av["wall_s"] <= BUDGET_S),
            bar("training wall minutes, audio-only", ao["wall_s"] / 60, "<= 15", ao["wall_s"] <= BUDGET_S)]
    return {"train": av, "eval": e_av, "train_audio_only": ao, "eval_audio_only": e_ao, "bars": bars}


def run_captioning(work: Path, args, train_clips: Path, held: Path) -> dict:
    train_clips, c_train = resized_data(work, "train", args.cap_size, args.fps)
    held, c_held = resized_data(work, "heldout", args.cap_size, args.fps)
    t = train(work, "captioning", "captioning", args.cap_preset, train_clips, args.cap_epochs, args.cap_batch_size,
              args.cap_lr, args.val_fraction, torch_threads=args.cap_torch_threads)
    e = evaluate(work, "captioning", "captioning", t["checkpoint"], held)
    m = e["metrics"]
    acc, acc0 = m["sounding_object_acc_audio"], m["sounding_object_acc_no_audio"]
    bars = [bar("CIDEr, with audio", m["cider_audio"], ">= 1.0", m["cider_audio"] >= 1.0),
            bar("sounding object named first, with audio", acc, ">= 0.80", acc >= 0.8),
            bar("… without audio (must drop)", acc0, f"< {acc:.3f}", acc0 < acc),
            bar("training wall minutes", t["wall_s"] / 60, "<= 15", t["wall_s"] <= BUDGET_S)]
    return {"train": t, "eval": e, "bars": bars, "data_commands": [c_train, c_held]}


def run_retrieval(work: Path, args, train_clips: Path, held: Path) -> dict:
    train_clips, c_train = resized_data(work, "train", args.ret_size, args.fps)
    held, c_held = resized_data(work, "heldout", args.ret_size, args.fps)
    t = train(work, "retrieval", "retrieval", args.ret_preset, train_clips, args.ret_epochs, args.ret_batch_size,
              args.ret_lr, args.val_fraction, torch_threads=args.torch_threads)
    e = evaluate(work, "retrieval", "retrieval", t["checkpoint"], held)
    m = e["metrics"]
    n = m["clips"]
    av, tv, shuffled = m["audio_to_video_r1"], m["text_to_video_r10"], m["shuffled_audio_to_video_r1"]
    bars = [bar("audio -> video R@1", av, ">= 0.5", av >= 0.5),
            bar("text -> video R@10", tv, f">= 0.5 and >= 10x chance ({10 * m['chance_r10']:.2f})",
                tv >= 0.5 and tv >= 10 * m["chance_r10"]),
            bar("audio of shuffled clips -> video R@1", shuffled, f"<= 2 / N = {2 / n:.4f}", shuffled <= 2 / n),
            bar("training wall minutes", t["wall_s"] / 60, "<= 15", t["wall_s"] <= BUDGET_S)]
    return {"train": t, "eval": e, "bars": bars, "data_commands": [c_train, c_held]}


def run_vqa(work: Path, args, train_clips: Path, held: Path) -> dict:
    train_clips, c_train = resized_data(work, "train", args.vqa_size, args.fps)
    held, c_held = resized_data(work, "heldout", args.vqa_size, args.fps)
    t = train(work, "vqa", "vqa", args.vqa_preset, train_clips, args.vqa_epochs, args.vqa_batch_size, args.vqa_lr,
              args.val_fraction, torch_threads=args.torch_threads)
    e = evaluate(work, "vqa", "vqa", t["checkpoint"], held)
    m = e["metrics"]
    sound, mute, qo, maj = m["acc_av_sound"], m["acc_no_audio_sound"], m["acc_question_only"], m["majority"]
    bars = [bar("sound-dependent types with audio (mean of the 7 types' accuracies)", sound, ">= 0.80", sound >= 0.8),
            bar("… without audio: points lower", 100 * (sound - mute), ">= 25", sound - mute >= 0.25,
                f"{mute:.3f}: {100 * (sound - mute):.1f} points lower"),
            bar("question only vs majority answer (all questions)", 100 * (qo - maj), "within 10 points",
                abs(qo - maj) <= 0.10, f"{qo:.3f} vs {maj:.3f}"),
            bar("training wall minutes", t["wall_s"] / 60, "<= 15", t["wall_s"] <= BUDGET_S)]
    return {"train": t, "eval": e, "bars": bars, "data_commands": [c_train, c_held]}


def run_soundnet(work: Path, args, train_clips: Path, held: Path) -> dict:
    """SoundNet in three avray train runs on the same clips: the visual teacher (labels on frames),
    the student distilled from it on audio (no label), the same student supervised (upper bound)."""
    train_clips, c_train = resized_data(work, "train", args.sn_size, args.fps)
    held, c_held = resized_data(work, "heldout", args.sn_size, args.fps)
    runs = {"teacher": ("soundnet-teacher", "tiny-teacher", args.sn_teacher_epochs),
            "student": ("soundnet-student", "tiny", args.sn_epochs),
            "supervised": ("soundnet-supervised", "tiny-supervised", args.sn_epochs)}
    t, e = {}, {}
    for key, (run, preset, epochs) in runs.items():
        extra = ("--teacher-weights", rel(t["teacher"]["checkpoint"])) if key == "student" else ()
        t[key] = train(work, run, "soundnet", preset, train_clips, epochs, args.sn_batch_size, args.sn_lr,
                       args.val_fraction, torch_threads=args.torch_threads, extra=extra)
        e[key] = evaluate(work, run, "soundnet", t[key]["checkpoint"], held)
    m, sup = e["student"]["metrics"], e["supervised"]["metrics"]
    acc, up, chance = m["student_acc"], sup["student_acc"], m["chance"]
    bars = [bar("student accuracy vs the supervised audio classifier", acc / up if up else 0.0, ">= 0.80x",
                acc >= 0.8 * up, f"{acc:.3f} vs {up:.3f} ({acc / up if up else 0.0:.2f}x)"),
            bar("student accuracy vs chance (1 / classes)", acc / chance, ">= 5x", acc >= 5 * chance,
                f"{acc:.3f} vs {chance:.3f} ({acc / chance:.1f}x)"),
            *(bar(f"training wall minutes, {key}", t[key]["wall_s"] / 60, "<= 15", t[key]["wall_s"] <= BUDGET_S)
              for key in runs)]
    return {**{f"train_{k}": v for k, v in t.items()}, **{f"eval_{k}": v for k, v in e.items()}, "bars": bars,
            "data_commands": [c_train, c_held]}


def speaker_pair_eval(checkpoint: Path, clips: Path) -> dict:
    """Audio-only SI-SDRi (PIT) over every 2-speaker mixture of test clips of DIFFERENT speakers
    (clip a + clip b at their own levels, both RMS-normalised recordings, so ~0 dB). No SDRi: the
    bss_eval SDR's 512-tap solve is singular on some of these clips (torchmetrics raised)."""
    import itertools

    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from models.checkpoint import load_checkpoint
    from models.separation_metrics import si_sdr_improvement
    from pipelines.schema import decode_clip_batch

    torch.set_num_threads(2)
    model, _ = load_checkpoint(str(checkpoint))
    model.eval()
    table = pq.read_table(str(clips), columns=["video_id", "speaker", "audio", "audio_shape"])
    batch = {n: table.column(n).combine_chunks().to_numpy(zero_copy_only=False) for n in table.column_names}
    audio = torch.from_numpy(np.ascontiguousarray(decode_clip_batch(batch)["audio"]))  # (C, S)
    speakers = [str(s) for s in batch["speaker"]]
    pairs = [(i, j) for i, j in itertools.combinations(range(len(speakers)), 2) if speakers[i] != speakers[j]]
    si, per_pair = [], {}
    with torch.no_grad():
        for k in range(0, len(pairs), 32):
            idx = torch.tensor(pairs[k:k + 32])  # (B, 2)
            sources = audio[idx]  # (B, 2, S)
            mixture = sources.sum(dim=1)  # (B, S)
            est = model(mixture)["waveforms"]
            si.append(si_sdr_improvement(est, sources, mixture, pit=True).mean(dim=1))
    si_all = torch.cat(si)
    for (i, j), v in zip(pairs, si_all.tolist()):
        per_pair.setdefault(" + ".join(sorted((speakers[i], speakers[j]))), []).append(v)
    return {"si_sdri": float(si_all.mean()), "si_sdri_median": float(si_all.median()),
            "mixtures": len(pairs), "clips": len(speakers),
            "clips_per_speaker": {s: speakers.count(s) for s in sorted(set(speakers))},
            "per_speaker_pair": {k: round(float(np.mean(v)), 2) for k, v in sorted(per_pair.items())}}


def run_speech(work: Path, args) -> dict:
    train_clips, train_info = speech_data(work, "train", SPEECH_TRAIN, hop=2.0)
    test_clips, test_info = speech_data(work, "test", SPEECH_TEST, hop=0.5)
    t = train(work, "speech-audio-only", "separation", "tiny-audio-only", train_clips, args.speech_epochs, 32,
              args.sep_lr, args.val_fraction, torch_threads=args.torch_threads)
    if not REUSE:  # the training record first: an evaluation that fails can be redone with --eval-only
        (work / "results" / "speech.json").write_text(json.dumps({"train": t}, indent=2, default=str))
    res = speaker_pair_eval(t["checkpoint"], test_clips)
    bars = [bar("training wall minutes", t["wall_s"] / 60, "<= 15", t["wall_s"] <= BUDGET_S)]
    return {"train": t, "speaker_pairs": res, "train_data": train_info, "test_data": test_info, "bars": bars}


# --- report ---------------------------------------------------------------------------------------

def _fmt(v: float) -> str:
    return "∞" if v == float("inf") else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def _bars_table(res: dict) -> list[str]:
    lines = ["| bar | measured | target | |", "|---|---|---|---|"]
    for b in res["bars"]:
        lines.append(f"| {b['bar']} | {b.get('shown') or _fmt(b['value'])} | {b['target']} | "
                     f"**{'PASS' if b['pass'] else 'FAIL'}** |")
    return lines


def _train_line(t: dict) -> str:
    return (f"`{t['command']}`: {t['epochs']} epochs in {t['wall_s'] / 60:.1f} min wall "
            f"({t['samples_per_s']:.0f} samples/s in the last epoch; train loss {t['train_loss'][0]} → "
            f"{t['train_loss'][-1]})" + (f"; wall time {t['wall_note']}" if t.get("wall_note") else ""))


def args_cap_size(r: dict) -> str:
    return r["data_commands"][0].split("--size ")[1].split()[0]


def report(work: Path, results: dict[str, dict], meta: dict) -> str:
    lines = [
        f"Data: `{meta['data_commands'][0]}` then `{meta['data_commands'][1]}` for training "
        f"({meta['train_clips']} clips); the held-out set is made the same way with seed "
        f"{meta['heldout_seed']}: `{meta['data_commands'][2]}` then `{meta['data_commands'][3]}` "
        f"({meta['heldout_clips']} clips, all evaluated). Training: `avray train`, Ray Train with 1 worker "
        f"(1 CPU, torch threads as each command says: 1 unless `--torch-threads`) on this machine's 2 cores, "
        f"Ray Data reading and preparing batches beside it; the wall time is the whole command (Ray start, "
        f"per-epoch validation and checkpoints). Commands with `--torch-threads` ran alone on the machine; "
        f"the others (earlier sessions) shared it with other work, so their wall times are upper bounds.",
        "",
    ]
    if "localization" in results:
        lines += [
            "**cIoU binarisation.** The issue asks for cIoU \"as defined by Senocak et al.\": the pixels "
            "A(τ) = {i : a_i > τ} of the response map count as the prediction, cIoU = Σ_{i∈A} g_i / "
            "(Σ_i g_i + |A \\ G|), and cIoU@0.5 is the share of samples with cIoU ≥ 0.5. We min-max normalise "
            "each map to [0, 1] and take τ = 0.5 (`models.metrics.ciou(..., binarize=\"value\")`; Senocak's "
            "released code has no evaluation script, so τ is the paper's A(τ) on the normalised map). The "
            "later LVS / EZ-VSL evaluator instead binarises at the map's *median*, so half of the pixels are "
            "always predicted, and cIoU ≤ |G| / (H·W/2): the sounding objects of a held-out frame cover 4–29 % "
            "of it (median 11 %, more than 25 % in 1 % of the frames), so under the median rule cIoU@0.5 is "
            "~0 for every model, however good, and measures nothing here. Both are reported; the bar uses "
            "Senocak's rule, the `_lvs` columns the median rule.",
            ""]
        r = results["localization"]
        m = r["eval"]["metrics"]
        lines += ["### Localization (Senocak attention + EZ-VSL InfoNCE + supervised attention loss)", "",
                  *_bars_table(r), "",
                  f"- {_train_line(r['train'])}",
                  f"- `{r['eval']['command']}` ({r['eval']['clips']} clips, {int(m['clips_with_box'])} with a sounding "
                  f"box at the localized frame, all scored); figure: `{r['eval']['figure']}`",
                  "",
                  "| audio at evaluation | cIoU@0.5 | AUC | cIoU@0.5, LVS median rule | AUC, LVS | cIoU@0.5 on the "
                  "attention map |",
                  "|---|---|---|---|---|---|"]
        names = {"own": "the clip's own", "other": "another clip's (half a batch away)", "silent": "silence"}
        for name, label in names.items():
            lines.append(f"| {label} | {m[f'ciou50_{name}_audio']:.3f} | {m[f'auc_{name}_audio']:.3f} | "
                         f"{m[f'ciou50_{name}_audio_lvs']:.3f} | {m[f'auc_{name}_audio_lvs']:.3f} | "
                         f"{m.get(f'ciou50_{name}_audio_attention', float('nan')):.3f} |")
        lines += ["",
                  "The localization map is the cosine-similarity map (`models.localization.heatmap`). The last "
                  "column binarises the softmax attention instead (the same rule): at the preset's τ = 0.2 it is "
                  "sharper than the objects, so fewer of its pixels reach the box.", ""]
    if "separation" in results:
        r = results["separation"]
        av, ao = r["eval"]["metrics"], r["eval_audio_only"]["metrics"]
        lines += ["### Separation (Looking to Listen, mix-and-separate of 2 held-out clips)", "",
                  *_bars_table(r), "",
                  f"- AV: {_train_line(r['train'])}",
                  f"- audio-only (PIT): {_train_line(r['train_audio_only'])}",
                  f"- `{r['eval']['command']}` and `{r['eval_audio_only']['command']}` "
                  f"({int(av['mixtures'])} mixtures, the same for both models)",
                  f"- SI-SDRi / SDRi (dB): AV {av['si_sdri']:.2f} / {av['sdri']:.2f}; audio-only "
                  f"{ao['si_sdri']:.2f} / {ao['sdri']:.2f}; AV with the faces swapped {av['si_sdri_wrong_visual']:.2f}",
                  ""]
    if "captioning" in results:
        r = results["captioning"]
        m = r["eval"]["metrics"]
        lines += ["### Captioning (Show, Attend and Tell over frames + audio)", "",
                  *_bars_table(r), "",
                  f"- Frames at {args_cap_size(r)} px, the tiny captioner's size: the same scenes preprocessed again, "
                  f"`{r['data_commands'][0]}` and `{r['data_commands'][1]}`.",
                  f"- {_train_line(r['train'])}",
                  f"- `{r['eval']['command']}` ({int(m['captions'])} captions, greedy decoding)",
                  f"- with audio: BLEU-4 {m['bleu4_audio']:.3f}, CIDEr {m['cider_audio']:.3f}, sounding object "
                  f"{m['sounding_object_acc_audio']:.1%}; without audio: BLEU-4 {m['bleu4_no_audio']:.3f}, CIDEr "
                  f"{m['cider_no_audio']:.3f}, sounding object {m['sounding_object_acc_no_audio']:.1%}",
                  ""]
    if "retrieval" in results:
        r = results["retrieval"]
        m = r["eval"]["metrics"]
        lines += ["### Retrieval (joint video / audio / text embedding, symmetric InfoNCE)", "",
                  *_bars_table(r), "",
                  f"- Frames at {args_cap_size(r)} px: `{r['data_commands'][0]}` and `{r['data_commands'][1]}`.",
                  f"- {_train_line(r['train'])}",
                  f"- `{r['eval']['command']}`: {int(m['clips'])} held-out clips, each query's own clip the one "
                  f"correct answer (chance R@1 {m['chance_r1']:.4f}, R@10 {m['chance_r10']:.3f}); learned "
                  f"temperature {m['temperature']:.3f}",
                  "",
                  "| direction | R@1 | R@5 | R@10 | median rank | R@1, identical captions count | R@10, identical "
                  "captions count |", "|---|---|---|---|---|---|---|"]
        for q, g in (("text", "video"), ("video", "text"), ("text", "audio"), ("audio", "text"),
                     ("audio", "video"), ("video", "audio"), ("text", "fused"), ("shuffled_audio", "video")):
            k = f"{q}_to_{g}"
            same = (f"{m[k + '_same_caption_r1']:.3f} | {m[k + '_same_caption_r10']:.3f}"
                    if k + "_same_caption_r1" in m else "– | –")
            lines.append(f"| {k.replace('_to_', ' → ').replace('_', ' ')} | {m[k + '_r1']:.3f} | {m[k + '_r5']:.3f} | "
                         f"{m[k + '_r10']:.3f} | {m[k + '_median_rank']:g} | {same} |")
        lines += ["", "`fused` is the clip embedding avray embed stores as `emb` (L2 of video + audio); text → video "
                  "and text → audio are its video-only and audio-only ablations. The shuffled row asks each clip "
                  "with the audio of another clip, 8 offsets between N/4 and 3N/4 through the held-out set, the "
                  "scores averaged (no clip keeps its own; one offset alone would hit about 1 clip of N).", ""]
    if "vqa" in results:
        from pipelines.questions import SOUND_TYPES, TYPES

        r = results["vqa"]
        m = r["eval"]["metrics"]
        lines += ["### Audio-visual question answering (Hadamard fusion of question, audio and video streams)", "",
                  *_bars_table(r), "",
                  f"- Frames at {args_cap_size(r)} px: `{r['data_commands'][0]}` and `{r['data_commands'][1]}`.",
                  f"- {_train_line(r['train'])}",
                  f"- `{r['eval']['command']}`: every question of the {r['eval']['clips']} held-out clips "
                  f"({int(m['questions'])} questions, generated from each clip's ground truth, pipelines/questions.py); "
                  "one model, streams taken away at evaluation (learned absent vectors, trained by stream dropout).",
                  "",
                  "| type | questions | audio + video | no audio | no video | question only | majority answer |",
                  "|---|---|---|---|---|---|---|"]
        for t in TYPES:
            if f"questions_{t}" in m:
                lines.append(f"| {t}{' (sound)' if t in SOUND_TYPES else ' (sight)'} | {int(m[f'questions_{t}'])} | "
                             + " | ".join(f"{m[f'acc_{c}_{t}']:.3f}" for c in ("av", "no_audio", "no_video", "question_only"))
                             + f" | {m[f'majority_{t}']:.3f} |")
        lines.append("| **mean of the sound types** | | " + " | ".join(
            f"**{m[f'acc_{c}_sound']:.3f}**" for c in ("av", "no_audio", "no_video", "question_only"))
            + f" | {m['majority_sound']:.3f} |")
        lines.append("| all questions | " + f"{int(m['questions'])} | " + " | ".join(
            f"{m[f'acc_{c}']:.3f}" for c in ("av", "no_audio", "no_video", "question_only")) + f" | {m['majority']:.3f} |")
        lines += ["", "Majority answer: each type's most common answer among these held-out questions (an upper bound "
                  "of what answering by the answer statistics alone scores).", ""]
    if "soundnet" in results:
        r = results["soundnet"]
        ev = {k: r[f"eval_{k}"]["metrics"] for k in ("teacher", "student", "supervised")}
        m = ev["student"]
        lines += ["### SoundNet (a visual teacher, an audio student: KL to the teacher, no audio labels)", "",
                  *_bars_table(r), "",
                  f"- Frames at {args_cap_size(r)} px: `{r['data_commands'][0]}` and `{r['data_commands'][1]}`.",
                  f"- teacher: {_train_line(r['train_teacher'])}",
                  f"- student: {_train_line(r['train_student'])}",
                  f"- supervised: {_train_line(r['train_supervised'])}",
                  f"- `{r['eval_student']['command']}` (and the same for the other two runs): "
                  f"{int(m['labelled_clips'])} of {int(m['clips'])} held-out clips have a sounding object (the label: "
                  "the kind of the object sounding in most of the clip's frames, 12 kinds); figure: "
                  f"`{r['eval_student']['figure']}`",
                  "",
                  "| model | input | top-1 | top-5 | linear probe of its features | agreement with the teacher |",
                  "|---|---|---|---|---|---|",
                  f"| visual teacher (labels on frames) | frames | {ev['teacher']['teacher_acc']:.3f} | – | – | – |"]
        for key, label in (("student", "student, distilled (no labels)"), ("supervised", "student, supervised (upper bound)")):
            x = ev[key]
            agree = f"{x['agreement']:.3f}" if "agreement" in x else "– (no teacher)"
            lines.append(f"| {label} | sound | {x['student_acc']:.3f} | {x['student_top5_acc']:.3f} | "
                         f"{x.get('probe_acc', float('nan')):.3f} | {agree} |")
        lines += [f"| chance (1 / 12) / most frequent label | – | {m['chance']:.3f} / {m['prior_acc']:.3f} | | | |", "",
                  "Linear probe: a logistic regression (torch LBFGS) on the frozen student features of the held-out "
                  f"clips of half the videos (by id), scored on the other half ({int(m.get('probe_clips', 0))} clips).", ""]
    if "speech" in results:
        r = results["speech"]
        p = r["speaker_pairs"]
        spk = lambda info: ", ".join(f"{k} ({v['files']} files, {v['seconds']:.0f} s)"  # noqa: E731
                                     for k, v in info["speakers"].items())
        lines += ["### Separation of real speech, audio-only, unseen speakers (no bar: a report)", "",
                  f"- Train speakers: {spk(r['train_data'])}. Clips: `{r['train_data']['command']}`.",
                  f"- Test speakers (never in training): {spk(r['test_data'])}. Clips every 0.5 s: "
                  f"`{r['test_data']['command']}`.",
                  f"- {_train_line(r['train'])}",
                  f"- **SI-SDRi {p['si_sdri']:.2f} dB** (median {p['si_sdri_median']:.2f}), "
                  f"over all {p['mixtures']} two-speaker mixtures of test clips of different speakers "
                  f"({p['clips']} clips; PIT; mean over both speakers). Per speaker pair: "
                  + ", ".join(f"{k} {v:+.2f}" for k, v in p["per_speaker_pair"].items()) + ".",
                  f"- Training speech is 8 kHz telephone prompts for {sum(v['seconds'] for k, v in r['train_data']['speakers'].items() if k.startswith('asterisk')) / 60:.0f} "
                  "of its minutes (two speakers); the test speakers are 16-24 kHz read speech, resampled to 16 kHz.",
                  ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "bench-out" / "quality"), help="default: bench-out/quality/")
    ap.add_argument("--only", nargs="+", choices=TASKS, help="run only these experiments (default: all)")
    ap.add_argument("--write", help="rewrite the quality section of this Markdown file (BENCHMARKS.md)")
    ap.add_argument("--train-videos", type=int, default=3000)
    ap.add_argument("--heldout-videos", type=int, default=120)
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--heldout-seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per scene (2 clips of 2 s)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--max-objects", type=int, default=3)
    ap.add_argument("--loc-preset", default="tiny")
    ap.add_argument("--loc-epochs", type=int, default=4)
    ap.add_argument("--loc-lr", type=float, default=1e-3)
    ap.add_argument("--loc-lr-schedule", choices=("cosine", "constant"),
                    help="localization's --lr-schedule (default: avray train's, constant for localization)")
    ap.add_argument("--sep-preset", default="tiny")
    ap.add_argument("--sep-epochs", type=int, default=5)
    ap.add_argument("--sep-lr", type=float, default=1e-3)
    ap.add_argument("--sep-batch-size", type=int, default=8,
                    help="default 8: at about the same clips/s, more steps (5-minute runs of the tiny preset, "
                         "1 thread: 5.0 dB at batch 8, 4.4 at 16, 4.1 at 4)")
    ap.add_argument("--cap-preset", default="tiny")
    ap.add_argument("--cap-epochs", type=int, default=18)
    ap.add_argument("--cap-lr", type=float, default=1e-3)
    ap.add_argument("--cap-batch-size", type=int, default=16)
    ap.add_argument("--cap-torch-threads", type=int, default=1,
                    help="default 1: the tiny captioner's small LSTM steps run no faster on 2 threads "
                         "(63 vs 71 clips/s measured)")
    ap.add_argument("--cap-size", type=int, default=64, help="frame side for captioning (the tiny preset's 64 px)")
    ap.add_argument("--ret-preset", default="tiny")
    ap.add_argument("--ret-epochs", type=int, default=8)
    ap.add_argument("--ret-lr", type=float, default=1e-3)
    ap.add_argument("--ret-batch-size", type=int, default=64,
                    help="default 64: InfoNCE's negatives are the batch's other clips")
    ap.add_argument("--ret-size", type=int, default=RET_PRESETS["tiny"].image_size,
                    help="frame side for retrieval (default: the tiny preset's)")
    ap.add_argument("--speech-epochs", type=int, default=5)
    ap.add_argument("--sn-teacher-epochs", type=int, default=3, help="soundnet: epochs of the visual teacher")
    ap.add_argument("--sn-epochs", type=int, default=3, help="soundnet: epochs of the distilled and supervised students")
    ap.add_argument("--sn-lr", type=float, default=2e-3)
    ap.add_argument("--sn-batch-size", type=int, default=32)
    ap.add_argument("--sn-size", type=int, default=64, help="frame side for soundnet's teacher (the tiny preset's 64 px)")
    ap.add_argument("--vqa-preset", default="tiny")
    ap.add_argument("--vqa-epochs", type=int, default=10)
    ap.add_argument("--vqa-lr", type=float, default=2e-3)
    ap.add_argument("--vqa-batch-size", type=int, default=32)
    ap.add_argument("--vqa-size", type=int, default=64, help="frame side for question answering (the tiny preset's 64 px)")
    ap.add_argument("--torch-threads", type=int, default=2,
                    help="avray train --torch-threads (default 2: this machine's cores; Ray Data prepares "
                         "batches beside the worker)")
    ap.add_argument("--val-fraction", type=float, default=0.03,
                    help="avray train's validation share for separation, captioning and speech (default 0.03: "
                         "per-epoch validation is time inside the training budget; the bars use the held-out set)")
    ap.add_argument("--eval-only", action="store_true",
                    help="keep the trained runs (and their recorded training) and only evaluate again")
    ap.add_argument("--parallel", action="store_true",
                    help="train the AV and audio-only separators at the same time (one core each)")
    args = ap.parse_args()

    work = Path(args.workdir)
    (work / "results").mkdir(parents=True, exist_ok=True)
    todo = args.only or list(TASKS)
    if args.eval_only:
        for name in todo:
            old = json.loads((work / "results" / f"{name}.json").read_text())
            for key, rec in old.items():
                if key.startswith("train") and isinstance(rec, dict) and "checkpoint" in rec:
                    REUSE[Path(rec["checkpoint"]).parent.name] = rec
    train_clips, c_train = synth_data(work, "train", args.train_videos, args.train_seed, args)
    held, c_held = synth_data(work, "heldout", args.heldout_videos, args.heldout_seed, args)
    runners = {"localization": run_localization, "separation": run_separation, "captioning": run_captioning,
               "vqa": run_vqa, "retrieval": run_retrieval, "soundnet": run_soundnet}
    for name in todo:
        print(f"== {name}", flush=True)
        res = run_speech(work, args) if name == "speech" else runners[name](work, args, train_clips, held)
        (work / "results" / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))

    import pyarrow.parquet as pq
    results = {n: json.loads((work / "results" / f"{n}.json").read_text())
               for n in TASKS if (work / "results" / f"{n}.json").exists()}
    meta = {"data_commands": c_train + c_held, "heldout_seed": args.heldout_seed,
            "train_clips": pq.read_table(str(train_clips), columns=["video_id"]).num_rows,
            "heldout_clips": pq.read_table(str(held), columns=["video_id"]).num_rows}
    md = report(work, results, meta)
    print(md)
    if args.write:
        write_section(Path(args.write), "quality", md)


if __name__ == "__main__":
    main()
