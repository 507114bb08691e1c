"""AV speech separation (models/separation.py) and its metrics (models/separation_metrics.py)."""
import math
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.separation import (
    PRESETS, AVSeparator, SeparationConfig, compress, decode, decompress,
    mix_and_separate_batch, separation_loss, soft_snr,
)
from models.separation_metrics import (
    best_permutation, pit_align, sdr, sdr_improvement, si_sdr, si_sdr_improvement,
)
from pipelines.spectrogram import SpectrogramConfig, stft

SPEECH = Path(__file__).parent / "fixtures" / "cmu_arctic_us_axb_a0005.wav"
B, S, T, PX = 3, 8000 + 37, 5, 33
N = S // 256 + 1  # 32 STFT frames at the tiny preset's hop


def preset(name: str, **overrides) -> SeparationConfig:
    return replace(PRESETS[name], **overrides)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _inputs(k: int, seed: int = 0, b: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(b, S, generator=g), torch.rand(b, k, T, 3, PX, PX, generator=g)


def _speech() -> torch.Tensor:
    with wave.open(str(SPEECH)) as w:
        assert w.getframerate() == 16000
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16)
    return torch.from_numpy(pcm.astype(np.float32) / 32768)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("audio_only", [False, True])
def test_output_shapes_for_odd_sizes(k, audio_only):
    model = AVSeparator(preset("tiny", num_speakers=k, audio_only=audio_only))
    mix, faces = _inputs(k)
    out = model(mix, None if audio_only else faces)
    assert set(out) == {"masks", "spec_compressed", "spec", "waveforms"}
    for key in ("masks", "spec_compressed", "spec"):
        assert out[key].shape == (B, k, 257, N) and out[key].dtype == torch.complex64
    assert out["waveforms"].shape == (B, k, S) and out["waveforms"].dtype == torch.float32
    bound = model.cfg.mask_bound
    assert out["masks"].real.abs().max() <= bound and out["masks"].imag.abs().max() <= bound


def test_av_mode_requires_faces_of_k_speakers():
    model = AVSeparator(PRESETS["tiny"])
    mix, faces = _inputs(3)
    with pytest.raises(ValueError):
        model(mix, None)
    with pytest.raises(ValueError):
        model(mix, faces)  # K=3 faces for a K=2 model


@pytest.mark.parametrize("audio_only", [False, True])
def test_tiny_forward_backward_finite(audio_only):
    cfg = preset("tiny", audio_only=audio_only)
    model = AVSeparator(cfg)
    mix, faces = _inputs(2)
    sources = 0.1 * torch.randn(B, 2, S)
    loss = separation_loss(model(mix, faces), sources, cfg)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_paper_preset_parameters_and_forward():
    av, ao = AVSeparator(PRESETS["paper"]), AVSeparator(preset("paper", audio_only=True))
    # BLSTM 400 on [audio 8·257 | own face 256 | mean face 256]: 2 directions x 4H(D + H + 2)
    assert count_parameters(av.head.blstm) == 2 * 4 * 400 * (8 * 257 + 2 * 256 + 400 + 2)
    assert len(av.audio.net) == 15 and len(av.visual.temporal) == 6
    assert count_parameters(av) == 16_337_962 and count_parameters(ao) == 12_519_356
    mix, faces = 0.1 * torch.randn(1, 1600), torch.rand(1, 2, 2, 3, 48, 48)
    loss = separation_loss(av(mix, faces), 0.1 * torch.randn(1, 2, 1600), av.cfg)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in av.parameters())
    with torch.no_grad():  # one full 2 s clip at 8 fps, ~3 s on one core
        out = av.eval()(0.1 * torch.randn(1, 32000), torch.rand(1, 2, 16, 3, 48, 48))
    assert out["waveforms"].shape == (1, 2, 32000) and torch.isfinite(out["waveforms"]).all()


@pytest.mark.parametrize("audio_only", [False, True])
def test_batched_equals_stacked_single_calls_in_eval(audio_only):
    model = AVSeparator(preset("tiny", num_speakers=3, audio_only=audio_only)).eval()
    mix, faces = _inputs(3)
    with torch.no_grad():
        batched = model(mix, faces)
        singles = [model(mix[i:i + 1], faces[i:i + 1]) for i in range(B)]
    for key in batched:
        stacked = torch.cat([s[key] for s in singles])
        torch.testing.assert_close(batched[key], stacked, atol=1e-4, rtol=1e-4)


def test_av_outputs_follow_the_faces_order():
    model = AVSeparator(PRESETS["tiny"]).eval()
    mix, faces = _inputs(2)
    with torch.no_grad():
        out, swapped = model(mix, faces), model(mix, faces.flip(1))
    # masks are bitwise equal; decompression's vectorised pow differs from its scalar tail by ~1e-8
    assert torch.equal(swapped["masks"], out["masks"].flip(1))
    assert torch.equal(swapped["spec_compressed"], out["spec_compressed"].flip(1))
    for key in ("spec", "waveforms"):
        torch.testing.assert_close(swapped[key], out[key].flip(1), atol=1e-6, rtol=0)
    assert not torch.allclose(out["masks"][:, 0], out["masks"][:, 1])  # the faces matter
    model3 = AVSeparator(preset("tiny", num_speakers=3)).eval()
    mix, faces = _inputs(3)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out, permuted = model3(mix, faces), model3(mix, faces[:, perm])
    for key in out:  # the mean over 3 faces sums in another order: equal up to rounding
        torch.testing.assert_close(permuted[key], out[key][:, perm], atol=1e-6, rtol=0)


def test_compress_decompress_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.complex(torch.randn(4, 33, 7, generator=g), torch.randn(4, 33, 7, generator=g))
    y = compress(x, 0.3)
    torch.testing.assert_close(y.abs(), x.abs() ** 0.3)
    torch.testing.assert_close(torch.angle(y), torch.angle(x))
    torch.testing.assert_close(decompress(y, 0.3), x)
    z = torch.zeros(5, dtype=torch.complex64, requires_grad=True)  # silence: finite, zero gradient
    compress(z, 0.3).abs().sum().backward()
    assert torch.isfinite(z.grad).all()


def test_ideal_mask_through_the_decode_path_reconstructs_speech():
    x = _speech()
    sources = torch.stack([x[:S], x[S:2 * S]]).unsqueeze(0)  # (1, 2, S)
    mixture = sources.sum(1)  # (1, S)
    cfg = PRESETS["tiny"]
    mix_c = compress(stft(mixture, cfg.spec), cfg.power)  # (1, F, N)
    ideal = compress(stft(sources, cfg.spec), cfg.power) / mix_c.unsqueeze(1)  # (1, 2, F, N)
    b = cfg.mask_bound
    bounded = torch.complex(ideal.real.clamp(-b, b), ideal.imag.clamp(-b, b))  # what the model can output
    for masks in (ideal, bounded):
        _, spec, waves = decode(masks, mix_c, S, cfg)
        assert waves.shape == (1, 2, S)
        assert (si_sdr(waves, sources) > 30).all()
    assert (si_sdr(mixture.unsqueeze(1).expand_as(sources), sources) < 3).all()


def test_si_sdr_and_sdr_against_hand_computed_values():
    t = torch.arange(4000) / 4000
    ref = torch.stack([torch.sin(2 * math.pi * 5 * t), torch.sin(2 * math.pi * 11 * t)]).unsqueeze(0)  # (1, 2, S)
    noise = 0.1 * torch.cos(2 * math.pi * 5 * t)  # orthogonal to ref[0], zero mean: SI-SDR = 20 dB exactly
    assert (si_sdr(3.0 * ref, ref) > 60).all()
    torch.testing.assert_close(si_sdr(ref[:, :1] + noise, ref[:, :1]), torch.tensor([[20.0]]), atol=1e-3, rtol=0)
    mixture = ref.sum(1)  # (1, S)
    mix_as_est = mixture.unsqueeze(1).expand_as(ref)
    assert torch.equal(si_sdr_improvement(mix_as_est, ref, mixture), torch.zeros(1, 2))
    assert torch.equal(sdr_improvement(mix_as_est, ref, mixture), torch.zeros(1, 2))
    assert (sdr(2.0 * ref, ref) > 60).all()
    assert si_sdr(ref, ref).shape == sdr(ref, ref).shape == (1, 2)


def test_pit_metrics_recover_the_order():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 3, 2000, generator=g)
    mixture = ref.sum(1)
    est = ref + 0.1 * torch.randn(3, 3, 2000, generator=g)
    perm = torch.tensor([[2, 0, 1], [0, 1, 2], [1, 2, 0]])
    shuffled = torch.stack([e[p] for e, p in zip(est, perm)])  # shuffled[b, i] = est[b, perm[b, i]]
    aligned, found = pit_align(shuffled, ref)
    assert torch.equal(aligned, est)
    assert torch.equal(best_permutation(shuffled, ref), found)
    torch.testing.assert_close(si_sdr_improvement(shuffled, ref, mixture, pit=True),
                               si_sdr_improvement(est, ref, mixture))


def test_pit_loss_is_invariant_to_output_order_and_av_loss_is_not():
    mix, faces = _inputs(2)
    sources = 0.1 * torch.randn(B, 2, S)
    for audio_only in (True, False):
        cfg = preset("tiny", audio_only=audio_only)
        with torch.no_grad():
            out = AVSeparator(cfg)(mix, faces)
        flipped = {k: v.flip(1) for k, v in out.items()}
        a, b = separation_loss(out, sources, cfg), separation_loss(flipped, sources, cfg)
        if audio_only:
            torch.testing.assert_close(a, b)
            assert a <= separation_loss(out, sources, replace(cfg, audio_only=False))
        else:
            assert not torch.isclose(a, b)


def test_soft_snr_values():
    ref = 0.1 * torch.randn(2, 4000)
    torch.testing.assert_close(soft_snr(ref, ref, 30.0), torch.tensor([30.0, 30.0]))
    torch.testing.assert_close(soft_snr(torch.zeros_like(ref), ref, 30.0), torch.full((2,), -10 * math.log10(1.001)))
    torch.testing.assert_close(soft_snr(0.5 * ref, ref, 20.0), torch.full((2,), -10 * math.log10(0.25 + 0.01)))


def test_loss_adds_weighted_snr_of_audible_sources_only():
    """separation_loss = mean over (example, speaker) of the compressed complex MSE minus
    snr_weight x soft_snr (dB) where the reference is audible, 0 where it is silent; audio-only:
    the better of the two pairings per example. The silent reference leaves the gradient finite."""
    cfg = preset("tiny")
    assert cfg.snr_weight == 0.1 and PRESETS["paper"].snr_weight == 0.0
    mix, faces = _inputs(2)
    sources = 0.1 * torch.randn(B, 2, S)
    sources[1, 0] = 0.0  # a silent speaker: no SNR term for it
    model = AVSeparator(cfg)
    out = model(mix, faces)
    ref = compress(stft(sources, cfg.spec), cfg.power, cfg.eps)

    def terms(o: dict, w: float) -> torch.Tensor:  # (B, K)
        mse = (o["spec_compressed"] - ref).abs().square().flatten(2).mean(dim=2)
        score = soft_snr(o["waveforms"], sources, cfg.snr_max_db).nan_to_num(0.0, 0.0, 0.0)
        score[1, 0] = 0.0
        return mse - w * score

    for w in (0.0, 0.01, 0.5):
        torch.testing.assert_close(separation_loss(out, sources, replace(cfg, snr_weight=w)), terms(out, w).mean())
    flipped = {k: v.flip(1) for k, v in out.items()}
    for w in (0.0, 0.5):
        ao = replace(cfg, audio_only=True, snr_weight=w)
        best = torch.minimum(terms(out, w).mean(dim=1), terms(flipped, w).mean(dim=1))
        torch.testing.assert_close(separation_loss(out, sources, ao), best.mean())
    separation_loss(out, sources, cfg).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="snr_weight must be >= 0"):
        preset("tiny", snr_weight=-1.0)


def test_mix_and_separate_batch_shapes_and_contents():
    b, k, s = 5, 3, 37
    audio = torch.arange(b, dtype=torch.float32)[:, None].repeat(1, s) + torch.rand(b, s)  # clip i ~ i
    faces = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1).repeat(1, 2, 3, 4, 4)
    mix, sources, mfaces = mix_and_separate_batch(audio, faces, k, torch.Generator().manual_seed(0))
    assert mix.shape == (b, s) and sources.shape == (b, k, s) and mfaces.shape == (b, k, 2, 3, 4, 4)
    assert torch.equal(mix, sources.sum(1))
    idx = sources[:, :, 0].floor().long()  # (B', K) clip ids
    assert torch.equal(sources, audio[idx]) and torch.equal(mfaces, faces[idx])
    assert all(len(set(row.tolist())) == k for row in idx)  # k different clips per mixture
    assert all(sorted(col.tolist()) == list(range(b)) for col in idx.T)  # each clip once per slot
    again = mix_and_separate_batch(audio, faces, k, torch.Generator().manual_seed(0))
    assert torch.equal(again[1], sources)
    with pytest.raises(ValueError):
        mix_and_separate_batch(audio[:2], faces[:2], 3)


def test_config_dict_round_trip():
    from models.checkpoint import config_from_dict, config_to_dict

    cfg = preset("tiny", num_speakers=3, spec=SpectrogramConfig(n_fft=256, win_length=256, hop_length=128))
    d = config_to_dict(cfg)
    assert isinstance(d["spec"], dict)
    as_json = {k: (list(map(list, v)) if k == "audio_kernels" else v) for k, v in d.items()}
    assert config_from_dict(SeparationConfig, as_json) == cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda():
    model = AVSeparator(PRESETS["tiny"]).cuda()
    mix, faces = _inputs(2)
    out = model(mix.cuda(), faces.cuda())
    assert out["waveforms"].device.type == "cuda" and torch.isfinite(out["waveforms"]).all()


# Toy AV problem: each source is a sinusoid (random pitch) switched on/off per video frame; its
# face crop's brightness follows that envelope. Sparse envelopes (on 30% of frames): the paper's
# compressed-spectrogram MSE shrinks estimates where both sources sound (a model that cannot yet
# tell the two pitches apart there outputs ~0 there), which SI-SDR punishes; with mostly one voice
# at a time, following the faces is what makes the separation.
TOY_SPEC = SpectrogramConfig(sample_rate=8000, n_fft=128, win_length=128, hop_length=64)
TOY_S, TOY_T, TOY_PX = 8000, 8, 16  # 1 s at 8 kHz, 8 fps, 16 px crops
TOY_P_ON = 0.3


def _toy_clips(b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    env = (torch.rand(b, TOY_T, generator=g) < TOY_P_ON).float()  # (B, T)
    env[torch.arange(b), torch.randint(TOY_T, (b,), generator=g)] = 1.0  # never silent throughout
    freq = 300 + 3200 * torch.rand(b, 1, generator=g)
    phase = 2 * math.pi * torch.rand(b, 1, generator=g)
    t = torch.arange(TOY_S) / TOY_SPEC.sample_rate
    audio = 0.3 * env.repeat_interleave(TOY_S // TOY_T, dim=1) * torch.sin(2 * math.pi * freq * t + phase)  # (B, S)
    faces = (0.2 + 0.6 * env)[:, :, None, None, None].expand(b, TOY_T, 3, TOY_PX, TOY_PX)  # (B, T, 3, h, w)
    return audio, (faces + 0.05 * torch.randn(faces.shape, generator=g)).clamp(0, 1)


@pytest.mark.slow
def test_tiny_av_model_learns_toy_separation():
    torch.manual_seed(0)
    cfg = preset("tiny", spec=TOY_SPEC)
    model = AVSeparator(cfg)
    g = torch.Generator().manual_seed(1)
    eval_mix, eval_src, eval_faces = mix_and_separate_batch(*_toy_clips(24, g), 2, g)
    strangers = mix_and_separate_batch(*_toy_clips(24, g), 2, g)[2]  # faces of other clips

    def si_sdri(faces: torch.Tensor) -> float:
        model.eval()
        with torch.no_grad():
            est = model(eval_mix, faces)["waveforms"]
        model.train()
        return si_sdr_improvement(est, eval_src, eval_mix).mean().item()

    untrained = si_sdri(eval_faces)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):  # ~10 s on one core
        mix, sources, faces = mix_and_separate_batch(*_toy_clips(8, g), 2, g)
        loss = separation_loss(model(mix, faces), sources, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    trained, with_strangers = si_sdri(eval_faces), si_sdri(strangers)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    assert trained > 3.0 and trained > untrained + 10.0, (untrained, trained)
    assert with_strangers < trained - 5.0, (trained, with_strangers)  # it separates by the faces


def test_sdr_works_with_several_torch_threads_and_restores_them():
    """torch 2.14.1's batched CPU solve fails with > 1 thread; `sdr` solves on one and puts the
    caller's thread count back."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        ref = torch.randn(4, 2, 16000, generator=g)
        est = ref + 0.1 * torch.randn(4, 2, 16000, generator=g)  # noise 20 dB below the reference (the
        # 512-tap filter fits 512 / 16000 of it: +0.14 dB)
        torch.testing.assert_close(sdr(est, ref), torch.full((4, 2), 20.0), atol=0.3, rtol=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_face_pool_max_detects_a_small_object_wherever_it_is():
    """The tiny preset max-pools the face CNN's grid, so a frame's features say whether an object is
    in the picture, not where or how many times: an 8x8 patch of a blank frame gives the same
    features at two places (moved by a multiple of the CNN's stride, 8 px, away from the padded
    borders) and twice at once; average pooling would give the two-patch frame other features."""
    assert PRESETS["tiny"].face_pool == "max" and PRESETS["paper"].face_pool == "avg"
    torch.manual_seed(0)
    cnn = AVSeparator(PRESETS["tiny"]).visual.frame_cnn.eval()
    frames = torch.zeros(3, 3, 96, 96)
    frames[[0, 2], 0, 16:24, 16:24] = 1.0  # a red patch ...
    frames[[1, 2], 0, 64:72, 64:72] = 1.0  # ... elsewhere; frame 2 has both
    with torch.no_grad():
        feats = cnn(frames)
    assert feats.shape == (3, 64)
    torch.testing.assert_close(feats[1], feats[0])
    torch.testing.assert_close(feats[2], feats[0])
    with pytest.raises(ValueError, match="face_pool must be 'avg' or 'max', got 'mean'"):
        preset("tiny", face_pool="mean")


def test_audio_proj_narrows_the_audio_features_before_fusion():
    """tiny: 2 x 257 audio features -> 64 before the BLSTM (beside 2 x 64 visual ones); paper: none."""
    tiny, paper = AVSeparator(PRESETS["tiny"]), PRESETS["paper"]
    assert tiny.audio.out_dim == 64 and tiny.head.blstm.input_size == 64 + 2 * 64
    assert paper.audio_proj == 0
    ao = AVSeparator(preset("tiny", audio_only=True))
    assert ao.audio.out_dim == 64 and ao.head.blstm.input_size == 64
    mix, _ = _inputs(2)
    feats = tiny.audio(stft(mix, PRESETS["tiny"].spec))  # (B, N, 64)
    assert feats.shape[0] == B and feats.shape[-1] == 64 and bool((feats >= 0).all())  # after the ReLU
    with pytest.raises(ValueError, match="audio_proj must be >= 0 \\(0: off\\), got -1"):
        preset("tiny", audio_proj=-1)
