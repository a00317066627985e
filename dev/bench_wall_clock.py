"""
What a run costs and what the wall-clock rule allows on this machine: runs the unmodified train.py as agent_loop.py
does (runner.run_in_folder: the scorer beside it, the sandbox around it) and prints each run's times.

    uv run dev/bench_wall_clock.py --runs 3           # with the prepared cache ($AUTORESEARCH_CACHE)

Per run: total wall clock (the driver's clock); when its evaluation began (the first logits reached the scorer,
from the run's start); the evaluation's seconds (the scored rows); the probe run's seconds (train.py again, scoring the
spliced copies with the weights the run handed over) and its causality numbers; what train.py printed as its own
training and total seconds. Then the limits of autoresearch.integrity.wall_clock_limits for a candidate.
"""

import argparse
import json
import secrets
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autoresearch import integrity, run_log, runner  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--runs", type=int, default=3)
args = parser.parse_args()
repo = Path(__file__).resolve().parent.parent
budget = json.loads((integrity.cache_dir() / "manifest.json").read_text())["time_budget"]
harness = {name: (repo / name).read_text() for name in integrity.HARNESS}

timings, evaluations, probes = [], [], []
for run in range(1, args.runs + 1):
    key = secrets.token_bytes(32)
    result = runner.run_in_folder((repo / "train.py").read_text(), harness, key.hex(), 3600, None)
    record, missing = integrity.verify_record(key, result["record"])
    evaluated = integrity.evaluation(record)
    if result["returncode"] != 0 or evaluated is None or not evaluated["probe"]:
        sys.exit(f"run {run} failed ({missing or record['problems'] or record['unfinished']}):\n"
                 f"{result['log'][-4000:]}")
    printed, probe = run_log.parse_summary(result["log"]), evaluated["probe"]
    timings.append((result["seconds"], evaluated["first_logits"]))
    evaluations.append(evaluated["seconds"])
    probes.append(result["probe_seconds"])
    print(f"run {run}: total {result['seconds']:.1f}s, evaluation began at {evaluated['first_logits']:.1f}s, "
          f"evaluation {evaluated['seconds']:.1f}s ({evaluated['tokens']} tokens scored); the probe run "
          f"{result['probe_seconds']:.1f}s ({probe['rows']} spliced rows in {probe['seconds']:.1f}s, future "
          f"influence {probe['future_influence']:.2g} nats); train.py says training "
          f"{printed.get('training_seconds', 0):.1f}s of {printed.get('total_seconds', 0):.1f}s; "
          f"val_bpb {evaluated['val_bpb']:.6f}; sandbox: {result['sandbox']}", flush=True)

until, total = integrity.wall_clock_limits(timings, budget)
print(f"TIME_BUDGET {budget}s: a candidate may begin its evaluation at {until:.1f}s and run {total:.1f}s in all "
      f"(medians of {args.runs} runs: total {median(s for s, _ in timings):.1f}s, evaluation began at "
      f"{median(r for _, r in timings):.1f}s, evaluation {median(evaluations):.1f}s, the probe run "
      f"{median(probes):.1f}s)")
