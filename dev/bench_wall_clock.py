"""
What a run costs and what the wall-clock rule allows on this machine: runs the unmodified train.py as agent_loop.py
does (runner.run_in_folder: the scorer beside it, the sandbox around it) and prints each run's times.

    uv run dev/bench_wall_clock.py --runs 3           # with the prepared cache ($AUTORESEARCH_CACHE)

Per run: total wall clock (the driver's clock); when its evaluation began (the first logits reached the scorer,
from the run's start); the evaluation's seconds (twice the tokens: the scored rows and their spliced copies, and one batch again),
what train.py printed as its own training and total seconds, and the causality numbers. Then the limits of
autoresearch.integrity.wall_clock_limits for a candidate.
"""

import argparse
import json
import secrets
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autoresearch import integrity, runner  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--runs", type=int, default=3)
args = parser.parse_args()
repo = Path(__file__).resolve().parent.parent
budget = json.loads((integrity.cache_dir() / "manifest.json").read_text())["time_budget"]
harness = {name: (repo / name).read_text() for name in integrity.HARNESS}

timings, evaluations = [], []
for run in range(1, args.runs + 1):
    key = secrets.token_bytes(32)
    result = runner.run_in_folder((repo / "train.py").read_text(), harness, key.hex(), 3600, None)
    record, missing = integrity.verify_record(key, result["record"])
    evaluated = integrity.evaluation(record)
    if result["returncode"] != 0 or evaluated is None:
        sys.exit(f"run {run} failed ({missing or record['problems']}):\n{result['log'][-4000:]}")
    printed = runner.parse_summary(result["log"])
    timings.append((result["seconds"], evaluated["first_logits"]))
    evaluations.append(evaluated["seconds"])
    print(f"run {run}: total {result['seconds']:.1f}s, evaluation began at {evaluated['first_logits']:.1f}s, "
          f"evaluation {evaluated['seconds']:.1f}s ({evaluated['tokens']} tokens scored, {evaluated['probes']} "
          f"spliced rows), train.py says training "
          f"{printed.get('training_seconds', 0):.1f}s of {printed.get('total_seconds', 0):.1f}s; future influence "
          f"{evaluated['future_influence']:.2g}, repeat {evaluated['repeat_difference']:.2g} nats; "
          f"val_bpb {evaluated['val_bpb']:.6f}; sandbox: {result['sandbox']}", flush=True)

until, total = integrity.wall_clock_limits(timings, budget)
print(f"TIME_BUDGET {budget}s: a candidate may begin its evaluation at {until:.1f}s and run {total:.1f}s in all "
      f"(medians of {args.runs} runs: total {median(s for s, _ in timings):.1f}s, evaluation began at "
      f"{median(r for _, r in timings):.1f}s, evaluation {median(evaluations):.1f}s)")
