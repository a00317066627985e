"""
A check of the CUDA path that anyone can run on a GPU machine with no network, in minutes: one table, one verdict.

- Prepares Python's standard library as the corpus (the default preset, a short budget) in a cache of its own,
  runs a two-experiment night (the baseline and one idea of Optuna's, offline) in a temporary clone of this
  checkout's HEAD, scores the best model's saved weights again (`agent_loop.py rescore`), and prints the baseline
  run's numbers: GPU, torch, the attention path and why, tok/s, MFU, peak memory, start-up and compile, the
  evaluation, the integrity verdict, the sandbox, the night and the weights.
- Exits 1 on any failure. Writes nothing outside its temp dir and the cache it names.
- --dry-run: the same path on the CPU with the tests' tiny constants (the test suite runs it).

    uv run dev/gpu_check.py                     # about 6 minutes on an H100/H200 (the first compile is most of it)
    uv run dev/gpu_check.py --budget 60 --cache ~/.cache/autoresearch-gpu-check
    uv run dev/gpu_check.py --dry-run           # no GPU needed: checks the check
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import git

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from autoresearch import state  # noqa: E402 -- after the checkout is on the path
from autoresearch.demo import temporary_clone  # noqa: E402

TAG = "gpu-check"
# The tests' constants (tests/conftest.py TINY): a check of the path, not of the GPU
DRY_RUN = ["--vocab-size", "512", "--max-seq-len", "64", "--eval-tokens", "4096"]
EVALUATION = ["--eval-tokens", str(2**18)]  # a tenth of the reference's 40 x 2^19: seconds, not a minute
NIGHT = ["--agent", "optuna", "--optuna-params", "MATRIX_LR", "--max-experiments", "2", "--keep-rule", "greedy",
         "--holdout-at-end", "off", "--paired", "off"]

# -----------------------------------------------------------------------------
# Steps


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n  uv run dev/gpu_check.py\n  uv run dev/gpu_check.py --dry-run")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cache", type=Path, help="prepare the corpus here, or bring it up to date (default: in the "
                       "check's temp dir, removed at the end)")
    where.add_argument("--prepared", type=Path, help="a prepared cache to use as it is (no prepare.py)")
    parser.add_argument("--budget", type=int, help="TIME_BUDGET of each run, seconds (default: 30; --dry-run: 2)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, with tiny constants: the check's own path")
    args = parser.parse_args(argv)
    args.budget = args.budget or (2 if args.dry_run else 30)
    if args.budget < 1:
        parser.error(f"--budget {args.budget}: must be at least 1 second")
    if args.prepared and not (args.prepared / "manifest.json").is_file():
        parser.error(f"--prepared {args.prepared}: no manifest.json there; prepare it (uv run prepare.py), or use --cache")
    return args


def device():
    """(GPU name or "cpu", torch's version), as train.py's runs will see them (the same interpreter)."""
    import torch

    return (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"), torch.__version__


def step(what, command, cwd, env, log):
    """Run one step, its output to `log`; its exit code (a failed one prints its last lines)."""
    started = time.time()
    print(f"gpu_check: {what} ...", flush=True)
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    print(f"gpu_check: {what}: {'done' if code == 0 else f'FAILED (exit code {code})'} in "
          f"{time.time() - started:.0f}s", flush=True)
    if code:
        print("".join(open(log).readlines()[-20:]), flush=True)
    return code


# -----------------------------------------------------------------------------
# What the night's records say


def baseline_table(state_dir):
    """The rows of the baseline's first run: what train.py printed and what the scorer attested."""
    ledger = state.Ledger(state_dir / "ledger.jsonl")
    run = next(r for r in ledger.events("run") if r["experiment"] == 0)
    log = (state_dir.parent.parent / run["log"]).read_text(errors="replace")  # the ledger's paths: from the root
    first = lambda prefix: next((line.split(":", 1)[1].strip() for line in log.splitlines()  # noqa: E731
                                 if line.startswith(prefix)), "not printed")
    speeds = [int(found.replace(",", "")) for found in re.findall(r"tok/sec: ([\d,]+)", log)]
    metrics, evaluated = run["metrics"], (run.get("attestation") or {}).get("evaluations", [{}])[-1]
    rows = [("attention", first("attention:")), ("device", first("device:")),
            ("tok/s", f"{statistics.median(speeds):,.0f} (median of {len(speeds)} step lines)" if speeds else "none"),
            ("MFU", f"{metrics.get('mfu_percent', 0):.1f} % ({first('mfu:')})"),
            ("peak memory", f"{metrics.get('peak_vram_mb', 0) / 1024:.1f} GiB"),
            ("training", f"{metrics.get('training_seconds', 0):.0f} s, {metrics.get('num_steps', 0):.0f} steps")]
    if evaluated:
        start_up = evaluated["first_logits"] - metrics.get("training_seconds", 0)
        rows += [("start-up + compile", f"{start_up:.0f} s (from the start to the first logits scored, less the "
                  "training)"),
                 ("evaluation", f"{evaluated['seconds']:.1f} s for {evaluated['tokens']:,} tokens and their spliced "
                  "copies")]
    verdict = "valid" if run["ok"] else "INVALID: " + "; ".join(run["problems"] or ["no val_bpb"])
    if evaluated:
        verdict += (f" (future influence {evaluated['future_influence']:.2g}, one batch scored twice moved "
                    f"{evaluated['repeat_difference']:.2g} nats)")
    rows += [("integrity", verdict), ("sandbox", run.get("sandbox") or "unknown")]
    return rows, run["ok"]


def night_rows(state_dir):
    """(rows, problems) of the night: each experiment's outcome, and the models it kept."""
    ledger, problems = state.Ledger(state_dir / "ledger.jsonl"), []
    results = ledger.results()
    outcome = ", ".join(f"#{r['experiment']} {r['status']} {r['val_bpb']:.4f}" for r in results)
    if len(results) != 2 or results[0]["status"] != "keep":
        problems.append(f"the night decided {len(results)} experiments ({outcome or 'none'}), not the baseline kept "
                        "and one idea")
    runs = ledger.events("run")
    start_ups = [f"{evaluated['first_logits'] - r['metrics'].get('training_seconds', 0):.0f}" for r in runs
                 if (evaluated := ((r.get("attestation") or {}).get("evaluations") or [None])[-1])]
    seconds = ", ".join(f"{r['seconds']:.0f}" for r in runs)
    rows = [("night", f"{outcome}; runs of {seconds} s"),
            ("start-up + compile, each run", f"{', '.join(start_ups)} s (the later ones start from the baseline's "
             "compile cache)")]
    models = state_dir / "models"
    for role in ("baseline", "best"):
        path = models / f"{role}.safetensors"
        if not path.is_file():
            problems.append(f"no {role} model was kept ({path})")
            continue
        rows.append((f"{role} weights", f"{path.stat().st_size / 1e6:.1f} MB"))
    return rows, problems


# -----------------------------------------------------------------------------
# The check


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gpu, torch_version = device()
    if gpu == "cpu" and not args.dry_run:
        sys.exit("gpu_check: torch sees no CUDA GPU here: run it on a GPU machine, or with --dry-run to check the "
                 "check on the CPU")
    repo = git.Repo(ROOT)
    commit = repo.head.commit.hexsha
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="autoresearch-gpu-check-") as folder:
        folder = Path(folder)
        clone = temporary_clone(repo, commit, folder / "autoresearch")
        cache = args.prepared or args.cache or folder / "cache"
        env = {**os.environ, "AUTORESEARCH_CACHE": str(cache)}
        print(f"gpu_check: {gpu}, torch {torch_version}, commit {commit[:7]}, cache {cache}, budget {args.budget}s"
              + (" (dry run)" if args.dry_run else ""), flush=True)
        preset = ["--preset", "small", *DRY_RUN] if args.dry_run else ["--preset", "default", *EVALUATION]
        steps = [] if args.prepared else [
            ("prepare the stdlib corpus", [sys.executable, "prepare.py", "--dataset", "stdlib", *preset,
                                           "--time-budget", str(args.budget)], "prepare.log")]
        steps += [("a night of two experiments", [sys.executable, "agent_loop.py", "--tag", TAG, *NIGHT], "night.log"),
                  ("the best model's weights, scored again", [sys.executable, "agent_loop.py", "rescore", "--tag", TAG],
                   "rescore.log")]
        failed = []
        for what, command, log in steps:
            if step(what, command, clone, env, folder / log):
                failed.append(what)
                break
        state_dir = clone / state.STATE_ROOT / TAG
        rows = [("GPU", gpu), ("torch", torch_version)]
        if (state_dir / "ledger.jsonl").is_file():
            table, valid = baseline_table(state_dir)
            rows += table
            failed += [] if valid else ["the baseline's run was not valid"]
            more, problems = night_rows(state_dir)
            rows += more
            failed += problems
        rescored = (folder / "rescore.log").read_text() if (folder / "rescore.log").exists() else ""
        if found := re.search(r"^val_bpb (.*?\)); #", rescored, re.MULTILINE):
            rows.append(("best, scored again", found[1]))
    print(f"\ngpu check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit[:7]}, "
          f"{time.time() - started:.0f} s\n")
    print("| what | measured |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value.replace('|', '/')} |")
    print(f"\ngpu_check: {'FAILED: ' + '; '.join(failed) if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
