"""Every task's training step under bf16 autocast, as `avray train` runs it on a GPU (here on the
CPU, which has bf16 autocast too): finite loss and gradients."""
import pytest
import torch

from jobs.tasks import TASKS, CaptioningTask
from models.captioning import SPECIALS
from models.checkpoint import build_model


def _batch(name: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    B = 3
    if name == "localization":
        box = torch.zeros(B, 96, 96, dtype=torch.bool)
        box[:, 20:50, 30:70] = True
        return {"frame": torch.rand(B, 3, 96, 96, generator=g), "logmel": torch.randn(B, 64, 33, generator=g),
                "box_mask": box, "has_box": torch.tensor([True, False, True]),
                "frame_centre": torch.full((B,), 0.5), "clip_seconds": torch.full((B,), 2.0)}
    if name == "separation":
        return {"audio": torch.randn(B, 16000, generator=g) * 0.1, "faces": torch.rand(B, 4, 3, 48, 48, generator=g)}
    tokens = torch.tensor([[1, 4, 5, 2, 0], [1, 5, 2, 0, 0], [1, 4, 4, 5, 2]])
    return {"frames": torch.rand(B, 8, 3, 64, 64, generator=g), "logmel": torch.randn(B, 64, 33, generator=g),
            "tokens": tokens}


@pytest.mark.parametrize("name", ["localization", "separation", "captioning"])
def test_step_under_bf16_autocast_is_finite(name):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    task = TASKS[name] if name != "captioning" else CaptioningTask(SPECIALS + ("red", "square"))
    cfg = task.configs["tiny"]
    cfg = cfg(task.vocab) if callable(cfg) else cfg
    model = build_model(task.model, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.step(model, _batch(name, g), cfg, g)["loss"]
    loss.backward()
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all(torch.isfinite(gr).all() for gr in grads)
