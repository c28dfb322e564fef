"""What `make bench` spends its time on: each script run through this, then a table and the total.

    python bench/_timed.py --file F -- CMD...   # runs CMD, adds "seconds<TAB>CMD" to F, exits with CMD's code
    python bench/_timed.py --file F --summary   # the table, slowest first, and the total against the goal

The goal (issue 14): `make bench` within 15 minutes on this 2-core machine. The table says which script to
shrink when it is not.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from _common import timed

GOAL_S = 15 * 60


def run(file: Path, cmd: list[str]) -> int:
    # its output shown as it comes; no limit of our own (each script bounds its own work)
    took, code = timed(cmd, dict(os.environ), stdout=None, stderr=None, cwd=Path.cwd(), timeout=24 * 3600)
    shown = " ".join(shlex.quote(c) for c in cmd)
    with file.open("a", encoding="utf-8") as f:
        f.write(f"{took:.1f}\t{code}\t{shown}\n")
    print(f"[make bench] {took:.1f} s: {shown}" + (f" (exit {code})" if code else ""), file=sys.stderr, flush=True)
    return code


def summary(file: Path) -> int:
    try:
        rows = [line.split("\t", 2) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        print(f"no timings in {file}", file=sys.stderr)
        return 1
    total = sum(float(r[0]) for r in rows)
    print(f"\nmake bench: {len(rows)} scripts in {total:.0f} s (goal <= {GOAL_S} s: "
          f"{'met' if total <= GOAL_S else 'not met'})")
    for took, code, cmd in sorted(rows, key=lambda r: -float(r[0])):
        print(f"  {float(took):7.1f} s  {100 * float(took) / max(total, 1e-9):4.1f} %  {cmd}" + ("" if code == "0" else
                                                                                    f"  (exit {code})"))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, required=True)
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.summary:
        return summary(args.file)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("a command to run (after --)")
    return run(args.file, cmd)


if __name__ == "__main__":
    sys.exit(main())
