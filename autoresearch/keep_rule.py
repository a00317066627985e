"""
The keep rule: is a candidate's val_bpb better than the best's by more than the noise between runs?

Plain numbers in, a verdict out (no ledger, no git): decisions.py, the benches and the tests call it directly.
"noise" (the default) measures the run-to-run noise on repeated runs of one commit and discards a candidate whose
first run is not below the best's runs; a promising one is paired (decide_paired): each of its runs gets a run of
the best beside it, and it is kept only when the mean paired difference clears a one-sided t-test at 2.5 % (and
min_delta), so that a machine whose speed drifts cannot make a change look better than it is. Unpaired (decide):
the difference of means against the best's own runs. "greedy" is the reference's: one run, keep if lower, a gain
too good to be true run again. docs/keep-rule.md gives the reasoning and the measured rates.
"""

import functools
import math
from statistics import fmean

KEEP_RULES = ("noise", "greedy")
PLAUSIBILITY_FACTOR = 3  # an improvement over 3x the largest kept so far is re-run before it can be kept...
PLAUSIBLE_FIRST_GAIN = 0.02  # ...and the first one when over 2 % of the baseline's val_bpb


def noise_estimate(groups):
    """Run-to-run noise from the val_bpb of repeated runs, one list per commit: the pooled standard deviation
    and its degrees of freedom (inf and 0 while no commit has run twice)."""
    groups = [values for values in groups if values]
    dof = sum(len(values) - 1 for values in groups)
    squares = sum(sum((v - fmean(values)) ** 2 for v in values) for values in groups)
    return (math.sqrt(squares / dof) if dof else math.inf), dof


@functools.lru_cache
def t_critical(dof):
    """The one-sided 2.5 % critical value of Student's t with dof degrees of freedom: where P(|T| < t) = 0.95."""
    if dof < 1:
        return math.inf
    low, high = 0.0, 13.0  # t(0.975) is 12.71 at one degree of freedom and falls towards 1.96
    for _ in range(60):  # bisection, to far below the precision a threshold needs
        middle = (low + high) / 2
        low, high = (low, middle) if t_within(middle, dof) >= 0.95 else (middle, high)
    return high


def t_within(t, dof):
    """P(|T| < t) for integer dof, in closed form: a series in cos(atan(t / sqrt(dof)))^2 (Abramowitz-Stegun 26.7)."""
    theta = math.atan(t / math.sqrt(dof))
    cos2, term, series = math.cos(theta) ** 2, 1.0, 1.0
    for k in range(2 if dof % 2 == 0 else 3, dof, 2):
        term *= cos2 * (k - 1) / k
        series += term
    if dof % 2 == 0:
        return math.sin(theta) * series
    return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if dof > 1 else 0.0))


def plausibility_bound(kept):
    """The largest improvement believed without the full number of runs, from the val_bpb of each kept result in
    order (the baseline first): a bug that scores far too well once (a leak, a broken eval) must reproduce."""
    gains = [before - after for before, after in zip(kept, kept[1:])]
    return PLAUSIBILITY_FACTOR * max(gains) if gains else PLAUSIBLE_FIRST_GAIN * kept[0]


def decide(candidate, best, noise, bound, rule="noise", max_runs=4, min_delta=0.0):
    """(status, reason) for the val_bpb runs of a candidate against those of the best, or (None, reason) when the
    candidate must run again first. noise: (sigma, dof) from noise_estimate; bound: plausibility_bound's.
    Means are compared, never a lucky minimum."""
    n, delta = len(candidate), fmean(best) - fmean(candidate)  # delta > 0: the candidate is better
    runs = f"{n} run{'s' * (n > 1)}"
    if delta <= 0:
        return "discard", f"mean of {runs} {fmean(candidate):.6f} is not below the best's {fmean(best):.6f}"
    if rule == "greedy":
        if delta > bound and n < 2:
            return None, f"{delta:.6f} better, beyond the plausible {bound:.6f}: running it again"
        if max(candidate) >= fmean(best):
            return "discard", f"{delta:.6f} better in the mean of {runs}, but the gain did not reproduce in each"
        return "keep", f"{delta:.6f} better (mean of {runs})"
    sigma, dof = noise
    threshold = max(min_delta, t_critical(dof) * sigma * math.sqrt(1 / n + 1 / len(best)))
    if n < max_runs:
        return None, f"{delta:.6f} better in {runs}: running it again ({n + 1} of {max_runs})"
    if delta > threshold:
        return "keep", (f"{delta:.6f} better over {runs}, above the threshold {threshold:.6f} "
                        f"(noise sigma {sigma:.6f}, {dof} dof)")
    return "discard", f"{delta:.6f} better over {runs}, within the noise: threshold {threshold:.6f}"


def decide_paired(candidate, reference, screen, noise, max_runs=4, min_delta=0.0):
    """(status, reason) for a candidate judged on paired runs, or (None, reason) when it needs more of them.
    candidate: the val_bpb of its runs by pair number (1: its first run); reference: those of the best's runs
    made beside them, by the same numbers; screen: the best's latest runs, which the first run must beat before
    a run of the best is spent on it; noise: (sigma, dof) from noise_estimate. The two runs of a pair ran at
    about the same time, so a drift of the machine moves both alike and cancels in their difference."""
    first = candidate[min(candidate)]
    if not reference:
        if first >= fmean(screen):
            return "discard", f"its first run {first:.6f} is not below the best's latest {fmean(screen):.6f}"
        return None, (f"{fmean(screen) - first:.6f} better in its first run: running the best beside it "
                      f"(pair 1 of {max_runs})")
    pairs = [(candidate[k], reference[k]) for k in sorted(candidate.keys() & reference.keys())]
    if not pairs:  # runs end out of order: no pair is complete yet
        return None, f"no pair complete yet: running the best beside it (pairs of {max_runs})"
    n, delta = len(pairs), fmean(best - mine for mine, best in pairs)  # delta > 0: the candidate is better
    runs = f"{n} pair{'s' * (n > 1)}"
    if delta <= 0:
        return "discard", f"not better than the best run beside it: mean paired difference {-delta:+.6f} over {runs}"
    if n < max_runs:
        return None, f"{delta:.6f} better than the best beside it over {runs}: running pair {n + 1} of {max_runs}"
    sigma, dof = noise
    threshold = max(min_delta, t_critical(dof) * sigma * math.sqrt(2 / n))  # a difference of two runs: 2 sigma^2
    verdict = "keep" if delta > threshold else "discard"
    where = "above" if verdict == "keep" else "within the noise:"
    return verdict, (f"{delta:.6f} better than the best beside it over {runs}, {where} threshold {threshold:.6f} "
                     f"(noise sigma {sigma:.6f}, {dof} dof)")
