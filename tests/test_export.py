"""avray export: a training checkpoint without its optimizer state, loadable and answering alike."""
import pytest
import torch

from benchmarks.serve import CLIP_SETTINGS, tiny_checkpoints
from jobs.export import ExportConfig
from jobs.export import run as export
from jobs.tasks import load_checkpoint
from models.checkpoint import read_checkpoint, save_checkpoint


def test_export_keeps_what_serving_reads_and_drops_the_optimizer(tmp_path, capsys):
    path = tiny_checkpoints(tmp_path, CLIP_SETTINGS, ["a red circle hums"])["localization"]
    model, _ = load_checkpoint(path)
    opt = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # a real optimizer state: two moments per parameter
    train = tmp_path / "model.pt"
    save_checkpoint(train, "localization", model, model.cfg,
                    extra={"epoch": 3, "clip_settings": CLIP_SETTINGS, "metrics": {"train_loss": 1.5},
                           "optimizer": opt.state_dict(), "scheduler": None})
    out = tmp_path / "export" / "localization.pt"
    assert export(ExportConfig(str(train), str(out), trained_with="avray train --task localization")) == 0
    assert "avray export: localization checkpoint, epoch 4," in capsys.readouterr().out
    got = read_checkpoint(out)
    from jobs.embed import checkpoint_id
    assert set(got["extra"]) == {"epoch", "clip_settings", "metrics", "exported"}
    assert got["extra"]["exported"] == {"from_sha1": checkpoint_id(str(train)), "trained_with": "avray train --task localization"}
    assert (got["extra"]["epoch"], got["extra"]["clip_settings"], got["extra"]["metrics"]) == (3, CLIP_SETTINGS, {"train_loss": 1.5})
    assert out.stat().st_size < train.stat().st_size / 2
    exported, _ = load_checkpoint(out)
    for a, b in zip(model.state_dict().values(), exported.state_dict().values()):
        assert torch.equal(a, b)


def test_export_refuses_its_source_and_checkpoints_without_clip_settings(tmp_path):
    path = tiny_checkpoints(tmp_path, CLIP_SETTINGS, ["a red circle hums"])["captioning"]
    with pytest.raises(ValueError, match="OUT must differ from the checkpoint"):
        export(ExportConfig(path, path))
    model, _ = load_checkpoint(path)
    bare = save_checkpoint(tmp_path / "bare.pt", "captioning", model, model.cfg, extra={"epoch": 0})
    with pytest.raises(ValueError, match="has no clip_settings: serving could not decode uploads"):
        export(ExportConfig(str(bare), str(tmp_path / "out.pt")))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export(ExportConfig(str(tmp_path / "missing.pt"), str(tmp_path / "out.pt")))
