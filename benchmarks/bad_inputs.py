"""Red team: the bad inputs of issue 12, each built under a temp folder and fed to the real CLI.

Usage: python benchmarks/bad_inputs.py [--workers 2] [--only SUBSTRING] [--markdown]

Every case runs ``python -m histoclass ...`` in a subprocess (the command a user types) and is
judged on what came back:

* ``outcome``: ``named+skipped`` (exit 0, every bad input named in the output or a skip list),
  ``refused`` (a non-zero exit with one ``error:`` line), or ``ok`` (accepted and handled);
* ``lost``: inputs that are neither in the output file nor in a skip list nor named (silent loss);
* ``traceback``: a Python traceback reached the user;
* ``dishonest``: a number or verdict that is not true (a patient metric without patient ids, a
  class for a NaN output, a report running a header as HTML, a clean audit of ungrouped images,
  an expected refusal that did not happen, a shell command run by a model file, debris left).

Prints one line per case and the totals; ``--markdown`` prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bad_inputs_cases import CASES, Case, NotHereError, build_shared

SRC = Path(__file__).resolve().parents[1] / "src"
SAMPLE = SRC / "histoclass" / "samples"


@dataclass
class Result:
    """What one case produced, judged."""

    case: Case
    command: str
    code: int
    output: str
    outcome: str = ""
    lost: list[str] = field(default_factory=list)
    traceback: bool = False
    dishonest: str = ""
    seconds: float = 0.0


def run_case(case: Case, shared: dict, root: Path) -> Result:
    """Build the case's files, run its command, judge the answer."""
    folder = root / case.name.replace("/", "_").replace(" ", "-")
    folder.mkdir(parents=True)
    try:
        spec = case.build(folder, shared)
    except NotHereError as exc:
        return Result(case, "-", 0, "", outcome=f"not run here ({exc})")
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", **spec.get("env", {})}
    args = spec["args"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "histoclass", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=spec.get("timeout", 600))
    res = Result(case, "histoclass " + " ".join(_short(a, folder) for a in args),
                 proc.returncode, proc.stdout + proc.stderr,
                 seconds=time.perf_counter() - start)
    res.traceback = "Traceback (most recent call last)" in res.output
    if res.code == 0:
        res.outcome = "named+skipped" if spec.get("bad") else "ok"
    else:  # a refusal: a non-zero exit with its reason (error: ..., or audit's findings)
        res.outcome = "refused" if res.output.strip() and not res.traceback else \
            f"exit {res.code}"
    res.lost = _lost(spec, res.output, folder)
    res.dishonest = _judge(case, spec, res, folder)
    return res


def _short(arg: str, folder: Path) -> str:
    """A path as a reader can follow it: relative to the case folder, the bundled sample as
    ``<sample>``."""
    return (arg.replace(str(folder) + "/", "").replace(str(folder), ".")
            .replace(str(SAMPLE), "<sample>"))


def _listed(folder: Path) -> str:
    """Every row of every CSV the run wrote (outputs and skip lists), as text."""
    text = []
    for csv in folder.rglob("*.csv"):
        with contextlib.suppress(OSError):
            text.append(csv.read_text(errors="replace"))
    return "\n".join(text)


def _lost(spec: dict, output: str, folder: Path) -> list[str]:
    """Inputs of a batch run that no output, skip list or message accounts for."""
    listed = _listed(folder) + output
    return [name for name in spec.get("inputs", []) if name not in listed]


def _judge(case: Case, spec: dict, res: Result, folder: Path) -> str:
    """Why this answer is not honest, or ``""``."""
    want = spec.get("expect", "ok")
    if want == "refused" and res.code == 0:
        return "accepted input it should refuse"
    if want in ("ok", "skip") and res.code != 0:
        return f"refused good input (exit {res.code})"
    for fragment in spec.get("says", []):
        if fragment not in res.output:
            return f"did not say {fragment!r}"
    for name in spec.get("bad", []):
        if name not in res.output and name not in _listed(folder):
            return f"did not name {name}"
    if Path("/tmp/histoclass-pwned").exists():
        return "a model file ran a shell command"
    if spec.get("check"):
        return spec["check"](res.output, folder) or ""
    return ""


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", default="")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    Path("/tmp/histoclass-pwned").unlink(missing_ok=True)
    cases = [c for c in CASES if args.only in c.name]
    with tempfile.TemporaryDirectory(prefix="histoclass-redteam-") as tmp:
        root = Path(tmp)
        shared = build_shared(root / "_shared")
        try:
            with ThreadPoolExecutor(args.workers) as pool:
                results = list(pool.map(lambda c: run_case(c, shared, root / "cases"), cases))
        finally:  # unmount the tiny filesystems before the temp folder goes
            for cleanup in shared.get("cleanup", {}).values():
                cleanup()
    rows = [{"case": r.case.name, "command": _short(r.command, root), "exit": r.code,
             "outcome": r.outcome,
             "lost": ", ".join(r.lost) or "-", "traceback": "yes" if r.traceback else "-",
             "dishonest": r.dishonest or "-", "s": f"{r.seconds:.1f}"} for r in results]
    table = pd.DataFrame(rows)
    if args.markdown:
        print("| # | case | command | exit | outcome | lost | traceback | dishonest |")
        print("|---|---|---|---|---|---|---|---|")
        for i, r in enumerate(rows, 1):
            print(f"| {i} | {r['case']} | `{r['command']}` | {r['exit']} | {r['outcome']} | "
                  f"{r['lost']} | {r['traceback']} | {r['dishonest']} |")
    else:
        for r in rows:
            print(f"{r['case'][:44]:<44} exit {r['exit']:<3} {r['outcome']:<14} lost "
                  f"{r['lost']:<4} traceback {r['traceback']:<3} dishonest {r['dishonest']}")
    lost = sum(bool(r.lost) for r in results)
    tb = sum(r.traceback for r in results)
    bad = sum(bool(r.dishonest) for r in results)
    print(f"\n{len(results)} cases on {os.cpu_count()} vCPU {cpu_name()}: {lost} with silent "
          f"losses, {tb} tracebacks, "
          f"{bad} dishonest answers; outcomes "
          + ", ".join(f"{k} {v}" for k, v in table["outcome"].value_counts().items()))
    for r in results:
        if r.lost or r.traceback or r.dishonest:
            print(f"--- {r.case.name}: {r.command}\n{r.output[-2000:]}")
    sys.exit(1 if lost or tb or bad else 0)


if __name__ == "__main__":
    main()
