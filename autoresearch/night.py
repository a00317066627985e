"""
The night's shared state and its records, as the engine (engine.py) writes them: a proposal, a result row,
steering and plateaus before each proposal, and when to stop.
"""

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean, median

import git

from autoresearch import keep_rule, state
from autoresearch.agents import source_digest
from autoresearch.console import log
from autoresearch.options import TIMEOUT_MARGIN
from autoresearch.state import Ledger

MAX_FAILED_PROPOSALS_IN_A_ROW = 5  # an agent that cannot produce a usable edit stops the night


@dataclass
class Night:
    args: argparse.Namespace
    agent: object
    repo: git.Repo
    state_dir: Path
    ledger: Ledger
    timeout: float  # --timeout, or None: time_limit() measures it
    constants: dict  # the prepared cache's time_budget, max_seq_len and eval_tokens
    fingerprint: dict  # of prepare.py and the cache, when the tag started
    branch: str = ""  # autoresearch/<tag>: it points at the best
    executor: object = None  # runs.LocalExecutor or ray_executor.RayExecutor, closed when the night ends
    stopping: bool = False  # cleaning up: a signal now does not cut that short
    interrupted: bool = False  # Ctrl-C or SIGTERM arrived
    started: float = field(default_factory=time.time)
    failed_proposals_in_a_row: int = 0
    source_digests: dict = field(default_factory=dict)  # commit: its train.py's source_digest (already_run's)

    def record(self, **record):
        return self.ledger.append(**record)


FIRST_RUNS_LIMIT = 10  # budgets a run may take before the baseline's first run has measured this machine


def time_limit(night):
    """(seconds before a run is killed, why): --timeout; else twice the baseline's first valid run on this machine,
    as busy as it is, plus TIMEOUT_MARGIN; before that run has ended, ten budgets plus the margin."""
    if night.timeout:
        return night.timeout, "--timeout"
    first = next((r for r in night.ledger.events("run") if r["experiment"] == 0 and r["ok"]), None)
    if first:
        return 2 * first["seconds"] + TIMEOUT_MARGIN, (f"twice the baseline's first run, {first['seconds']:.0f}s, "
                                                       f"plus {TIMEOUT_MARGIN}s; --timeout sets it")
    return FIRST_RUNS_LIMIT * night.constants["time_budget"] + TIMEOUT_MARGIN, (
        f"until the baseline's first run sets the limit: twice its time, plus {TIMEOUT_MARGIN}s; --timeout sets it")


def already_run(night, besides=None):
    """{source_digest(train.py): what became of it} of every commit decided or in flight (besides: but those of
    this experiment): not to be run again."""
    known = {}
    for r in night.ledger.results():
        if r["commit"] != state.NO_COMMIT:
            outcome = f", val_bpb {r['val_bpb']:.6f}" if r["status"] in ("keep", "discard") else ""
            known[r["commit"]] = f"experiment #{r['experiment']} ({r['status']}{outcome})"
    now = night.ledger.open_experiments()
    for r in night.ledger.events("proposal"):  # a commit that crashed before a fix, or one rebased, ran too
        if r["ok"] and r["experiment"] != besides:
            known.setdefault(r["commit"], f"experiment #{r['experiment']} "
                             f"({'being tested now' if r['experiment'] in now else 'a commit before its last'})")
    for commit in known.keys() - night.source_digests.keys():  # read from git once per commit, not per proposal
        night.source_digests[commit] = source_digest(state.file_at(night.repo, commit, "train.py"))
    return {night.source_digests[commit]: what for commit, what in known.items()}


def record_proposal(night, experiment, attempt, change, started, commit=None, **committed):
    """Ledger one conversation's outcome (an agents.Change); committed: the commit made of it, and its ref."""
    if change.source is None:
        outcome = dict(ok=False, error=change.error) | ({"description": change.description} if change.violation else {})
    else:
        outcome = dict(ok=True, commit=commit, **committed, description=change.description,
                       hypothesis=change.hypothesis, diff=night.repo.git.diff(f"{commit}~1", commit))
    output = getattr(night.agent, "output", None)  # --agent openai: auto switched to JSON output, said once
    if output and output.switched and not night.ledger.events("openai_output"):
        night.record(event="openai_output", using="json", reason="a reply held no tool call")
    night.record(event="proposal", experiment=experiment, attempt=attempt, **outcome,
                 **({"trial": change.trial} if change.trial is not None else {}),
                 **({"notes": change.notes} if change.notes is not None else {}),
                 seconds=round(time.time() - started, 1), calls=change.calls,
                 cost_usd=sum(call.get("cost_usd") or 0 for call in change.calls))


def before_proposal(night):
    """What the night says before each proposal: steer.md read fresh (a change is ledgered and logged), and a
    plateau (ledgered once per run of --plateau experiments not kept). Returns steer.md's text for the prompt."""
    steering, rows = state.read_steering(), night.ledger.results()
    if steering != night.ledger.steering():
        night.record(event="steer", text=steering)
        log("steer.md changed: the agent is shown it from this proposal on" if steering else "steer.md is empty now")
    streak, after = state.plateau_streak(rows), night.args.plateau
    last = night.ledger.events("plateau")[-1:]
    if after and streak >= after and not (last and last[0]["since"] == len(rows) - streak):
        night.record(event="plateau", since=len(rows) - streak, streak=streak, after=after)
        log(f"plateau: {streak} experiments in a row were not kept; the agent is asked for another kind of change")
    return steering


def record_result(night, experiment, run, description, status, reason, **extra):
    """The experiment's row in the ledger, from the valid runs of its last commit (and the best's beside them)."""
    candidate, reference = night.ledger.experiment_runs(experiment, run["commit"])
    values = [r["val_bpb"] for _, r in sorted(candidate.items()) if r["ok"]] if status in ("keep", "discard") else []
    beside = [r["val_bpb"] for _, r in sorted(reference.items()) if r["ok"]]
    sigma, dof = keep_rule.noise_estimate(night.ledger.run_groups().values())
    return night.record(event="result", experiment=experiment, commit=run["commit"], status=status,
                        val_bpb=fmean(values) if values else 0.0, runs=values,
                        memory_gb=run["metrics"].get("peak_vram_mb", 0.0) / 1024 if values else 0.0,
                        **({"best_runs_beside": beside} if beside and values else {}),
                        description=description, hypothesis=night.ledger.hypothesis(experiment), reason=reason,
                        noise_sigma=sigma if dof else None, noise_dof=dof, **extra)


def holds_out(night):
    return night.args.holdout_at_end == "on"


def typical_seconds(ledger):
    """(median run, median agent call) over the tag's last 20 valid runs and proposals that called the agent;
    None for either where there is none yet."""
    runs = [r["seconds"] for r in ledger.valid_runs()][-20:]
    calls = [r["seconds"] for r in ledger.events("proposal") if r["ok"] and r["calls"]][-20:]
    return median(runs) if runs else None, median(calls) if calls else None


def seconds_to_finish(night, asked=False):
    """How long an experiment that starts now takes here, and then the holdout's runs if the night ends with
    them: the tag's median run times the rounds its median experiment's runs take on the executor's slots, plus
    the median agent call (asked: its idea is already in hand). None before the first valid run."""
    run, call = typical_seconds(night.ledger)
    if run is None:
        return None
    per_experiment = [len(r["runs"]) + len(r.get("best_runs_beside", [])) for r in night.ledger.results()[1:]
                      if r["runs"]][-20:]
    slots = night.executor.slots if night.executor else 1
    runs = median(per_experiment) if per_experiment else 1
    rounds = 1 + math.ceil(max(0, runs - 1) / slots)  # its first run alone, then the others as slots allow
    holdout = run * math.ceil(2 / slots) if holds_out(night) else 0
    return run * rounds + (0 if asked else call or 0) + holdout


def time_left_text(night):
    """", 12.5 of 15 minutes left" under --max-hours, else ""."""
    if night.args.max_hours is None:
        return ""
    left = max(0.0, 3600 * night.args.max_hours - (time.time() - night.started))
    return f", {left / 60:.1f} of {round(60 * night.args.max_hours, 1):g} minutes left"


def why_stop(night, open_count=0, asked=False):
    """Why no new experiment may start, or None; open_count: experiments proposed or running, not yet decided;
    asked: its idea is in hand (the agent's call is not to be waited for again)."""
    args, spent = night.args, night.ledger.spent_usd()
    if args.max_experiments is not None and len(night.ledger.results()) + open_count >= args.max_experiments:
        return f"reached --max-experiments {args.max_experiments}"
    if args.max_hours is not None:
        left, needed = 3600 * args.max_hours - (time.time() - night.started), seconds_to_finish(night, asked)
        if left <= 0:
            return f"reached --max-hours {args.max_hours:g}"
        if needed and needed > left:
            return (f"reached --max-hours {args.max_hours:g}: {left / 60:.1f} minutes are left, and an experiment "
                    f"takes about {needed / 60:.1f} here{' with the holdout runs' * holds_out(night)}")
    if args.max_cost is not None and spent >= args.max_cost:
        return f"spent ${spent:.2f}, reached --max-cost {args.max_cost}"
    if night.failed_proposals_in_a_row >= MAX_FAILED_PROPOSALS_IN_A_ROW:
        why = getattr(night.agent, "why_no_usable_change", None)
        return (f"the agent gave no usable change {MAX_FAILED_PROPOSALS_IN_A_ROW} times in a row "
                f"(see {night.ledger.path})" + (f": {why()}" if why else ""))
    return None
