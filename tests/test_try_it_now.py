"""The README's "Try it now" path, shortened: prepare the stdlib corpus, let --agent optuna run the
real train.py on the CPU, read the report. A fresh git repository in a temp dir, no network."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

FILES = ("prepare.py", "train.py", "agent_loop.py", "program.md", "README.md", "pyproject.toml")
PACKAGE = "autoresearch"  # the loop's parts


@pytest.mark.slow
def test_prepare_then_optuna_then_report_works_offline_on_the_cpu(tmp_path):
    repo, cache = tmp_path / "autoresearch", tmp_path / "cache"
    repo.mkdir()
    for name in FILES:
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / PACKAGE, repo / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}

    def run(*args, timeout=300):
        result = subprocess.run([*args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    run("git", "init", "-q", "-b", "main")
    run("git", "add", ".")
    run("git", "commit", "-q", "-m", "autoresearch")
    # The README's path with a shorter budget and smaller rows, and fewer runs per decision.
    run(sys.executable, "prepare.py", "--dataset", "stdlib", "--preset", "small",
        "--max-seq-len", "64", "--time-budget", "2", "--eval-tokens", "4096")
    run(sys.executable, "agent_loop.py", "--agent", "optuna", "--max-experiments", "2",
        "--noise-runs", "2", "--max-runs", "2")
    report = run(sys.executable, "agent_loop.py", "report")
    summary = json.loads(run(sys.executable, "agent_loop.py", "report", "--json"))

    rows = (repo / "results.tsv").read_text().splitlines()[1:]
    assert len(rows) == 2 and rows[0].split("\t")[3:] == ["keep", "baseline"]
    assert all(" -> " in row.split("\t")[4] for row in rows[1:])  # NAME old -> new, from the optuna agent
    assert rows[1].split("\t")[3] in ("keep", "discard")  # an honest change of the real train.py is judged
    assert 1.0 < summary["baseline"]["val_bpb"] < 12.0  # a real model, a real metric: bits per byte
    assert summary["experiments"] == 2 and summary["cost_usd"] == 0
    assert "baseline" in report and (repo / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((repo / ".autoresearch").glob("*/optuna.journal"))) == 1
    assert run("git", "status", "--porcelain") == ""  # everything it wrote is kept out of git
