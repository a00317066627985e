"""The README's "Try it now": `agent_loop.py demo` end to end, shortened (a tiny budget and fewer runs), in a
fresh git repository in a temp dir, offline, on the CPU, with the real train.py under the real harness."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

FILES = ("prepare.py", "scorer.py", "prepare_data.py", "data_sources.py", "train.py", "agent_loop.py", "program.md", "README.md", "pyproject.toml", ".gitignore")
PACKAGE = "autoresearch"  # the loop's parts


@pytest.mark.slow
def test_the_demo_runs_the_offline_loop_and_leaves_the_checkout_as_it_was(tmp_path):
    repo, cache = tmp_path / "autoresearch", tmp_path / ".cache" / "autoresearch-demo"  # the default, under HOME
    repo.mkdir()
    for name in FILES:
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / PACKAGE, repo / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "HOME": str(tmp_path), "GIT_CONFIG_NOSYSTEM": "1", "AUTORESEARCH_CACHE": str(tmp_path / "main")}
    for name in [n for n in env if n.startswith("GIT_") and n != "GIT_CONFIG_NOSYSTEM"]:
        del env[name]  # no identity at all: the demo must not need one

    def run(*args, timeout=300):
        result = subprocess.run([*args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    run("git", "init", "-q", "-b", "main")
    run("git", "add", ".")
    run("git", "-c", "user.name=u", "-c", "user.email=u@example.com", "commit", "-q", "-m", "autoresearch")
    (repo / "notes.txt").write_text("the user's own untracked file\n")
    before = [run("git", *command) for command in (("status", "--porcelain"), ("branch", "-a"), ("rev-parse", "HEAD"),
                                                   ("for-each-ref",))]
    # The demo's cache, prepared as the demo would, but tiny: a 2 s budget instead of the small preset's 30 s
    subprocess.run([sys.executable, "prepare.py", "--dataset", "stdlib", "--preset", "small", "--max-seq-len", "64",
                    "--time-budget", "2", "--eval-tokens", "4096"], cwd=repo,
                   env={**env, "AUTORESEARCH_CACHE": str(cache)}, check=True, capture_output=True)
    out = run(sys.executable, "agent_loop.py", "demo", "--minutes", "4", "--max-experiments", "2", "--keep-rule",
              "greedy", "--holdout-at-end", "off")  # a run each: the keep rules and the holdout have tests of their own

    assert [run("git", *command) for command in (("status", "--porcelain"), ("branch", "-a"), ("rev-parse", "HEAD"),
                                                 ("for-each-ref",))] == before
    assert not (tmp_path / "main").exists()  # the user's main cache is not touched
    results = re.search(r"demo: stopped: reached --max-experiments 2 \([\d.]+ minutes\)\. Kept in (\S+): report.html",
                        out)[1]
    assert os.path.dirname(results) == str(cache / "runs")
    assert "<html" in open(os.path.join(results, "report.html")).read()
    kept = sorted(os.listdir(os.path.join(results, "models")))
    assert kept == ["baseline.json", "baseline.safetensors", "best.json", "best.safetensors"]  # the weights
    rows = open(os.path.join(results, "results.tsv")).read().splitlines()[1:]
    assert len(rows) == 2 and rows[0].split("\t")[3:] == ["keep", "baseline"]
    assert " -> " in rows[1].split("\t")[4] and rows[1].split("\t")[3] in ("keep", "discard")  # judged, not invalid
    assert "baseline     val_bpb" in out and "2 experiments (baseline included)" in out
    png = os.path.join(results, "progress.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the checkout has no tag of its own (the demo's was in its clone): the report finds the demo's last run
    summary = json.loads(run(sys.executable, "agent_loop.py", "report", "--json", "--png", str(tmp_path / "again.png")))
    assert summary["source"] == f"the demo's last run ({results}/ledger.jsonl)" and summary["experiments"] == 2
    assert 1.0 < summary["baseline"]["val_bpb"] < 12.0  # a real model, a real metric: bits per byte
