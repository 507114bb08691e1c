"""Sound localizer: presets, output contract, losses, box masks and a tiny training run."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.encoders import AudioEncoderConfig, VisualEncoderConfig
from models.localization import (PRESETS, LocalizationConfig, SoundLocalizer, attention_supervision_loss,
                                 audio_window, heatmap, infonce_loss, localization_loss,
                                 triplet_loss)

B, H, W = 3, 67, 67
M, N = 64, 37


def boxes_to_mask(boxes: torch.Tensor, image_size: int | tuple[int, int],
                  grid_hw: int | tuple[int, int]) -> torch.Tensor:
    """Fraction of each grid cell covered by a box.

    boxes: float (B, 4) pixel xyxy (continuous coordinates; pixel (r, c) spans [c, c+1) x [r, r+1));
    image_size: (H, W); grid_hw: (h, w), cell (r, c) spans H / h rows and W / w columns.
    Returns float (B, h, w) in [0, 1]. With grid_hw = image_size it is a pixel coverage mask
    (threshold at 0.5 for a bool mask at image resolution).
    """
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    h, w = (grid_hw, grid_hw) if isinstance(grid_hw, int) else grid_hw
    boxes = boxes.float()
    ys = torch.arange(h + 1, device=boxes.device, dtype=torch.float32) * (H / h)  # (h + 1,) cell edges
    xs = torch.arange(w + 1, device=boxes.device, dtype=torch.float32) * (W / w)  # (w + 1,)
    x0, y0, x1, y1 = (boxes[:, k, None] for k in range(4))  # each (B, 1)
    ov_y = (torch.minimum(y1, ys[1:]) - torch.maximum(y0, ys[:-1])).clamp_min(0) / (H / h)  # (B, h)
    ov_x = (torch.minimum(x1, xs[1:]) - torch.maximum(x0, xs[:-1])).clamp_min(0) / (W / w)  # (B, w)
    return torch.einsum("bh,bw->bhw", ov_y, ov_x)  # (B, h, w)


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    return F.normalize(x, dim=dim)


def test_tiny_preset_forward_backward_contract():
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = SoundLocalizer(cfg)
    out = model(torch.rand(B, 3, H, W), torch.randn(B, M, N) - 5)
    e = cfg.embed_dim
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "visual_grid": (B, e, 9, 9), "audio": (B, e), "sim": (B, 9, 9), "attention": (B, 9, 9), "attended": (B, e)}
    for v in out.values():
        assert torch.isfinite(v).all()
    torch.testing.assert_close(out["visual_grid"].norm(dim=1), torch.ones(B, 9, 9))
    torch.testing.assert_close(out["audio"].norm(dim=1), torch.ones(B))
    torch.testing.assert_close(out["attention"].sum(dim=(-2, -1)), torch.ones(B))
    assert out["sim"].abs().max() <= 1 + 1e-5
    expected_sim = torch.einsum("behw,be->bhw", out["visual_grid"], out["audio"])
    torch.testing.assert_close(out["sim"], expected_sim)
    torch.testing.assert_close(out["attended"], torch.einsum("behw,bhw->be", out["visual_grid"], out["attention"]))
    localization_loss(out, cfg)["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_paper_preset_builds_and_runs():
    cfg = PRESETS["paper"]
    model = SoundLocalizer(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == 22_872_066
    assert cfg.image_size == 224 and cfg.visual.arch == "resnet18" and cfg.embed_dim == 512
    with torch.no_grad():
        out = model(torch.rand(2, 3, 224, 224), torch.randn(2, M, 101))
    assert out["sim"].shape == (2, 7, 7) and out["visual_grid"].shape == (2, 512, 7, 7)
    assert all(torch.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("loss", ["infonce", "triplet"])
def test_localizer_batch_consistency(loss):
    torch.manual_seed(3)
    model = SoundLocalizer(LocalizationConfig(loss=loss)).eval()
    frames, logmel = torch.rand(B, 3, H, W), torch.randn(B, M, N)
    with torch.no_grad():
        batched = model(frames, logmel)
        singles = [model(frames[i : i + 1], logmel[i : i + 1]) for i in range(B)]
    for key, value in batched.items():
        torch.testing.assert_close(value, torch.cat([s[key] for s in singles]), atol=1e-5, rtol=1e-4)


def test_heatmap_resolution_and_range():
    torch.manual_seed(4)
    sim = torch.rand(B, 5, 7) * 2 - 1
    hm = heatmap({"sim": sim}, (H, 71))
    assert hm.shape == (B, H, 71)
    assert float(hm.min()) == 0.0 and torch.allclose(hm.amax(dim=(-2, -1)), torch.ones(B))
    assert torch.equal(heatmap({"sim": torch.zeros(1, 3, 3)}, 9), torch.zeros(1, 9, 9))
    peak = torch.zeros(1, 3, 3)
    peak[0, 2, 0] = 1.0  # bottom-left cell -> bottom-left region of the image
    idx = int(heatmap({"sim": peak}, 30).flatten().argmax())
    assert idx // 30 >= 20 and idx % 30 < 10


def test_infonce_aligned_lower_than_shuffled_and_matches_definition():
    torch.manual_seed(5)
    b, e, h, w = 5, 8, 3, 4
    grid = _unit(torch.randn(b, e, h, w), 1)
    audio = _unit(grid[:, :, 1, 2] + 0.1 * torch.randn(b, e), 1)  # each clip's sound matches one of its cells
    tau = 0.1
    aligned = infonce_loss(grid, audio, tau)
    shuffled = infonce_loss(grid, audio[torch.tensor([1, 2, 3, 4, 0])], tau)
    assert aligned < shuffled
    logits = torch.tensor([[max(float(grid[i, :, r, c] @ audio[j]) for r in range(h) for c in range(w)) / tau
                            for j in range(b)] for i in range(b)])
    expected = sum(-torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i] for i in range(b)) / b
    torch.testing.assert_close(aligned, expected.float(), atol=1e-5, rtol=1e-5)


def test_triplet_loss_hand_values():
    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    attended = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # d+ = 0, d- = 2 for both anchors: relu(0 - 2 + m)
    assert float(triplet_loss(attended, audio, margin=0.5)) == 0.0
    torch.testing.assert_close(triplet_loss(attended, audio, margin=3.0), torch.tensor(1.0))
    swapped = attended.flip(0)  # positives far, negatives close: relu(2 - 0 + 0.5)
    torch.testing.assert_close(triplet_loss(swapped, audio, margin=0.5), torch.tensor(2.5))
    one = triplet_loss(attended[:1].requires_grad_(), audio[:1], 0.5)
    assert float(one.detach()) == 0.0 and one.requires_grad


def test_boxes_to_mask_hand_values():
    boxes = torch.tensor([[2.0, 0.0, 6.0, 4.0], [0.0, 0.0, 8.0, 8.0], [1.0, 5.0, 3.0, 7.0]])
    mask = boxes_to_mask(boxes, 8, (2, 2))  # 4 x 4 pixel cells
    assert mask.shape == (3, 2, 2)
    torch.testing.assert_close(mask[0], torch.tensor([[0.5, 0.5], [0.0, 0.0]]))
    torch.testing.assert_close(mask[1], torch.ones(2, 2))
    torch.testing.assert_close(mask[2], torch.tensor([[0.0, 0.0], [0.25, 0.0]]))
    rect = boxes_to_mask(torch.tensor([[1.5, 2.0, 4.0, 3.0]]), (5, 6), (5, 6))[0]  # pixel resolution
    assert rect.shape == (5, 6)
    torch.testing.assert_close(rect[2], torch.tensor([0.0, 0.5, 1.0, 1.0, 0.0, 0.0]))
    assert float(rect.sum()) == pytest.approx(2.5)


def test_attention_supervision_loss():
    attention = torch.full((3, 2, 2), 0.25, requires_grad=True)
    masks = torch.zeros(3, 2, 2)
    masks[0, 0, 0] = 1.0
    masks[1, 1] = 0.5
    has_box = torch.tensor([True, True, False])
    loss = attention_supervision_loss(attention, masks, has_box)
    torch.testing.assert_close(loss, torch.tensor(math.log(4.0)))  # uniform attention: CE = log(4)
    peaked = torch.tensor([[[0.97, 0.01], [0.01, 0.01]]]).repeat(3, 1, 1)
    assert attention_supervision_loss(peaked, masks[:1].repeat(3, 1, 1), has_box) < loss
    none = attention_supervision_loss(attention, masks, torch.zeros(3, dtype=torch.bool))
    assert float(none.detach()) == 0.0
    none.backward()
    assert torch.equal(attention.grad, torch.zeros_like(attention))
    empty = attention_supervision_loss(attention, torch.zeros(3, 2, 2), torch.ones(3, dtype=torch.bool))
    assert float(empty.detach()) == 0.0  # has_box but an empty mask (box outside the frame) counts as no box


def test_localization_loss_without_boxes_is_the_contrastive_term():
    torch.manual_seed(6)
    cfg = LocalizationConfig(visual=VisualEncoderConfig(arch="tiny", width=8),
                             audio=AudioEncoderConfig(arch="tiny", width=8), attention_weight=2.0)
    out = SoundLocalizer(cfg)(torch.rand(B, 3, H, W), torch.randn(B, M, N))
    masks = torch.rand(B, 9, 9)
    losses = localization_loss(out, cfg, masks, torch.zeros(B, dtype=torch.bool))
    torch.testing.assert_close(losses["loss"], losses["contrastive"])
    with_box = localization_loss(out, cfg, masks, torch.tensor([True, False, True]))
    expected = with_box["contrastive"] + 2.0 * attention_supervision_loss(out["attention"], masks,
                                                                         torch.tensor([True, False, True]))
    torch.testing.assert_close(with_box["loss"], expected)


# --- a tiny training run -------------------------------------------------------------------------
# Each 64 px frame shows two 20 px squares of two distinct colours out of four; the log-mel carries
# a "tone" in the mel band of one of them (the sounding one). Localizing needs the audio.

COLOURS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1]])
SIZE, SIDE = 64, 20


def _toy_batch(g: torch.Generator, b: int, m: int = 16, n: int = 11):
    frames = 0.1 * torch.rand(b, 3, SIZE, SIZE, generator=g)
    boxes = torch.zeros(b, 2, 4)
    colours = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(b)])  # (b, 2)
    for i in range(b):
        while True:  # non-overlapping squares
            xy = torch.randint(0, SIZE - SIDE + 1, (2, 2), generator=g)
            if int((xy[0] - xy[1]).abs().max()) >= SIDE:
                break
        for k in range(2):
            x, y = xy[k].tolist()
            frames[i, :, y : y + SIDE, x : x + SIDE] = COLOURS[colours[i, k]][:, None, None]
            boxes[i, k] = torch.tensor([x, y, x + SIDE, y + SIDE], dtype=torch.float32)
    which = torch.randint(0, 2, (b,), generator=g)
    rows = torch.arange(b)
    logmel = -6.0 + 0.5 * torch.randn(b, m, n, generator=g)
    for i, c in enumerate(colours[rows, which].tolist()):
        logmel[i, 4 * c : 4 * c + 3] += 5.0
    return frames, logmel, boxes[rows, which], boxes[rows, 1 - which]


def _peak_in(hm: torch.Tensor, boxes: torch.Tensor) -> float:
    idx = hm.flatten(1).argmax(dim=1)
    py, px = idx // hm.shape[-1] + 0.5, idx % hm.shape[-1] + 0.5
    inside = (px >= boxes[:, 0]) & (px < boxes[:, 2]) & (py >= boxes[:, 1]) & (py < boxes[:, 3])
    return float(inside.float().mean())


def _train(cfg: LocalizationConfig, steps: int, supervised: bool) -> tuple[list[float], float, float]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = SoundLocalizer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        frames, logmel, box, _ = _toy_batch(g, 24)
        out = model(frames, logmel)
        masks = boxes_to_mask(box, SIZE, tuple(out["sim"].shape[-2:]))
        has_box = (torch.arange(24) % 2 == 0) if supervised else torch.zeros(24, dtype=torch.bool)
        loss = localization_loss(out, cfg, masks, has_box)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    frames, logmel, box, other = _toy_batch(torch.Generator().manual_seed(99), 128)
    with torch.no_grad():
        hm = heatmap(model(frames, logmel), SIZE)
    return losses, _peak_in(hm, box), _peak_in(hm, other)


def _toy_config(**kw) -> LocalizationConfig:
    return LocalizationConfig(visual=VisualEncoderConfig(arch="tiny", width=8),
                              audio=AudioEncoderConfig(arch="tiny", width=8), embed_dim=32, temperature=0.1, **kw)


@pytest.mark.slow
def test_training_infonce_learns_to_localize():
    losses, right, other = _train(_toy_config(loss="infonce"), steps=120, supervised=False)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    chance = SIDE**2 / SIZE**2  # ~0.1: a peak placed uniformly at random
    assert right > 2 * chance and right > other + 0.15, (right, other)


@pytest.mark.slow
def test_training_triplet_with_supervised_attention():
    losses, right, other = _train(_toy_config(loss="triplet", attention_weight=1.0), steps=60, supervised=True)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3
    assert right > 0.7 and other < 0.1, (right, other)


def test_audio_window_hand_values():
    mel = torch.arange(21.0).reshape(1, 1, 21).repeat(2, 3, 1)  # (2, 3, 21): frame index as value, 2 s clips
    # 0.5 s of a 2 s clip = round(21 / 4) = 5 frames, centred on frame 8.5 / 16 of the clip:
    # start = round(0.53125 * 21 - 2.5) = round(8.66) = 9 -> frames 9..13
    out = audio_window(mel, 8.5 / 16, 0.5, 2.0)
    assert out.shape == (2, 3, 5) and out[0, 0].tolist() == [9.0, 10.0, 11.0, 12.0, 13.0]
    # per-sample centres; windows are shifted inside the clip at its edges
    out = audio_window(mel, torch.tensor([0.0, 1.0]), 0.5, torch.tensor([2.0, 2.0]))
    assert out[0, 2].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0] and out[1, 1].tolist() == [16.0, 17.0, 18.0, 19.0, 20.0]
    # 0 s (the default) and windows longer than the clip return the whole clip
    assert torch.equal(audio_window(mel, 0.5, 0.0, 2.0), mel)
    assert torch.equal(audio_window(mel, 0.5, 5.0, 2.0), mel)
    with pytest.raises(ValueError):
        LocalizationConfig(audio_window_s=-1.0)
