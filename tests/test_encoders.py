"""Visual and audio encoders: shapes, gradients, batch consistency, local resnet18 weights."""
import pytest
import torch
from torchvision.models import resnet18

from models.encoders import AUDIO_ARCHS, AudioEncoder, AudioEncoderConfig, VisualEncoder, VisualEncoderConfig

B, H, W = 3, 67, 67
M, N = 64, 37
# Grid sizes for 67 x 67 frames and 64 x 37 log-mels (stride 8 tiny, 32 resnet18, 16 vggish).
VISUAL_GRID = {"tiny": (9, 9), "resnet18": (3, 3)}
AUDIO_GRID = {"tiny": (8, 5), "vggish": (4, 3), "resnet18": (2, 2)}


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_visual_encoder_shapes_and_backward(arch):
    torch.manual_seed(0)
    enc = VisualEncoder(VisualEncoderConfig(arch=arch, width=16))
    frames = torch.rand(B, 3, H, W)
    grid = enc.forward_features(frames)
    d = 64 if arch == "tiny" else 512
    assert enc.out_dim == d
    assert grid.shape == (B, d, *VISUAL_GRID[arch])
    vec = enc.forward_head(grid)
    assert vec.shape == (B, d)
    assert torch.allclose(vec, grid.mean(dim=(-2, -1)))
    enc(frames).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(grid).all()


def test_visual_out_dim_projection():
    enc = VisualEncoder(VisualEncoderConfig(arch="tiny", width=8, out_dim=24))
    assert enc.out_dim == 24
    assert enc.forward_features(torch.rand(B, 3, H, W)).shape == (B, 24, 9, 9)


@pytest.mark.parametrize("arch", AUDIO_ARCHS)
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_audio_encoder_shapes_and_backward(arch, pool):
    torch.manual_seed(0)
    enc = AudioEncoder(AudioEncoderConfig(arch=arch, width=16, pool=pool))
    logmel = torch.randn(B, M, N) - 5.0
    grid = enc.forward_features(logmel)
    d = 64 if arch == "tiny" else 512
    assert grid.shape == (B, d, *AUDIO_GRID[arch])
    vec = enc.forward_head(grid)
    expected = grid.amax(dim=(-2, -1)) if pool == "max" else grid.mean(dim=(-2, -1))
    assert vec.shape == (B, d) and torch.allclose(vec, expected)
    enc(logmel).square().mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("make,x", [
    (lambda: VisualEncoder(VisualEncoderConfig(arch="tiny", width=8)), lambda: torch.rand(B, 3, H, W)),
    (lambda: VisualEncoder(VisualEncoderConfig(arch="resnet18")), lambda: torch.rand(B, 3, H, W)),
    (lambda: AudioEncoder(AudioEncoderConfig(arch="tiny", width=8)), lambda: torch.randn(B, M, N)),
    (lambda: AudioEncoder(AudioEncoderConfig(arch="vggish")), lambda: torch.randn(B, M, N)),
])
def test_encoder_batch_consistency(make, x):
    torch.manual_seed(1)
    enc, inp = make().eval(), x()
    with torch.no_grad():
        batched = enc.forward_features(inp)
        single = torch.cat([enc.forward_features(inp[i : i + 1]) for i in range(B)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_visual_resnet18_is_the_torchvision_trunk(tmp_path):
    torch.manual_seed(2)
    ref = resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)  # includes fc.*, which the encoder ignores
    enc = VisualEncoder(VisualEncoderConfig(arch="resnet18", weights=str(path))).eval()
    for name, p in enc.trunk.state_dict().items():
        assert torch.equal(p, ref.state_dict()[name]), name
    frames = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        x = (frames - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        expected = ref.layer4(ref.layer3(ref.layer2(ref.layer1(x))))
        torch.testing.assert_close(enc.forward_features(frames), expected)


def test_visual_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        VisualEncoder(VisualEncoderConfig(weights=str(tmp_path / "absent.pth")))
    state = resnet18(weights=None).state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing keys"):
        VisualEncoder(VisualEncoderConfig(weights=str(tmp_path / "missing.pth")))
    wrong = dict(state, **{"conv1.weight": torch.zeros(64, 1, 7, 7)})
    torch.save(wrong, tmp_path / "wrong_shape.pth")
    with pytest.raises(ValueError, match="does not match"):
        VisualEncoder(VisualEncoderConfig(weights=str(tmp_path / "wrong_shape.pth")))
    with pytest.raises(ValueError, match="arch must be 'resnet18'"):
        VisualEncoderConfig(arch="tiny", weights=str(tmp_path / "missing.pth"))


def test_unknown_archs_rejected():
    with pytest.raises(ValueError, match="unknown visual arch"):
        VisualEncoderConfig(arch="vit")
    with pytest.raises(ValueError, match="unknown audio arch"):
        AudioEncoderConfig(arch="soundnet")
