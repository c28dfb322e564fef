"""Pack a workspace for upload: .gitignore/.fedmlignore at its root decide what goes in (scheduler.contract.archive packs).

Symlinks that point outside the workspace are refused here with the file named (the scheduler would refuse
them too)."""

from __future__ import annotations

from pathlib import Path

from scheduler.contract.archive import Packed, PackError
from scheduler.contract.archive import pack as _pack

from .errors import USAGE, CliError


def _ignore(root: Path):  # type: ignore[no-untyped-def]
    patterns: list[str] = []
    for name in (".gitignore", ".fedmlignore"):
        f = root / name
        if f.is_file():
            patterns += f.read_text(errors="replace").splitlines()
    if not patterns:
        return None
    import pathspec

    return pathspec.PathSpec.from_lines("gitwildmatch", patterns)


def pack(root: Path, *, show_progress: bool = True) -> Packed:
    from .progress import Progress

    try:
        with Progress(f"packing {root.name or root}", None, enabled=show_progress, unit="files") as bar:
            return _pack(root, ignore=_ignore(root), on_file=lambda: bar.advance(1))
    except PackError as exc:
        raise CliError(f"workspace {exc}", USAGE) from None


__all__ = ["Packed", "pack"]
