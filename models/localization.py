"""Sound source localization after Senocak et al. CVPR 2018 "Learning to Localize Sound Source in
Visual Scenes", trained with either Senocak's triplet loss or the multiple-instance InfoNCE of
EZ-VSL (Mo & Morgado 2022, "Localizing Visual Sounds the Easy Way").

    frames ─VisualEncoder─▶ grid ─1x1 conv, L2─▶ visual_grid (B, E, h, w) ┐
    logmel ─AudioEncoder──▶ vec  ─linear,  L2─▶ audio (B, E) ─────────────┴▶ sim = cos per cell (B, h, w)
                                         attention = softmax(sim / tau) over cells; attended = Σ attention · visual_grid

Losses are functions of the forward output (`infonce_loss`, `triplet_loss`,
`attention_supervision_loss`, combined by `localization_loss`); `heatmap` upsamples `sim` to
image resolution for display and for the cIoU metric (`models.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

from models.encoders import AudioEncoder, AudioEncoderConfig, VisualEncoder, VisualEncoderConfig


@dataclass(frozen=True)
class LocalizationConfig:
    """Sound localizer. `embed_dim`: E, the joint embedding width; `temperature`: tau of the InfoNCE
    logits and of the attention softmax; `loss`: "infonce" | "triplet"; `margin`: triplet margin;
    `attention_weight`: weight of Senocak's supervised attention loss (0 = unsupervised; it only
    applies to clips with boxes, so unlabelled data trains the contrastive term alone);
    `audio_window_s`: seconds of log-mel around the localized frame that the audio encoder hears
    (`audio_window`; 0 = the whole clip); `image_size`: the frame side the data pipeline resizes
    to (the model accepts any size)."""

    visual: VisualEncoderConfig = field(default_factory=lambda: VisualEncoderConfig(arch="tiny", width=32))
    audio: AudioEncoderConfig = field(default_factory=lambda: AudioEncoderConfig(arch="tiny", width=16))
    embed_dim: int = 64
    temperature: float = 0.07
    loss: str = "infonce"
    margin: float = 0.5
    attention_weight: float = 0.0
    audio_window_s: float = 0.0
    image_size: int = 96

    def __post_init__(self) -> None:
        if self.loss not in ("infonce", "triplet"):
            raise ValueError(f"loss must be 'infonce' or 'triplet', got {self.loss!r}")
        if self.temperature <= 0 or self.embed_dim <= 0:
            raise ValueError("temperature and embed_dim must be positive")
        if self.audio_window_s < 0 or self.attention_weight < 0:
            raise ValueError("audio_window_s and attention_weight must be >= 0")


PRESETS: dict[str, LocalizationConfig] = {
    # ~0.4 M parameters; 96 px frames -> 12 x 12 grid; trains on 2 CPU cores in minutes. Supervised
    # attention loss at Senocak's weight 1 (semi-supervised: clips without boxes add only InfoNCE).
    # It hears the 0.5 s around the frame (in a 2 s clip, the whole clip's sound often names another
    # object than the one sounding at the frame), and tau = 0.2, not 0.07 (at 0.07 the cosine map,
    # the localization map, stays as high on the silent objects). Measurements: BENCHMARKS.md.
    "tiny": LocalizationConfig(temperature=0.2, attention_weight=1.0, audio_window_s=0.5),
    # ResNet-18 visual trunk at 224 px (7 x 7 grid), ResNet-18 audio on 1 channel, E = 512, tau = 0.03
    # (EZ-VSL's settings). Pass a local ImageNet state dict via `visual.weights` to start pretrained.
    "paper": LocalizationConfig(
        visual=VisualEncoderConfig(arch="resnet18"),
        audio=AudioEncoderConfig(arch="resnet18", pool="max"),
        embed_dim=512, temperature=0.03, image_size=224),
}


class SoundLocalizer(nn.Module):
    """Frames + log-mel -> per-cell audio-visual similarity, attention and embeddings."""

    def __init__(self, cfg: LocalizationConfig = LocalizationConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = VisualEncoder(cfg.visual)
        self.audio = AudioEncoder(cfg.audio)
        self.visual_proj = nn.Conv2d(self.visual.out_dim, cfg.embed_dim, kernel_size=1)
        self.audio_proj = nn.Linear(self.audio.out_dim, cfg.embed_dim)

    def forward(self, frames: torch.Tensor, logmel: torch.Tensor) -> dict[str, torch.Tensor]:
        """frames: float (B, 3, H, W) in [0, 1]; logmel: float (B, M, N). Returns float tensors:

        - `visual_grid` (B, E, h, w): projected visual cells, L2-normalised over E;
        - `audio` (B, E): projected audio embedding, L2-normalised;
        - `sim` (B, h, w): cosine similarity of `audio` to each cell, in [-1, 1];
        - `attention` (B, h, w): softmax of sim / temperature over the h * w cells (sums to 1);
        - `attended` (B, E): attention-weighted sum of the cells of `visual_grid`.
        """
        grid = F.normalize(self.visual_proj(self.visual.forward_features(frames)), dim=1)  # (B, E, h, w)
        audio = F.normalize(self.audio_proj(self.audio(logmel)), dim=1)  # (B, E)
        sim = einsum(grid, audio, "b e h w, b e -> b h w")  # (B, h, w)
        h, w = sim.shape[-2:]
        attention = torch.softmax(rearrange(sim, "b h w -> b (h w)") / self.cfg.temperature, dim=-1)
        attention = rearrange(attention, "b (h w) -> b h w", h=h, w=w)  # (B, h, w)
        attended = einsum(grid, attention, "b e h w, b h w -> b e")  # (B, E)
        return {"visual_grid": grid, "audio": audio, "sim": sim, "attention": attention, "attended": attended}


def audio_window(logmel: torch.Tensor, centre: torch.Tensor | float, seconds: float,
                 clip_seconds: torch.Tensor | float) -> torch.Tensor:
    """The log-mel frames within `seconds` around a time point of the clip.

    logmel: float (B, M, N) covering clips of `clip_seconds` (float or (B,)); centre: float or (B,),
    the time point as a fraction of the clip in [0, 1] (frame t of T shown from t/T to (t+1)/T:
    its centre is (t + 0.5) / T). The window has round(N * seconds / clip_seconds) frames (at least
    1, at most N; the same for the whole batch, taken from the first clip), shifted inside the
    clip at its edges. seconds <= 0 returns logmel unchanged. Returns float (B, M, n).
    """
    if seconds <= 0:
        return logmel
    b, _, n = logmel.shape
    clip_s = torch.as_tensor(clip_seconds, dtype=torch.float64).reshape(-1)
    width = int(min(n, max(1, round(n * seconds / float(clip_s[0])))))
    c = torch.as_tensor(centre, dtype=torch.float64).reshape(-1).expand(b)  # (B,)
    start = (c * n - width / 2).round().long().clamp(0, n - width)  # (B,)
    idx = start[:, None] + torch.arange(width)  # (B, n)
    return torch.gather(logmel, 2, idx[:, None, :].expand(-1, logmel.shape[1], -1).to(logmel.device))  # (B, M, n)


def heatmap(out: dict[str, torch.Tensor], size: int | tuple[int, int], source: str = "sim") -> torch.Tensor:
    """Localization map at image resolution: `out[source]` (B, h, w) upsampled bilinearly
    (align_corners=False: cell centres land on the centres of the pixels they cover) to `size`
    (H, W), then min-max normalised per sample to [0, 1] (a constant map becomes all zeros).
    source: "sim" (the cosine map, EZ-VSL's localization map) or "attention" (softmax(sim / tau),
    Senocak's localization response: sharper, since tau is small). Returns float (B, H, W)."""
    if source not in ("sim", "attention"):
        raise ValueError(f"source must be 'sim' or 'attention', got {source!r}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(out[source].unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    lo = up.amin(dim=(-2, -1), keepdim=True)
    hi = up.amax(dim=(-2, -1), keepdim=True)
    return (up - lo) / (hi - lo).clamp_min(1e-12)


def infonce_loss(visual_grid: torch.Tensor, audio: torch.Tensor, tau: float) -> torch.Tensor:
    """EZ-VSL multiple-instance contrastive loss.

    visual_grid: (B, E, h, w) and audio: (B, E), both L2-normalised. The score of pair (i, j) is
    max over cells of cos(v_i cell, a_j) / tau; cross-entropy with positives on the diagonal,
    visual->audio plus audio->visual (summed, as EZ-VSL: chance level is 2 ln B). Returns a float scalar.
    """
    scores = einsum(visual_grid, audio, "i e h w, j e -> i j h w")  # (B, B, h, w)
    logits = rearrange(scores, "i j h w -> i j (h w)").amax(dim=-1) / tau  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)


def triplet_loss(attended: torch.Tensor, audio: torch.Tensor, margin: float) -> torch.Tensor:
    """Senocak-style triplet loss with the audio embedding as anchor.

    attended, audio: (B, E). Positive: the clip's own attended vector z_i; negatives: every other
    clip's attended vector z_j (j != i; a simplification of Senocak, who attends the negative frame
    with the anchor sound). Loss = mean over i != j of relu(|a_i - z_i|^2 - |a_i - z_j|^2 + margin).
    Returns a float scalar (0 with gradient for B = 1).
    """
    d = (audio[:, None, :] - attended[None, :, :]).pow(2).sum(dim=-1)  # (B, B): d[i, j] = |a_i - z_j|^2
    b = d.shape[0]
    if b < 2:
        return d.sum() * 0.0
    pos = d.diagonal().unsqueeze(1)  # (B, 1)
    off = ~torch.eye(b, dtype=torch.bool, device=d.device)
    return F.relu(pos - d + margin)[off].mean()


def attention_supervision_loss(attention: torch.Tensor, box_masks: torch.Tensor,
                               has_box: torch.Tensor) -> torch.Tensor:
    """Senocak's supervised attention loss: cross-entropy -sum(g * log(attention)) between the
    attention map and the ground-truth map g = box_mask / sum(box_mask), averaged over samples
    with `has_box` (and a non-empty mask) only; 0 (with gradient) when there are none.

    attention: float (B, h, w) summing to 1; box_masks: float (B, h, w) >= 0 (e.g. the share of
    each cell that the sounding boxes cover); has_box: bool (B,). Returns a float scalar.
    """
    mass = box_masks.sum(dim=(-2, -1))  # (B,)
    keep = has_box.bool() & (mass > 0)
    if not bool(keep.any()):
        return attention.sum() * 0.0
    target = box_masks[keep] / mass[keep, None, None]  # (B', h, w)
    ce = -(target * attention[keep].clamp_min(1e-12).log()).sum(dim=(-2, -1))  # (B',)
    return ce.mean()


def localization_loss(out: dict[str, torch.Tensor], cfg: LocalizationConfig,
                      box_masks: torch.Tensor | None = None,
                      has_box: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Training objective for `SoundLocalizer` output `out`: the contrastive term of `cfg.loss`
    plus `cfg.attention_weight` * `attention_supervision_loss` when box masks (B, h, w) and
    has_box (B,) are given. Returns float scalars {"loss", "contrastive", "attention"}."""
    if cfg.loss == "infonce":
        contrastive = infonce_loss(out["visual_grid"], out["audio"], cfg.temperature)
    else:
        contrastive = triplet_loss(out["attended"], out["audio"], cfg.margin)
    attn = out["attention"].sum() * 0.0
    if box_masks is not None and has_box is not None and cfg.attention_weight > 0:
        attn = attention_supervision_loss(out["attention"], box_masks, has_box)
    return {"loss": contrastive + cfg.attention_weight * attn, "contrastive": contrastive, "attention": attn}
