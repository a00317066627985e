"""
A picture of the HTML report for the README: the page of a synthetic 40-experiment night (made-up ideas and
numbers in the shape the loop records them), opened in headless Chromium and captured.

    uv run dev/screenshot_report.py                  # dev/report.html and dev/report-screenshot.png
    uv run dev/screenshot_report.py --rows 80 --out /tmp/shot

Needs Debian's chromium (apt-get install chromium) or another Chromium on PATH.
"""

import argparse
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autoresearch import html_report, report  # noqa: E402
from autoresearch.state import Ledger  # noqa: E402

IDEAS = [
    ("halve TOTAL_BATCH_SIZE", "more optimizer steps in the same 5 minutes"),
    ("MATRIX_LR 0.04 -> 0.05", "the matrices are under-trained at this budget"),
    ("switch MLP activation to GeLU", "smoother gradients than relu squared"),
    ("DEPTH 8 -> 10, ASPECT_RATIO 64 -> 52", "deeper at the same width budget"),
    ("WARMDOWN_RATIO 0.5 -> 0.35", "stay at the peak learning rate longer"),
    ("add QK-norm scale 1.1", "sharper attention early in training"),
    ("window pattern SSSL -> SSLL", "more long-range context per layer"),
    ("double model width", "capacity is the bottleneck"),
    ("EMBEDDING_LR 0.6 -> 0.8", "embeddings learn slowly"),
    ("remove value embeddings", "fewer parameters, faster steps"),
]

NOTES = ("Learning rates are near their optimum (#3, #7, #12 flat).\n"
         "Depth helps up to 10 layers; width runs out of memory.\n"
         "Next: attention window patterns, then value embeddings.")


def synthetic_night(rows, rng):
    records = [{"event": "start", "time": "2026-12-02T00:00:00", "keep_rule": "noise", "base_commit": "0" * 40},
               {"event": "steer", "time": "2026-12-02T02:10:00",
                "text": "Stop tuning learning rates; try architecture changes. Keep memory under 40 GB."}]
    best, sigma = 0.9979, 0.002
    for n in range(rows):
        description, hypothesis = ("baseline", "") if n == 0 else rng.choice(IDEAS)
        commit = f"{rng.getrandbits(160):040x}"
        roll = rng.random()
        status = "keep" if n == 0 or roll < 0.15 else "crash" if roll > 0.93 else "discard"
        if status == "keep" and n:
            best -= rng.uniform(1.5, 4) * sigma
        value = 0.0 if status == "crash" else best if status == "keep" else best + rng.uniform(-0.8, 6) * sigma
        runs = [] if status == "crash" else [value + rng.gauss(0, sigma) for _ in range(4 if status == "keep" else 1)]
        reason = ("exit code 1, no val_bpb" if status == "crash" else "mean of 4 runs, noise sigma 0.002011" if n == 0
                  else f"{3.1 * sigma:.6f} better than the best beside it over 4 pairs, above threshold 0.004499"
                  if status == "keep" else f"its first run {value:.6f} is not below the best's latest {best:.6f}"
                  if value >= best else f"{best - value:.6f} better than the best beside it over 4 pairs, within "
                  "the noise: threshold 0.004499")
        records.append({"event": "proposal", "time": "2026-12-02T01:00:00", "experiment": n, "attempt": 0,
                        "ok": True, "commit": commit, "description": description, "hypothesis": hypothesis,
                        "diff": f"--- a/train.py\n+++ b/train.py\n@@ -42 +42 @@\n-# before\n+# {description}",
                        "cost_usd": 0.08, "calls": [], "seconds": 20.0,
                        **({"notes": NOTES} if n == rows - 1 else {})})
        records.append({"event": "run", "time": "2026-12-02T01:05:00", "experiment": n, "commit": commit, "repeat": 1,
                        "ok": status != "crash", "val_bpb": value, "seconds": 330.0,
                        "log_tail": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
                        if status == "crash" else ""})
        records.append({"event": "result", "time": "2026-12-02T01:06:00", "experiment": n, "commit": commit,
                        "status": status, "val_bpb": value, "runs": runs, "memory_gb": 44.0, "reason": reason,
                        "description": description, "hypothesis": hypothesis, "noise_sigma": sigma, "noise_dof": 3,
                        **({"best_runs_beside": [best + rng.gauss(0, sigma) for _ in range(4)]}
                           if status == "keep" and n else {})})
    return Ledger(records=records)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("no chromium on PATH: apt-get install chromium")
    ledger = synthetic_night(args.rows, random.Random(args.seed))
    rows = ledger.results()
    page = html_report.write_page(rows, ledger, report.summarize(rows, ledger), "autoresearch dec02 (synthetic)",
                                  args.out / "report.html")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        view = browser.new_page(viewport={"width": 1240, "height": 1400})
        view.goto(page.as_uri())
        view.locator("#e3 summary").first.click()  # one diff open, as a reader would
        view.screenshot(path=args.out / "report-screenshot.png")
        browser.close()
    print(f"{page}\n{args.out / 'report-screenshot.png'}")


if __name__ == "__main__":
    main()
