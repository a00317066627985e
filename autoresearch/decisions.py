"""
What happens next to an experiment: a pure function of the runs it has, by pair number, and the best's.

The engine calls next_action after every run that ends, and on resume, with plain values; the answer is one
Action: the runs still needed (in the order to run them), a fix to ask for, a rebase onto a best that moved on,
or the row. A run that never ended is simply absent, so a resume is the same call on what the ledger holds.
"""

from dataclasses import dataclass

from autoresearch import keep_rule


@dataclass(frozen=True)
class Rule:
    """The keep rule's settings, from the command line."""
    keep_rule: str = "noise"
    paired: bool = True
    noise_runs: int = 4
    max_runs: int = 4
    min_delta: float = 0.0
    max_fix_attempts: int = 2

    def baseline_runs(self):
        return self.noise_runs if self.keep_rule == "noise" else 1


@dataclass(frozen=True)
class Action:
    """kind: "run" (runs: the (role, pair) still needed), "fix", "rebase", "keep", "discard", "crash", "invalid",
    or "refused" (the baseline cannot be measured: the night stops)."""
    kind: str
    reason: str = ""
    run: dict = None  # the run a row or a fix is about
    runs: tuple = ()


def baseline_action(runs, noise, rule):
    """The unmodified train.py: rule.baseline_runs() runs, all valid; their mean is the first best."""
    for run in runs.values():
        if run["problems"]:
            return Action("refused", f"the unmodified train.py breaks the rules of the metric: "
                          f"{'; '.join(run['problems'])}.", run)
        if not run["ok"]:
            how = (f"was {crash_reason(run)}: on a slow or busy machine, run again with a longer --timeout"
                   if run["timed_out"] else "did not produce val_bpb")
            return Action("refused", f"the unmodified train.py {how} (see {run['log']}).", run)
    wanted = rule.baseline_runs()
    missing = tuple(("candidate", pair) for pair in range(1, wanted + 1) if pair not in runs)
    if missing:
        pairs = ", ".join(str(pair) for _, pair in missing)
        return Action("run", f"the unmodified train.py, the baseline: run{'s' * (len(missing) > 1)} {pairs} of "
                      f"{wanted}", runs=missing)
    sigma, dof = noise
    return Action("keep", f"mean of {wanted} runs, noise sigma {sigma:.6f}" if dof else "one run",
                  runs[max(runs)])


def next_action(candidate, reference, base_values, noise, bound, rule, attempt=0, base="", best=""):
    """What the experiment needs next. candidate: {pair: run} of its commit; reference: {pair: run} of its base's
    runs beside them (the paired rule); base_values: the val_bpb of the base's valid runs, latest last; noise:
    (sigma, dof); bound: keep_rule.plausibility_bound; attempt: fixes so far; base, best: the commit it was
    proposed on and the best now (a keep needs them equal; else it is rebased onto the best)."""
    if not candidate:
        return Action("run", "its first run", runs=(("candidate", 1),))
    ordered = [candidate[pair] for pair in sorted(candidate)]
    if invalid := [run for run in ordered if run["problems"]]:
        return Action("invalid", "; ".join(invalid[-1]["problems"]), invalid[-1])
    if failed := [run for run in ordered if not run["ok"]]:
        run = failed[-1]
        if run["repeat"] > 1:
            return Action("crash", f"run {run['repeat']} of the same commit failed (see {run['log']})", run)
        if not run["timed_out"] and attempt < rule.max_fix_attempts:
            return Action("fix", run=run)
        return Action("crash", crash_reason(run), run)
    last = ordered[-1]
    if failed := [reference[pair] for pair in sorted(reference) if not reference[pair]["ok"]]:
        return Action("discard", f"the best's own run beside it failed (see {failed[-1]['log']}): nothing to "
                      "compare it with", last)
    values = {pair: run["val_bpb"] for pair, run in candidate.items()}
    if rule.keep_rule == "noise" and rule.paired:
        status, reason = keep_rule.decide_paired(values, {pair: run["val_bpb"] for pair, run in reference.items()},
                                                 base_values[-rule.max_runs:], noise, rule.max_runs, rule.min_delta)
        needed = [(role, pair) for pair in range(1, rule.max_runs + 1) for role in pair_order(pair)]
    else:
        contiguous = [values[pair] for pair in range(1, len(values) + 1) if pair in values]
        status, reason = keep_rule.decide(contiguous, base_values, noise, bound, rule.keep_rule, rule.max_runs,
                                          rule.min_delta)
        more = 1 if rule.keep_rule == "greedy" else rule.max_runs - len(contiguous)
        needed = [("candidate", pair) for pair in range(1, len(contiguous) + more + 1)]
    if status is None:
        have = {("candidate", pair) for pair in candidate} | {("best", pair) for pair in reference}
        return Action("run", reason, runs=tuple(run for run in needed if run not in have))
    if base != best:
        if status == "keep":
            return Action("rebase", f"beat its base {base[:7]}: {reason}", last)
        reason = f"against its base {base[:7]}: {reason}"
    return Action(status, reason, last)


def pair_order(pair):
    """Pair k runs the candidate first when k is odd and the best first when it is even (A B, B A, ...), so that
    a linear drift within pairs cancels over two of them."""
    return ("candidate", "best") if pair % 2 else ("best", "candidate")


def crash_reason(run):
    if run["timed_out"]:
        return f"killed at the {run['limit']:.0f}s time limit" if run.get("limit") else "killed at the time limit"
    return f"exit code {run['returncode']}, no val_bpb"
