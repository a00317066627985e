"""
A check of the CUDA path that anyone can run on a GPU machine with no network, in minutes: one table, one verdict.

- Prepares Python's standard library as the corpus (the default preset, a short budget) in a cache of its own,
  runs a two-experiment night (the baseline and one idea of Optuna's, offline) in a temporary clone of this
  checkout's HEAD, scores the best model's saved weights again (`agent_loop.py rescore`), and prints the baseline
  run's numbers: GPU, torch, the attention path and why, tok/s, MFU, peak memory, start-up and compile, the
  evaluation, the integrity verdict, the sandbox, the night and the weights.
- --reference PATH: also the reference's train.py from a checkout of karpathy/autoresearch, on the same documents
  (our stdlib splits written as its shards, its tokenizer trained by its prepare.py), with the same budget and
  evaluation tokens (its two constants changed in a copy), its Flash Attention 3 served by SDPA and FlexAttention
  as ours is (the kernel hub is offline); then the ratio of the two throughputs.
- Exits 1 on any failure. Writes nothing outside its temp dir, the cache it names and the logs' archive (--logs).
- --dry-run: the same path on the CPU with the tests' tiny constants (the test suite runs it); with --reference,
  the reference's prepare.py only (its train.py needs CUDA).

    uv run dev/gpu_check.py                     # about 6 minutes on an H100/H200 (the first compile is most of it)
    uv run dev/gpu_check.py --budget 60 --cache ~/.cache/autoresearch-gpu-check
    uv run dev/gpu_check.py --reference ~/src/autoresearch-karpathy
    uv run dev/gpu_check.py --dry-run           # no GPU needed: checks the check
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import git

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from autoresearch import report, state, weights  # noqa: E402 -- after the checkout is on the path
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
    parser.add_argument("--logs", type=Path, metavar="PATH.tar.gz", help="keep the logs there (the steps', the "
                        "night's ledger and its runs'), also when the check fails")
    parser.add_argument("--reference", type=Path, metavar="PATH", help="a checkout of karpathy/autoresearch: its "
                        "train.py runs too, on the same documents, and the throughputs are compared")
    args = parser.parse_args(argv)
    args.budget = args.budget or (2 if args.dry_run else 30)
    if args.budget < 1:
        parser.error(f"--budget {args.budget}: must be at least 1 second")
    if args.prepared and not (args.prepared / "manifest.json").is_file():
        parser.error(f"--prepared {args.prepared}: no manifest.json there; prepare it (uv run prepare.py), or use "
                     "--cache")
    if args.reference and not all((args.reference / name).is_file() for name in ("prepare.py", "train.py")):
        parser.error(f"--reference {args.reference}: no prepare.py and train.py there (a checkout of "
                     "karpathy/autoresearch)")
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
    run = next((r for r in ledger.events("run") if r["experiment"] == 0), None)
    if run is None:
        return [("baseline", "no run recorded")], False, None
    log = (state_dir.parent.parent / run["log"]).read_text(errors="replace")  # the ledger's paths: from the root
    first = lambda prefix: next((line.split(":", 1)[1].strip() for line in log.splitlines()  # noqa: E731
                                 if line.startswith(prefix)), "not printed")
    speed, lines = median_speed(log)
    metrics, evaluated = run["metrics"], (run.get("attestation") or {}).get("evaluations", [{}])[-1]
    rows = [("attention", first("attention:")), ("device", first("device:")),
            ("tok/s", f"{speed:,.0f} (median of {lines} step lines)" if speed else "none"),
            ("MFU", f"{metrics.get('mfu_percent', 0):.1f} % ({first('mfu:')})"),
            ("peak memory", f"{metrics.get('peak_vram_mb', 0) / 1024:.1f} GiB"),
            ("training", f"{metrics.get('training_seconds', 0):.0f} s, {metrics.get('num_steps', 0):.0f} steps")]
    if evaluated:
        start_up = evaluated["first_logits"] - metrics.get("training_seconds", 0)
        rows += [("start-up + compile", f"{start_up:.0f} s (from the start to the first logits scored, less the "
                  "training)"),
                 ("evaluation", f"{evaluated['seconds']:.1f} s for {evaluated['tokens']:,} tokens")]
    probe = evaluated.get("probe") if evaluated else None
    if probe:
        rows.append(("probe run", f"{run.get('probe_seconds') or 0:.0f} s in all (train.py again, loading the weights "
                     f"it handed over), {probe['seconds']:.1f} s of it scoring {probe['rows']:,} spliced rows"))
    verdict = "valid" if run["ok"] else "INVALID: " + "; ".join(run["problems"] or ["no val_bpb"])
    if probe:
        verdict += f" (future influence {probe['future_influence']:.2g} nats, the largest over the spliced rows)"
    rows += [("integrity", verdict), ("sandbox", run.get("sandbox") or "unknown")]
    return rows, run["ok"], speed


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
    seconds = ", ".join(f"{r['seconds']:.0f}" + (f" + {r['probe_seconds']:.0f}" if r.get("probe_seconds") else "")
                        for r in runs)
    rows = [("night", f"{outcome}; runs of {seconds} s (+ the probe run)"),
            ("start-up + compile, each run", f"{', '.join(start_ups)} s (the later ones start from the baseline's "
             "compile cache)")]
    models = {model["role"]: model for model in report.saved_models(ledger)}
    for role in weights.ROLES:
        if role not in models:
            problems.append(f"no {role} model was kept (in {state_dir / weights.MODELS})")
            continue
        rows.append((f"{role} weights", f"{models[role]['bytes'] / 1e6:.1f} MB"))
    return rows, problems


# -----------------------------------------------------------------------------
# How busy the GPU was: compilation leaves it idle, training does not (data for telling them apart from outside)

GPU_SAMPLER = ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"]


def busy_seconds(samples, spans):
    """For each (start, end) span (datetimes), the seconds nvidia-smi's samples ("YYYY/MM/DD HH:MM:SS.mmm, N" lines,
    N the utilization in %) show the GPU busy in it; None without two samples."""
    points = []
    for line in samples.splitlines():
        try:
            stamp, utilization = (field.strip() for field in line.split(","))
            points.append((datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f"), float(utilization)))
        except ValueError:  # a header, a partial last line
            continue
    if len(points) < 2:
        return [None for _ in spans]
    step = statistics.median((b[0] - a[0]).total_seconds() for a, b in zip(points, points[1:]))
    return [step * sum(1 for when, busy in points if start <= when <= end and busy > 0) for start, end in spans]


def run_spans(state_dir):
    """(start, end) of each run of the night, from its ledger: when it went out, when it was recorded."""
    ledger = state.Ledger(state_dir / "ledger.jsonl")
    started = {(r["experiment"], r["repeat"], r["commit"]): r["time"] for r in ledger.events("run_started")}
    return [(datetime.datetime.fromisoformat(started[(r["experiment"], r["repeat"], r["commit"])]),
             datetime.datetime.fromisoformat(r["time"])) for r in ledger.events("run")
            if (r["experiment"], r["repeat"], r["commit"]) in started]


# -----------------------------------------------------------------------------
# The reference, side by side

# Its FA3 call, served as our train.py serves attention without FA3: SDPA for full causal layers, FlexAttention
# (with a block mask built once, outside the compiled graph) for sliding windows.
KERNELS_STAND_IN = """
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

_masks = {}


@torch.compiler.disable
def _mask(T, window, device):
    if (T, window) not in _masks:
        _masks[T, window] = create_block_mask(lambda b, h, q, k: (k <= q) & (q - k <= window), None, None, T, T,
                                              device=device)
    return _masks[T, window]


def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)):
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    T, window = q.shape[2], window_size[0]
    if window < 0 or window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = flex_attention(q, k, v, block_mask=_mask(T, window, q.device))
    return y.transpose(1, 2)


class _Kernel:
    flash_attn_interface = sys.modules[__name__]


def get_kernel(repo):
    return _Kernel()
"""
REFERENCE_CONSTANTS = {"TIME_BUDGET = 300": "TIME_BUDGET = {budget}",
                       "EVAL_TOKENS = 40 * 524288": "EVAL_TOKENS = {eval}"}
REFERENCE_VAL_SHARD = "shard_06542.parquet"


def reference_folder(reference, folder, budget, eval_tokens):
    """A copy of the reference's two files with its budget and evaluation tokens ours, its `kernels` stood in for,
    and our stdlib corpus's train and val documents as its shards under a HOME of its own. (folder, env)."""
    import types

    import pyarrow as pa
    import pyarrow.parquet as pq

    import data_sources

    work, home = folder / "reference", folder / "reference-home"
    (work / "kernels").mkdir(parents=True)
    (work / "kernels" / "__init__.py").write_text(KERNELS_STAND_IN)
    shutil.copy(reference / "train.py", work / "train.py")
    source = (reference / "prepare.py").read_text()
    for line, ours in REFERENCE_CONSTANTS.items():
        if source.count(line) != 1:
            sys.exit(f"gpu_check: {reference / 'prepare.py'} has no line `{line}`: not the reference's prepare.py?")
        source = source.replace(line, ours.format(budget=budget, eval=eval_tokens))
    (work / "prepare.py").write_text(source)
    shards = home / ".cache" / "autoresearch" / "data"
    shards.mkdir(parents=True)
    stdlib = types.SimpleNamespace(text=None, dataset="stdlib", split_lines=False)
    for _, split, batches in data_sources.resolve_source(stdlib)[2]:
        if split in ("train", "val"):
            texts = [text for batch in batches() for text in batch]
            pq.write_table(pa.table({"text": texts}), shards / ("shard_00000.parquet" if split == "train"
                                                                else REFERENCE_VAL_SHARD), row_group_size=1024)
    # its `kernels` before any installed one, and what PYTHONPATH held (a lent machine's carried packages)
    path = os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")]))
    return work, {**os.environ, "HOME": str(home), "PYTHONPATH": path}


def median_speed(log):
    """(the median tok/sec of a log's step lines after step 10, which compile and warm up; how many), as both
    train.py print them."""
    speeds = [(int(step), int(speed.replace(",", ""))) for step, speed in re.findall(
        r"step (\d+) .*?tok/sec: ([\d,]+)", log)]
    counted = [speed for step, speed in speeds if step > 10] or [speed for _, speed in speeds]
    return (statistics.median(counted) if counted else None), len(counted)


# -----------------------------------------------------------------------------
# The check


def compare_with_reference(args, folder, speed, failed):
    """The reference's run on the same documents, and the ratio of the throughputs (rows); a failure goes to
    `failed`."""
    manifest = json.loads(((args.prepared or args.cache or folder / "cache") / "manifest.json").read_text())
    work, env = reference_folder(args.reference, folder, manifest["time_budget"], manifest["eval_tokens"])
    if step("the reference's prepare.py (its tokenizer, on our stdlib documents)",
            [sys.executable, "prepare.py", "--num-shards", "1"], work, env, folder / "reference-prepare.log"):
        failed.append("the reference's prepare.py")
        return []
    if args.dry_run:
        return [("reference", "its train.py needs CUDA: not run in a dry run")]
    log = folder / "reference-train.log"
    if step("the reference's train.py", [sys.executable, "train.py"], work, env, log):
        failed.append("the reference's train.py")
        return []
    text = log.read_text(errors="replace")
    summary = dict(re.findall(r"^(\w+):\s+(\S+)$", text, re.MULTILINE))
    theirs, lines = median_speed(text)
    peak = float(summary.get("peak_vram_mb", 0)) / 1024
    rows = [("reference", f"val_bpb {summary.get('val_bpb', '?')}, {theirs or 0:,.0f} tok/s (median of {lines} step "
             f"lines), MFU {summary.get('mfu_percent', '?')} %, peak {peak:.1f} GiB; its FA3 stood in for by SDPA + "
             "FlexAttention")]
    if speed and theirs:
        rows.append(("ours / reference", f"{speed / theirs:.2f}x the tokens per second"))
    return rows


def pack_logs(path, folder, state_dir):
    """The steps' logs, the night's ledger and its runs' logs, in one .tar.gz (a lent machine returns few files)."""
    with tarfile.open(path, "w:gz") as archive:
        for log in sorted([*folder.glob("*.log"), *folder.glob("gpu-busy.csv")]):
            archive.add(log, arcname=log.name)
        for name in ("ledger.jsonl", "logs"):
            if (state_dir / name).exists():
                archive.add(state_dir / name, arcname=f"night/{name}")
    print(f"gpu_check: the logs are in {path}", flush=True)


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
        failed, state_dir = [], clone / state.STATE_ROOT / TAG
        try:
            with contextlib.ExitStack() as sampling:
                if not args.dry_run and shutil.which(GPU_SAMPLER[0]):
                    samples = sampling.enter_context(open(folder / "gpu-busy.csv", "w"))
                    sampler = sampling.enter_context(subprocess.Popen(GPU_SAMPLER, stdout=samples,
                                                                      stderr=subprocess.DEVNULL))
                    sampling.callback(sampler.terminate)  # before the Popen's own exit waits for it
                for what, command, log in steps:
                    if step(what, command, clone, env, folder / log):
                        failed.append(what)
                        break
            rows, speed = [("GPU", gpu), ("torch", torch_version)], None
            if (state_dir / "ledger.jsonl").is_file():
                table, valid, speed = baseline_table(state_dir)
                rows += table
                failed += [] if valid else ["the baseline's run was not valid"]
                more, problems = night_rows(state_dir)
                rows += more
                failed += problems
            if (folder / "gpu-busy.csv").exists() and (state_dir / "ledger.jsonl").is_file():
                spans = run_spans(state_dir)
                busy = busy_seconds((folder / "gpu-busy.csv").read_text(), spans)
                rows.append(("GPU busy, each run", ", ".join(
                    f"{b:.0f} of {(end - start).total_seconds():.0f} s" for b, (start, end) in zip(busy, spans)
                    if b is not None) + " (nvidia-smi every 0.2 s: compilation leaves the GPU idle)"))
            if args.reference and not failed:
                rows += compare_with_reference(args, folder, speed, failed)
            rescored = (folder / "rescore.log").read_text() if (folder / "rescore.log").exists() else ""
            if found := re.search(r"^val_bpb (.*?\)); #", rescored, re.MULTILINE):
                rows.append(("best, scored again", found[1]))
        finally:  # also after an error: the logs are what tells why
            if args.logs:
                pack_logs(args.logs, folder, state_dir)
    print(f"\ngpu check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit[:7]}, "
          f"{time.time() - started:.0f} s\n")
    print("| what | measured |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value.replace('|', '/')} |")
    print(f"\ngpu_check: {'FAILED: ' + '; '.join(failed) if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
