"""THE checkpoint format, shared by train (resume), evaluate, serve and the tests.

A checkpoint is one `torch.save`d dict::

    {"model": name,              # the task's name, e.g. "localization"
     "config": {...},            # the model's frozen config dataclass as a plain dict
     "state_dict": {...},        # model.state_dict(), tensors on CPU
     "extra": {...}}             # anything plain: step, epoch, metrics, optimizer state

It is loaded with `torch.load(..., weights_only=True)`, so the config and `extra` may only hold
str / int / float / bool / None / list / tuple / dict (and tensors in `extra`). The model is
rebuilt from the (config class, model class) that the caller's `builders` give for its name
(jobs.tasks.builders: the task table); config fields named `weights` (paths of pretrained files
used at initialisation) are set to None for the rebuild, since the state dict already holds the
weights.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

Builders = Mapping[str, tuple[type, type]]  # model name -> (config dataclass, model class built as model_cls(config))

_KEYS = ("model", "config", "state_dict", "extra")
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(obj: Any, where: str, allow_tensors: bool = False) -> None:
    """Raise TypeError unless `obj` is made only of types `torch.load(weights_only=True)` accepts."""
    if isinstance(obj, _PLAIN) or (allow_tensors and isinstance(obj, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]", allow_tensors)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, f"{where} key {k!r}", allow_tensors=False)
            _check_plain(v, f"{where}[{k!r}]", allow_tensors)
    else:
        raise TypeError(f"{where} has type {type(obj).__name__}, which a weights_only checkpoint cannot hold")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Frozen config dataclass (nested dataclasses allowed) -> plain dict; tuples stay tuples."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"expected a config dataclass instance, got {type(config).__name__}")
    d = dataclasses.asdict(config)
    _check_plain(d, type(config).__name__)
    return d


def _from_value(tp: Any, value: Any) -> Any:
    """Rebuild `value` as type `tp`: dicts -> dataclasses, lists -> tuples where the type says so."""
    if value is None:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return config_from_dict(arg, value)
            if typing.get_origin(arg) in (tuple, list, dict) and isinstance(value, (list, tuple, dict)):
                return _from_value(arg, value)
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_value(args[0], v) for v in value)
        if args:
            return tuple(_from_value(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_from_value(args[0] if args else Any, v) for v in value]
    if origin is dict and isinstance(value, dict):
        vt = args[1] if len(args) == 2 else Any
        return {k: _from_value(vt, v) for k, v in value.items()}
    return value


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Plain dict (as from `config_to_dict`) -> config dataclass `cls`, nested configs rebuilt.

    Missing fields take their defaults; unknown fields raise ValueError.
    """
    if not isinstance(d, dict):
        raise TypeError(f"{cls.__name__} config must be a dict, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} config fields: {unknown}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _from_value(hints[k], v) for k, v in d.items()})


def _without_init_weights(config: Any) -> Any:
    """Copy of `config` with every (nested) field named `weights` set to None."""
    changes = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name == "weights" and v is not None:
            changes[f.name] = None
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            changes[f.name] = _without_init_weights(v)
    return dataclasses.replace(config, **changes) if changes else config


def save_checkpoint(path: str | Path, name: str, model: nn.Module, config: Any,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of `model` atomically (temporary file in the same folder, then rename).

    name: the model's (task's) name; config: its config dataclass, of the type of `model.cfg`;
    extra: plain values and tensors (step, metrics, optimizer state...). Returns the path written.
    """
    own = getattr(model, "cfg", config)
    if type(config) is not type(own):
        raise TypeError(f"model {name!r} needs a {type(own).__name__}, got {type(config).__name__}")
    extra = {} if extra is None else extra
    _check_plain(extra, "extra", allow_tensors=True)
    ckpt = {
        "model": name,
        "config": config_to_dict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict (weights_only=True), checked to be one; nothing is built. Raises
    FileNotFoundError for a missing file and ValueError for a file that is not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types on foreign files (UnpicklingError, KeyError, ...)
        raise ValueError(f"{path} is not an avray checkpoint (torch.load failed: {e})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _KEYS):
        got = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not an avray checkpoint: expected keys {list(_KEYS)}, got {got}")
    return ckpt


def load_checkpoint(path: str | Path, builders: Builders,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Read a checkpoint (`read_checkpoint`) and rebuild its model with `builders[name]`.

    Returns (model in eval mode on `map_location`, the checkpoint dict). Raises like
    `read_checkpoint`, and KeyError for a model name `builders` does not know.
    """
    ckpt = read_checkpoint(path, map_location)
    if ckpt["model"] not in builders:
        raise KeyError(f"unknown model {ckpt['model']!r}; known models: {sorted(builders)}")
    cfg_cls, model_cls = builders[ckpt["model"]]
    model = model_cls(_without_init_weights(config_from_dict(cfg_cls, ckpt["config"])))
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.to(map_location).eval(), ckpt
