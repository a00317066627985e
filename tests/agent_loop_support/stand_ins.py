"""Stand-ins that let the engine run whole nights in milliseconds, in this process: an executor that runs nothing
(each run's outcome, and the order runs end in, come from a `draw` function, hypothesis's or a random one's), an
agent that edits one constant, and a repository for them. tests/test_engine_properties.py and
dev/bench_rebase.py drive agent_loop.loop with them; everything else (git, the ledger, the decisions) is real."""

import hashlib
import hmac
import json
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

from autoresearch import agents

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parent.parent
CONSTANT = re.compile(r"^(QUALITY|OTHER) = (\S+)", re.MULTILINE)
TRAIN_PY = '''"""A stand-in train.py: the stand-in executor reads its constants, nothing runs it."""
from prepare import evaluate_bpb

QUALITY = 0.0

OTHER = 0.0
print(f"val_bpb: {evaluate_bpb(1.0):.6f}")
'''


def true_val_bpb(source):
    """The val_bpb a train.py's constants are worth: best at QUALITY 0.5 and OTHER 0.5."""
    constants = {name: float(value) for name, value in CONSTANT.findall(source)}
    return 1.0 + (constants["QUALITY"] - 0.5) ** 2 + (constants["OTHER"] - 0.5) ** 2


# The stand-in harness: the scorer's protocol, no data (tests/agent_loop_support/fake_prepare.py, fake_scorer.py)
FAKE_HARNESS = {name: (SUPPORT / f"fake_{name}").read_text() for name in ("prepare.py", "scorer.py")}


def write_harness(folder):
    for name, source in FAKE_HARNESS.items():
        (folder / name).write_text(source)


def make_repo(folder, cache):
    """A repository ready for agent_loop.py, with the stand-in train.py and the stand-in harness."""
    folder.mkdir(parents=True)
    (folder / "train.py").write_text(TRAIN_PY)
    write_harness(folder)
    shutil.copy(ROOT / "program.md", folder / "program.md")
    for command in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "initial"]):
        subprocess.run(["git", *command], cwd=folder, check=True, capture_output=True)
    stand_in_cache(cache)
    return folder


def stand_in_cache(cache):
    """A prepared cache as the stand-in harness needs one: its manifest of constants, no data."""
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "manifest.json").write_text(json.dumps(
        {"time_budget": 1, "max_seq_len": 64, "eval_tokens": 4096, "vocab_size": 512}))
    return cache


class Killed(BaseException):
    """The driver died here (SIGKILL): what is on disk now is all that is left of it."""


class StandInExecutor:
    """Runs nothing: when the engine waits, one run in flight ends, picked by draw(n) (an index below n), with
    the outcome draw picks (ok mostly; a crash, a timeout, or a broken rule; the baseline's are ok), val_bpb from
    its train.py's constants plus noise(), and a record signed as the harness signs one. kill(waits) says when the
    driver dies: "kill" (the folder is copied by snapshot() first, then Killed is raised), "interrupt" (Ctrl-C),
    or None. A cancelled run keeps its slot until the next wait, as a process being killed does; remote: its runs
    come back as a Ray worker's would, with the log written by the executor."""
    OUTCOMES = ("crash", "timeout", "invalid") + ("ok",) * 17

    def __init__(self, slots, draw, noise, kill=lambda waits: None, snapshot=None, most_waits=5000, remote=False):
        self.slots, self.draw, self.noise, self.kill, self.snapshot = slots, draw, noise, kill, snapshot
        self.running, self.waits, self.most_waits, self.runs, self.remote = {}, 0, most_waits, 0, remote
        self.dying = 0  # cancelled runs whose slots are not free yet
        self.device_type = "cpu"

    def describe(self):
        return f"{self.slots} at once on stand-in slots"

    def free_slots(self):
        return self.slots - len(self.running) - self.dying

    def submit(self, key, request):
        assert self.free_slots() > 0, "a run was sent to a slot that is not free"
        self.running[key] = request

    def wait(self, timeout):
        self.waits, self.dying = self.waits + 1, 0
        assert self.waits <= self.most_waits, "the night did not end"
        if (death := self.kill(self.waits)) == "kill":
            self.snapshot()
            raise Killed
        if death == "interrupt":
            raise KeyboardInterrupt
        if not self.running:
            return []
        key = sorted(self.running, key=repr)[self.draw(len(self.running))]
        request = self.running.pop(key)
        self.runs += 1
        outcome = "ok" if key.experiment == 0 else self.OUTCOMES[self.draw(len(self.OUTCOMES))]  # a broken
        return [(key, self.result(request, outcome))]  # baseline stops the night: tests/test_agent_loop.py

    def result(self, request, outcome):
        val_bpb = round(true_val_bpb(request.train_source) + self.noise(), 6)
        evaluation = {"split": request.split, "first_logits": 0.5, "seconds": 0.1, "val_bpb": val_bpb, "batch_size": 8,
                      "seq_len": 64, "tokens": 4096, "bytes": 1,
                      "probe": {"rows": 16, "future_influence": 0.0, "seconds": 0.1, "run": "apart"}}
        record = {"format": 3, "split": request.split, "evaluations": [evaluation] if outcome == "ok" else [],
                  "problems": ["evaluate_bpb refuses to score this model: it looks ahead"] if outcome == "invalid"
                  else []}
        mac = hmac.new(bytes.fromhex(request.key_hex), json.dumps(record, sort_keys=True).encode(),
                       hashlib.sha256).hexdigest()
        log = {"ok": f"---\nval_bpb: {val_bpb:.6f}\npeak_vram_mb: 1024.0\n", "crash": "RuntimeError: out of memory\n",
               "timeout": "step 1\n", "invalid": f"---\nval_bpb: {val_bpb:.6f}\n"}[outcome]
        request.log_path.write_text(log)
        return dict(returncode={"crash": 1, "timeout": None}.get(outcome, 0), seconds=1.0, log=log,
                    record=json.dumps({"record": record, "hmac": mac}), changed=[],
                    worker=dict(hostname="stand-in", ip="127.0.0.1", gpu="cpu", worker_pid=os.getpid()))

    def cancel(self, key):
        self.dying += self.running.pop(key, None) is not None

    def cancel_all(self):
        self.running.clear()
        self.dying = 0

    def waiting_for(self):
        return ""

    def close(self):
        pass


class StandInAgent:
    """Proposes a new value of QUALITY or OTHER, from `StandInAgent.ideas` (an iterator of (name, value)), on the
    train.py its prompt shows; now and then an edit of prepare.py, which breaks a rule, or a train.py the static
    checks refuse ("holdout"). It answers on the engine's thread, as Optuna does: a night is one sequence of events."""
    in_background = False
    ideas, comments = iter(()), itertools.count(1)

    def __init__(self, settings, instructions, repo):
        self.source = ""

    def start(self, prompt):
        self.source = prompt.rsplit("```python\n", 1)[1]
        return self.propose()

    def reply(self, error):
        return self.propose()

    def propose(self):
        name, value = next(StandInAgent.ideas)
        if name == "prepare.py":
            return agents.Proposal(description="edit the harness", edits=[
                {"file": "prepare.py", "search": "TIME_BUDGET = 1", "replace": "TIME_BUDGET = 2"}])
        if name == "holdout":  # a train.py that names the holdout split: committed, then refused before it runs
            name, value = "OTHER", f"0.{next(StandInAgent.comments)}  # tuned on the holdout"
        current = re.search(rf"^{name} = .+$", self.source, re.MULTILINE)[0]
        return agents.Proposal(description=f"{name} {value}", hypothesis=f"{name} near {value} is better",
                               edits=[{"search": current, "replace": f"{name} = {value}"}])
