"""Job metrics on the wire: a job reports values by printing one line `FEDML_METRIC {"loss": 0.3, "step": 7}` to
its output, from any language (`fedml.log({...}, step=7)` prints exactly that). The line travels with the rest of
the run's log (exactly once, per rank and attempt) and the scheduler reads the metrics out of the stored log
(scheduler/service/metrics.py): nothing else to ship, store or lose, and a job never waits on it.

A metric line is bounded before it is parsed (MAX_LINE characters); it holds a JSON object of at most MAX_KEYS
names (letters, digits, `_ . / -`, 100 characters at most) to finite numbers (true/false count as 1/0), and an
optional integer `step`. A line that starts with the prefix but breaks these rules is counted as ignored, with
why, and changes nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

PREFIX = "FEDML_METRIC "
MAX_LINE = 16 * 1024
MAX_KEYS = 100
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]{0,99}$")


class Parsed(NamedTuple):
    values: dict[str, float]
    step: int | None
    problem: str | None  # why the line was ignored (values is then empty)


def line(values: Mapping[str, Any], step: int | None = None) -> str:
    """The line that reports `values` (at `step`): what a job prints. ValueError naming what is wrong."""
    if not isinstance(values, Mapping):
        raise ValueError(f"metrics must be a dict of name -> number, not {type(values).__name__}")
    out: dict[str, Any] = {}
    for k, v in values.items():
        if not isinstance(v, int | float | str) and hasattr(v, "__float__"):
            v = float(v)  # a numpy scalar, a 0-d torch tensor
        got = _value(k, v)
        if isinstance(got, str):
            raise ValueError(got)
        out[k] = got
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step must be an integer, not {step!r}")
        out["step"] = step
    text = PREFIX + json.dumps(out, separators=(",", ":"), allow_nan=False)
    if len(text) > MAX_LINE:
        raise ValueError(f"a metrics line is at most {MAX_LINE} characters (report fewer names at once)")
    return text


def parse(text: str) -> Parsed | None:
    """The metrics of a log line, or None when it is not a metric line at all."""
    if not text.startswith(PREFIX):
        return None
    if len(text) > MAX_LINE:
        return Parsed({}, None, f"longer than {MAX_LINE} characters")
    try:
        doc = json.loads(text[len(PREFIX):])
    except ValueError:
        return Parsed({}, None, "not a JSON object")
    if not isinstance(doc, dict):
        return Parsed({}, None, "not a JSON object")
    step = doc.pop("step", None)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
        return Parsed({}, None, "step is not an integer")
    if len(doc) > MAX_KEYS:
        return Parsed({}, None, f"more than {MAX_KEYS} names")
    values: dict[str, float] = {}
    for k, v in doc.items():
        got = _value(k, v)
        if isinstance(got, str):
            return Parsed({}, None, got)
        values[k] = got
    return Parsed(values, step, None)


def _value(name: Any, v: Any) -> float | str:
    """The number, or why it is not one."""
    if not isinstance(name, str) or not NAME.match(name) or name == "step":
        return f"{name!r} is not a metric name (letters, digits, _ . / -; not 'step')"
    if isinstance(v, bool):
        return float(v)
    if not isinstance(v, int | float) or not math.isfinite(v):
        return f"{name}: {v!r} is not a finite number"
    return float(v)
