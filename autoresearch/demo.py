"""
`uv run agent_loop.py demo`: the whole loop in one command, offline, on a CPU, with no API key.

It prepares Python's own standard-library sources as the corpus (small preset) in a cache of its own,
runs the loop with Optuna as the agent in a temporary clone of the current commit, prints the report
and keeps the results. The user's checkout, branches and main cache are not touched: a clone, not a
worktree, because a worktree shares branches, refs and .git/info/exclude with the checkout.

    uv run agent_loop.py demo                      # about 15 minutes on 2 CPU cores
    uv run agent_loop.py demo --minutes 30
    uv run agent_loop.py demo --noise-runs 2       # any option of the loop goes through
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import git

from autoresearch import runs, state, weights

DEMO_CACHE = Path("~/.cache/autoresearch-demo").expanduser()  # beside the default cache, never the same
PREPARE = ["--dataset", "stdlib", "--preset", "small"]  # the corpus every Python has; a 30 s budget
CONSTANTS = ("max_seq_len", "time_budget", "eval_tokens", "vocab_size")  # of a cache, which the demo keeps
# Unpaired: a promising idea paired with 4 runs of the best takes 7 minutes here, and the demo would show one idea
# (2026-12-02, dev/LOG.md). The demo shows the loop; a night is where pairs pay for themselves.
DEMO_OPTIONS = ["--paired", "off"]
OVERRUN = 0.2  # of --minutes (at least 2): when the loop's own estimate was wrong, the demo cuts it off then


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="agent_loop.py demo",
        description="The research loop offline, in one command: Python's standard library as the corpus (prepared "
        "once in the demo's own cache), Optuna as the agent (no LLM, no API key), the small preset's 30 s runs on "
        "this machine's CPU or GPU, in a temporary clone of your current commit. Your checkout is not touched. "
        "Ends with the report; the results are kept in the demo cache.",
        epilog="Other options are passed to the loop (see agent_loop.py --help), e.g. --noise-runs 2, or --timeout "
        "600 where a busy machine's runs are killed at their time limit.")
    parser.add_argument("--minutes", type=float, default=15,
                        help="end within this many minutes: no experiment starts that this machine's measured runs "
                        "say cannot finish in the time left (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=DEMO_CACHE,
                        help="the demo's prepared cache, made if missing and brought up to date (default: "
                        "%(default)s)")
    args, loop_options = parser.parse_known_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes {args.minutes:g}: must be positive")
    return args, loop_options


def temporary_clone(repo, commit, path):
    """A clone of the repository at `commit` (detached) that can commit: the loop runs in it, never in yours."""
    copy = repo.clone(str(path), shared=True, no_checkout=True, quiet=True)
    copy.git.checkout("--quiet", "--detach", commit)
    try:
        copy.git.var("GIT_COMMITTER_IDENT")
    except git.GitCommandError:  # no user.name/email here: its commits never leave the clone
        with copy.config_writer() as config:
            config.set_value("user", "name", "autoresearch demo")
            config.set_value("user", "email", "demo@localhost")
    return path


def keep_results(tag_dir, cache):
    """Copy the demo tag's folder (ledger, results.tsv, report.html, logs, models) into the cache's runs/; its path,
    or None when the loop ledgered nothing."""
    if not (tag_dir / "ledger.jsonl").exists():
        return None
    results = cache / "runs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    # of models/, the baseline's and the best's (runs/ holds them again, and those of undecided experiments)
    shutil.copytree(tag_dir, results, ignore=shutil.ignore_patterns("lock", "*.pid", "scratch", runs.COMPILE_CACHE,
                                                                     weights.RUNS))
    return results


def fail(message):
    raise SystemExit(f"agent_loop.py demo: error: {message}")


def demo_main(argv):
    args, loop_options = parse_args(argv)
    root = state.worktree_root()
    if not root or not (root / "agent_loop.py").is_file():
        fail("run the demo inside the autoresearch checkout (the folder with agent_loop.py).")
    repo = git.Repo(root)
    commit = repo.head.commit.hexsha
    env = {**os.environ, "AUTORESEARCH_CACHE": str(args.cache)}
    started = time.time()
    print(f"demo: commit {commit[:7]} of {root}, in a temporary clone; corpus: Python's standard library; "
          f"agent: Optuna; at most {args.minutes:g} minutes", flush=True)
    if repo.is_dirty(untracked_files=False):
        print("demo: your uncommitted changes are not part of it: it runs the last commit", flush=True)
    with tempfile.TemporaryDirectory(prefix="autoresearch-demo-") as folder:
        clone = temporary_clone(repo, commit, Path(folder) / "autoresearch")
        # Every time: nothing to do when the cache is current (a second), else it is brought up to date (a
        # prepare.py that orders or splits documents anew), keeping the constants it was prepared with.
        manifest = args.cache / "manifest.json"
        kept = json.loads(manifest.read_text()) if manifest.exists() else {}
        print(f"demo: the corpus, in {args.cache}", flush=True)
        subprocess.run([sys.executable, "prepare.py", *PREPARE, *(f"--{name.replace('_', '-')}={kept[name]}"
                                                                   for name in CONSTANTS if name in kept)],
                       cwd=clone, env=env, check=True)
        left = args.minutes - (time.time() - started) / 60
        defaults = [] if "--paired" in loop_options else DEMO_OPTIONS
        loop = subprocess.Popen([sys.executable, "agent_loop.py", "--agent", "optuna", "--tag", "demo", *defaults,
                                 "--max-hours", f"{max(left, 1) / 60:.4f}", *loop_options], cwd=clone, env=env)
        cut_off = False
        try:
            try:
                loop.wait(timeout=60 * (max(left, 1) + max(2.0, OVERRUN * args.minutes)))
            except subprocess.TimeoutExpired:  # the loop ends in time by its own measure: here it was wrong
                cut_off = True
                print(f"demo: {(time.time() - started) / 60:.1f} minutes, over the {args.minutes:g}: stopping the "
                      "loop; what it was running is cut off", flush=True)
                loop.send_signal(signal.SIGTERM)  # it stops cleanly, and ledgers the runs that ended
                loop.wait()
            except KeyboardInterrupt:
                loop.wait()  # it got the Ctrl-C too, and stops cleanly
        finally:  # also after an error: the logs its message names must outlive the clone
            results = keep_results(clone / ".autoresearch" / "demo", args.cache)
        if loop.returncode not in (0, 130, -signal.SIGTERM):
            fail(f"the loop stopped with an error (exit code {loop.returncode}): see its last lines above"
                 + (f"; the logs it names are kept in {results / 'logs'}." if results else "."))
        if results is None:
            fail("the demo stopped before its first run: nothing to report.")
        subprocess.run([sys.executable, "agent_loop.py", "report", "--ledger", str(results / "ledger.jsonl"),
                        "--png", str(results / "progress.png")], cwd=clone, env=env)
    ledger = state.Ledger(results / "ledger.jsonl")
    stops = ledger.events("stop")
    reason = stops[-1]["reason"] if stops else "killed"
    if not reason.startswith("reached --max-hours"):
        ended = f"cut off at its {args.minutes:g} minutes" if cut_off else f"stopped: {reason}"
    elif ":" in reason:  # it stopped short: the next experiment would not have finished in time
        ended = f"no other experiment could finish in the demo's {args.minutes:g} minutes"
    else:
        ended = f"the demo's {args.minutes:g} minutes are up"
    print(f"\ndemo: {ended} ({(time.time() - started) / 60:.1f} minutes). Kept in {results}: report.html, "
          f"results.tsv, progress.png, ledger.jsonl, logs/, models/ (the temporary clone the loop ran in, and so its tag, are "
          f"gone: the resume hint above does not apply).\nThe report again: uv run agent_loop.py report --ledger "
          f"{results / 'ledger.jsonl'}   (or with no --ledger where you have no tag of your own)", flush=True)
    return 0
