"""
Dataloader throughput: tokens/s that make_dataloader packs on this machine, from one process.

    uv run prepare.py --dataset stdlib --preset small   # any prepared cache will do
    uv run dev/bench_dataloader.py                      # prints the median of --repeats runs per shape

Measures the training split at the reference's shape (B=128, T=2048) and a small one (B=32, T=256),
on the CPU (no transfer), after one warm-up batch.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare import CACHE_DIR, Tokenizer, make_dataloader  # noqa: E402


def tokens_per_second(tokenizer, B, T, batches):
    loader = make_dataloader(tokenizer, B, T, "train", device="cpu")
    next(loader)  # fills the buffer and touches the memory maps
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * B * T / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per shape; the median is reported")
    parser.add_argument("--batches", type=int, default=20, help="batches timed per run")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_directory()
    print(f"cache: {CACHE_DIR}")
    for B, T in [(128, 2048), (32, 256)]:
        rates = [tokens_per_second(tokenizer, B, T, args.batches) for _ in range(args.repeats)]
        print(f"B={B:<4} T={T:<5} median {statistics.median(rates) / 1e6:6.2f}M tokens/s  "
              f"(runs: {', '.join(f'{r / 1e6:.2f}M' for r in rates)})")


if __name__ == "__main__":
    main()
