"""`avray <command>`: one CLI whose subcommands each parse into a dataclass and call `run(cfg)`.

A command lives in its own module under `jobs/` and exposes:

- a module docstring: first line is the one-line help, the rest (with an example) the description;
- `CONFIG`: a dataclass whose fields are the options. Field metadata drives argparse:
  `help` (required), `positional=True`, `nargs`, `choices`, `short` (e.g. "-o");
- `run(cfg) -> int | None`: does the work (heavy imports happen inside it, so `--help` is fast).

The CLI layer holds no logic of its own beyond this translation.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import types
import typing
from typing import Any, Sequence

# command name -> module; a plain dict, no decorator registry.
COMMANDS: dict[str, str] = {
    "synth": "jobs.synth",
    "preprocess": "jobs.preprocess",
    "train": "jobs.train",
    "evaluate": "jobs.evaluate",
    "embed": "jobs.embed",
    "search": "jobs.search",
    "index": "jobs.index",
    "dedup": "jobs.dedup",
    "export": "jobs.export",
    "manifest": "jobs.manifest",
    "serve": "jobs.serve",
}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, is_optional) for `X | None` / `Optional[X]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one argparse option per field of dataclass `cls` (see module docstring)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{f.name} has no help text")
        if f.name == "command":  # the subcommand's own dest: the option would replace it
            raise TypeError(f"{cls.__name__}.command: an option may not be named 'command'")
        tp, _ = _unwrap_optional(hints[f.name])
        kwargs: dict[str, Any] = {"help": meta["help"]}
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        if typing.get_origin(tp) in (list, tuple):
            (elem,) = set(typing.get_args(tp)) - {Ellipsis}
            kwargs["type"] = elem
            kwargs["nargs"] = meta.get("nargs", "+")
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
        flag = "--" + f.name.replace("_", "-")
        if meta.get("positional"):
            if has_default:
                kwargs["default"] = default
                if kwargs.get("nargs") == "+":
                    kwargs["nargs"] = "*"
            parser.add_argument(f.name, metavar=f.name.upper(), **kwargs)
            continue
        names = [flag] + ([meta["short"]] if "short" in meta else [])
        if has_default:
            kwargs["default"] = default
            if tp is not bool and default is not None:
                kwargs["help"] += " (default: %(default)s)"
        else:
            kwargs["required"] = True
        parser.add_argument(*names, dest=f.name, **kwargs)


def dataclass_from_args(cls: type, ns: argparse.Namespace) -> Any:
    """Build `cls` from the parsed namespace (lists become tuples where the field is a tuple)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        tp, _ = _unwrap_optional(hints[f.name])
        if typing.get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        values[f.name] = v
    return cls(**values)


def _load(command: str) -> types.ModuleType:
    return importlib.import_module(COMMANDS[command])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avray",
        description="Audio-visual learning at cluster scale on Ray: synthesise scenes, ingest video "
        "into clip Parquet, train, evaluate and serve.",
        epilog="Run `avray <command> --help` for a command's options and an example.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name in COMMANDS:
        mod = _load(name)
        doc = (mod.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(name, help=summary, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_dataclass_arguments(p, mod.CONFIG)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    mod = _load(ns.command)
    cfg = dataclass_from_args(mod.CONFIG, ns)
    try:
        rc = mod.run(cfg)
    except KeyboardInterrupt:
        print("avray: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: one clear line, no traceback
        print(f"avray {ns.command}: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
