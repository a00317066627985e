"""
What a night of edits to the same constant keeps with 4 slots, against a serial night of the same ideas.

With several slots, ideas are asked on the best of their time and decided in the order they end, so a change that
beat its base often finds the best moved on, and on real nights agents tune the same constants again and again:
its change conflicts with the new best's. The engine then judges its whole train.py against the new best (a
"program" rebase) rather than dropping it. This bench runs the engine itself (agent_loop.loop) on the stand-ins of
tests/agent_loop_support/stand_ins.py, in this process: the stand-in executor ends one run in flight at a time, in
random order, with val_bpb = 1 + (QUALITY - 0.5)^2 + Gaussian noise; the stand-in agent proposes QUALITY values in
a fixed order, the same for every night (0.97, 0.95, 0.93, 0.91, 0.92, ... as seen on a real 3-worker night).
Each night gets a fresh temporary repository; the numbers are medians over --nights nights per setting.

    uv run dev/bench_rebase.py                    # 20 nights each of 1 and 4 slots
    uv run dev/bench_rebase.py --nights 50 --sigma 0.002
"""

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "agent_loop_support")]
import agent_loop  # noqa: E402
from autoresearch import agents  # noqa: E402
from stand_ins import StandInAgent, StandInExecutor, make_repo, true_val_bpb  # noqa: E402

IDEAS = [0.97, 0.95, 0.93, 0.91, 0.92, 0.89, 0.9, 0.87, 0.85, 0.86, 0.83, 0.84]


def night(slots, seed, args, folder):
    """(best true val_bpb, rows kept beyond the baseline, rebases by kind, runs) of one night."""
    rng = random.Random(seed)
    repo = make_repo(folder / f"{slots}-{seed}", folder / "cache")
    source = (repo / "train.py").read_text().replace("QUALITY = 0.0", "QUALITY = 1.0").replace("OTHER = 0.0",
                                                                                              "OTHER = 0.5")
    (repo / "train.py").write_text(source)
    agent_loop.state.open_repo(repo).git.commit("-qam", "start at QUALITY 1.0")
    StandInAgent.ideas = itertools.chain((("QUALITY", v) for v in IDEAS), itertools.repeat(("QUALITY", 0.8)))
    executor = StandInExecutor(slots, lambda n: rng.randrange(n), lambda: rng.gauss(0, args.sigma))
    executor.OUTCOMES = ("ok",)  # no crashes: this bench is about what is kept
    os.chdir(repo)
    with contextlib.redirect_stdout(io.StringIO()):
        agent_loop.loop(["--tag", "b", "--agent", "stand-in", "--workers", str(slots), "--max-experiments",
                         str(len(IDEAS) + 1), "--holdout-at-end", "off"], executor=executor)
    records = [json.loads(line) for line in (repo / ".autoresearch/b/ledger.jsonl").read_text().splitlines()]
    rows = [r for r in records if r["event"] == "result"]
    best = [r for r in rows if r["status"] == "keep"][-1]
    best_source = agent_loop.state.file_at(agent_loop.state.open_repo(repo), best["commit"], "train.py")
    rebases = [r.get("rebase") for r in rows if r.get("rebase")]
    return (true_val_bpb(best_source), sum(r["status"] == "keep" for r in rows[1:]),
            {kind: rebases.count(kind) for kind in ("merge", "program")},
            sum(r["event"] == "run" for r in records))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=20)
    parser.add_argument("--sigma", type=float, default=0.002, help="run-to-run noise of val_bpb")
    args = parser.parse_args()
    agent_loop.AGENTS["stand-in"], agents.DEFAULT_MODELS["stand-in"] = StandInAgent, None
    for name, value in dict(GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@example.com", GIT_COMMITTER_NAME="b",
                            GIT_COMMITTER_EMAIL="b@example.com").items():
        os.environ[name] = value
    best_possible = 1 + (min(IDEAS) - 0.5) ** 2
    print(f"{len(IDEAS)} ideas, each a new value of QUALITY (true val_bpb 1 + (QUALITY - 0.5)^2), noise sigma "
          f"{args.sigma}; the best idea is worth {best_possible:.4f}; medians over {args.nights} nights")
    print(f"{'slots':>5} {'best val_bpb':>12} {'best idea kept':>15} {'kept':>5} {'merged':>7} {'whole':>6} "
          f"{'runs':>5}")
    with tempfile.TemporaryDirectory() as folder:
        os.environ["AUTORESEARCH_CACHE"] = str(Path(folder) / "cache")
        for slots in (1, 4):
            nights = [night(slots, seed, args, Path(folder)) for seed in range(args.nights)]
            found = sum(abs(n[0] - best_possible) < 1e-9 for n in nights)
            print(f"{slots:>5} {median(n[0] for n in nights):>12.4f} {f'{found} of {len(nights)}':>15} "
                  f"{median(n[1] for n in nights):>5g} "
                  f"{median(n[2]['merge'] for n in nights):>7g} {median(n[2]['program'] for n in nights):>6g} "
                  f"{median(n[3] for n in nights):>5g}")
        os.chdir(ROOT)


if __name__ == "__main__":
    main()
