"""Cold start of the CLI: wall time of `fedml --help` and `fedml version` (a new process each time), and what they
import.

    .venv/bin/python bench/cli_startup.py [--runs 20]

Each command runs twice to warm the .pyc cache, then N times; we report median / p90 / min wall seconds. Then one
`python -X importtime` run of the same entry point counts the modules imported, lists the top-level packages
that take the most import time, and says whether any of the heavy packages (FastAPI, uvicorn, docker, kubernetes,
torch, starlette, pydantic, httpx) got imported on that path. Target: median <= 0.15 s for both commands.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import defaultdict

from _common import FEDML, REPO, check_cli, emit, summary, temp_home, timed, verdict

TARGET_S = 0.15
COMMANDS = {"--help": ["--help"], "version": ["version"]}
HEAVY = ("fastapi", "uvicorn", "docker", "kubernetes", "torch", "starlette", "pydantic", "httpx")
# The console script's own path, with the final module list written to stderr (no extra imports).
PROBE = ("import sys\n"
         "sys.argv = ['fedml'] + {args!r}\n"
         "try:\n"
         "    from fedml_cli.entry import main\n"
         "    main()\n"
         "except SystemExit:\n"
         "    pass\n"
         "finally:\n"
         "    sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)) + '\\n')\n")
LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


def import_profile(args: list[str], env: dict[str, str]) -> dict:
    """Modules imported by the CLI for these args, per `python -X importtime`."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", PROBE.format(args=args)], env=env, cwd=REPO,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                       timeout=60)
    imported: list[str] = []
    self_us: dict[str, int] = defaultdict(int)
    loaded: list[str] = []
    for ln in r.stderr.splitlines():
        m = LINE.match(ln)
        if m:
            name = m.group(4)
            imported.append(name)
            self_us[name.split(".")[0]] += int(m.group(1))
        elif ln.startswith("MODULES "):
            loaded = ln.split()[1:]
    top_level = {name.split(".")[0] for name in loaded}
    heavy = [h for h in HEAVY if h in top_level]
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:8]
    return {"modules_imported": len(imported), "modules_loaded": len(loaded), "heavy_imported": heavy,
            "import_ms_total": round(sum(self_us.values()) / 1000, 1),
            "top_packages_ms": {k: round(v / 1000, 1) for k, v in top}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    opts = ap.parse_args()
    check_cli()
    results: dict[str, dict] = {}
    ok = works = True
    with temp_home("startup") as (_home, env):
        # The interpreter's own floor: what any Python CLI pays before importing anything of ours.
        floor = [timed([sys.executable, "-c", "pass"], env)[0] for _ in range(opts.runs)]
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], env=env, capture_output=True,
                           text=True, timeout=30)
        floor_modules = sum(1 for ln in r.stderr.splitlines() if LINE.match(ln))
        s = summary(floor)
        print(f"python -c pass (interpreter floor): median {s['median_s']:.3f} s, p90 {s['p90_s']:.3f} s, "
              f"min {s['min_s']:.3f} s; {floor_modules} modules")
        results["python_floor"] = {**s, "modules_imported": floor_modules}
        for label, args in COMMANDS.items():
            cmd = [str(FEDML), *args]
            for _ in range(opts.warmup):
                timed(cmd, env)
            times, codes = [], []
            for _ in range(opts.runs):
                t, code = timed(cmd, env)
                times.append(t)
                codes.append(code)
            s = summary(times)
            prof = import_profile(args, env)
            v = verdict(s["median_s"], TARGET_S)
            works = works and all(c == 0 for c in codes)
            ok = ok and works and v == "PASS"
            floor_ratio = s["median_s"] / summary(floor)["median_s"]
            print(f"fedml {label}: median {s['median_s']:.3f} s, p90 {s['p90_s']:.3f} s, min {s['min_s']:.3f} s "
                  f"over {len(times)} runs (exit codes {sorted(set(codes))}); target <= {TARGET_S:.2f} s: {v}; "
                  f"{floor_ratio:.1f}x the interpreter floor" + (" (issue 14: <= 4x)" if label == "--help" else ""))
            print(f"  modules imported: {prof['modules_imported']} (interpreter floor {floor_modules}); "
                  f"heavy packages imported: {', '.join(prof['heavy_imported']) or 'none'}")
            top = ", ".join(f"{k} {v:.1f}" for k, v in prof["top_packages_ms"].items())
            print(f"  import time by top-level package (ms, -X importtime self time, inflated): {top}")
            results[label] = {**s, "exit_codes": sorted(set(codes)), "target_s": TARGET_S, "verdict": v,
                              "floor_ratio": round(floor_ratio, 2), **prof}
    emit("cli_startup", {"results": results, "all_pass": ok})
    return 0 if works else 1  # a missed target is a figure; a command that fails is an error


if __name__ == "__main__":
    sys.exit(main())
