"""The Night: a temp git repository ready for agent_loop.py, with a fake train.py and prepare.py, local
stand-ins for the agents, and ways to look at what a night did. The `night` fixture (tests/conftest.py)
makes one; the end-to-end tests of the loop import the edits below by name."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

import agent_loop
from autoresearch import state
from stand_ins import FAKE_HARNESS, stand_in_cache, write_harness

SUPPORT = Path(__file__).resolve().parent
ROOT = SUPPORT.parent.parent
FAKE_PREPARE = FAKE_HARNESS["prepare.py"]
AGENT_LOOP = ROOT / "agent_loop.py"

# Edits of the fake train.py that decide what the next run does.
BETTER = ("VAL_BPB = 1.000000", "VAL_BPB = 0.990000")
WORSE = ("VAL_BPB = 1.000000", "VAL_BPB = 1.010000")
CRASH = ('MODE = "ok"', 'MODE = "crash"')
HANG = ('MODE = "ok"', 'MODE = "hang"')


class Night:
    """A temp repository ready for agent_loop.py, and ways to look at what it did."""

    def __init__(self, tmp_path, llm, pycache, monkeypatch):
        self.llm, self.tmp = llm, tmp_path
        self.repo = tmp_path / "repo"
        self.repo.mkdir()
        shutil.copy(SUPPORT / "fake_train.py", self.repo / "train.py")
        shutil.copy(ROOT / "program.md", self.repo / "program.md")
        write_harness(self.repo)
        cache = stand_in_cache(tmp_path / "cache")
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "claude").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{SUPPORT / "fake_claude.py"}" "$@"\n')
        (bin_dir / "claude").chmod(0o755)
        (tmp_path / "shared").mkdir()
        self.starts = tmp_path / "shared" / "train_starts"  # the one place outside its folder train.py may write
        # The environment of this process (for main()) and of every process it starts.
        for name in os.environ:
            if name.startswith(("ANTHROPIC_", "OPENAI_", "GIT_")) or name == "PYTHONDONTWRITEBYTECODE":
                monkeypatch.delenv(name)
        for name, value in dict(
                HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1", AUTORESEARCH_CACHE=str(cache),
                GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
                GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
                ANTHROPIC_API_KEY="test-key", ANTHROPIC_BASE_URL=llm.url, FAKE_TRAIN_STARTS=str(self.starts),
                AUTORESEARCH_SANDBOX_WRITABLE=str(tmp_path / "shared"),
                FAKE_CLAUDE_SCRIPT=str(tmp_path / "claude_script.json"),
                FAKE_CLAUDE_CALLS=str(tmp_path / "claude_calls"),
                PYTHONPYCACHEPREFIX=str(pycache),  # compile the SDKs once per session, not once per process
                PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}").items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(self.repo)
        self.git("init", "-q", "-b", "main")
        self.git("add", ".")
        self.git("commit", "-q", "-m", "initial")
        self.base = self.head()

    def arguments(self, *args, timeout=30):
        """The loop's options for a test: quick retries, a short time limit (None: the loop's own), and no holdout
        runs at the end (which tests/test_holdout.py turns on) unless the test's own options say otherwise."""
        limit = ["--timeout", str(timeout)] if timeout is not None else []
        return ["--tag", "t", "--retry-delay", "0.01", *limit, "--holdout-at-end", "off", *args]

    def run(self, *args, timeout=30):
        """agent_loop.main() in this process: (exit code, what it printed, the error it stopped with)."""
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            try:
                code, error = agent_loop.main(self.arguments(*args, timeout=timeout)), ""
            except SystemExit as stop:
                code, error = 1, str(stop.code)
        return subprocess.CompletedProcess(args, code, printed.getvalue(), error)

    def start(self, *args):
        """`python agent_loop.py` as its own process."""
        return subprocess.Popen([sys.executable, str(AGENT_LOOP), *self.arguments(*args)], cwd=self.repo,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def wait_for_runs(self, count, timeout=60, running=False):
        """The pids of the first `count` train.py runs, once that many have started (None: it has ended); running:
        once the count-th is found running too (a run that has named itself may not have re-executed yet)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            pids = self.train_pids()
            if len(pids) >= count and not (running and pids[count - 1] is None):
                return pids
            time.sleep(0.05)
        raise AssertionError(f"fewer than {count} runs of train.py started")

    def keep_records(self, keep, tag="t"):
        """Rewrite the tag's ledger with the records keep(record) accepts, sealed as the loop seals them: the state
        a kill would have left (a ledger edited by anyone else is refused on resume)."""
        path = self.repo / ".autoresearch" / tag / "ledger.jsonl"
        records = [r for r in state.read_records(path) if keep(r)]
        path.unlink()
        ledger = state.Ledger(path)
        for record in records:
            ledger.append(**{name: value for name, value in record.items() if name != "seal"})

    def train_pids(self):
        """The pid of each train.py run so far, in the order they started; None for a run that has ended."""
        runs = self.starts.read_text().split() if self.starts.exists() else []
        if not runs:
            return []
        running = {}
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if "--run" in cmdline[:-1]:
                running[cmdline[cmdline.index("--run") + 1]] = process.pid
        return [running.get(run) for run in runs]

    def git(self, *args):
        return subprocess.run(["git", *args], cwd=self.repo, check=True, capture_output=True, text=True).stdout.strip()

    def head(self):
        return self.git("rev-parse", "HEAD")

    def refs(self):
        """Commit of each refs/autoresearch/t/<n>, in order of n."""
        lines = self.git("for-each-ref", "--format=%(refname) %(objectname)", "refs/autoresearch/t/").splitlines()
        return [commit for _, commit in sorted((int(ref.rsplit("/", 1)[1]), commit)
                                               for ref, commit in (line.split() for line in lines))]

    def rows(self):
        lines = (self.repo / "results.tsv").read_text().splitlines()
        assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
        return [line.split("\t") for line in lines[1:]]

    def ledger(self):
        return [json.loads(line) for line in (self.repo / ".autoresearch/t/ledger.jsonl").read_text().splitlines()]

    def train_py(self):
        return (self.repo / "train.py").read_text()

    def is_clean(self):
        """No change at all, untracked files included: our outputs are kept out of git."""
        return self.git("status", "--porcelain") == ""

    def requests(self, path="/v1/messages"):
        return self.llm.requests[path]
