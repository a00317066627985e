"""Stand-in for train.py whose true val_bpb is a known function of its constants, plus noise.

The measured val_bpb is true_val_bpb(...) + Gaussian noise of sigma $NOISY_TRAIN_SIGMA (default
0.002). The noise of run n is drawn from random.Random(f"{$NOISY_TRAIN_SEED}-{n}"), where n counts
the lines of the file $NOISY_TRAIN_RUNS (each run appends one), so a test replays the same noise.
SEED changes nothing real: it only stands for the edits a keep rule should not reward.
$NOISY_TRAIN_DRIFT (default 0) is added once per run so far: a machine whose speed drifts over the night.
"""
import math
import os
import random

MATRIX_LR = 0.04        # best at 0.02
DEPTH = 8               # best at 6
WARMDOWN_RATIO = 0.5    # best at 0.4
SEED = 42


def true_val_bpb(matrix_lr, depth, warmdown_ratio):
    return 1.0 + 0.1 * math.log2(matrix_lr / 0.02) ** 2 + 0.01 * (depth - 6) ** 2 + 0.1 * (warmdown_ratio - 0.4) ** 2


if __name__ == "__main__":
    from prepare import evaluate_bpb

    runs_file = os.environ.get("NOISY_TRAIN_RUNS")
    run = 0
    if runs_file:
        run = len(open(runs_file).readlines()) if os.path.exists(runs_file) else 0
        with open(runs_file, "a") as f:
            f.write(f"{os.getpid()}\n")
    rng = random.Random(f"{os.environ.get('NOISY_TRAIN_SEED', os.getpid())}-{run}")
    sigma = float(os.environ.get("NOISY_TRAIN_SIGMA", "0.002"))
    drift = float(os.environ.get("NOISY_TRAIN_DRIFT", "0")) * run
    val_bpb = evaluate_bpb(true_val_bpb(MATRIX_LR, DEPTH, WARMDOWN_RATIO) + drift + rng.gauss(0.0, sigma))
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print("training_seconds: 1.0")
    print("total_seconds:    1.2")
    print(f"peak_vram_mb:     {1024.0 * DEPTH:.1f}")
    print("mfu_percent:      1.00")
    print("total_tokens_M:   0.1")
    print("num_steps:        2")
    print(f"depth:            {DEPTH}")
