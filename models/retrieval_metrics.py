"""Retrieval metrics from a similarity matrix, as CLIP and CAV-MAE report them: recall at k and
the median rank of the first correct answer."""

from __future__ import annotations

import torch


def ranks(sim: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's best-scored correct item.

    sim: float (Q, N) scores of every gallery item for every query; correct: bool (Q, N), at least
    one True per row. The rank is 1 + the number of incorrect items scored above that item, plus
    half of those scored exactly as high (ties are broken at random, in expectation), so a model
    whose scores carry no information ranks at chance, not first. Returns float (Q,).
    """
    if sim.shape != correct.shape or sim.dim() != 2:
        raise ValueError(f"sim and correct must be (Q, N) alike, got {tuple(sim.shape)} and {tuple(correct.shape)}")
    if not bool(correct.any(dim=1).all()):
        raise ValueError("every query needs at least one correct item")
    best = sim.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    wrong = ~correct
    above = ((sim > best) & wrong).sum(dim=1)  # (Q,)
    tied = ((sim == best) & wrong).sum(dim=1)  # (Q,)
    return 1.0 + above.double() + 0.5 * tied.double()


def retrieval_scores(sim: torch.Tensor, correct: torch.Tensor | None = None, ks: tuple[int, ...] = (1, 5, 10)
                     ) -> dict[str, float]:
    """R@k (share of queries whose first correct item ranks <= k) for each k, and the median rank.
    `correct` defaults to the diagonal: a query's own item (sim must then be square)."""
    if correct is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"without `correct`, sim must be square, got {tuple(sim.shape)}")
        correct = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    r = ranks(sim, correct)
    out = {f"r{k}": float((r <= k).double().mean()) for k in ks}
    out["median_rank"] = float(r.median())
    return out
