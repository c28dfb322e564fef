"""`fedml template list|show|init`: the prebuilt jobs shipped with the package (job_templates/)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import USAGE, CliError
from .output import JsonOpt
from .output import err as _err
from .output import print_json as _print_json

template_app = typer.Typer(help="Prebuilt jobs to copy and edit: hello, train, train_ddp ...", no_args_is_help=True,
                           rich_markup_mode=None)


def _templates_dir() -> Any:

    here = Path(__file__).resolve().parent
    for d in (here / "job_templates", here.parent / "job_templates"):  # installed wheel, source checkout
        if d.is_dir():
            return d
    raise CliError("job templates are not installed with this copy of fedml")


def _template(name: str) -> Any:
    d = _templates_dir() / name
    if not (d / "job.yaml").is_file():
        names = ", ".join(sorted(p.name for p in _templates_dir().iterdir() if (p / "job.yaml").is_file()))
        raise CliError(f'no template "{name}"; templates: {names}', USAGE)
    return d


def _describe_template(d: Any) -> str:
    first = d.joinpath("job.yaml").read_text().splitlines()[0] if d.joinpath("job.yaml").exists() else ""
    return first.lstrip("# ").strip() if first.startswith("#") else ""


@template_app.command("list")
def template_list(as_json: JsonOpt = False) -> None:
    """The prebuilt jobs."""
    d = _templates_dir()
    items = [{"name": p.name, "description": _describe_template(p)}
             for p in sorted(d.iterdir()) if (p / "job.yaml").is_file()]
    if as_json:
        _print_json(items)
        return
    for it in items:
        sys.stdout.write(f"{it['name']:<12} {it['description']}\n")


@template_app.command("show")
def template_show(name: Annotated[str, typer.Argument(metavar="NAME")]) -> None:
    """Print a template's job.yaml and list its files."""
    d = _template(name)
    sys.stdout.write(d.joinpath("job.yaml").read_text())
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    sys.stdout.write("\n# files: " + ", ".join(files) + "\n")


@template_app.command("init")
def template_init(name: Annotated[str, typer.Argument(metavar="NAME")],
                  dest: Annotated[str | None, typer.Argument(metavar="DIR", help="Where (default: ./NAME).")] = None) -> None:
    """Copy a template into DIR to edit it; then `fedml launch DIR/job.yaml`."""
    import shutil

    d = _template(name)
    target = Path(dest or name)
    if target.exists() and any(target.iterdir()):
        _err(f"error: {target} exists and is not empty; pick another DIR")
        raise typer.Exit(USAGE)
    from .progress import Progress

    total = sum(1 for p in d.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")

    def copy(src: str, dst: str) -> object:
        bar.advance(1)
        return shutil.copy2(src, dst)

    try:
        with Progress(f"copying template {name}", total, unit="files") as bar:
            shutil.copytree(d, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                            copy_function=copy)
    except OSError as exc:
        _err(f"error: cannot create {target}: {exc.strerror or exc}")
        raise typer.Exit(USAGE) from None
    _err(f"Created {target} from template {name}. Run it with: fedml launch {target / 'job.yaml'}")
