"""
How often each keep rule of agent_loop.py keeps a change that does nothing, and a real 3-sigma gain.

Simulated nights: the ledger events agent_loop.py writes, with val_bpb = true value + Gaussian
noise of a known sigma, judged by autoresearch/keep_rule.py's own decide / noise_estimate / plausibility_bound.
Each night: the baseline, then proposals in random order: nulls (a seed or a comment: the
true value stays), 3-sigma improvements, and 5-sigma regressions. No git, no subprocesses.

    uv run dev/bench_keep_rule.py                    # 300 nights of 30 proposals
    uv run dev/bench_keep_rule.py --nights 1000 --max-runs 4
"""

import argparse
import random
import sys
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autoresearch import keep_rule  # noqa: E402


def simulate_night(args, rule, rng):
    """{kind: [kept?, ...]} and the number of runs of one night."""
    groups, kept, true_best = {}, [], 1.0  # groups: {commit: [val_bpb of each run]}; kept: [(commit, mean)]

    def run(commit, true_value):
        groups.setdefault(commit, []).append(true_value + rng.gauss(0, args.sigma))

    for _ in range(args.noise_runs if rule == "noise" else 1):
        run("c0", true_best)
    kept.append(("c0", fmean(groups["c0"])))
    kinds = ["null"] * args.nulls + ["gain"] * args.gains + ["loss"] * args.losses
    rng.shuffle(kinds)
    outcome = {kind: [] for kind in ("null", "gain", "loss")}
    for number, kind in enumerate(kinds, 1):
        commit, true_value = f"c{number}", true_best + {"null": 0.0, "gain": -3 * args.sigma, "loss": 5 * args.sigma}[kind]
        best, bound = groups[kept[-1][0]], keep_rule.plausibility_bound([value for _, value in kept])
        run(commit, true_value)
        while True:
            status, _ = keep_rule.decide(groups[commit], best, keep_rule.noise_estimate(groups.values()), bound,
                                         rule, args.max_runs)
            if status:
                break
            run(commit, true_value)
        outcome[kind].append(status == "keep")
        if status == "keep":
            kept.append((commit, fmean(groups[commit])))
            true_best = true_value
    return outcome, sum(len(values) for values in groups.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=300)
    parser.add_argument("--nulls", type=int, default=20, help="proposals per night that change nothing real")
    parser.add_argument("--gains", type=int, default=6, help="proposals per night that gain 3 sigma")
    parser.add_argument("--losses", type=int, default=4, help="proposals per night that lose 5 sigma")
    parser.add_argument("--sigma", type=float, default=0.002, help="run-to-run noise (0.002: a 4090)")
    parser.add_argument("--noise-runs", type=int, default=4)
    parser.add_argument("--max-runs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.nights} nights of {args.nulls} null, {args.gains} 3-sigma gains, {args.losses} 5-sigma losses; "
          f"sigma {args.sigma}, noise runs {args.noise_runs}, max runs {args.max_runs}")
    first = argparse.Namespace(**{**vars(args), "nulls": 1, "gains": 0, "losses": 0})
    first_gain = argparse.Namespace(**{**vars(args), "nulls": 0, "gains": 1, "losses": 0})
    print(f"{'rule':8s} {'null kept':>10s} {'gain kept':>10s} {'loss kept':>10s} {'runs/proposal':>14s}")
    for rule in keep_rule.KEEP_RULES:
        rng = random.Random(args.seed)
        kept, runs = {"null": [], "gain": [], "loss": []}, 0
        for _ in range(args.nights):
            outcome, night_runs = simulate_night(args, rule, rng)
            runs += night_runs
            for kind, decisions in outcome.items():
                kept[kind] += decisions
        rates = {kind: sum(d) / len(d) if d else float("nan") for kind, d in kept.items()}
        proposals = args.nulls + args.gains + args.losses
        # The first decision of a night, against a fresh baseline: the hardest case (the least known noise).
        null_first = sum(simulate_night(first, rule, rng)[0]["null"][0] for _ in range(args.nights)) / args.nights
        gain_first = sum(simulate_night(first_gain, rule, rng)[0]["gain"][0] for _ in range(args.nights)) / args.nights
        print(f"{rule:8s} {rates['null']:10.1%} {rates['gain']:10.1%} {rates['loss']:10.1%} "
              f"{runs / args.nights / proposals:14.2f}   first proposal of a night: null kept {null_first:.1%}, "
              f"gain kept {gain_first:.1%}")


if __name__ == "__main__":
    main()
