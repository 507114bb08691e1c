"""Shared encoders: a visual CNN over RGB frames and an audio CNN over log-mel spectrograms.

Both expose the timm-style split the task models share:

- `forward_features(x)` -> a spatial feature grid `(B, D, h, w)` (localization attends over it),
- `forward_head(grid)` -> one vector `(B, D)` per sample (global pooling),
- `forward(x) = forward_head(forward_features(x))`.

Architectures (torchvision building blocks, `weights=None` always; pretrained weights come only
from a local state-dict file named in the config):

- visual "resnet18": torchvision ResNet-18 trunk up to `layer4`, D = 512, stride 32.
- visual "tiny": a small ResNet (stem + 3 stages of torchvision `BasicBlock`), D = 4 * width,
  stride 8, so a 64 px frame still gives an 8 x 8 grid.
- audio "tiny": the same small ResNet on 1 channel; audio "resnet18": ResNet-18 with a 1-channel
  stem (as EZ-VSL); audio "vggish": the VGGish conv stack (64-128-256-256-512-512, 4 max-pools).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock, conv1x1

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VISUAL_ARCHS = ("resnet18", "tiny")
AUDIO_ARCHS = ("tiny", "vggish", "resnet18")


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` torchvision BasicBlocks; the first one changes width/stride via a 1x1 shortcut."""
    down = None
    if stride != 1 or inplanes != planes:
        down = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
    layers = [BasicBlock(inplanes, planes, stride=stride, downsample=down)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _tiny_resnet(in_ch: int, width: int) -> nn.Sequential:
    """Stem (3x3, stride 2) + stages of width (w, 2w, 4w) at strides (1, 2, 2): total stride 8."""
    return nn.Sequential(
        nn.Conv2d(in_ch, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        _stage(width, width, 1, 1),
        _stage(width, 2 * width, 1, 2),
        _stage(2 * width, 4 * width, 1, 2),
    )


def _resnet18_trunk(in_ch: int = 3) -> nn.Module:
    """torchvision resnet18 without avgpool/fc (state-dict keys stay `conv1.*`, `layer1.*`, ...)."""
    net = resnet18(weights=None)
    if in_ch != 3:
        net.conv1 = nn.Conv2d(in_ch, 64, kernel_size=7, stride=2, padding=3, bias=False)
    del net.avgpool, net.fc
    return net


def _run_resnet_trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _vggish(in_ch: int = 1) -> nn.Sequential:
    """VGGish conv stack (Hershey et al. 2017) with BatchNorm; D = 512, stride 16."""
    layers: list[nn.Module] = []
    ch = in_ch
    for group in ((64,), (128,), (256, 256), (512, 512)):
        for out in group:
            layers += [nn.Conv2d(ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            ch = out
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


def load_resnet18_trunk_weights(trunk: nn.Module, path: str | Path) -> None:
    """Load a LOCAL torchvision resnet18 state dict into `trunk` (strict on trunk keys; `fc.*` and a
    DataParallel `module.` prefix are ignored). Never downloads anything.

    Raises FileNotFoundError if `path` is missing and ValueError if the keys or shapes mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"visual weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    expected = set(trunk.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} is not a torchvision resnet18 state dict: missing keys {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    try:
        trunk.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{path} does not match the resnet18 trunk: {e}") from e


@dataclass(frozen=True)
class VisualEncoderConfig:
    """Visual encoder. `arch`: "resnet18" | "tiny"; `width`: base width of "tiny" (D = 4 * width);
    `out_dim`: if set, a 1x1 conv projects the grid to this width (D = out_dim);
    `weights`: path to a LOCAL torchvision resnet18 state dict (arch "resnet18" only), or None."""

    arch: str = "resnet18"
    width: int = 32
    out_dim: int | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.arch not in VISUAL_ARCHS:
            raise ValueError(f"unknown visual arch {self.arch!r}; expected one of {VISUAL_ARCHS}")
        if self.weights is not None and self.arch != "resnet18":
            raise ValueError("visual weights files are torchvision resnet18 state dicts: arch must be 'resnet18'")


class VisualEncoder(nn.Module):
    """RGB frames float (B, 3, H, W) in [0, 1] -> grid (B, D, h, w) -> vector (B, D).

    ImageNet mean/std normalisation happens inside: callers pass uint8 frames / 255 (as the tasks'
    `prepare` + `to_model` give them, jobs/tasks/base.py).
    Grid size: h = ceil(H / 32) for resnet18, ceil(H / 8) for tiny.
    """

    def __init__(self, cfg: VisualEncoderConfig = VisualEncoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.arch == "resnet18":
            self.trunk = _resnet18_trunk(3)
            trunk_dim, self.stride = 512, 32
            if cfg.weights is not None:
                load_resnet18_trunk_weights(self.trunk, cfg.weights)
        else:
            self.trunk = _tiny_resnet(3, cfg.width)
            trunk_dim, self.stride = 4 * cfg.width, 8
        self.proj = nn.Identity() if cfg.out_dim is None else nn.Conv2d(trunk_dim, cfg.out_dim, 1)
        self.out_dim = trunk_dim if cfg.out_dim is None else cfg.out_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: float (B, 3, H, W) in [0, 1] -> float grid (B, D, h, w)."""
        x = (frames - self.mean) / self.std
        x = _run_resnet_trunk(self.trunk, x) if self.cfg.arch == "resnet18" else self.trunk(x)
        return self.proj(x)

    def frame_cells(self, frames: torch.Tensor, max_frames: int) -> torch.Tensor:
        """frames float (B, T, 3, H, W) in [0, 1] (or (B, 3, H, W): T = 1) -> every frame's grid
        cells with their position: float (B, T, h*w, D + 2), row-major over cells, the last two
        channels each cell's (x, y) in [-1, 1] (what attention over the grid needs to say where).
        More than `max_frames` frames is a ValueError (a model's time embedding has that many)."""
        if frames.dim() == 4:
            frames = frames.unsqueeze(1)  # (B, 1, 3, H, W)
        B, T = frames.shape[:2]
        if T > max_frames:
            raise ValueError(f"{T} frames exceed max_frames={max_frames}")
        grid = self.forward_features(rearrange(frames, "b t c h w -> (b t) c h w"))  # (B*T, D, h, w)
        h, w = grid.shape[-2:]
        cells = rearrange(grid, "(b t) d h w -> b t (h w) d", b=B)  # (B, T, h*w, D)
        ys = torch.linspace(-1.0, 1.0, h, device=grid.device, dtype=grid.dtype) if h > 1 else grid.new_zeros(1)
        xs = torch.linspace(-1.0, 1.0, w, device=grid.device, dtype=grid.dtype) if w > 1 else grid.new_zeros(1)
        coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2): (x, y) per cell
        coords = rearrange(coords, "h w c -> (h w) c").expand(B, T, h * w, 2)  # (B, T, h*w, 2)
        return torch.cat([cells, coords], dim=-1)

    def forward_head(self, grid: torch.Tensor) -> torch.Tensor:
        """grid: (B, D, h, w) -> (B, D) by global average pooling."""
        return grid.mean(dim=(-2, -1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: float (B, 3, H, W) in [0, 1] -> float (B, D)."""
        return self.forward_head(self.forward_features(frames))


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Audio encoder over log-mel (B, M, N). `arch`: "tiny" | "vggish" | "resnet18";
    `width`: base width of "tiny" (D = 4 * width); `out_dim`: optional 1x1 projection width;
    `pool`: "avg" | "max" global pooling in `forward_head` (EZ-VSL max-pools its audio)."""

    arch: str = "tiny"
    width: int = 16
    out_dim: int | None = None
    pool: str = "avg"

    def __post_init__(self) -> None:
        if self.arch not in AUDIO_ARCHS:
            raise ValueError(f"unknown audio arch {self.arch!r}; expected one of {AUDIO_ARCHS}")
        if self.pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")


class AudioEncoder(nn.Module):
    """Log-mel float (B, M, N) -> grid (B, D, m, n) -> vector (B, D).

    The log-mel enters through a BatchNorm over its single channel (learned level/scale, running
    statistics in eval), then a 1-channel CNN. Stride: 8 (tiny), 16 (vggish), 32 (resnet18).
    """

    def __init__(self, cfg: AudioEncoderConfig = AudioEncoderConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_norm = nn.BatchNorm2d(1)
        if cfg.arch == "resnet18":
            self.trunk, trunk_dim = _resnet18_trunk(1), 512
        elif cfg.arch == "vggish":
            self.trunk, trunk_dim = _vggish(1), 512
        else:
            self.trunk, trunk_dim = _tiny_resnet(1, cfg.width), 4 * cfg.width
        self.stride = {"resnet18": 32, "vggish": 16, "tiny": 8}[cfg.arch]
        self.proj = nn.Identity() if cfg.out_dim is None else nn.Conv2d(trunk_dim, cfg.out_dim, 1)
        self.out_dim = trunk_dim if cfg.out_dim is None else cfg.out_dim

    def forward_features(self, logmel: torch.Tensor) -> torch.Tensor:
        """logmel: float (B, M, N) -> float grid (B, D, m, n)."""
        x = self.input_norm(rearrange(logmel, "b m n -> b 1 m n"))  # (B, 1, M, N)
        x = _run_resnet_trunk(self.trunk, x) if self.cfg.arch == "resnet18" else self.trunk(x)
        return self.proj(x)

    def forward_head(self, grid: torch.Tensor) -> torch.Tensor:
        """grid: (B, D, m, n) -> (B, D) by global average or max pooling (`cfg.pool`)."""
        if self.cfg.pool == "max":
            return F.adaptive_max_pool2d(grid, 1).flatten(1)  # (B, D)
        return grid.mean(dim=(-2, -1))

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """logmel: float (B, M, N) -> float (B, D)."""
        return self.forward_head(self.forward_features(logmel))
