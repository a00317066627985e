"""
Is the night's gain real? A night makes its keep decisions on the validation tokens, so the best commit is
chosen on them and its val_bpb is optimistic. The holdout split (prepare.py) is text no decision has seen: the
baseline commit and the best commit each run once more with evaluate_bpb scoring it, and the two deltas are
compared, in a line like "val: -0.0282, holdout: -0.0241".

It runs at the end of a tag stopped by a limit (--holdout-at-end on), or with `agent_loop.py holdout`, on the
night's executor; it never moves the branch. Its runs and scores are ledgered apart (holdout_run, holdout
events), which no prompt reads: the agent never sees a holdout number.
"""

from autoresearch import runs
from autoresearch.console import log


def score_holdout(night):
    """Run the baseline and the best once each on the holdout; ledger and return the holdout event (None when
    there is nothing to compare: no keep beyond the baseline)."""
    rows, best = night.ledger.results(), night.ledger.best()
    if not rows or best is None or best["experiment"] == 0:
        log("holdout: the best is still the baseline, nothing to compare")
        return None
    baseline = rows[0]
    which = {baseline["commit"]: "baseline", best["commit"]: "best"}
    log(f"holdout: running the baseline ({baseline['commit'][:7]}) and the best ({best['commit'][:7]}) once each, "
        "scored on the holdout split")
    holdout_runs, ended = runs.Runs(night, night.executor), {}
    todo = [runs.RunKey(row["experiment"], row["commit"], 0, split="holdout") for row in (baseline, best)]
    try:
        while len(ended) < 2:
            while todo and night.executor.free_slots() > 0:
                holdout_runs.send(todo.pop(0))
            ended |= {run["commit"]: run for run in holdout_runs.collect(timeout=1.0)}
    finally:
        holdout_runs.cancel_all()
    for commit, run in ended.items():
        if not run["ok"]:
            log(f"holdout: the {which[commit]}'s run gave no holdout score (see {run['log']}): "
                f"{'; '.join(run['problems']) or 'it crashed'}")
            return None
    scores = {which[commit]: run["val_bpb"] for commit, run in ended.items()}
    val_delta, holdout_delta = best["val_bpb"] - baseline["val_bpb"], scores["best"] - scores["baseline"]
    event = night.record(event="holdout", baseline_commit=baseline["commit"], best_commit=best["commit"],
                         best_experiment=best["experiment"], val=[baseline["val_bpb"], best["val_bpb"]],
                         holdout=[scores["baseline"], scores["best"]], val_delta=val_delta,
                         holdout_delta=holdout_delta)
    log(f"holdout: {holdout_text(event)}")
    return event


def holdout_text(event):
    """The holdout line of the report and the page: both deltas, and how much of the val gain holds."""
    held = event["holdout_delta"] / event["val_delta"] if event["val_delta"] else float("nan")
    return (f"val: {event['val_delta']:+.4f}, holdout: {event['holdout_delta']:+.4f} (best #{event['best_experiment']} "
            f"against the baseline; {100 * held:.0f} % of the val gain holds on text no decision saw)")
