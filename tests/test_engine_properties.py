"""The night's invariants, whatever order runs end in, whichever runs fail and wherever the driver is killed or
interrupted and started again: hypothesis draws the night (slots, keep rule, limits, ideas) and its events, and the
engine runs it through agent_loop.loop on the stand-in executor and agent (tests/agent_loop_support/stand_ins.py),
in this process, on a real git repository and ledger. After the night, whatever happened on the way:

- every experiment that was committed ends in exactly one row, and no row is there twice;
- no two experiments share a commit (so no train.py runs twice), and no pair of runs is made twice;
- no commit runs more than --max-runs times per side (the baseline: --noise-runs times; a rebased
  experiment's new commit counts afresh);
- the branch points at the best, the work tree is clean;
- each kept row was judged against the best before it, and beat it;
- the night ends, and --max-experiments holds.
"""

import contextlib
import io
import itertools
import json
import os
import random
import shutil
import subprocess
from statistics import fmean

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agent_loop
from autoresearch import agents
from stand_ins import Killed, StandInAgent, StandInExecutor, make_repo

COUNTER = itertools.count()  # a folder of its own for each night
VALUES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  # few: ideas repeat, as an agent's do
IDEA = st.sampled_from([(name, value) for name in ("QUALITY", "OTHER") for value in VALUES]
                       + [("prepare.py", None), ("holdout", None)])  # now and then, an edit that breaks a rule
NIGHT = st.fixed_dictionaries(dict(
    slots=st.integers(1, 3), remote=st.booleans(), max_experiments=st.integers(2, 6), rule=st.sampled_from(["paired", "unpaired", "greedy"]),
    max_runs=st.integers(2, 3), fixes=st.integers(0, 1), ideas=st.lists(IDEA, min_size=3, max_size=12),
    seed=st.integers(0, 2**16), deaths=st.lists(st.tuples(st.integers(1, 15), st.sampled_from(["kill", "interrupt"])),
                                                 max_size=2)))


@pytest.fixture
def stand_in_env(tmp_path, monkeypatch):
    """The stand-ins registered and an environment for git and the cache; the folder nights go in."""
    monkeypatch.setitem(agent_loop.AGENTS, "stand-in", StandInAgent)
    monkeypatch.setitem(agents.DEFAULT_MODELS, "stand-in", None)
    for name in list(os.environ):
        if name.startswith("GIT_"):
            monkeypatch.delenv(name)
    for name, value in dict(HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1", AUTORESEARCH_CACHE=str(tmp_path / "cache"),
                            GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@example.com").items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # the loop moves into each night's repository; this is where it comes back
    return tmp_path


def options(night):
    rule = {"paired": ["--keep-rule", "noise", "--paired", "on"], "unpaired": ["--keep-rule", "noise", "--paired",
                                                                               "off"],
            "greedy": ["--keep-rule", "greedy"]}[night["rule"]]
    return ["--tag", "p", "--agent", "stand-in", "--max-experiments", str(night["max_experiments"]), *rule,
            "--noise-runs", "2", "--max-runs", str(night["max_runs"]), "--max-fix-attempts", str(night["fixes"]),
            "--workers", str(night["slots"]), "--holdout-at-end", "off"]


def run_night(folder, night, data):
    """The night, started again after each death, until it stops by itself; the folder it ended in."""
    deaths, copies, rng = dict(night["deaths"]), itertools.count(), random.Random(night["seed"])
    StandInAgent.ideas = itertools.cycle(night["ideas"])
    for _ in range(len(deaths) + 1):
        def snapshot(into=folder.parent / f"{folder.name}-{next(copies)}"):
            shutil.copytree(folder, into, symlinks=True)
            snapshots.append(into)
        snapshots = []
        executor = StandInExecutor(night["slots"], lambda n: data.draw(st.integers(0, n - 1)) if n > 1 else 0,
                                   lambda: rng.gauss(0, 0.002), kill=lambda waits: deaths.pop(waits, None),
                                   snapshot=snapshot, remote=night["remote"])
        os.chdir(folder)
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                code = agent_loop.loop(options(night), executor=executor)
            except Killed:
                folder = snapshots[-1]  # what the SIGKILL left: resume there
                continue
        if code == 0:
            return folder
        check_branch_and_tree(folder)  # an interrupted night, stopped cleanly
    with contextlib.redirect_stdout(io.StringIO()):  # deaths drawn past the night's end: a last, plain start
        assert agent_loop.loop(options(night), executor=StandInExecutor(
            night["slots"], lambda n: 0, lambda: rng.gauss(0, 0.002))) == 0
    return folder


def git(folder, *args):
    return subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


def ledger(folder):
    return [json.loads(line) for line in (folder / ".autoresearch/p/ledger.jsonl").read_text().splitlines()
            if line.strip()]


def check_branch_and_tree(folder):
    rows = [r for r in ledger(folder) if r["event"] == "result"]
    best = [r for r in rows if r["status"] == "keep"][-1:]
    if best:
        assert git(folder, "rev-parse", "autoresearch/p") == best[0]["commit"]
    assert git(folder, "status", "--porcelain") == ""


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(night=NIGHT, data=st.data())
def test_the_night_s_invariants_hold_whatever_the_runs_and_the_kills(stand_in_env, night, data):
    folder = make_repo(stand_in_env / f"night-{next(COUNTER)}", stand_in_env / "cache")
    folder = run_night(folder, night, data)
    records = ledger(folder)
    rows = [r for r in records if r["event"] == "result"]
    committed = {r["experiment"] for r in records if r["event"] == "proposal" and r["ok"]} | {0}
    numbers = [r["experiment"] for r in rows]
    assert len(numbers) == len(set(numbers)), "a row twice"
    assert committed <= set(numbers), f"experiments without a row: {committed - set(numbers)}"
    assert len((folder / "results.tsv").read_text().splitlines()) == len(rows) + 1
    assert len(rows) <= night["max_experiments"]
    owners = {}  # commit: the experiments that committed it
    for r in records:
        if r["event"] == "proposal" and r["ok"]:
            owners.setdefault(r["commit"], set()).add(r["experiment"])
    assert all(len(numbers) == 1 for numbers in owners.values()), "two experiments ran one commit"
    runs = [(r["experiment"], r["commit"], r.get("reference", False), r["repeat"]) for r in records
            if r["event"] == "run"]
    assert len(runs) == len(set(runs)), "a pair ran twice"
    for experiment, commit, reference, pair in runs:
        most = 2 if experiment == 0 else night["max_runs"]
        assert pair <= most, f"#{experiment} {commit[:7]} ran pair {pair}{' (the best beside it)' * reference}"
    check_branch_and_tree(folder)
    bases = {r["commit"]: r.get("base") for r in records if r["event"] == "proposal" and r["ok"]}
    kept = [r for r in rows if r["status"] == "keep"]
    for before, row in zip(kept, kept[1:]):
        assert bases[row["commit"]] == before["commit"], f"#{row['experiment']} was judged against another best"
        if row.get("best_runs_beside"):
            assert fmean(row["best_runs_beside"]) - fmean(row["runs"]) > 0
        else:
            assert row["val_bpb"] < before["val_bpb"]

