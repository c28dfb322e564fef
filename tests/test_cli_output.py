"""How the CLI prints a run's log from the scheduler's text form (show.write_text): pure functions, no server."""

from __future__ import annotations

import io

import pytest

from fedml_cli.show import write_text

pytestmark = pytest.mark.unit


def text(*records: tuple[int, int, str, str]) -> str:
    return "".join(f"{pos}\t{rank}\t{s}\t{line}\n" for pos, rank, s, line in records)


def printed(chunk: str, ranked: bool = False) -> tuple[str, str, int | None]:
    out, err = io.StringIO(), io.StringIO()
    last = write_text(chunk, ranked, out, err)
    return out.getvalue(), err.getvalue(), last


def test_stdout_lines_print_as_they_were_written_tabs_and_digits_included() -> None:
    lines = ["plain", "1\t0\to\tlooks like a record", "", "tab\tin it", "é 中 🚀"]
    out, err, last = printed(text(*((i, 0, "o", line) for i, line in enumerate(lines))))
    assert out == "".join(line + "\n" for line in lines) and err == "" and last == 4


def test_stderr_and_the_schedulers_lines_go_to_stderr_in_order() -> None:
    chunk = text((7, 0, "o", "a"), (8, 0, "e", "warn"), (9, 0, "f", "── attempt 2 on node n1"), (10, 0, "o", "b"))
    out, err, last = printed(chunk)
    assert out == "a\nb\n" and err == "warn\n── attempt 2 on node n1\n" and last == 10


def test_ranked_lines_are_prefixed_except_the_schedulers_own() -> None:
    out, err, last = printed(text((0, 0, "o", "x"), (1, 1, "o", "y"), (2, 0, "f", "attempt")), ranked=True)
    assert out == "[rank 0] x\n[rank 1] y\n" and err == "attempt\n" and last == 2


def test_nothing_to_print() -> None:
    assert printed("") == ("", "", None)


def test_fast_help_is_the_help_typer_renders_and_is_dropped_when_stale(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`fedml --help` prints the text rendered at install (fedml_cli/entry.py): it must be typer's own, for a pipe
    and for any terminal at least 80 columns wide, and is not used once the code changed or the terminal is
    narrower."""
    import subprocess
    import sys

    from fedml_cli import entry

    monkeypatch.setattr(entry, "HELP_CACHE", str(tmp_path / "help.cache"))
    entry.write_help_cache()
    live = [sys.executable, "-c", "import sys; sys.argv[0] = 'fedml'; from fedml_cli.main import main; main()",
            "--help"]
    for columns in ("", "80", "200"):
        env = {k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"} | (
            {"COLUMNS": columns} if columns else {})
        monkeypatch.setattr(entry.os, "environ", env)
        assert entry.cached_help() == subprocess.run(live, env=env, capture_output=True, text=True).stdout
    monkeypatch.setattr(entry.os, "environ", {"COLUMNS": "60"})
    assert entry.cached_help() is None  # click wraps narrower: typer renders it
    monkeypatch.setattr(entry.os, "environ", {})
    monkeypatch.setattr(entry, "fingerprint", lambda: "the code changed")
    assert entry.cached_help() is None


@pytest.mark.parametrize("args", [["launch", "--help"], ["logs", "--help"], ["launch"], ["logs"],
                                  ["launch", "--bogus", "x"], ["launch", "/no/such/job.yaml"], ["logs", "-h"]])
def test_hot_commands_built_alone_say_what_the_whole_tree_says(tmp_path, args) -> None:  # type: ignore[no-untyped-def]
    """`fedml launch` and `fedml logs` are built without the other ~70 commands (fedml_cli/main.py: ALONE): their
    usage line, help, errors and exit codes must be those of the whole command tree."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "FEDML_HOME": str(tmp_path / "home"), "COLUMNS": "100"}
    env.pop("FEDML_SERVER", None)
    fast = "import sys; sys.argv[0] = 'fedml'; from fedml_cli.main import main; main()"
    whole = "import sys; sys.argv[0] = 'fedml'; from fedml_cli.main import app; app()"
    a, b = (subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)
            for code in (fast, whole))
    assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert a.returncode != 0 or "Usage: fedml " + args[0] in a.stdout


def _paths() -> list[tuple[list[str], bool]]:
    """Every command path of the tree, and whether it is a group: top-level commands and groups, and each
    group's commands and groups."""
    import typer.main

    from fedml_cli.main import app

    def name(c) -> str:  # type: ignore[no-untyped-def]
        return str(c.name or typer.main.get_command_name(c.callback.__name__))

    out = [([name(c)], False) for c in app.registered_commands]
    for g in app.registered_groups:
        out.append(([g.name], True))
        out += [([g.name, name(c)], False) for c in g.typer_instance.registered_commands]
        out += [([g.name, s.name], True) for s in g.typer_instance.registered_groups]
    return out


def test_every_command_built_alone_says_what_the_whole_tree_says(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A call builds only the commands its words name (fedml_cli/main.py: pruned): for every command path of the
    tree, its help and its usage errors (an unknown option; in a group, an unknown command) must be those of the
    whole tree, word for word, with the same exit code."""
    import typer.main
    import typer.testing
    from typer.testing import CliRunner

    from fedml_cli.main import app, pruned

    whole = typer.main.get_command(app)  # (built once: the runner builds what it is given at every call)
    monkeypatch.setattr(typer.testing, "_get_command", lambda t: whole if t is app else typer.main.get_command(t))
    paths = _paths()
    assert len(paths) > 60 and (["run", "status"], False) in paths and (["scheduler", "key"], True) in paths
    tried = 0
    for path, group in paths:
        # (a command given a word it does not know would run with it: only groups are given one)
        for tail in (["--help"], ["-h"], ["--no-such-option"], *([["no-such-command"]] if group else [])):
            args = path + tail
            one = pruned(args)
            assert one is not None, args
            a = CliRunner().invoke(one, args, prog_name="fedml", terminal_width=100)
            b = CliRunner().invoke(app, args, prog_name="fedml", terminal_width=100)
            assert (a.exit_code, a.output) == (b.exit_code, b.output), args
            assert a.exit_code in (0, 2), (args, a.output)  # help, or a usage error: nothing ran
            tried += 1
    assert tried == sum(4 if group else 3 for _, group in paths)
    for args in (["--version"], ["no-such-command"], []):  # the whole tree: top-level options, unknown words
        assert pruned(args) is None


def test_a_call_builds_only_the_commands_it_names(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The time saved: typer turns only the command named into a click command, not every command of the tree."""
    import typer.main

    from fedml_cli import main

    built: list[str] = []
    real = typer.main.get_command_from_info

    def counting(command_info, **kw):  # type: ignore[no-untyped-def]
        built.append(command_info.name or command_info.callback.__name__)
        return real(command_info, **kw)

    monkeypatch.setattr(typer.main, "get_command_from_info", counting)
    for argv, want in ((["launch", "--help"], ["launch"]), (["run", "status", "--help"], ["status"]),
                       (["scheduler", "key", "--help"], ["create", "list", "revoke"])):
        built.clear()
        monkeypatch.setattr(main.sys, "argv", ["fedml", *argv])
        with pytest.raises(SystemExit) as e:
            main.main()
        assert e.value.code == 0 and sorted(built) == want, (argv, built)
