"""SoundNet: teacher / student shapes, the distillation loss against hand-computed values, labels
from scene ground truth, the teacher-weights files (a random torchvision resnet18 saved here:
nothing is downloaded), the linear probe, and the served answer for sound-only uploads."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from jobs.tasks import get
from jobs.tasks.base import RequestError
from jobs.tasks.soundnet import clip_labels, video_groups
from models.checkpoint import save_checkpoint
from models.encoders import AudioEncoderConfig
from models.soundnet import (KINDS, PRESETS, SoundNet, SoundNetConfig, TeacherConfig, distillation_loss,
                             labelled_cross_entropy, linear_probe, soundnet_loss, teacher_log_probs, with_teacher_weights)
from pipelines.clipsettings import ClipSettings

TASK = get("soundnet")
SETTINGS = ClipSettings(clip_seconds=1.0, fps=5.0, size=56)
LIMITS = {"max_pixels": 1920 * 1080, "max_seconds": 60.0}


def test_kinds_are_the_twelve_sound_table_kinds():
    assert len(KINDS) == 12 and KINDS[0] == "red circle" and KINDS[-1] == "yellow triangle"


def test_shapes_of_teachers_and_student():
    torch.manual_seed(0)
    frames, mel = torch.rand(3, 5, 3, 40, 40), torch.randn(3, 64, 37)  # odd sizes: T = 5, 40 px, N = 37
    tiny = SoundNet(SoundNetConfig())
    assert tiny.teacher_logits(frames).shape == (3, 1, 12)
    assert tiny(mel).shape == (3, 12) and tiny.features(mel).shape == (3, 64)
    res = SoundNet(SoundNetConfig(classes=("a", "b", "c"), teacher=TeacherConfig(arch="resnet18", frame_stride=2),
                                  student=AudioEncoderConfig(arch="tiny", width=8)))
    assert res.teacher_logits(frames).shape == (3, 5, 3)  # one per frame given (prepare strides)
    assert res(mel).shape == (3, 3) and res.features(mel).shape == (3, 32)
    teacher = SoundNet(PRESETS["tiny-teacher"])
    assert teacher.student is None and teacher.head is None
    with pytest.raises(ValueError, match="has no audio student"):
        teacher(mel)
    supervised = SoundNet(PRESETS["tiny-supervised"])
    assert supervised.teacher is None
    with pytest.raises(ValueError, match="of mode 'supervised' has no visual teacher"):
        supervised.teacher_logits(frames)
    with pytest.raises(ValueError, match="unknown mode 'x'"):
        SoundNetConfig(mode="x")


def test_teacher_log_probs_average_the_frames_distributions():
    logits = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0]]])  # (1, T=2, C=2): [.25, .75] and [.75, .25]
    assert torch.allclose(teacher_log_probs(logits).exp(), torch.tensor([[0.5, 0.5]]))
    # at τ = 2 the frame logits halve: softmax([0, ln 3 / 2]) = [1 / (1 + √3), √3 / (1 + √3)]
    one = teacher_log_probs(logits[:, :1], temperature=2.0).exp()
    assert torch.allclose(one, torch.tensor([[1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]]))


def test_distillation_loss_against_hand_computed_values():
    teacher = torch.tensor([[[0.0, math.log(3)]], [[0.0, 0.0]]])  # p_t = [.25, .75] and [.5, .5]
    student = torch.tensor([[0.0, 0.0], [0.0, math.log(3)]])  # p_s = [.5, .5] and [.25, .75]
    kl1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.130812
    kl2 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.143841
    assert distillation_loss(student, teacher, 1.0).item() == pytest.approx((kl1 + kl2) / 2, abs=1e-6)
    # τ = 2: p_t = softmax([0, ln 3 / 2]) vs uniform, times τ² = 4; the second row's teacher is uniform
    a = 1 / (1 + math.sqrt(3))
    kl_t1 = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)
    kl_t2 = 0.5 * math.log(0.5 / a) + 0.5 * math.log(0.5 / (1 - a))
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(4 * (kl_t1 + kl_t2) / 2, abs=1e-6)
    assert distillation_loss(student, student[:, None], 3.0).item() == pytest.approx(0.0, abs=1e-7)  # p_t = p_s


def test_labelled_cross_entropy_leaves_unlabelled_rows_out():
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]))
    loss = labelled_cross_entropy(logp, torch.tensor([1, -1, 0]))
    assert loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.9)) / 2, abs=1e-6)
    none = labelled_cross_entropy(logp.requires_grad_(), torch.tensor([-1, -1, -1]))
    assert none.item() == 0.0 and none.requires_grad


def test_distillation_reads_no_label_and_leaves_the_frozen_teacher_alone():
    torch.manual_seed(0)
    model = SoundNet(PRESETS["tiny"]).train()
    assert not model.teacher.training and model.student.training
    assert all(not p.requires_grad for p in model.teacher.parameters())
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    model.head[0].p = 0.0  # no dropout: the two losses must match exactly
    batch = {"frames": torch.rand(4, 5, 3, 40, 40), "logmel": torch.randn(4, 64, 37),
             "label": torch.tensor([0, 3, -1, 11])}
    loss = soundnet_loss(model, batch, model.cfg)["loss"]
    other = soundnet_loss(model, {**batch, "label": torch.full((4,), -1)}, model.cfg)["loss"]
    assert loss.item() == other.item() > 0
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(p.grad is not None for p in model.student.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())  # BN statistics too


def test_every_mode_trains_inside_distributed_data_parallel(tmp_path):
    """Ray Train wraps the model in DistributedDataParallel when it has several workers: the loss
    only calls the wrapper (no attribute of the model behind it), so every mode steps through it."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        batch = {"frames": torch.rand(4, 5, 3, 40, 40), "logmel": torch.randn(4, 64, 37),
                 "label": torch.tensor([0, 3, -1, 11])}
        for preset in ("tiny-teacher", "tiny", "tiny-supervised"):
            torch.manual_seed(0)
            cfg = PRESETS[preset]
            wrapped = DistributedDataParallel(SoundNet(cfg).train())
            loss = soundnet_loss(wrapped, batch, cfg)["loss"]
            loss.backward()
            trained = wrapped.module.teacher if cfg.mode == "teacher" else wrapped.module.student
            assert loss.item() > 0 and all(p.grad is not None for p in trained.parameters()), preset
    finally:
        dist.destroy_process_group()


def test_clip_labels_are_the_dominant_sounding_kind(tmp_path):
    from pipelines.decode import DecodeConfig
    from pipelines.groundtruth import clip_targets
    from pipelines.synth import ground_truth, make_scene

    gts = [ground_truth(make_scene(3, i, seconds=2.0, size=64)) for i in range(3)]
    silent = json.loads(json.dumps(gts[0]))
    for o in silent["objects"]:
        o["sounding"] = [False] * len(o["sounding"])
    batch = {"video_id": np.array(["0a" * 8, "0b" * 8, "0c" * 8, "ff" * 8, "0d" * 8], object),
             "ground_truth": np.array([json.dumps(g) for g in gts] + [None, json.dumps(silent)], object),
             "start_s": np.array([0.0, 1.0, 0.0, 0.0, 0.0]), "fps": np.full(5, 5.0),
             "frames_shape": np.array([[5, 56, 56, 3]] * 5)}
    labels = clip_labels(batch, KINDS)
    expected = []
    for g, s in zip(gts, (0.0, 1.0, 0.0)):
        t = clip_targets(g, s, 5, DecodeConfig(fps=5.0, size=64))
        expected.append(KINDS.index(f"{t.colours[t.dominant]} {t.shapes[t.dominant]}"))
    assert labels.tolist() == expected + [-1, -1] and labels.dtype == np.int64
    assert video_groups(batch["video_id"]).tolist() == [0x0a0a0a0a, 0x0b0b0b0b, 0x0c0c0c0c, 0xffffffff, 0x0d0d0d0d]


def _random_resnet18(path, fc: bool = True):
    from torchvision.models import resnet18

    torch.manual_seed(1)
    state = resnet18(weights=None).state_dict()
    if not fc:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save(state, path)
    return state


def test_teacher_weights_from_a_torchvision_classifier_with_its_fc(tmp_path):
    from jobs.train import TrainConfig, model_config

    state = _random_resnet18(tmp_path / "r18.pth")
    common = {"task": "soundnet", "data": "-", "out": "-"}
    cfg = model_config(TrainConfig(**common, preset="paper", teacher_weights=str(tmp_path / "r18.pth")))
    assert len(cfg.classes) == 1000 and cfg.classes[0] == "tench" and cfg.classes[-1] == "toilet tissue"
    assert cfg.teacher == TeacherConfig(arch="resnet18", frame_stride=8, weights=str(tmp_path / "r18.pth"))
    model = SoundNet(cfg)
    assert torch.equal(model.teacher.net.fc.weight, state["fc.weight"]) and torch.equal(model.teacher.net.conv1.weight,
                                                                                         state["conv1.weight"])
    _random_resnet18(tmp_path / "trunk.pth", fc=False)
    with pytest.raises(ValueError, match="has no fc.weight / fc.bias: a teacher needs the whole torchvision classifier"):
        model_config(TrainConfig(**common, preset="paper", teacher_weights=str(tmp_path / "trunk.pth")))
    with pytest.raises(ValueError, match="distills a frozen visual teacher: give --teacher-weights"):
        model_config(TrainConfig(**common, preset="tiny"))
    with pytest.raises(ValueError, match="not of mode 'supervised'"):
        model_config(TrainConfig(**common, preset="tiny-supervised", teacher_weights=str(tmp_path / "r18.pth")))
    with pytest.raises(ValueError, match="applies to models with a visual teacher"):
        model_config(TrainConfig(**{**common, "task": "localization"}, teacher_weights=str(tmp_path / "r18.pth")))
    with pytest.raises(FileNotFoundError, match="teacher weights file not found"):
        model_config(TrainConfig(**common, preset="tiny", teacher_weights=str(tmp_path / "none.pth")))


def test_teacher_weights_from_a_tiny_teacher_run(tmp_path):
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny-teacher"], classes=("a", "b", "c"), teacher=TeacherConfig(width=8))
    teacher = SoundNet(cfg)
    path = save_checkpoint(tmp_path / "teacher.pt", "soundnet", teacher, cfg, extra={"epoch": 0})
    student_cfg = with_teacher_weights(PRESETS["tiny"], str(path))
    assert student_cfg.classes == ("a", "b", "c") and student_cfg.teacher == TeacherConfig(width=8, weights=str(path))
    student = SoundNet(student_cfg)
    assert all(torch.equal(a, b) for a, b in zip(teacher.teacher.state_dict().values(),
                                                 student.teacher.state_dict().values()))
    sup = save_checkpoint(tmp_path / "sup.pt", "soundnet", SoundNet(PRESETS["tiny-supervised"]), PRESETS["tiny-supervised"])
    with pytest.raises(ValueError, match="mode 'supervised'.*not a soundnet teacher"):
        with_teacher_weights(PRESETS["tiny"], str(sup))


def test_linear_probe():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    y = torch.arange(3).repeat(20)  # (60,)
    x = centres[y] + 0.3 * torch.randn(60, 3, generator=g)
    assert linear_probe(x[:30], y[:30], x[30:], y[30:], 3) == 1.0
    # constant features: only the bias learns, the training rows' majority (class 0) is always predicted
    flat = torch.ones(4, 5)
    assert linear_probe(flat, torch.tensor([0, 0, 0, 1]), flat[:3], torch.tensor([0, 1, 1]), 2) == pytest.approx(1 / 3)


def test_served_sound_only_uploads_and_answers(tmp_path):
    from tests.mediagen import write_audio_only, write_video

    torch.manual_seed(0)
    cfg = PRESETS["tiny-supervised"]
    model = SoundNet(cfg).eval()
    wav = write_audio_only(tmp_path / "a.wav", seconds=2.5)
    item, meta = TASK.from_upload(wav.read_bytes(), cfg, SETTINGS, options={}, **LIMITS)
    assert set(item) == {"logmel"} and item["logmel"].shape == (2, 64, 101)  # 2 clips of 1 s (the tail dropped)
    assert meta["starts"] == [0.0, 1.0] and meta["classes"] == KINDS
    (probs,) = TASK.infer(model, [item], torch.device("cpu"))
    assert probs.shape == (2, 12) and np.allclose(probs.sum(1), 1, atol=1e-5)
    silent = write_video(tmp_path / "silent.mp4", seconds=1.0, audio=False)
    with pytest.raises(RequestError, match="the video has no audio stream") as e:
        TASK.from_upload(silent.read_bytes(), cfg, SETTINGS, options={}, **LIMITS)
    assert e.value.status == 422

    p = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32)  # mean: [0.3, 0.4, 0.3]
    body = TASK.answer(p, {"classes": ("a", "b", "c"), "starts": [0.0, 1.0], "fps": 5.0, "frames_per_clip": 5}, {}).body
    assert body == {"top5": [{"class": "b", "probability": 0.4}, {"class": "a", "probability": 0.3},
                             {"class": "c", "probability": 0.3}],
                    "clips": [{"start_s": 0.0, "end_s": 1.0, "top5": [{"class": "b", "probability": 0.6},
                                                                   {"class": "c", "probability": 0.3},
                                                                   {"class": "a", "probability": 0.1}]},
                              {"start_s": 1.0, "end_s": 2.0, "top5": [{"class": "a", "probability": 0.5},
                                                                   {"class": "c", "probability": 0.3},
                                                                   {"class": "b", "probability": 0.2}]}]}


def test_evaluate_scores_the_student_the_teacher_and_their_agreement():
    torch.manual_seed(0)
    model = SoundNet(PRESETS["tiny"]).eval()
    batch = {"frames": torch.rand(6, 5, 3, 40, 40), "logmel": torch.randn(6, 64, 37),
             "label": torch.tensor([0, 3, -1, 11, 5, 5]), "group": torch.tensor([0, 0, 1, 1, 2, 3])}
    m = TASK.evaluate(model, [batch], model.cfg)
    with torch.no_grad():
        s, t = model(batch["logmel"]).argmax(1), model.teacher_logits(batch["frames"])[:, 0].argmax(1)
    keep = batch["label"] >= 0
    assert m["clips"] == 6.0 and m["labelled_clips"] == 5.0 and m["chance"] == 1 / 12 and m["prior_acc"] == 2 / 5
    assert m["student_acc"] == float((s[keep] == batch["label"][keep]).float().mean())
    assert m["teacher_acc"] == float((t[keep] == batch["label"][keep]).float().mean())
    assert m["agreement"] == float((s == t).float().mean())
    assert m["probe_clips"] == 2.0 and 0.0 <= m["probe_acc"] <= 1.0  # groups 1 and 3 are scored: clips 3 and 5
    assert TASK.headline(m).startswith(f"names the sounding object from sound alone in {m['student_acc']:.0%}")
    with torch.no_grad():  # KL(teacher || student) at τ = 1, averaged over the clips
        p_t = teacher_log_probs(model.teacher_logits(batch["frames"])).exp()  # (6, C)
        p_s = torch.softmax(model(batch["logmel"]), 1)
        kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert m["kl_teacher_student"] == pytest.approx(float(kl), rel=1e-5)
    # no clip labelled (real video, an ImageNet teacher): agreement and KL are still scored
    none = TASK.evaluate(model, [{**batch, "label": torch.full((6,), -1)}], model.cfg)
    assert set(none) == {"clips", "labelled_clips", "chance", "agreement", "kl_teacher_student"}
    assert (none["agreement"], none["kl_teacher_student"]) == (m["agreement"], m["kl_teacher_student"])
    assert TASK.headline(none) == (f"agrees with its visual teacher on {m['agreement']:.0%} of clips "
                                   f"(KL {m['kl_teacher_student']:.2f}; 6 clips, none labelled)")


def test_prepare_decodes_what_the_mode_reads_and_strides_the_teachers_frames():
    from pipelines.schema import encode_tensor

    frames = np.arange(2 * 5 * 8 * 8 * 3, dtype=np.uint32).astype(np.uint8).reshape(2, 5, 8, 8, 3)  # (B, T, H, W, 3)
    mel = np.random.default_rng(0).standard_normal((2, 64, 21)).astype(np.float32)
    enc = {"frames": [encode_tensor("frames", f) for f in frames], "logmel": [encode_tensor("logmel", m) for m in mel]}
    batch = {"video_id": np.array(["00000001" * 2, "00000002" * 2], object), "start_s": np.zeros(2), "fps": np.full(2, 5.0),
             "ground_truth": np.array([None, None], object),
             **{k: np.array([b for b, _ in v], object) for k, v in enc.items()},
             **{f"{k}_shape": np.array([s for _, s in v]) for k, v in enc.items()}}
    cfg = replace(PRESETS["paper"], teacher=TeacherConfig(arch="resnet18", frame_stride=2))
    x = TASK.prepare(batch, cfg)
    assert set(x) == {"frames", "logmel", "label", "group"} and x["frames"].shape == (2, 3, 3, 8, 8)
    np.testing.assert_array_equal(x["frames"], np.moveaxis(frames[:, ::2], -1, 2))  # frames 0, 2, 4, channels first
    np.testing.assert_array_equal(x["logmel"], mel)
    assert x["label"].tolist() == [-1, -1] and x["group"].tolist() == [1, 2]
    assert set(TASK.prepare(batch, cfg, targets=False, sound_only=True)) == {"logmel"}
    assert set(TASK.prepare(batch, PRESETS["tiny-supervised"])) == {"logmel", "label", "group"}
    assert set(TASK.prepare(batch, PRESETS["tiny-teacher"], targets=False)) == {"frames"}
