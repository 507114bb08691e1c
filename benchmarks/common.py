"""What the benchmark scripts share."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, name: str, markdown: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in `path` (appending
    the marked block when the markers are absent), so a benchmark rewrites only its own figures."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown}\n{end}"
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
