"""
The unattended overnight research loop: an AI agent proposes, this program experiments.

Each experiment: ask the agent for ONE idea (a one-line description and exact search/replace
edits of train.py), apply it, check that it compiles and still lets prepare.py score it, commit
it, run train.py for its time budget under the harness, take val_bpb from the harness's signed
record of the run (never from train.py's printout), log a row in results.tsv, then keep the
commit (the branch advances) or reset to the best one. The keep rule compares means against the
measured run-to-run noise (--keep-rule greedy: the reference's one run, keep if lower). A crash
gets up to two fix attempts (none with optuna); a run that breaks a rule of the metric is
`invalid`, never kept. The first experiment is always the unmodified baseline, run four times.
It runs until a limit, Ctrl-C or SIGTERM; the same --tag again resumes, also after a kill.
With --workers N, many experiments run at once on Ray (autoresearch/scheduler.py, docs/parallel.md).
The parts live in autoresearch/, one concern per module (dev/INTERFACE.md draws them).

    uv run agent_loop.py                                   # Anthropic API, ANTHROPIC_API_KEY
    uv run agent_loop.py --agent claude-code               # the claude CLI, headless
    uv run agent_loop.py --agent openai --base-url http://localhost:8000/v1 --model qwen3-32b
    uv run agent_loop.py --agent optuna                    # no LLM: Optuna tunes train.py's constants
    uv run agent_loop.py report                            # the morning summary and progress.png
    uv run agent_loop.py demo                              # all of it offline, in one command (~15 min)

Everything it writes is kept out of git (it adds itself to .git/info/exclude if needed):
    results.tsv                          one row per experiment (SPEC section 10 format)
    .autoresearch/<tag>/ledger.jsonl     append-only: every attempt's diff, timings, metrics,
                                         log path, token usage and cost
    .autoresearch/<tag>/logs/<n>.log     the output of the commit with ref n (<n>-<k>.log: its run k)
    progress.png                         drawn by `agent_loop.py report`
and every commit it ran stays reachable as refs/autoresearch/<tag>/<n>.
"""

import os
import signal
import sys
import time
from pathlib import Path

import filelock
import git

from autoresearch import demo, holdout, integrity, keep_rule, report, runner, state
from autoresearch import runs as experiment_runs
from autoresearch.agents import RuleViolation, ask_for_change
from autoresearch.console import fail, log, plural
from autoresearch.night import (Night, already_run, before_proposal, check_baseline_run, finish_baseline, is_paired,
                                record_proposal, record_result, why_stop)
from autoresearch.openai_agent import OpenAIAgent, OutputMode
from autoresearch.options import AGENTS, TAG_OPTIONS, TIMEOUT_MARGIN, agent_settings, parse_args
from autoresearch.prompts import fix_prompt, idea_prompt, instructions_text
from autoresearch.state import Ledger


# -----------------------------------------------------------------------------
# The night: baseline, experiment, confirm, stop

def propose_and_commit(night, experiment, attempt, prompt):
    """Ask the agent (unapplicable replies go back in the same conversation), commit the change on the branch.
    Returns (commit, description, ref number), or None when no usable change came; raises RuleViolation."""
    args, started = night.args, time.time()
    base = night.ledger.best()["commit"]
    change = ask_for_change(night.agent, prompt, Path("train.py").read_text(), args.max_edit_retries, args.max_tokens,
                            f"#{experiment}", already_run(night))
    if change.source is None:
        record_proposal(night, experiment, attempt, change, started)
        if change.violation:
            raise RuleViolation(change.error, change.description)
        return None
    Path("train.py").write_text(change.source)
    commit = state.commit_train_py(night.repo, change.description)
    number = state.keep_reachable(night.repo, args.tag, commit)
    record_proposal(night, experiment, attempt, change, started, commit, ref_number=number, base=base)
    return commit, change.description, number


def run_baseline(night):
    """The unmodified train.py, run --noise-runs times under the noise rule: its mean is the first best and
    the spread of its runs the first estimate of the run-to-run noise."""
    commit = state.head_commit(night.repo)
    number = state.keep_reachable(night.repo, night.args.tag, commit)
    runs = night.args.noise_runs if night.args.keep_rule == "noise" else 1
    while len(done := night.ledger.measured(commit)) < runs:  # a resumed tag goes on from the runs it has
        log(f"#0 the unmodified train.py: the baseline, run {len(done) + 1} of {runs}")
        [run] = experiment_runs.run_commit(night, 0, 0, commit, number, [len(done) + 1])
        check_baseline_run(night, run)
        log(f"#0 baseline run {run['repeat']} of {runs}: val_bpb {run['val_bpb']:.6f} ({run['seconds']:.0f}s)")
    finish_baseline(night, commit, runs)


def confirm(night, experiment, run, number):
    """Run the candidate again (paired: and the best beside it) until the keep rule decides; (status, reason,
    last run)."""
    args, ledger = night.args, night.ledger
    best = ledger.best()["commit"]
    bound = keep_rule.plausibility_bound(ledger.kept_val_bpbs())
    while True:
        noise = keep_rule.noise_estimate(ledger.run_groups().values())
        if is_paired(args):
            candidate, reference = ledger.paired_runs(experiment, run["commit"])
            status, reason = keep_rule.decide_paired(candidate, reference, ledger.measured(best)[-args.max_runs:],
                                                     noise, args.max_runs, args.min_delta)
            roles = keep_rule.next_pair_runs(len(candidate), len(reference))
        else:
            candidate = ledger.measured(run["commit"])
            status, reason = keep_rule.decide(candidate, ledger.measured(best), noise, bound, args.keep_rule,
                                              args.max_runs, args.min_delta)
            roles = ["candidate"]
        if status:
            return status, reason, run
        log(f"#{experiment} {reason}")
        for role in roles:
            if role == "best":  # the pair's run of the best: beside the candidate's, in its logs
                state.reset_hard(night.repo, best)  # runs happen in the work tree: the best's train.py, then back
                try:
                    [beside] = experiment_runs.run_commit(night, experiment, run["attempt"], best, number,
                                                          [len(reference) + 1], reference=True)
                finally:
                    state.reset_hard(night.repo, run["commit"])
                if not beside["ok"]:
                    return "discard", (f"the best's own run beside it failed (see {beside['log']}): nothing to "
                                       "compare it with"), run
                continue
            [run] = experiment_runs.run_commit(night, experiment, run["attempt"], run["commit"], number,
                                               [len(candidate) + 1])
            if run["problems"]:
                return "invalid", "; ".join(run["problems"]), run
            if not run["ok"]:
                return "crash", f"run {run['repeat']} of the same commit failed (see {run['log']})", run


def run_experiment(night):
    args, experiment = night.args, night.ledger.next_experiment()
    log(f"#{experiment} asking {args.agent} for an idea")
    try:
        change = propose_and_commit(night, experiment, 0, idea_prompt(
            night.ledger, Path("train.py").read_text(), steering=before_proposal(night), plateau_after=args.plateau))
    except RuleViolation as violation:
        run = dict(commit="0" * 40, metrics={})  # nothing was committed: the change was refused whole
        record_result(night, experiment, run, violation.description, "invalid", str(violation))
        return
    if change is None:
        night.failed_proposals_in_a_row += 1
        return
    night.failed_proposals_in_a_row = 0
    commit, description, number = change
    log(f"#{experiment} the idea: {description}")
    [run] = experiment_runs.run_commit(night, experiment, 0, commit, number, [1])
    for fix in range(1, args.max_fix_attempts + 1):
        if run["ok"] or run["timed_out"] or run["problems"]:
            break
        log(f"#{experiment} crashed; asking for fix {fix} of {args.max_fix_attempts}")
        try:
            change = propose_and_commit(night, experiment, fix, fix_prompt(
                night.ledger, description, run, fix, args.max_fix_attempts, Path("train.py").read_text(),
                before_proposal(night)))
        except RuleViolation as violation:
            run = dict(run, problems=[str(violation)])
            break
        if change is None:
            break
        commit, _, number = change
        [run] = experiment_runs.run_commit(night, experiment, fix, commit, number, [1])
    if run["problems"]:
        status, reason = "invalid", "; ".join(run["problems"])
    elif not run["ok"]:
        status, reason = "crash", ("killed at the time limit" if run["timed_out"]
                                   else f"exit code {run['returncode']}, no val_bpb")
    else:
        status, reason, run = confirm(night, experiment, run, number)
    record_result(night, experiment, run, description, status, reason)


# -----------------------------------------------------------------------------
# Setup and the command line

def check_committer(repo):
    """Fail now, not after the baseline, when git cannot commit: no user.name/user.email."""
    try:
        repo.git.var("GIT_COMMITTER_IDENT")
    except git.GitCommandError as error:
        fail(f"git cannot commit here ({error.stderr.strip()}): set user.name and user.email "
             "(git config user.name NAME; git config user.email EMAIL).")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"] and "--holdout" in argv and not {"-h", "--help"} & set(argv):
        # the holdout's runs first, in the tag's repository as a night would make them; then the report
        rest = [a for a in argv[1:] if a != "--holdout"]
        tag = report.tag_to_report(rest)
        loop(["--tag", tag], holdout_only=True)
        return report.report_main(rest)
    if argv[:1] == ["report"]:
        return report.report_main(argv[1:])
    if argv[:1] == ["demo"]:
        return demo.demo_main(argv[1:])
    return loop(argv)


def loop(argv, holdout_only=False):
    """The night of the tag the options name (holdout_only: only the holdout's runs, then stop)."""
    args = parse_args(argv)
    repo = state.open_repo()
    root = repo.working_tree_dir
    os.chdir(root)
    for name in ("train.py", "prepare.py", "program.md"):
        if not Path(name).is_file():
            fail(f"{Path(root) / name} is missing: run agent_loop.py in the autoresearch repository.")
    constants = integrity.harness_constants()
    state_dir = state.STATE_ROOT / args.tag
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    state.keep_out_of_git(repo, "results.tsv", "progress.png", f"{state.STATE_ROOT}/", str(state.STEER_FILE))
    if not state.STEER_FILE.exists():  # for the researcher to steer the night with, while it goes
        state.STEER_FILE.write_text(state.STEER_TEMPLATE)
    try:
        with filelock.FileLock(state.STATE_ROOT / "lock", timeout=0):  # released however the night ends
            return run_night(repo, args, argv, constants, state_dir, holdout_only)
    except filelock.Timeout:
        fail(f"another agent_loop.py is running in {root}.")


def run_night(repo, args, argv, constants, state_dir, holdout_only=False):
    """Start or resume the tag, then experiment until a limit, an interrupt or an error (and then score the
    holdout); the exit code. holdout_only: score the holdout, and stop."""
    check_committer(repo)
    state.end_unfinished_line(state_dir / "ledger.jsonl")
    ledger = Ledger(state_dir / "ledger.jsonl")
    started = ledger.last_start()
    if started and "options" in started:  # a resumed tag goes on as it was started, unless told otherwise
        args = parse_args(argv, started["options"])
    branch, resuming = state.check_branch(repo, args.tag, ledger)
    instructions = instructions_text()

    output = OutputMode("json" if ledger.events("openai_output") else args.openai_output)  # shared by all

    def make_agent(repo):  # with workers, each conversation has an agent of its own
        if args.agent == "openai":
            return OpenAIAgent(agent_settings(args), instructions, repo, output)
        return AGENTS[args.agent](agent_settings(args), instructions, repo)
    agent = None if holdout_only else make_agent(repo)  # before the branch: none if it fails
    if resuming:
        repo.heads[branch].checkout(force=True)  # force: the train.py check_branch found to be ours
    else:
        repo.create_head(branch).checkout()
    fingerprint = ledger.events("start")[0]["fingerprint"] if started else integrity.harness_fingerprint()
    if changed := integrity.fingerprint_changes(fingerprint, integrity.harness_fingerprint()):
        fail(f"prepare.py or the prepared cache changed since tag {args.tag} started ({', '.join(changed)}): its "
             "results would not be comparable. Restore them (same prepare.py, same prepare flags), or use a new --tag.")
    night = Night(args, agent, repo, state_dir, ledger,
                  args.timeout or 2 * constants["time_budget"] + TIMEOUT_MARGIN, constants, fingerprint)
    runner.kill_leftover_training(state_dir / "train.pid")
    night.record(event="start", tag=args.tag, branch=branch, base_commit=state.head_commit(repo), agent=args.agent,
                 model=args.model, time_budget=constants["time_budget"], timeout=night.timeout, keep_rule=args.keep_rule,
                 fingerprint=fingerprint, argv=argv, options={name: getattr(args, name) for name in TAG_OPTIONS})
    best = ledger.best()
    state.reset_hard(repo, best["commit"] if best else ledger.base_commit())
    state.write_results_tsv(ledger.results(), state_dir)
    log(f"{'resuming' if resuming else 'starting'} {branch}: {len(ledger.results())} experiments so far, "
        f"agent {args.agent}{f' ({args.model})' if args.model else ''}, runs killed after {night.timeout:.0f}s")

    def stop_on_sigterm(signum, frame):
        raise KeyboardInterrupt
    previous_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    reason, exit_code = None, 0
    try:
        if holdout_only:
            reason = "holdout scored" if holdout.score_holdout(night) else "no holdout score"
        elif args.workers > 1 or args.ray:
            from autoresearch import scheduler  # imports no Ray until it connects
            scheduler.connect_workers(night)
            reason = scheduler.run_night_on_workers(night, make_agent)
        else:
            for number in ledger.open_experiments():  # cut off by a stop: this loop proposes anew
                night.record(event="abandoned", experiment=number)
            while not (reason := why_stop(night)):
                if ledger.best():
                    run_experiment(night)
                else:
                    run_baseline(night)
        if reason.startswith(("reached --max", "spent $")) and args.holdout_at_end == "on" and not holdout_only:
            holdout.score_holdout(night)
    except KeyboardInterrupt:
        reason, exit_code = "interrupted", 130
    except SystemExit as error:
        reason = str(error.code)
        raise
    finally:
        # Nothing may interrupt the cleanup: train.py goes back to the best commit, the ledger gets its last word.
        for signum in previous_handlers:
            signal.signal(signum, signal.SIG_IGN)
        best = ledger.best()
        state.reset_hard(repo, best["commit"] if best else ledger.base_commit())
        night.record(event="stop", reason=reason or "error")
        report.write_html(ledger, state_dir / "report.html", f"autoresearch {args.tag}")  # the night is over
        if night.cluster:
            from autoresearch import ray_executor
            ray_executor.shutdown(night.cluster)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    rows = ledger.results()
    summary = f"best val_bpb {best['val_bpb']:.6f} at {best['commit'][:7]}" if best else "no baseline yet"
    log(f"stopped: {reason}. {count_text(rows)}, {summary}. {go_on_hint(args, reason)}")
    return exit_code


def count_text(rows):
    """The counts as the loop and the report say them: experiments include the baseline, kept ideas do not."""
    kept = sum(r["status"] == "keep" for r in rows[1:])
    return f"{plural(len(rows), 'experiment')} (baseline included), {plural(kept, 'idea')} kept"


def go_on_hint(args, reason):
    """The command that goes on from here: the tag keeps its options, so only a limit it reached must be raised."""
    command = f"uv run agent_loop.py --tag {args.tag}"  # + how it ran, which the tag does not keep
    command += f" --workers {args.workers}" * (args.workers > 1) + f" --ray {args.ray}" * bool(args.ray)
    if reason.startswith("reached --max-experiments"):
        return f"To go on, raise the limit: {command} --max-experiments {args.max_experiments + 10}"
    if reason.startswith("spent $"):
        return f"To go on, raise the limit: {command} --max-cost {2 * args.max_cost:g}"
    return f"Resume with: {command}"


if __name__ == "__main__":
    sys.exit(main())
