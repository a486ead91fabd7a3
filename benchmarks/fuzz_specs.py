"""Fuzz the front half: draw specs (tests/fuzz_specs.py), run each with a timeout, write a result table.

    python benchmarks/fuzz_specs.py --n 10000 --seed 1 [--timeout 2] [--out benchmarks/results/fuzz_<date>.md]

Every spec must end in a module whose torch backend agrees with the reference backend, or in one located
error line; the table counts each outcome and lists every spec that did neither.  The table is rewritten
every 200 specs, so a run cut short still leaves its counts.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TRITON_INTERPRET", "1")

from fuzz_specs import Runner, draw_specs, name_pool

KINDS = ("agree", "located", "nonfinite", "traceback", "hang", "disagree", "mismatch")
LABELS = {"agree": "accepted, torch agrees with reference", "located": "located errors",
          "traceback": "tracebacks", "hang": "hangs", "disagree": "check/compile disagreements",
          "mismatch": "reference mismatches",
          "nonfinite": "accepted, reference output not finite at the drawn inputs (not compared)"}


def write_table(out: Path, args, counts: Counter, failures: list, done: int, seconds: float) -> None:
    lines = [f"# Spec fuzzing, {datetime.date.today()}", "",
             (f"`python benchmarks/fuzz_specs.py --n {args.n} --seed {args.seed} --timeout {args.timeout:g}`: "
             f"{done} of {args.n} specs in {seconds:.0f} s (1 process)."), "",
             "| outcome | count |", "|---|---|"]
    lines += [f"| {LABELS[k]} | {counts[k]} |" for k in KINDS]
    lines += ["", "## Failing specs", ""]
    if not failures:
        lines.append("None.")
    for i, kind, detail, text in failures:
        lines += [f"### spec {i}: {kind}", "", f"{detail}", "", "```", text.rstrip("\n"), "```", ""]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds per spec before it counts as a hang")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or ROOT / "benchmarks" / "results" / f"fuzz_{datetime.date.today()}.md"
    specs = draw_specs(args.n, args.seed, name_pool())
    runner = Runner(args.timeout)
    counts: Counter = Counter()
    failures: list = []
    start = time.perf_counter()
    try:
        for i, text in enumerate(specs):
            result = runner.run(text, i)
            counts[result.kind] += 1
            if result.kind not in ("agree", "located", "nonfinite"):
                failures.append((i, result.kind, result.detail, text))
            if (i + 1) % 200 == 0 or i + 1 == len(specs):
                elapsed = time.perf_counter() - start
                print(f"[{i + 1}/{args.n}] {elapsed:.0f} s " + " ".join(f"{k}={counts[k]}" for k in KINDS),
                      flush=True)
                write_table(out, args, counts, failures, i + 1, elapsed)
    finally:
        runner.close()
    print(f"wrote {out}")
    return 0 if all(counts[k] == 0 for k in ("traceback", "hang", "disagree", "mismatch")) else 1


if __name__ == "__main__":
    sys.exit(main())
