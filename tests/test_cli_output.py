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
