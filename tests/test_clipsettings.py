"""ClipSettings: the one serialised form of what a clip contains (preprocess -> checkpoint -> serve)."""
import json

import pytest

from jobs.preprocess import PreprocessConfig
from pipelines.clipsettings import ClipSettings
from pipelines.decode import DecodeConfig
from pipelines.spectrogram import SpectrogramConfig


def test_round_trip_through_json_and_the_configs_it_makes():
    s = ClipSettings(clip_seconds=1.5, hop_seconds=0.5, fps=5.0, size=72, resize="letterbox", sample_rate=22050,
                     n_mels=40, n_fft=1024, hop_length=256, win_length=1024)
    assert ClipSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    d = s.decode_config(max_pixels=100 * 100, max_seconds=9.0)
    assert d == DecodeConfig(clip_seconds=1.5, hop_seconds=0.5, fps=5.0, size=72, resize="letterbox",
                             sample_rate=22050, max_pixels=10000, max_seconds=9.0)
    assert s.spectrogram_config() == SpectrogramConfig(sample_rate=22050, n_fft=1024, win_length=1024,
                                                       hop_length=256, n_mels=40)
    assert ClipSettings.from_dict({}) == ClipSettings()  # missing keys take the defaults


def test_preprocess_options_name_the_same_settings():
    cfg = PreprocessConfig(inputs=("x.mp4",), out="o", fps=4.0, size=64, resize="letterbox", n_mels=32)
    assert ClipSettings.from_fields(cfg) == ClipSettings(fps=4.0, size=64, resize="letterbox", n_mels=32)
    assert ClipSettings.from_fields(PreprocessConfig(inputs=("x.mp4",), out="o")) == ClipSettings()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"unknown clip settings \['colour'\]"):
        ClipSettings.from_dict({"fps": 8.0, "colour": "red"})
    with pytest.raises(ValueError, match="resize must be 'crop' or 'letterbox'"):
        ClipSettings(resize="stretch")
    with pytest.raises(ValueError, match="win_length must be in"):
        ClipSettings(win_length=1024, n_fft=512)
