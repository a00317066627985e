"""
What a large prepared cache costs each run's sandbox: Landlock grants by path, so every file beside a denied one
(the training parts beside the validation parts in tokens/) is a rule of its own.

- Builds a synthetic cache (empty files, a manifest naming the parts) with --parts training parts, as climbmix's
  6541 training shards would leave (a .bin and an .npz each), in a temp dir.
- Times what a run does with it before train.py starts: the denied paths and their links (runner.guarded), and
  `true` run in the sandbox (sandbox.wrap), against the same with a cache of one training part. Medians.

    uv run dev/bench_sandbox_rules.py                  # 6541 parts, 5 repeats
    uv run dev/bench_sandbox_rules.py --parts 100 --repeats 9
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autoresearch import runner, sandbox  # noqa: E402 -- after the checkout is on the path


def synthetic_cache(folder, parts):
    """A cache whose tokens/ holds `parts` training parts and one val and one holdout part (empty files)."""
    (folder / "tokens").mkdir(parents=True)
    (folder / "data").mkdir()
    names = {"train": [f"shard_{i:05d}" for i in range(parts)], "val": ["shard_06542"], "holdout": ["shard_06541"]}
    for name in sum(names.values(), []):
        for suffix in (".bin", ".npz"):
            (folder / "tokens" / f"{name}{suffix}").touch()
        (folder / "data" / f"{name}.parquet").touch()
    (folder / "manifest.json").write_text(json.dumps({"splits": {split: {"parts": found}
                                                                for split, found in names.items()}}))
    return folder


def timed(function, repeats):
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def measure(cache, work, repeats):
    deny = runner.guarded(cache, os.environ)[0]
    command = sandbox.wrap(["true"], sandbox.policy(work, work, deny, os.environ))
    return (timed(lambda: runner.guarded(cache, os.environ), repeats),
            timed(lambda: subprocess.run(command, check=True), repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--parts", type=int, default=6541, help="training parts in the big cache (default 6541)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each measurement; the median is printed")
    args = parser.parse_args()
    print(f"sandbox: {sandbox.describe(sandbox.probe())}")
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as folder:
        folder = Path(folder)
        (folder / "work").mkdir()
        for parts in (1, args.parts):
            cache = synthetic_cache(folder / f"cache-{parts}", parts)
            guard, run = measure(cache, folder / "work", args.repeats)
            rules = len(os.listdir(cache / "tokens")) - 4 + len(os.listdir(cache))  # its siblings, granted one by one
            print(f"{parts:5d} training parts (~{rules} rules in the cache): guarded {guard * 1000:7.1f} ms, "
                  f"`true` in the sandbox {run * 1000:7.1f} ms (medians of {args.repeats})")


if __name__ == "__main__":
    main()
