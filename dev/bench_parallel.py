"""
How busy agent_loop.py --workers N keeps its workers: experiments per hour, worker utilisation, the idle
worker-seconds per run (the driver's overhead, a run's start-up, any wait for the agent, and the drain at the end,
together), and the dispatch time: the median from a run's end to the next run's start (the driver's own overhead;
a wait for the agent shows in the tail, not the median).

Everything is real but the two slow parts: train.py is a stand-in that sleeps --run-seconds and prints a
val_bpb (it runs under the tests' stand-in harness, tests/agent_loop_support/fake_prepare.py, on this machine's
local executor, one CPU slot per worker, no Ray), and the agent is a local stand-in of the Anthropic API that
answers after --agent-latency seconds with a random change of one constant (so about half of the ideas beat the
best and take the noise rule's four runs). Each N runs one night in a fresh temporary repository.

    uv run dev/bench_parallel.py                                  # N = 1, 2, 4, 8; 6 s runs, 1 s agent calls
    uv run dev/bench_parallel.py --run-seconds 60 --agent-latency 10 --experiments 40 --workers 8
"""

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
STAND_IN_HARNESS = ROOT / "tests" / "agent_loop_support" / "fake_prepare.py"

TRAIN_PY = '''"""A stand-in train.py: sleeps SLEEP seconds, then reports VAL_BPB - GAIN (and when it ran)."""
import os
import time

from prepare import evaluate_bpb

VAL_BPB = 1.0
GAIN = 0.0
SLEEP = {sleep}

started = time.time()
time.sleep(SLEEP)
print("---")
print(f"val_bpb:          {{evaluate_bpb(VAL_BPB - GAIN):.6f}}")
print("peak_vram_mb:     1.0")
with open(os.environ["BENCH_STAMPS"], "a") as f:
    f.write(f"{{started}} {{time.time()}}\\n")
'''


# -----------------------------------------------------------------------------
# The agent stand-in: the Anthropic Messages API, answering after a fixed latency

def serve_agent(latency, seed):
    rng, lock = random.Random(seed), threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(latency)
            prompt = body["messages"][0]["content"]
            current = re.findall(r"^GAIN = (\S+)$", prompt.split("The current train.py")[-1], re.MULTILINE)[0]
            with lock:
                new = round(float(current) + rng.uniform(-0.01, 0.01), 6)
            edit = {"file": "train.py", "search": f"GAIN = {current}\n", "replace": f"GAIN = {new!r}\n"}
            reply = json.dumps({
                "id": "msg_bench", "type": "message", "role": "assistant", "model": "bench", "stop_reason": "tool_use",
                "content": [{"type": "tool_use", "id": "toolu_bench", "name": "propose_change",
                             "input": {"description": f"GAIN {current} -> {new}", "edits": [edit]}}],
                "usage": {"input_tokens": 1, "output_tokens": 1}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# -----------------------------------------------------------------------------
# One night

def run_night(workers, args, folder):
    repo, cache = folder / "repo", folder / "cache"
    repo.mkdir()
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps(
        {"time_budget": 1, "max_seq_len": 64, "eval_tokens": 4096, "vocab_size": 512}))
    (repo / "train.py").write_text(TRAIN_PY.format(sleep=args.run_seconds))
    shutil.copy(STAND_IN_HARNESS, repo / "prepare.py")
    shutil.copy(ROOT / "program.md", repo / "program.md")
    identity = dict(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.com", GIT_COMMITTER_NAME="bench",
                    GIT_COMMITTER_EMAIL="bench@example.com")
    env = {**os.environ, **identity, "AUTORESEARCH_CACHE": str(cache), "BENCH_STAMPS": str(folder / "stamps"),
           "ANTHROPIC_API_KEY": "bench", "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{args.port}", "HOME": str(folder)}
    for command in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-qm", "bench"]):
        subprocess.run(["git", *command], cwd=repo, env=env, check=True)
    started = time.time()
    command = [sys.executable, str(ROOT / "agent_loop.py"), "--tag", "bench", "--workers", str(workers),
               "--max-experiments", str(args.experiments + 1), "--timeout", str(4 * args.run_seconds + 60)]
    night = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    if night.returncode != 0:
        sys.exit(f"the night with {workers} workers failed:\n{night.stdout[-3000:]}{night.stderr[-3000:]}")
    ledger = [json.loads(line) for line in (repo / ".autoresearch/bench/ledger.jsonl").read_text().splitlines()]
    stamps = sorted(tuple(map(float, line.split())) for line in (folder / "stamps").read_text().splitlines())
    return measure(workers, stamps, ledger, time.time() - started)


def measure(workers, stamps, ledger, wall):
    """Numbers of the night after its baseline (its first 4 runs: with more workers, some idle while it runs).
    Utilisation is busy worker-seconds over workers x seconds: over the whole night after the baseline, and
    while it was going: from when all workers first ran at once to the start of its last run (after that the workers drain: no new idea
    starts once the limit is near)."""
    after = stamps[4:]
    first, last_start, last_end = after[0][0], max(start for start, _ in after), max(end for _, end in after)
    full = min((start for start, _ in after if sum(s <= start < e for s, e in after) >= workers), default=first)
    busy = sum(end - start for start, end in after)
    busy_going = sum(max(0.0, min(end, last_start) - max(start, full)) for start, end in after)
    starts = sorted(start for start, _ in after)
    # the driver's own overhead: from a run's end to the next run's start, when one was ready
    dispatch = [next(s for s in starts if s >= end) - end for _, end in after if end <= last_start]
    results = [r for r in ledger if r["event"] == "result"][1:]
    calls = [r["seconds"] for r in ledger if r["event"] == "proposal" and r["calls"]]
    return dict(workers=workers, experiments=len(results), runs=len(after),
                runs_per_experiment=len(after) / len(results),
                experiments_per_hour=3600 * len(results) / (last_end - first),
                utilisation=busy / (workers * (last_end - first)),
                utilisation_going=busy_going / (workers * (last_start - full)) if last_start > full else float("nan"),
                idle_seconds_per_run=(workers * (last_end - first) - busy) / len(after),
                dispatch_seconds=median(dispatch) if dispatch else float("nan"),
                agent_call_seconds=median(calls), night_seconds=wall)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8",
                        help="numbers of workers, comma-separated (default: %(default)s)")
    parser.add_argument("--run-seconds", type=float, default=6.0, help="how long a run sleeps (default: %(default)s)")
    parser.add_argument("--agent-latency", type=float, default=1.0,
                        help="seconds the agent stand-in takes to answer (default: %(default)s)")
    parser.add_argument("--experiments", type=int, default=24, help="ideas per night, after the baseline "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep each night's folder (its repository, ledger and "
                        "run stamps) and print where")
    args = parser.parse_args()
    server = serve_agent(args.agent_latency, args.seed)
    args.port = server.server_address[1]
    print(f"runs of {args.run_seconds:g}s, agent calls of {args.agent_latency:g}s, {args.experiments} ideas a night")
    print("workers  experiments  runs/exp  exp/hour  utilisation  (while going)  idle s/run  dispatch s  "
          "agent call s  night s")
    for workers in map(int, args.workers.split(",")):
        folder = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
        m = run_night(workers, args, folder)
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder)
        print(f"{m['workers']:7d}  {m['experiments']:11d}  {m['runs_per_experiment']:8.2f}  "
              f"{m['experiments_per_hour']:8.0f}  {m['utilisation']:11.1%}  {m['utilisation_going']:13.1%}  "
              f"{m['idle_seconds_per_run']:10.2f}  {m['dispatch_seconds']:10.2f}  "
              f"{m['agent_call_seconds']:12.1f}  {m['night_seconds']:7.0f}", flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
