"""Localization metrics: consensus IoU (cIoU), cIoU@0.5 and the AUC of the success-rate curve,
as evaluated by Chen et al. CVPR 2021 "Localizing Visual Sounds the Hard Way" (LVS, github
hche11/Localizing-Visual-Sounds-the-Hard-Way, `test.py` + `utils.Evaluator`) and reused by EZ-VSL.

What LVS computes for one sample (heatmap resized to 224 x 224 and min-max normalised):

    t    = sort(pred.flatten())[int(H * W / 2)]       # the upper median value
    P    = pred > t                                    # binarised prediction (strict)
    cIoU = sum(P * G) / (sum(G) + sum(P * (G == 0)))   # G: ground-truth map in [0, 1]

    success(k) = mean(cIoU >= 0.05 * k), k = 0..20;   AUC = trapezoid(x=0.05 * k, y=success)
    cIoU@0.5   = mean(cIoU >= 0.5)

For VGG-SS, G is the union of the boxes (binary); then cIoU is exactly the IoU |P ∩ G| / |P ∪ G|.
(On Flickr-SoundNet, G is the annotator consensus: sum of the boxes / 2, clipped to 1.)

Implemented here: `ciou` takes the heatmap at whatever resolution the caller chose (the 224 resize
is the caller's job) and the quantile `threshold` (LVS: 0.5); min-max normalisation is skipped
because it does not change which pixels exceed the threshold. EZ-VSL binarises with `>=` instead
of `>`, which differs only on ties at t. A sample whose denominator is 0 (empty G and empty P) gets
cIoU 0 instead of NaN. Thresholds for the AUC are the floats 0.05 * k exactly as in the code
(so 0.05 * 3 = 0.15000000000000002 and a cIoU of exactly 0.15 does not count at that step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def ciou(heatmap: torch.Tensor, gt_mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-sample consensus IoU of a heatmap binarised at its `threshold` quantile (LVS rule).

    heatmap: float (B, H, W), any range; gt_mask: bool (B, H, W), or float (B, H, W) in [0, 1]
    for a consensus map; threshold: quantile q in [0, 1): a pixel is predicted iff its value is
    strictly greater than the element at index int(H * W * q) of the ascending sorted heatmap.
    Returns float64 (B,) in [0, 1].
    """
    if heatmap.shape != gt_mask.shape or heatmap.dim() != 3:
        raise ValueError(f"heatmap and gt_mask must both be (B, H, W), got {tuple(heatmap.shape)} "
                         f"and {tuple(gt_mask.shape)}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold is a quantile in [0, 1), got {threshold}")
    flat = heatmap.detach().double().flatten(1)  # (B, H * W)
    idx = int(flat.shape[1] * threshold)
    t = flat.sort(dim=1).values[:, idx : idx + 1]  # (B, 1)
    pred = (flat > t).double()  # (B, H * W)
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
