"""
The unattended overnight research loop: an AI agent proposes, this program experiments.

Each experiment is ONE idea of the agent's (exact search/replace edits of train.py), committed beside the branch
autoresearch/<tag>, run for its time budget under the harness in a fresh folder, scored by the harness's signed
record, and kept (the branch moves to it) or not by the keep rule; the first is the unmodified baseline. Until a
limit, Ctrl-C or SIGTERM; the same --tag resumes, also after a kill. One engine runs every night, one experiment at
a time or --workers N at once (autoresearch/engine.py; dev/INTERFACE.md draws the parts). Its records are
results.tsv and .autoresearch/<tag>/ (the ledger, every run's log, report.html), kept out of git.

    uv run agent_loop.py                                   # Anthropic API, ANTHROPIC_API_KEY
    uv run agent_loop.py --agent claude-code               # the claude CLI, headless
    uv run agent_loop.py --agent openai --base-url http://localhost:8000/v1 --model qwen3-32b
    uv run agent_loop.py --agent optuna                    # no LLM: Optuna tunes train.py's constants
    uv run agent_loop.py report                            # the morning summary and progress.png
    uv run agent_loop.py holdout                           # is the gain real: the holdout check
    uv run agent_loop.py rescore                           # the best model's weights, scored again
    uv run agent_loop.py demo                              # all of it offline, in one command (~15 min)
"""

import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import filelock
import git

from autoresearch import demo, holdout, integrity, report, run_folders, runner, state, weights
from autoresearch.console import fail, log, plural
from autoresearch.engine import Engine
from autoresearch.night import Night, time_limit
from autoresearch.openai_agent import OpenAIAgent, OutputMode
from autoresearch.options import AGENTS, TAG_OPTIONS, agent_settings, parse_args
from autoresearch.prompts import instructions_text
from autoresearch.runs import LocalExecutor, local_gpus
from autoresearch.state import Ledger


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
    if argv[:1] == ["report"]:
        return report.report_main(argv[1:])
    if argv[:1] == ["holdout"]:  # the tag whose ledger changed last, unless --tag names one
        root, ledgers = report.tag_ledgers()
        if not ledgers and not any(a.startswith("--tag") for a in argv):
            fail(f"holdout runs a tag's baseline and best again, and {root / state.STATE_ROOT} has no tag: run the "
                 "loop first (uv run agent_loop.py), or name a tag with --tag.")
        tag = [] if any(a.startswith("--tag") for a in argv) else ["--tag", ledgers[-1].parent.name]
        return loop(tag + argv[1:], holdout_only=True)
    if argv[:1] == ["demo"]:
        return demo.demo_main(argv[1:])
    if argv[:1] == ["rescore"]:
        return weights.rescore_main(argv[1:])
    return loop(argv)


def loop(argv, holdout_only=False, executor=None):
    """The night of the tag the options name (holdout_only: only the holdout's runs, then stop); executor: where
    runs go (default: this machine, or the Ray cluster --ray names)."""
    args = parse_args(argv)
    if not hasattr(socket, "send_fds"):
        fail("a run talks to its scorer through a Unix socket, which this platform lacks: run agent_loop.py on Linux "
             "or macOS (on Windows, in WSL 2)")
    repo = state.open_repo()
    root = repo.working_tree_dir
    os.chdir(root)
    for name in ("train.py", *integrity.HARNESS, "program.md"):
        if not Path(name).is_file():
            fail(f"{Path(root) / name} is missing: run agent_loop.py in the autoresearch repository.")
    constants = integrity.harness_constants()
    state_dir = state.STATE_ROOT / args.tag
    state.keep_out_of_git(repo, "results.tsv", "progress.png", f"{state.STATE_ROOT}/", str(state.STEER_FILE))
    state.STATE_ROOT.mkdir(exist_ok=True)  # for the lock; the tag's folder waits for an agent that could start
    try:
        with filelock.FileLock(state.STATE_ROOT / "lock", timeout=0):  # released however the night ends
            return run_night(repo, args, argv, constants, state_dir, holdout_only, executor)
    except filelock.Timeout:
        fail(f"another agent_loop.py is running in {root}.")


def run_night(repo, args, argv, constants, state_dir, holdout_only=False, executor=None):
    """Start or resume the tag, then experiment until a limit, an interrupt or an error (and then score the
    holdout); the exit code. holdout_only: score the holdout, and stop."""
    check_committer(repo)
    state.end_unfinished_line(state_dir / "ledger.jsonl")
    ledger = Ledger(state_dir / "ledger.jsonl")
    if where := ledger.altered():
        fail(f"{ledger.path} was changed after the loop wrote it: {where}. Its results cannot be trusted, so tag "
             f"{args.tag} cannot go on: start a new --tag.")
    started = ledger.last_start()
    if started and "options" in started:  # a resumed tag goes on as it was started, unless told otherwise
        args = parse_args(argv, started["options"])
    branch, resuming = state.check_branch(repo, args.tag, ledger)
    instructions = instructions_text()
    output = OutputMode("json" if ledger.events("openai_output") else args.openai_output)  # shared by all

    def make_agent(repo):  # one per conversation (with claude-code, in its scratch worktree)
        if args.agent == "openai":
            return OpenAIAgent(agent_settings(args), instructions, repo, output)
        return AGENTS[args.agent](agent_settings(args), instructions, repo)
    fresh = not state_dir.exists()
    state_dir.mkdir(parents=True, exist_ok=True)  # the Optuna agent keeps its study there
    try:
        agent = None if holdout_only else make_agent(repo)  # before the branch: none if it fails
    except BaseException:
        if fresh:  # a start the agent refused leaves no trace
            shutil.rmtree(state_dir, ignore_errors=True)
        raise
    (state_dir / "logs").mkdir(exist_ok=True)
    if not state.STEER_FILE.exists():  # for the researcher to steer the night with, while it goes
        state.STEER_FILE.write_text(state.STEER_TEMPLATE)
    if resuming:
        repo.heads[branch].checkout()
    else:
        repo.create_head(branch).checkout()
    fingerprint = ledger.events("start")[0]["fingerprint"] if started else integrity.harness_fingerprint()
    if changed := integrity.fingerprint_changes(fingerprint, integrity.harness_fingerprint()):
        fail(f"the harness (prepare.py, scorer.py) or the prepared cache changed since tag {args.tag} started "
             f"({', '.join(changed)}): its results would not be comparable. Restore them (same prepare.py, same "
             "prepare flags), or use a new --tag.")
    night = Night(args, agent, repo, state_dir, ledger, args.timeout,
                  constants, fingerprint, branch)
    for pid_path in state_dir.glob("train*.pid"):
        run_folders.kill_leftover_training(pid_path)
    night.record(event="start", tag=args.tag, branch=branch, base_commit=state.head_commit(repo), agent=args.agent,
                 model=args.model, time_budget=constants["time_budget"], timeout=night.timeout, keep_rule=args.keep_rule,
                 fingerprint=fingerprint, argv=argv, options={name: getattr(args, name) for name in TAG_OPTIONS})
    best = ledger.best()
    state.move_branch(repo, branch, best["commit"] if best else ledger.base_commit())
    state.write_results_tsv(ledger.results(), state_dir)

    def on_signal(signum, frame):  # a signal stops the night, but never cuts its cleanup short
        night.interrupted = True
        if night.stopping:  # os.write: a print here could break into a print of the code it interrupted
            os.write(2, b"agent_loop.py: already stopping: the runs are being stopped and the ledger closed\n")
            return
        night.stopping = True
        raise KeyboardInterrupt
    previous_handlers = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    reason, exit_code = None, 0
    try:
        night.executor = executor or open_executor(night)
        log(f"{'resuming' if resuming else 'starting'} {branch}: {len(ledger.results())} experiments so far, "
            f"agent {args.agent}{f' ({args.model})' if args.model else ''}, runs {night.executor.describe()}, "
            "killed after {:.0f}s ({})".format(*time_limit(night)))
        log(f"train.py's sandbox{' here (each node says its own in its runs)' if args.ray else ''}: "
            f"{runner.sandbox_words(integrity.cache_dir(), os.environ)}")
        if holdout_only:
            reason = "holdout scored" if holdout.score_holdout(night) else "no holdout score"
        else:
            reason = Engine(night, make_agent).run()
        if night.interrupted:  # during the engine's cleanup
            raise KeyboardInterrupt
        if reason.startswith(("reached --max", "spent $")) and args.holdout_at_end == "on" and not holdout_only:
            holdout.score_holdout(night)
    except KeyboardInterrupt:
        reason, exit_code = "interrupted", 130
    except SystemExit as error:
        reason = str(error.code)
        raise
    finally:  # the ledger gets its last word, the page is final, the executor is closed
        night.stopping, best = True, ledger.best()
        night.record(event="stop", reason=reason or "error")
        try:
            report.write_html(ledger, state_dir / "report.html", f"autoresearch {args.tag}")  # the night is over
        finally:
            if night.executor:
                night.executor.close()
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
    rows = ledger.results()
    summary = f"best val_bpb {best['val_bpb']:.6f} at {best['commit'][:7]}" if best else "no baseline yet"
    log(f"stopped: {reason}. {count_text(rows)}, {summary}. {go_on_hint(args, reason)}")
    return exit_code


def open_executor(night):
    """Where the runs go: this machine (one slot per GPU --workers allows, or --workers CPU slots), or the Ray
    cluster --ray names (at most --workers of its GPUs when --workers is more than one)."""
    args = night.args
    if args.ray:
        from autoresearch import ray_executor  # here: only a night on Ray imports it
        try:
            cluster = ray_executor.connect(args.ray, args.workers)
        except RuntimeError as error:  # a cluster that cannot be joined
            fail(str(error))
        night.executor = executor = ray_executor.RayExecutor(cluster, integrity.portable_fingerprint())
        kind, slots, models = "GPU" if cluster.gpus else "CPU", cluster.slots, cluster.gpu_models
        where = f"the Ray cluster at {cluster.address}"
    else:
        gpus = local_gpus()
        executor = LocalExecutor(min(args.workers, len(gpus)) if gpus else args.workers, night.state_dir, gpus)
        kind, slots, models, where = "GPU", executor.slots, sorted({name for _, name in executor.gpus}), "this machine"
        if gpus and args.workers > len(gpus):
            log(f"--workers {args.workers}, but this machine shows {plural(len(gpus), 'GPU')}: {len(gpus)} at once")
    if slots < 1:
        fail(f"{where} has no {kind} for a run: start its worker nodes (or give the head node resources), then run "
             "the same command again.")
    if len(models) > 1 and not args.allow_mixed_gpus:
        fail(f"{where} mixes GPU models ({', '.join(models)}): their speed and run-to-run noise differ, so runs on one "
             "would be compared with runs on another. Use one model, or pass --allow-mixed-gpus.")
    return executor


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
