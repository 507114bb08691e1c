"""Separation metrics on waveforms, via torchmetrics: SI-SDR, SDR, their improvements over the
mixture, and a permutation-invariant (PIT) variant for unordered outputs (the audio-only baseline).

Conventions: est / ref are float (B, K, S), one row per speaker; mixture is float (B, S).
Results are float (B, K) in dB, higher is better.

- SI-SDR (Le Roux et al. 2019) with zero-mean signals (`zero_mean=True`, as in asteroid and the
  paper's definition): scale- and offset-invariant, cheap; the headline number.
- SDR: torchmetrics' `signal_distortion_ratio` (the bss_eval v4 SDR with a 512-tap distortion
  filter, as in `fast_bss_eval`); what the Looking-to-Listen paper reports. Computed in float64.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torchmetrics.functional.audio import (
    permutation_invariant_training,
    pit_permutate,
    scale_invariant_signal_distortion_ratio,
    signal_distortion_ratio,
)


AUDIBLE_POWER = 1e-6  # mean square of a source above -60 dBFS RMS: SI-SDR against silence is undefined


def audible(ref: torch.Tensor) -> torch.Tensor:
    """Which references can be scored: float (..., S) -> bool (...), mean square > AUDIBLE_POWER."""
    return ref.pow(2).mean(dim=-1) > AUDIBLE_POWER


def _check(est: torch.Tensor, ref: torch.Tensor) -> None:
    if est.shape != ref.shape or est.ndim != 3:
        raise ValueError(f"est and ref must both be (B, K, S), got {tuple(est.shape)} and {tuple(ref.shape)}")


def si_sdr(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Scale-invariant SDR per source: float (B, K, S) x2 -> float (B, K) dB."""
    _check(est, ref)
    return scale_invariant_signal_distortion_ratio(est, ref, zero_mean=True)


@contextmanager
def _one_torch_thread():
    """torch 2.14.1's batched CPU `linalg.solve` (MKL) fails with more than one torch thread
    ("Pivots given to lu_solve must all be greater or equal to 1", MKL: "Parameter 6 was
    incorrect on entry to DLASWP"); torchmetrics' SDR solves a batch of Toeplitz systems."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sdr(est: torch.Tensor, ref: torch.Tensor, filter_length: int = 512) -> torch.Tensor:
    """bss_eval SDR per source (distortion filter of `filter_length` taps): float (B, K, S) x2 -> float (B, K) dB.

    Needs S > filter_length; computed in float64 and returned in est's dtype.
    """
    _check(est, ref)
    with _one_torch_thread():
        return signal_distortion_ratio(est.double(), ref.double(), filter_length=filter_length).to(est.dtype)


def _mixture_as_estimate(mixture: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if mixture.shape != (ref.shape[0], ref.shape[2]):
        raise ValueError(f"mixture must be (B, S) = {(ref.shape[0], ref.shape[2])}, got {tuple(mixture.shape)}")
    return mixture.unsqueeze(1).expand_as(ref)  # (B, K, S)


def best_permutation(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The output order maximising mean SI-SDR: float (B, K, S) x2 -> long (B, K),
    with est[b, perm[b, k]] the estimate of ref[b, k] (torchmetrics' PIT: a K x K SI-SDR matrix,
    then all K! pairings, or scipy's Hungarian solver for K >= 3 when scipy is installed)."""
    _check(est, ref)
    with warnings.catch_warnings():  # "install scipy" hint: for K <= 3 the K! search is 6 pairings at most
        warnings.filterwarnings("ignore", message="In pit metric")
        _, perm = permutation_invariant_training(est, ref, scale_invariant_signal_distortion_ratio,
                                                 mode="speaker-wise", eval_func="max", zero_mean=True)
    return perm


def pit_align(est: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder unordered estimates to match the references by SI-SDR.

    est, ref: float (B, K, S) -> (est reordered float (B, K, S), perm long (B, K)).
    """
    perm = best_permutation(est, ref)
    return pit_permutate(est, perm), perm


def si_sdr_improvement(est: torch.Tensor, ref: torch.Tensor, mixture: torch.Tensor,
                       pit: bool = False) -> torch.Tensor:
    """SI-SDRi = SI-SDR(est, ref) - SI-SDR(mixture, ref), per source.

    est, ref: float (B, K, S); mixture: float (B, S) -> float (B, K) dB. `pit=True` first reorders
    est by the best SI-SDR permutation (audio-only outputs are unordered).
    """
    if pit:
        est, _ = pit_align(est, ref)
    return si_sdr(est, ref) - si_sdr(_mixture_as_estimate(mixture, ref), ref)


def sdr_improvement(est: torch.Tensor, ref: torch.Tensor, mixture: torch.Tensor,
                    pit: bool = False, filter_length: int = 512) -> torch.Tensor:
    """SDRi = SDR(est, ref) - SDR(mixture, ref), per source.

    est, ref: float (B, K, S); mixture: float (B, S) -> float (B, K) dB. `pit=True` reorders est by
    the best SI-SDR permutation first (one criterion for both metrics keeps them comparable).
    """
    if pit:
        est, _ = pit_align(est, ref)
    mix = _mixture_as_estimate(mixture, ref)
    return sdr(est, ref, filter_length) - sdr(mix, ref, filter_length)
