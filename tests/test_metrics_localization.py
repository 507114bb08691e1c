"""cIoU / cIoU@0.5 / AUC against hand-computed examples (Senocak value threshold and LVS quantile rule,
see models/metrics.py)."""
import numpy as np
import pytest
import torch

from models.metrics import auc_success, ciou, ciou_at

# A 4 x 4 heatmap holding 0..15 row by row: the sorted value at index int(16 * 0.5) = 8 is 8, so the
# LVS rule predicts the 7 pixels with values 9..15 (strictly greater).
RAMP = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)


def _mask(rows=slice(None), cols=slice(None)) -> torch.Tensor:
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, rows, cols] = True
    return m


def test_ciou_hand_values():
    # bottom half (values 8..15): intersection 7, |G| = 8, no prediction outside G -> 7 / 8
    assert ciou(RAMP, _mask(rows=slice(2, 4))).tolist() == [7 / 8]
    # right half (2, 3, 6, 7, 10, 11, 14, 15): inter {10, 11, 14, 15} = 4; outside G {9, 12, 13} -> 4 / (8 + 3)
    assert ciou(RAMP, _mask(cols=slice(2, 4))).tolist() == [pytest.approx(4 / 11)]
    # top half: no overlap -> 0
    assert ciou(RAMP, _mask(rows=slice(0, 2))).tolist() == [0.0]
    # quantile 0.25: threshold = sorted[4] = 4 -> 11 pixels (5..15) predicted; bottom half: 8 / (8 + 3)
    assert ciou(RAMP, _mask(rows=slice(2, 4)), threshold=0.25).tolist() == [pytest.approx(8 / 11)]


def test_ciou_batch_float_gt_and_degenerate_maps():
    heat = torch.cat([RAMP, RAMP.flip(-1), torch.zeros(1, 4, 4)])  # (3, 4, 4)
    gt = torch.cat([_mask(rows=slice(2, 4))] * 3)
    out = ciou(heat, gt)
    assert out.shape == (3,) and out.dtype == torch.float64
    assert out.tolist() == [7 / 8, 7 / 8, 0.0]  # a constant map predicts nothing (strict rule)
    # Flickr-style consensus map (one annotator box = 0.5): sum(P*G) / (sum(G) + sum(P*(G==0)))
    assert ciou(RAMP, _mask(rows=slice(2, 4)).float() * 0.5).tolist() == [pytest.approx(3.5 / 4.0)]
    # empty ground truth and empty prediction: 0, not NaN
    assert ciou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool)).tolist() == [0.0]
    with pytest.raises(ValueError):
        ciou(RAMP, torch.zeros(1, 4, 5, dtype=torch.bool))


def test_ciou_matches_a_literal_port_of_the_lvs_rule():
    rng = np.random.default_rng(0)
    heat = rng.random((5, 23, 29)).astype(np.float32)
    gt = np.zeros((5, 23, 29))
    for i in range(5):
        y0, x0 = rng.integers(0, 12, size=2)
        gt[i, y0 : y0 + 9, x0 : x0 + 13] = 1
    expected = []
    for i in range(5):
        pred = (heat[i] - heat[i].min()) / (heat[i].max() - heat[i].min())  # normalize_img
        thr = np.sort(pred.flatten())[int(pred.shape[0] * pred.shape[1] / 2)]
        pred[pred > thr] = 1
        pred[pred < 1] = 0
        infer = (pred >= 0.5).astype(np.float64)
        expected.append(np.sum(infer * gt[i]) / (np.sum(gt[i]) + np.sum(infer * (gt[i] == 0))))
    got = ciou(torch.from_numpy(heat), torch.from_numpy(gt).bool())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_ciou_value_mode_hand_values():
    # Senocak: min-max normalised RAMP is k / 15; > 0.5 <=> k >= 8: exactly the bottom half (8 pixels)
    assert ciou(RAMP, _mask(rows=slice(2, 4)), binarize="value").tolist() == [1.0]
    # right half: inter {10, 11, 14, 15} = 4; predicted outside G {8, 9, 12, 13} = 4 -> 4 / (8 + 4)
    assert ciou(RAMP, _mask(cols=slice(2, 4)), binarize="value").tolist() == [pytest.approx(1 / 3)]
    # tau 0.25: k / 15 > 0.25 <=> k >= 4 -> 12 pixels; bottom half: 8 / (8 + 4)
    assert ciou(RAMP, _mask(rows=slice(2, 4)), 0.25, binarize="value").tolist() == [pytest.approx(2 / 3)]
    # k / 15 > 0.5 is strict: with values 0..2 (normalised 0, 0.5, 1) the middle value is not predicted
    three = torch.tensor([[[0.0, 1.0, 2.0]]])
    assert ciou(three, torch.tensor([[[False, True, True]]]), binarize="value").tolist() == [0.5]


def test_ciou_value_mode_is_invariant_to_offset_and_scale_and_predicts_small_regions():
    # a 2 x 2 bright block on a dim background, exactly on the box: IoU 1 in value mode; the quantile
    # rule predicts the 7 pixels above the upper median (4 box + 3 background) -> 4 / 7
    heat = torch.zeros(1, 4, 4)
    heat[0, 1:3, 1:3] = 1.0
    heat = heat + 0.01 * torch.arange(16.0).reshape(1, 4, 4)  # break ties: background 0..0.15, box 1.05..1.1
    box = _mask(rows=slice(1, 3), cols=slice(1, 3))
    assert ciou(heat, box, binarize="value").tolist() == [1.0]
    assert ciou(heat * 7 - 3, box, binarize="value").tolist() == [1.0]
    assert ciou(heat, box).tolist() == [pytest.approx(4 / 7)]
    # a constant map predicts nothing; empty G and empty prediction give 0, not NaN
    assert ciou(torch.full((1, 4, 4), 3.0), box, binarize="value").tolist() == [0.0]
    assert ciou(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), binarize="value").tolist() == [0.0]
    # batched == stacked single calls
    heats = torch.cat([RAMP, heat, RAMP.flip(-1)])
    gts = torch.cat([_mask(rows=slice(2, 4)), box, _mask(cols=slice(0, 2))])
    assert ciou(heats, gts, binarize="value").tolist() == [
        ciou(heats[i : i + 1], gts[i : i + 1], binarize="value").item() for i in range(3)]
    with pytest.raises(ValueError):
        ciou(RAMP, _mask(), binarize="median")


def test_ciou_at():
    assert ciou_at([0.5, 0.49, 0.7, 0.1]) == 0.5
    assert ciou_at(torch.tensor([0.2, 0.3]), 0.25) == 0.5
    with pytest.raises(ValueError):
        ciou_at([])


def test_auc_success_hand_values():
    assert auc_success([1.0, 1.0]) == pytest.approx(1.0)
    # all zero: success(0) = 1 (0 >= 0), then 0 -> one trapezoid 0.05 * (1 + 0) / 2
    assert auc_success([0.0, 0.0, 0.0]) == pytest.approx(0.025)
    # 0.52: success 1 for k <= 10 (0.5 of area), then one trapezoid down to 0 (0.025)
    assert auc_success(torch.tensor([0.52])) == pytest.approx(0.525)
    # [0, 1]: success(0) = 1, success(k >= 1) = 0.5 -> 0.05 * 1.5 / 2 + 19 * 0.05 * 0.5
    assert auc_success(np.array([0.0, 1.0])) == pytest.approx(0.5125)
    # the thresholds are the floats 0.05 * k as in the LVS code: 0.05 * 3 = 0.15000000000000002 > 0.15
    assert auc_success([0.15]) == pytest.approx(0.1 + 0.025)
