"""SoundNet (Aytar, Vondrick and Torralba, NeurIPS 2016): a visual teacher, an audio student.

    frames (B, T, 3, H, W) ─teacher (frozen)─▶ logits (B, T', C) ─softmax(/τ), mean over T'─▶ p_teacher (B, C)
    logmel (B, M, N) ─AudioEncoder─▶ features (B, D) ─linear─▶ logits (B, C) ─softmax(/τ)─▶ p_student
    distillation_loss = τ² KL(p_teacher || p_student)        (no audio label is ever used)

Teachers (`TeacherConfig.arch`):

- "resnet18": a torchvision ResNet-18 *classifier* (trunk and `fc` head) run on every
  `frame_stride`-th frame; its class distributions are averaged over the frames, as SoundNet
  averages its ImageNet / Places teachers over a video's frames. Its weights come from a LOCAL
  state dict (`weights`, e.g. ImageNet: then the classes are ImageNet's 1,000 categories).
- "tiny": for the synthetic scenes, where the classes are the 12 object kinds (shape, colour).
  A sounding object visibly pulses with its sound (pipelines/synth.py), so the teacher sees the
  clip's temporal mean and standard deviation per pixel (6 channels: where things are, and
  where they change) through a small ResNet; per-cell class logits are pooled by a log-mean-exp
  over cells (a soft max: one object decides). It is trained first, with labels on frames
  (`mode="teacher"`), then frozen and loaded into the student's model (`weights`: that checkpoint).

`mode`: "teacher" trains the teacher alone (cross-entropy with the clip's label on frames);
"distill" trains the student against the frozen teacher (the model holds both, so a checkpoint
can report their agreement; only the student serves); "supervised" trains the same student with
the labels (cross-entropy): the upper bound the distilled student is compared with.
`linear_probe` fits a logistic regression on frozen student features (no sklearn here: torch LBFGS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

from models.encoders import IMAGENET_MEAN, IMAGENET_STD, AudioEncoder, AudioEncoderConfig, _tiny_resnet
from pipelines.synth_audio import SOUND_TABLE

KINDS: tuple[str, ...] = tuple(f"{colour} {shape}" for shape, colour in SOUND_TABLE)  # the synthetic classes
MODES = ("distill", "teacher", "supervised")
TEACHER_ARCHS = ("tiny", "resnet18")


@dataclass(frozen=True)
class TeacherConfig:
    """The visual teacher. `arch`: "tiny" | "resnet18" (module docstring); `width`: base width of
    "tiny"; `frame_stride`: the teacher sees frames 0, k, 2k, ... of a clip; `weights`: a LOCAL
    file loaded at initialisation (`load_teacher_weights`): an avray soundnet checkpoint of
    `mode="teacher"` (its teacher) or, for "resnet18", a torchvision resnet18 state dict with
    its `fc` head. None: random (tests; a teacher being trained)."""

    arch: str = "tiny"
    width: int = 16
    frame_stride: int = 1
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.arch not in TEACHER_ARCHS:
            raise ValueError(f"unknown teacher arch {self.arch!r}; expected one of {TEACHER_ARCHS}")
        if self.width <= 0 or self.frame_stride <= 0:
            raise ValueError("teacher width and frame_stride must be positive")


@dataclass(frozen=True)
class SoundNetConfig:
    """`classes`: the class names (C); `mode`: "distill" | "teacher" | "supervised" (module
    docstring); `temperature`: τ of the softened distributions (distillation only); `dropout`
    before the student's linear head; `image_size`: the frame side the data pipeline resizes to."""

    classes: tuple[str, ...] = KINDS
    mode: str = "distill"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: AudioEncoderConfig = field(default_factory=lambda: AudioEncoderConfig(arch="tiny", width=16))
    temperature: float = 2.0
    dropout: float = 0.1
    image_size: int = 64

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"need at least 2 distinct classes, got {len(self.classes)} ({len(set(self.classes))} distinct)")
        if self.temperature <= 0 or not 0 <= self.dropout < 1:
            raise ValueError("temperature must be > 0 and dropout in [0, 1)")

    @property
    def uses_frames(self) -> bool:
        return self.mode != "supervised"

    @property
    def uses_audio(self) -> bool:
        return self.mode != "teacher"


PRESETS: dict[str, SoundNetConfig] = {
    # 77,886 student parameters (AudioEncoder tiny, width 16, + a 64 x 12 head); the teacher: 78,616, on
    # 64 px frames (the whole clip's per-pixel mean / std), trained first with the tiny-teacher preset.
    "tiny": SoundNetConfig(),
    "tiny-teacher": SoundNetConfig(mode="teacher"),
    "tiny-supervised": SoundNetConfig(mode="supervised"),
    # ResNet-18 ImageNet classifier teacher (11.7 M with 1,000 classes) at 224 px on 1 frame a second of
    # 8 fps clips (its local state dict via avray train --teacher-weights: the classes become its 1,000),
    # VGGish student (4.5 M).
    "paper": SoundNetConfig(teacher=TeacherConfig(arch="resnet18", frame_stride=8),
                            student=AudioEncoderConfig(arch="vggish"), dropout=0.5, image_size=224),
    "paper-supervised": SoundNetConfig(mode="supervised", student=AudioEncoderConfig(arch="vggish"), dropout=0.5,
                                       image_size=224),
}


class TinyTeacher(nn.Module):
    """frames float (B, T, 3, H, W) in [0, 1] -> logits (B, 1, C): the clip's per-pixel temporal
    mean and standard deviation (B, 6, H, W) through a small ResNet (stride 8), a 1x1 conv to
    per-cell class logits (B, C, h, w), log-mean-exp over the cells."""

    def __init__(self, cfg: TeacherConfig, num_classes: int) -> None:
        super().__init__()
        self.input_norm = nn.BatchNorm2d(6)
        self.trunk = _tiny_resnet(6, cfg.width)
        self.cells = nn.Conv2d(4 * cfg.width, num_classes, 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = torch.cat([frames.mean(dim=1), frames.std(dim=1, correction=0)], dim=1)  # (B, 6, H, W)
        cells = self.cells(self.trunk(self.input_norm(x))).flatten(2)  # (B, C, h·w)
        return (cells.logsumexp(dim=2) - math.log(cells.shape[2]))[:, None]  # (B, 1, C)


class ResNetTeacher(nn.Module):
    """frames float (B, T, 3, H, W) in [0, 1] -> logits (B, T, C): a torchvision ResNet-18
    classifier on each frame (ImageNet normalisation inside). State-dict keys are torchvision's
    under `net.` (conv1.*, ..., fc.*)."""

    def __init__(self, cfg: TeacherConfig, num_classes: int) -> None:
        super().__init__()
        self.net = resnet18(weights=None, num_classes=num_classes)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        B = frames.shape[0]
        x = (frames.flatten(0, 1) - self.mean) / self.std  # (B·T, 3, H, W)
        return self.net(x).unflatten(0, (B, -1))  # (B, T, C)


def _plain_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def teacher_file_kind(path: str | Path) -> tuple[str, dict]:
    """What a teacher weights file holds: ("soundnet", its checkpoint dict) for an avray soundnet
    checkpoint, ("torchvision", its state dict) for a torchvision classifier state dict with `fc`.
    Raises FileNotFoundError, and ValueError for anything else (a trunk without fc included)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights file not found: {path}")
    state = _plain_state_dict(path)
    if {"model", "config", "state_dict", "extra"} <= set(state):
        if state["model"] != "soundnet" or state["config"].get("mode") != "teacher":
            raise ValueError(f"{path} is an avray {state['model']} checkpoint (mode {state['config'].get('mode')!r}), "
                             "not a soundnet teacher (avray train --task soundnet --preset tiny-teacher)")
        return "soundnet", state
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "fc.weight" not in state or "fc.bias" not in state:
        raise ValueError(f"{path} has no fc.weight / fc.bias: a teacher needs the whole torchvision classifier, its fc "
                         "head included (--visual-weights takes a trunk; --teacher-weights a classifier)")
    return "torchvision", state


def load_teacher_weights(teacher: nn.Module, path: str | Path) -> None:
    """Load a LOCAL teacher file (`teacher_file_kind`) into `teacher` (strict). Never downloads.
    ValueError when its keys or shapes do not fit the teacher."""
    kind, data = teacher_file_kind(path)
    if kind == "soundnet":
        state = {k.removeprefix("teacher."): v for k, v in data["state_dict"].items() if k.startswith("teacher.")}
    else:
        state = {f"net.{k}": v for k, v in data.items()}
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the {type(teacher).__name__}: {e}") from e


def with_teacher_weights(cfg: SoundNetConfig, path: str) -> SoundNetConfig:
    """`cfg` (a distilling config) with its frozen teacher loaded from the LOCAL file `path`
    (`teacher_file_kind`): a soundnet teacher checkpoint gives its teacher config and classes; a
    torchvision classifier state dict makes the teacher a "resnet18" (cfg's frame_stride kept) whose
    classes are ImageNet's categories for a 1,000-way fc, else class_0 ... class_{C-1}."""
    from dataclasses import replace

    from models.checkpoint import config_from_dict

    if cfg.mode != "distill":
        raise ValueError(f"teacher weights give the frozen teacher of a distilling preset (mode 'distill'), not of "
                         f"mode {cfg.mode!r}")
    kind, data = teacher_file_kind(path)
    if kind == "soundnet":
        taught = config_from_dict(SoundNetConfig, data["config"])
        return replace(cfg, classes=taught.classes, teacher=replace(taught.teacher, weights=str(path)))
    n = int(data["fc.weight"].shape[0])
    if n == 1000:
        from torchvision.models import ResNet18_Weights  # its metadata is in the package: nothing is downloaded

        classes = tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    else:
        classes = tuple(f"class_{i}" for i in range(n))
    return replace(cfg, classes=classes, teacher=replace(cfg.teacher, arch="resnet18", weights=str(path)))


class SoundNet(nn.Module):
    """The modules of `cfg.mode`: `teacher` (modes teacher, distill; frozen and always in eval
    mode in distill), `student` + `head` (modes distill, supervised)."""

    def __init__(self, cfg: SoundNetConfig = SoundNetConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        C = len(cfg.classes)
        self.teacher = self.student = self.head = None
        if cfg.uses_frames:
            self.teacher = (TinyTeacher if cfg.teacher.arch == "tiny" else ResNetTeacher)(cfg.teacher, C)
            if cfg.teacher.weights is not None:
                load_teacher_weights(self.teacher, cfg.teacher.weights)
            if cfg.mode == "distill":
                self.teacher.requires_grad_(False).eval()
        if cfg.uses_audio:
            self.student = AudioEncoder(cfg.student)
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.student.out_dim, C))

    def train(self, mode: bool = True) -> "SoundNet":
        super().train(mode)
        if self.cfg.mode == "distill":
            self.teacher.eval()  # frozen: its BatchNorm statistics stay those it was trained with
        return self

    def teacher_logits(self, frames: torch.Tensor) -> torch.Tensor:
        """frames float (B, T, 3, H, W) in [0, 1], the frames the teacher sees (the task's `prepare`
        gives every `teacher.frame_stride`-th frame of a clip) -> logits (B, T', C): T' = T for
        resnet18, 1 for tiny."""
        if self.teacher is None:
            raise ValueError(f"a soundnet model of mode {self.cfg.mode!r} has no visual teacher")
        return self.teacher(frames)

    def features(self, logmel: torch.Tensor) -> torch.Tensor:
        """logmel float (B, M, N) -> the student's pooled features (B, D) (what the linear probe reads)."""
        if self.student is None:
            raise ValueError("a soundnet teacher (mode 'teacher') has no audio student: it classifies frames, not sound")
        return self.student(logmel)

    def forward(self, logmel: torch.Tensor | None = None, frames: torch.Tensor | None = None) -> torch.Tensor:
        """logmel float (B, M, N) -> the student's class logits (B, C), from the sound alone; or
        frames (and no logmel) -> the teacher's logits (B, T', C) (`teacher_logits`). Both go through
        forward so that a DistributedDataParallel wrapper (Ray Train with several workers) sees
        every pass: training code calls the model, never its methods."""
        if logmel is None:
            if frames is None:
                raise ValueError("SoundNet needs logmel (the student) or frames (the teacher)")
            return self.teacher_logits(frames)
        return self.head(self.features(logmel))


def teacher_log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-frame teacher logits (B, T, C) -> log of the frames' mean class distribution at
    temperature τ: log(1/T Σ_t softmax(logits_t / τ)) (B, C), float32."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, C)
    return logp.logsumexp(dim=1) - math.log(logits.shape[1])


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² KL(p_teacher || p_student), averaged over the batch (Hinton et al. 2015's τ² keeps the
    gradient scale of τ = 1). student_logits (B, C); teacher_logits (B, T, C) (`teacher_log_probs`)."""
    log_t = teacher_log_probs(teacher_logits, temperature)  # (B, C)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def labelled_cross_entropy(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of log_probs (B, C) at labels (B,) int64 over labelled rows (label >= 0); 0 (with
    a gradient) when none is labelled."""
    keep = labels >= 0
    if not keep.any():
        return log_probs.sum() * 0.0
    return F.nll_loss(log_probs[keep].float(), labels[keep])


def soundnet_loss(model: nn.Module, batch: dict[str, torch.Tensor], cfg: SoundNetConfig) -> dict[str, torch.Tensor]:
    """The training loss of `cfg.mode` for `model` (a SoundNet, or the DistributedDataParallel
    wrapper of one: only its forward is called): teacher: cross-entropy of the teacher's frame
    distribution with `label`; distill: `distillation_loss` against the frozen teacher (labels
    unused); supervised: cross-entropy of the student with `label`."""
    if cfg.mode == "teacher":
        return {"loss": labelled_cross_entropy(teacher_log_probs(model(frames=batch["frames"])), batch["label"])}
    logits = model(batch["logmel"])
    if cfg.mode == "supervised":
        return {"loss": labelled_cross_entropy(F.log_softmax(logits.float(), dim=-1), batch["label"])}
    with torch.no_grad():
        teacher = model(frames=batch["frames"])
    return {"loss": distillation_loss(logits, teacher, cfg.temperature)}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, steps: int = 200, weight_decay: float = 1e-3) -> float:
    """Accuracy on (test_x, test_y) of a multinomial logistic regression fitted on (train_x,
    train_y): features (N, D) standardised with the training rows' statistics, L2 penalty
    `weight_decay`, full-batch LBFGS for up to `steps` iterations (deterministic)."""
    mean, std = train_x.mean(dim=0), train_x.std(dim=0, correction=0).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std  # (N, D)
    lin = nn.Linear(xs.shape[1], num_classes, dtype=xs.dtype)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xs), train_y) + weight_decay * lin.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((lin(xt).argmax(dim=1) == test_y).float().mean())
