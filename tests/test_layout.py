"""Conventions DESIGN.md makes checkable."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_models_never_import_ray():
    files = sorted((ROOT / "models").glob("*.py"))
    assert files, "models/ has no modules"
    offenders = [f.name for f in files if "ray" in _imports(f)]
    assert offenders == []


def test_command_modules_import_light_at_top_level():
    # `avray --help` imports every command module: heavy libraries load inside run().
    from jobs.cli import COMMANDS

    heavy = {"ray", "torch", "av", "torchvision", "torchaudio"}
    for f in [ROOT / (m.replace(".", "/") + ".py") for m in COMMANDS.values()]:
        top = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                top.add(node.module.split(".")[0])
        assert not (top & heavy), f"{f.name} imports {top & heavy} at module level"
