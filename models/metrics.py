"""Localization metrics: consensus IoU (cIoU), cIoU@0.5 and the AUC of the success-rate curve.

cIoU (Senocak et al. CVPR 2018 "Learning to Localize Sound Source in Visual Scenes", §5, and its
TPAMI 2020 version) for a response map a and a ground-truth map g in [0, 1]:

    A(tau) = {i : a_i > tau}                                  # pixels predicted as the source
    cIoU   = sum_{i in A} g_i / (sum_i g_i + |{i in A : g_i = 0}|)

    success(k) = mean(cIoU >= 0.05 * k), k = 0..20;   AUC = trapezoid(x=0.05 * k, y=success)
    cIoU@0.5   = mean(cIoU >= 0.5)                          # the "cIoU" column of the papers

For a binary G (union of boxes, as on our synthetic scenes) cIoU is exactly the IoU
|A ∩ G| / |A ∪ G|. The papers differ in how A is chosen, so `ciou` has two modes:

- `binarize="value"` (Senocak's definition, the primary metric of `avray evaluate`): the map is
  min-max normalised per sample to [0, 1] and A = {i : a_i > tau} with tau = `threshold` (0.5).
  Senocak's released code (ardasnck/learning_to_localize_sound_source) has no evaluation script,
  so the threshold is the paper's A(tau) read with tau = 0.5 on the normalised response. A
  constant map (max == min) predicts nothing. A confident localizer predicts a small region, so
  cIoU can reach 1 for a source of any size.
- `binarize="quantile"` (the LVS rule of Chen et al. CVPR 2021 "Localizing Visual Sounds the Hard
  Way", github hche11/Localizing-Visual-Sounds-the-Hard-Way, `test.py` + `utils.Evaluator`, reused
  by EZ-VSL): the threshold is the map's `threshold` quantile, i.e. for 0.5 the upper median
  `t = sort(a.flatten())[int(H * W / 2)]` and A = {i : a_i > t}: about half of the pixels are
  always predicted, so cIoU <= |G| / (H * W / 2) and cIoU@0.5 is 0 whenever the sounding object
  covers less than a quarter of the frame (the sounding objects of our held-out synthetic frames
  cover 4-29 % of a frame, median 11 %: BENCHMARKS.md). Reported by
  `avray evaluate` under keys with an `_lvs` suffix, for comparison with the LVS/EZ-VSL tables.

Implemented here: `ciou` takes the heatmap at whatever resolution the caller chose (LVS resizes to
224 x 224; that is the caller's job). In quantile mode min-max normalisation is skipped because it
does not change which pixels exceed the threshold; EZ-VSL binarises with `>=` instead of `>`, which
differs only on ties at t. (On Flickr-SoundNet, G is the annotator consensus: sum of the boxes / 2,
clipped to 1; a float gt_mask is accepted for it.) A sample whose denominator is 0 (empty G and
empty A) gets cIoU 0 instead of NaN. Thresholds for the AUC are the floats 0.05 * k exactly as in
the LVS code (so 0.05 * 3 = 0.15000000000000002 and a cIoU of exactly 0.15 does not count at that step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def ciou(heatmap: torch.Tensor, gt_mask: torch.Tensor, threshold: float = 0.5,
         binarize: str = "quantile") -> torch.Tensor:
    """Per-sample consensus IoU of a heatmap binarised at `threshold`.

    heatmap: float (B, H, W), any range; gt_mask: bool (B, H, W), or float (B, H, W) in [0, 1]
    for a consensus map. binarize: "value" (Senocak): a pixel is predicted iff its min-max
    normalised value (per sample) is strictly greater than `threshold`; "quantile" (LVS): iff its
    value is strictly greater than the element at index int(H * W * threshold) of the ascending
    sorted heatmap. threshold in [0, 1). Returns float64 (B,) in [0, 1].
    """
    if heatmap.shape != gt_mask.shape or heatmap.dim() != 3:
        raise ValueError(f"heatmap and gt_mask must both be (B, H, W), got {tuple(heatmap.shape)} "
                         f"and {tuple(gt_mask.shape)}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    flat = heatmap.detach().double().flatten(1)  # (B, H * W)
    if binarize == "value":
        lo = flat.amin(dim=1, keepdim=True)  # (B, 1)
        span = flat.amax(dim=1, keepdim=True) - lo  # (B, 1)
        norm = torch.where(span > 0, (flat - lo) / span.clamp_min(1e-300), torch.zeros_like(flat))
        pred = (norm > threshold).double()  # (B, H * W)
    elif binarize == "quantile":
        idx = int(flat.shape[1] * threshold)
        t = flat.sort(dim=1).values[:, idx : idx + 1]  # (B, 1)
        pred = (flat > t).double()  # (B, H * W)
    else:
        raise ValueError(f"binarize must be 'value' or 'quantile', got {binarize!r}")
    gt = gt_mask.detach().to(device=flat.device, dtype=torch.float64).flatten(1)  # (B, H * W)
    inter = (pred * gt).sum(dim=1)
    denom = gt.sum(dim=1) + (pred * (gt == 0)).sum(dim=1)
    return torch.where(denom > 0, inter / denom.clamp_min(1e-12), torch.zeros_like(inter))


def _as_array(cious: torch.Tensor | Sequence[float] | np.ndarray) -> np.ndarray:
    if isinstance(cious, torch.Tensor):
        cious = cious.detach().cpu().double().numpy()
    arr = np.asarray(cious, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("no cIoU values")
    return arr


def ciou_at(cious: torch.Tensor | Sequence[float] | np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of samples with cIoU >= threshold (LVS/EZ-VSL "cIoU" / "AP50")."""
    return float(np.mean(_as_array(cious) >= threshold))


def auc_success(cious: torch.Tensor | Sequence[float] | np.ndarray) -> float:
    """Area under the success-rate curve: success(k) = fraction of cIoU >= 0.05 * k for k = 0..20,
    integrated with the trapezoidal rule over x = 0.05 * k (as sklearn.metrics.auc in LVS)."""
    arr = _as_array(cious)
    x = np.array([0.05 * k for k in range(21)])
    success = np.array([np.mean(arr >= xk) for xk in x])
    return float(np.sum((x[1:] - x[:-1]) * (success[1:] + success[:-1]) / 2.0))
