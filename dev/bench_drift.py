"""
The keep rule on a machine whose speed drifts during the night: how often a change that does nothing is kept,
and a true 3-sigma gain, with the paired rule (the default) and with today's unpaired one (--paired off).

Simulated nights, as in dev/bench_keep_rule.py: val_bpb = true value + drift x (runs so far) + Gaussian noise,
judged by the engine's own decision (autoresearch/decisions.py's next_action, over keep_rule.py's rules), run in
the order a one-slot night runs them (one at a time; the best's runs beside a candidate are their own noise group, as
in the ledger). Each night: the baseline's 4 runs, then 30 proposals in random order: 20 nulls, 6 gains of
3 sigma, 4 losses of 5 sigma. The drift is given in noise sigmas over 30 experiments of today's rule without
drift (whose runs per experiment the bench measures first): "5 sigmas over 30 experiments" by default, both
upwards (a machine that slows down, as under thermal throttling: val_bpb rises) and downwards.

    uv run dev/bench_drift.py                       # 1000 nights per setting
    uv run dev/bench_drift.py --nights 3000 --drift 10
"""

import argparse
import random
import sys
from pathlib import Path
from statistics import fmean

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from autoresearch import decisions, keep_rule  # noqa: E402

EFFECTS = {"null": 0.0, "gain": -3.0, "loss": 5.0}  # in noise sigmas


def measured(value, pair):
    """A valid run of pair `pair` that measured `value`, as the engine's decisions read it."""
    return dict(ok=True, problems=[], val_bpb=value, repeat=pair, timed_out=False, returncode=0, log="")


def simulate_night(args, paired, drift_per_run, rng):
    """{kind: [kept?, ...]} and the number of runs of one night."""
    groups, history, clock = {}, {}, [0]  # groups: {(commit, experiment): values}; history: {commit: values}

    def run(commit, experiment, true_value):
        value = true_value + drift_per_run * clock[0] + rng.gauss(0, args.sigma)
        clock[0] += 1
        groups.setdefault((commit, experiment), []).append(value)
        history.setdefault(commit, []).append(value)
        return value

    true_best, best = 1.0, "c0"
    for _ in range(args.noise_runs):
        run("c0", 0, true_best)
    kinds = ["null"] * args.nulls + ["gain"] * args.gains + ["loss"] * args.losses
    rng.shuffle(kinds)
    outcome = {kind: [] for kind in EFFECTS}
    rule = decisions.Rule(paired=paired, noise_runs=args.noise_runs, max_runs=args.max_runs)
    for number, kind in enumerate(kinds, 1):
        commit, true_value = f"c{number}", true_best + EFFECTS[kind] * args.sigma
        candidate, reference = {1: measured(run(commit, number, true_value), 1)}, {}
        while (action := decisions.next_action(candidate, reference, history[best],
                                               keep_rule.noise_estimate(groups.values()), None, rule)).kind == "run":
            role, pair = action.runs[0]  # the runs it needs, one at a time, in the order the engine sends them
            if role == "candidate":
                candidate[pair] = measured(run(commit, number, true_value), pair)
            else:
                reference[pair] = measured(run(best, number, true_best), pair)
        outcome[kind].append(action.kind == "keep")
        if action.kind == "keep":
            true_best, best = true_value, commit
    return outcome, clock[0]


def rates(args, paired, drift_per_run, seed):
    rng, kept, runs = random.Random(seed), {kind: [] for kind in EFFECTS}, 0
    for _ in range(args.nights):
        outcome, night_runs = simulate_night(args, paired, drift_per_run, rng)
        runs += night_runs
        for kind, verdicts in outcome.items():
            kept[kind] += verdicts
    proposals = args.nulls + args.gains + args.losses
    runs_per_idea = (runs / args.nights - args.noise_runs) / proposals
    return {kind: fmean(verdicts) for kind, verdicts in kept.items()}, runs_per_idea


def drift_per_run(args, runs_per_idea):
    """--drift sigmas over --over experiments of today's rule (runs_per_idea runs each), per run."""
    return args.drift * args.sigma / (args.over * runs_per_idea)


def parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=1000)
    parser.add_argument("--drift", type=float, default=5.0, help="noise sigmas of drift over --over experiments")
    parser.add_argument("--over", type=int, default=30, help="experiments (of today's rule, without drift)")
    parser.add_argument("--nulls", type=int, default=20)
    parser.add_argument("--gains", type=int, default=6)
    parser.add_argument("--losses", type=int, default=4)
    parser.add_argument("--sigma", type=float, default=0.002, help="run-to-run noise (0.002: a 4090)")
    parser.add_argument("--noise-runs", type=int, default=4)
    parser.add_argument("--max-runs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main():
    args = parser().parse_args()
    _, runs_per_idea = rates(args, paired=False, drift_per_run=0.0, seed=args.seed)
    per_run = drift_per_run(args, runs_per_idea)
    print(f"{args.nights} nights of {args.nulls} nulls, {args.gains} 3-sigma gains, {args.losses} 5-sigma losses; "
          f"sigma {args.sigma}; today's rule makes {runs_per_idea:.2f} runs per idea without drift, so "
          f"{args.drift:g} sigmas over {args.over} experiments is {per_run / args.sigma:.4f} sigma per run")
    print(f"{'rule':22s} {'drift':>7s} {'null kept':>10s} {'gain kept':>10s} {'loss kept':>10s} {'runs/idea':>10s}")
    for paired in (False, True):
        for direction in (0, 1, -1):
            kept, runs = rates(args, paired, direction * per_run, args.seed)
            name = "paired (default)" if paired else "unpaired (--paired off)"
            drift = f"{direction * args.drift:+g}s" if direction else "none"
            print(f"{name:22s} {drift:>7s} {kept['null']:10.1%} {kept['gain']:10.1%} {kept['loss']:10.1%} "
                  f"{runs:10.2f}")


if __name__ == "__main__":
    main()
