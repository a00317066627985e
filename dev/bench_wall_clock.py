"""
What the wall-clock rule allows on this machine: runs the unmodified train.py under the harness, as
agent_loop.py does (runner.run_in_folder), and prints each run's times and the limits its baseline would set.

    uv run dev/bench_wall_clock.py --runs 3           # with the prepared cache ($AUTORESEARCH_CACHE)

Per run: total wall clock (the driver's clock), the training interval (the harness's clock, from the first
training batch to the start of the evaluation), its start-up (the interval beyond TIME_BUDGET: compilation,
the uncounted first steps, the last step's overshoot), the time outside it (imports, building the model,
the evaluation, exit) and the median seconds between training batches. Then the limits of
autoresearch.integrity.wall_clock_limits for a candidate with the same step time, as seconds and as a
fraction of the budget.
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

timings, gaps = [], []
for run in range(1, args.runs + 1):
    key = secrets.token_bytes(32)
    result = runner.run_in_folder((repo / "train.py").read_text(), (repo / "prepare.py").read_text(), key.hex(),
                                  3600, None)
    seconds = result["seconds"]
    record, missing = integrity.verify_record(key, result["record"])
    training = integrity.training_seconds(record)
    if result["returncode"] != 0 or training is None:
        sys.exit(f"run {run} failed ({missing or 'no evaluation'}):\n{result['log'][-4000:]}")
    timings.append((seconds, training))
    gaps.append(record["median_batch_gap"])
    print(f"run {run}: total {seconds:.1f}s, training {training:.1f}s (start-up {training - budget:.1f}s), "
          f"outside {seconds - training:.1f}s, median batch gap {record['median_batch_gap']:.3f}s, "
          f"{record['train_batches']} batches, val_bpb {integrity.evaluation(record)['val_bpb']:.6f}", flush=True)

training_limit, total_limit = integrity.wall_clock_limits(timings, budget, median(gaps))
print(f"TIME_BUDGET {budget}s: a candidate may train {training_limit:.1f}s ({training_limit / budget - 1:+.0%} of the "
      f"budget) and run {total_limit:.1f}s in all (median of {args.runs} runs: total "
      f"{median(s for s, _ in timings):.1f}s, training {median(t for _, t in timings):.1f}s)")
