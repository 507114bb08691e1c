"""The checkpoint format: config round trips, save/load round trips, clear errors, atomic writes."""
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet18

import models.checkpoint as ckpt_mod
from models.checkpoint import config_from_dict, config_to_dict, load_checkpoint as load, save_checkpoint
from models.encoders import AudioEncoderConfig, VisualEncoderConfig
from models.localization import PRESETS, LocalizationConfig, SoundLocalizer

B, H, W, M, N = 3, 67, 67, 64, 37
BUILDERS = {"localization": (LocalizationConfig, SoundLocalizer)}


def load_checkpoint(path):
    return load(path, BUILDERS)


@dataclass(frozen=True)
class _Inner:
    sizes: tuple[int, ...] = (3, 5)
    name: str | None = None


@dataclass(frozen=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    pair: tuple[float, str] = (0.5, "x")
    inners: tuple[_Inner, ...] = ()
    maybe: _Inner | None = None
    table: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class _HasPath:
    where: Path = Path(".")


def _small_config() -> LocalizationConfig:
    return LocalizationConfig(visual=VisualEncoderConfig(arch="tiny", width=8),
                              audio=AudioEncoderConfig(arch="tiny", width=8), embed_dim=16)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_configs_round_trip(name):
    d = config_to_dict(PRESETS[name])
    assert isinstance(d["visual"], dict) and isinstance(d["audio"], dict)
    assert config_from_dict(LocalizationConfig, d) == PRESETS[name]


def test_nested_config_with_tuples_round_trips():
    cfg = _Outer(inner=_Inner((7,), "a"), pair=(1.5, "y"), inners=(_Inner(), _Inner((1, 2, 3), "b")),
                 maybe=_Inner((9,)), table={"k": [1, 2]})
    d = config_to_dict(cfg)
    assert d["inners"][1] == {"sizes": (1, 2, 3), "name": "b"}
    assert config_from_dict(_Outer, d) == cfg
    as_lists = dict(d, pair=[1.5, "y"], inner={"sizes": [7], "name": "a"})  # e.g. after JSON
    assert config_from_dict(_Outer, as_lists) == cfg
    assert config_from_dict(_Outer, {}) == _Outer()  # missing fields take defaults


def test_config_errors():
    with pytest.raises(ValueError, match="unknown _Inner config fields"):
        config_from_dict(_Inner, {"sizes": (1,), "colour": "red"})
    with pytest.raises(TypeError, match="weights_only"):
        config_to_dict(_HasPath())
    with pytest.raises(TypeError):
        config_to_dict({"not": "a dataclass"})


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    cfg = _small_config()
    model = SoundLocalizer(cfg)
    frames, logmel = torch.rand(B, 3, H, W), torch.randn(B, M, N)
    model(frames, logmel)  # one train-mode step moves the BatchNorm running statistics
    model.eval()
    path = save_checkpoint(tmp_path / "sub" / "loc.pt", "localization", model, cfg, extra={"step": 7, "loss": [1.0]})
    assert [p.name for p in path.parent.iterdir()] == ["loc.pt"]  # no temporary file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "config", "state_dict", "extra"} and raw["model"] == "localization"
    loaded, ck = load_checkpoint(path)
    assert isinstance(loaded, SoundLocalizer) and not loaded.training
    assert loaded.cfg == cfg and ck["extra"] == {"step": 7, "loss": [1.0]}
    with torch.no_grad():
        a, b = model(frames, logmel), loaded(frames, logmel)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pretrained_weights_path_is_not_needed_to_load(tmp_path):
    torch.save(resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    cfg = LocalizationConfig(visual=VisualEncoderConfig(arch="resnet18", weights=str(tmp_path / "r18.pth")),
                             audio=AudioEncoderConfig(arch="tiny", width=8), embed_dim=16)
    model = SoundLocalizer(cfg).eval()
    save_checkpoint(tmp_path / "loc.pt", "localization", model, cfg)
    (tmp_path / "r18.pth").unlink()
    loaded, ck = load_checkpoint(tmp_path / "loc.pt")
    assert ck["config"]["visual"]["weights"] == str(tmp_path / "r18.pth")  # provenance kept
    assert loaded.cfg.visual.weights is None
    frames, logmel = torch.rand(1, 3, 64, 64), torch.randn(1, M, N)
    with torch.no_grad():
        assert torch.equal(model(frames, logmel)["sim"], loaded(frames, logmel)["sim"])


def test_unknown_model_name_and_wrong_config(tmp_path):
    cfg = _small_config()
    torch.save({"model": "nope", "config": {}, "state_dict": {}, "extra": {}}, tmp_path / "y.pt")
    with pytest.raises(KeyError, match=r"unknown model 'nope'; known models: \['localization'\]"):
        load_checkpoint(tmp_path / "y.pt")
    with pytest.raises(TypeError, match="model 'localization' needs a LocalizationConfig, got VisualEncoderConfig"):
        save_checkpoint(tmp_path / "z.pt", "localization", SoundLocalizer(cfg), VisualEncoderConfig())


def test_files_that_are_not_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "text.pt").write_text("hello, not a checkpoint")
    with pytest.raises(ValueError, match="not an avray checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not an avray checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"state_dict": {}}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="expected keys"):
        load_checkpoint(tmp_path / "partial.pt")


def test_extra_must_be_plain_and_failed_save_keeps_old_file(tmp_path, monkeypatch):
    cfg = _small_config()
    model = SoundLocalizer(cfg)
    with pytest.raises(TypeError, match="extra"):
        save_checkpoint(tmp_path / "a.pt", "localization", model, cfg, extra={"path": Path(".")})
    path = save_checkpoint(tmp_path / "a.pt", "localization", model, cfg, extra={"step": 1})
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, "localization", model, cfg, extra={"step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


@pytest.mark.parametrize("preset", ["tiny", "tiny-audio-only"])
def test_separation_checkpoint_round_trip(tmp_path, preset):
    from jobs.tasks import get, load_checkpoint
    from models.separation import AVSeparator

    cfg = get("separation").presets[preset]
    torch.manual_seed(0)
    model = AVSeparator(cfg).eval()
    save_checkpoint(tmp_path / "sep.pt", "separation", model, cfg, extra={"epoch": 3})
    back, ckpt = load_checkpoint(tmp_path / "sep.pt", task="separation")
    assert ckpt["model"] == "separation" and ckpt["extra"] == {"epoch": 3} and back.cfg == cfg
    with pytest.raises(ValueError, match="holds a separation model, not captioning"):
        load_checkpoint(tmp_path / "sep.pt", task="captioning")
    mix = torch.randn(2, 4000)
    faces = None if cfg.audio_only else torch.rand(2, cfg.num_speakers, 3, 3, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(back(mix, faces)["waveforms"], model(mix, faces)["waveforms"])
