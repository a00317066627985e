"""
How big each call's prompt is as a night grows: the cached prefix (program.md + prepare.py) and the uncached
idea prompt (steering, lab notes, the history with hypotheses, near misses, a plateau, train.py), built by
autoresearch/prompts.py from this repository's files and a synthetic ledger of typical rows.

    uv run dev/measure_prompt.py                 # 0, 50 and 100 rows
    uv run dev/measure_prompt.py --rows 100 200

Tokens are estimated at 3.5 characters each (Anthropic's tokenizer is not available offline); the ledger
records the real counts of every call.
"""

import argparse
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from autoresearch import prompts  # noqa: E402
from autoresearch.state import Ledger  # noqa: E402

CHARS_PER_TOKEN = 3.5
DESCRIPTION = "raise MATRIX_LR 0.04 -> 0.05 and shorten the warmdown to 0.4 of the budget"  # 75 characters
HYPOTHESIS = ("A larger matrix learning rate moves further per step in a 5-minute budget; a shorter warmdown keeps "
              "it high longer, and the loss still settles at the end.")  # 152 characters
STEERING = ("Stop tuning learning rates: they are near their optimum. Try architecture changes (depth, width, "
            "attention window pattern) and keep peak memory under 40 GB.")


def ledger_of(rows, rng):
    """A night of `rows` results: one keep in eight, one discard in ten a near miss, notes at their maximum."""
    records, best = [], 1.0
    for number in range(rows):
        status = "keep" if number == 0 or rng.random() < 1 / 8 else rng.choice(["discard"] * 8 + ["crash"])
        if status == "keep":
            best -= 0.002
        val_bpb = best if status == "keep" else 0.0 if status == "crash" else best + rng.uniform(-0.001, 0.01)
        records.append(dict(event="result", experiment=number, commit=f"{rng.getrandbits(160):040x}", status=status,
                            val_bpb=val_bpb, description="baseline" if number == 0 else DESCRIPTION,
                            hypothesis="" if number == 0 else HYPOTHESIS))
    records.append(dict(event="proposal", experiment=rows - 1, notes="n" * prompts.MAX_NOTES))
    return Ledger(records=records)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[0, 50, 100], help="rows of history (default: 0 50 100)")
    args = parser.parse_args()
    os.chdir(ROOT)
    cached = len(prompts.instructions_text())
    source = (ROOT / "train.py").read_text()
    print(f"cached prefix (program.md + prepare.py): {cached:,} characters, ~{cached / CHARS_PER_TOKEN / 1000:.1f}k "
          f"tokens; train.py {len(source):,} characters")
    print("rows  uncached prompt  ~tokens  of which: train.py  history  notes+steering  near misses+plateau")
    for rows in args.rows:
        ledger = ledger_of(max(rows, 1), random.Random(rows))
        prompt = prompts.idea_prompt(ledger, source, steering=STEERING, plateau_after=10)
        history = len(prompts.history_text(ledger))
        context = len(prompts.context_text(ledger, STEERING))
        extra = len(prompts.near_misses_text(ledger.results()) + prompts.plateau_text(ledger.results(), 10))
        print(f"{rows:>4}  {len(prompt):>15,}  {len(prompt) / CHARS_PER_TOKEN / 1000:>6.1f}k  {len(source):>17,}  "
              f"{history:>7,}  {context:>14,}  {extra:>19,}")


if __name__ == "__main__":
    main()
