import pytest
import torch
import torchaudio

from pipelines.spectrogram import LogMel, SpectrogramConfig, istft, log_mel, stft

CFG = SpectrogramConfig(sample_rate=8000, n_fft=64, win_length=48, hop_length=16, n_mels=11)


def test_log_mel_matches_direct_stft_reference():
    torch.manual_seed(0)
    x = torch.randn(333)
    spec = torch.stft(x, n_fft=64, hop_length=16, win_length=48, window=torch.hann_window(48),
                      center=True, pad_mode="reflect", return_complex=True)  # (F, N)
    fb = torchaudio.functional.melscale_fbanks(33, 0.0, 4000.0, 11, 8000, norm=None, mel_scale="htk")  # (F, M)
    ref = torch.log(fb.T @ spec.abs() ** 2 + CFG.log_eps)  # (M, N)
    out = log_mel(x, CFG)
    assert out.shape == (11, 333 // 16 + 1) == (CFG.n_mels, CFG.num_frames(333))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_log_mel_batched_equals_stacked_single_calls():
    x = torch.randn(3, 5, 401)
    batched = log_mel(x, CFG)
    assert batched.shape == (3, 5, 11, 26)
    stacked = torch.stack([torch.stack([log_mel(x[i, j], CFG) for j in range(5)]) for i in range(3)])
    torch.testing.assert_close(batched, stacked)
    torch.testing.assert_close(LogMel(CFG)(x), batched)


def test_stft_istft_round_trip_and_batch_consistency():
    x = torch.randn(2, 3, 777)
    spec = stft(x, CFG)
    assert spec.shape == (2, 3, CFG.n_freqs, 777 // 16 + 1) == (2, 3, 33, 49)
    assert spec.dtype == torch.complex64
    torch.testing.assert_close(spec[1, 2], stft(x[1, 2], CFG))
    back = istft(spec, 777, CFG)
    assert back.shape == (2, 3, 777)
    torch.testing.assert_close(back, x, rtol=1e-4, atol=1e-4)


def test_silence_gives_log_eps_floor():
    out = log_mel(torch.zeros(160), CFG)
    torch.testing.assert_close(out, torch.full((11, 11), float(torch.log(torch.tensor(CFG.log_eps)))))


@pytest.mark.parametrize("kwargs, message", [
    ({"win_length": 600}, "win_length must be in"),
    ({"hop_length": 0}, "must be positive"),
])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpectrogramConfig(**kwargs)
