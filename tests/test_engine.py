"""The one engine (autoresearch/engine.py), end to end on the fake harness: one regression test for each fault
the two engines it replaced had (issue 22), and for those a review found in the one engine (a baseline run again
once its setup is fixed, Ctrl-C during the holdout), on one slot and on several alike. The night's invariants under random
completion orders, failures and kills are in tests/test_engine_properties.py."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from autoresearch import sandbox
from fake_llm import change
from night_repo import AGENT_LOOP, BETTER, WORSE
from processes import alive

GAIN = ("GAIN_A = 0.0", "GAIN_A = 0.01")
SLOW = ("SLEEP = 0.0", "SLEEP = 1.0")


def events(night, kind):
    return [e for e in night.ledger() if e["event"] == kind]


def from_now_on_the_baseline(night, monkeypatch, mode, reply):
    """An agent's reply that first makes every later run of the baseline's train.py take `mode` (fake_train.py)."""
    mode_at = night.tmp / "mode_at"
    monkeypatch.setenv("FAKE_TRAIN_MODE_AT", str(mode_at))

    def act():
        mode_at.write_text(f"1.0 {mode}")
        return reply
    return act


def test_a_resumed_night_runs_exactly_the_pairs_a_kill_left_missing_and_ends(night):
    # Runs end out of order on workers: killed with the candidate's pairs {1, 2, 4} and the best's {1, 2, 3} back,
    # the night must run the candidate's pair 3 and the best's pair 4, once each, and decide.
    night.llm.script(change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "2").returncode == 0
    night.keep_records(lambda r: r["event"] not in ("result", "stop") and not (
        r["event"] in ("run", "run_started") and r["experiment"] == 1
        and (r["repeat"], r.get("reference", False)) in ((3, False), (4, True))))
    driver = night.start("--max-experiments", "2", "--workers", "2")
    printed = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, printed
    runs = [(r["repeat"], r.get("reference", False)) for r in events(night, "run") if r["experiment"] == 1]
    assert sorted(runs) == [(k, reference) for k in (1, 2, 3, 4) for reference in (False, True)]
    assert [row[3:] for row in night.rows()] == [["keep", "baseline"], ["keep", "lower val_bpb"]]


def test_when_the_best_s_run_beside_a_candidate_fails_the_row_is_the_candidate_s(night, monkeypatch):
    night.llm.script(from_now_on_the_baseline(night, monkeypatch, "crash", change("lower val_bpb", BETTER)),
                     change("raise val_bpb", WORSE))
    result = night.run("--max-experiments", "2", "--workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    [row] = [r for r in events(night, "result") if r["experiment"] == 1]
    [proposal] = [r for r in events(night, "proposal") if r["experiment"] == 1]
    assert row["status"] == "discard" and "the best's own run beside it failed" in row["reason"]
    assert row["commit"] == proposal["commit"] and row["val_bpb"] == 0.99 and row["runs"] == [0.99]
    assert night.rows()[1][:2] == [proposal["commit"][:7], "0.990000"]


def test_two_ideas_proposed_at_once_with_the_same_train_py_run_once(night):
    night.llm.script(change("lower val_bpb", BETTER), change("lower val_bpb", BETTER), change("gain a", GAIN))
    result = night.run("--max-experiments", "3", "--workers", "2", "--keep-rule", "greedy")
    assert result.returncode == 0, result.stdout + result.stderr
    [refused] = [r for r in events(night, "proposal") if not r["ok"]]
    assert "byte-identical to that of experiment #" in refused["error"] and "proposed at the same time" in \
        refused["error"]
    lowered = [r for r in events(night, "proposal") if r["ok"] and r["description"] == "lower val_bpb"]
    assert len(lowered) == 1 and [row[4] for row in night.rows()].count("lower val_bpb") == 1
    assert len({r["commit"] for r in events(night, "proposal") if r["ok"]}) == len(
        [r for r in events(night, "proposal") if r["ok"]])  # no two experiments share a commit


def test_a_user_s_uncommitted_train_py_on_the_tag_s_branch_is_never_discarded(night):
    assert night.run("--max-experiments", "1").returncode == 0  # a clean stop, on autoresearch/t
    (night.repo / "train.py").write_text("the user's own edit\n")
    result = night.run("--max-experiments", "2")
    assert result.returncode == 1 and "uncommitted changes to tracked files: train.py" in result.stderr
    assert (night.repo / "train.py").read_text() == "the user's own edit\n"


def test_a_driver_killed_during_the_holdout_leaves_the_branch_at_the_best(night):
    (night.repo / "train.py").write_text(night.train_py().replace(*SLOW))  # every run takes a second
    night.git("commit", "-qam", "slow runs")
    night.base = night.head()
    night.llm.script(change("lower val_bpb", BETTER))
    driver = night.start("--max-experiments", "2", "--keep-rule", "greedy", "--holdout-at-end", "on")
    night.wait_for_runs(3, timeout=60)  # the baseline's run, the idea's, then the baseline's holdout run
    driver.kill()
    driver.wait()
    [kept] = [r for r in events(night, "result") if r["experiment"] == 1]
    assert kept["status"] == "keep" and night.git("rev-parse", "autoresearch/t") == kept["commit"]
    assert night.train_py() == night.git("show", f"{kept['commit']}:train.py") + "\n"


def test_ideas_that_arrive_after_the_cost_limit_are_not_run(night):
    night.llm.script(change("lower val_bpb", BETTER), change("raise", WORSE), change("raise more", (
        "VAL_BPB = 1.000000", "VAL_BPB = 1.02")))
    result = night.run("--max-cost", "0.01", "--workers", "2", "--keep-rule", "greedy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(events(night, "proposal")) == 3  # asked at once, ahead of need, and paid for
    assert len(night.rows()) == 2 and "reached --max-cost 0.01" in night.ledger()[-1]["reason"]
    not_run = [r["error"] for r in events(night, "proposal") if not r["ok"]]
    assert len(not_run) == 2 and all(error.startswith("not run: spent $") for error in not_run)


def test_a_baseline_resumed_after_a_kill_keeps_one_ref_and_its_logs_one_name(night):
    (night.repo / "train.py").write_text(night.train_py().replace(*SLOW))
    night.git("commit", "-qam", "slow runs")
    driver = night.start("--max-experiments", "1")
    night.wait_for_runs(2, timeout=60)
    driver.kill()
    driver.wait()
    assert night.run("--max-experiments", "1").returncode == 0
    assert night.refs() == [night.head()]
    logs = {Path(r["log"]).name for r in events(night, "run")}
    assert logs == {"1.log", "1-2.log", "1-3.log", "1-4.log"}


def test_a_night_never_moves_a_branch_checked_out_in_its_middle(night):
    def checkout_main_then(reply):
        def act():
            night.git("checkout", "-q", "main")
            return reply
        return act
    night.llm.script(checkout_main_then(change("lower val_bpb", BETTER)))
    result = night.run("--max-experiments", "2", "--keep-rule", "greedy")
    assert result.returncode == 0, result.stdout + result.stderr
    [kept] = [r for r in events(night, "result") if r["experiment"] == 1]
    assert night.git("rev-parse", "main") == night.base and night.git("rev-parse", "autoresearch/t") == kept["commit"]
    assert "your checkout, main, is left as it is" in result.stdout and night.is_clean()


def test_a_wait_with_nothing_to_show_says_what_it_waits_for(night, monkeypatch):
    from autoresearch import engine

    monkeypatch.setattr(engine, "HEARTBEAT_SECONDS", 0.3)
    night.llm.script(change("hang", ('MODE = "ok"', 'MODE = "hang"')))
    result = night.run("--max-experiments", "2", "--keep-rule", "greedy", "--timeout", "3")
    assert "waiting for 1 run (#1 run 1), one at a time on this machine" in result.stdout


def test_a_second_signal_does_not_cut_the_cleanup_short(night):
    steps = [{"sleep": 600, "result": "DESCRIPTION: slow"}] * 2
    (night.tmp / "claude_script.json").write_text(json.dumps(steps))
    driver = night.start("--agent", "claude-code", "--workers", "2")
    lines, said = [], threading.Event()

    def read():
        for line in driver.stdout:
            lines.append(line)
            said.set() if "asking claude-code for an idea" in line and len(lines) > 1 else None
    threading.Thread(target=read, daemon=True).start()
    calls = night.tmp / "claude_calls"
    deadline = time.time() + 120  # the baseline decided, two claude calls asleep in their scratch worktrees
    while time.time() < deadline and not (calls.exists() and len(calls.read_text().splitlines()) == 2):
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    while time.time() < deadline and not any("interrupted: stopping" in line for line in lines):
        time.sleep(0.01)
    driver.send_signal(signal.SIGINT)  # as `uv run` forwards one more
    assert driver.wait(timeout=60) == 130, "".join(lines)
    assert night.ledger()[-1]["event"] == "stop" and night.ledger()[-1]["reason"] == "interrupted"
    assert night.git("worktree", "list", "--porcelain").count("worktree ") == 1
    assert not (night.repo / ".autoresearch/t/scratch").exists() and night.is_clean()


def test_a_night_on_this_machine_never_imports_ray(night):
    night.llm.script(change("lower val_bpb", BETTER))
    code = ("import runpy, sys\nsys.argv = ['agent_loop.py', *sys.argv[1:]]\n"
            f"sys.path.insert(0, {str(AGENT_LOOP.parent)!r})\ntry:\n"
            f"    runpy.run_path({str(AGENT_LOOP)!r}, run_name='__main__')\n"
            "finally:\n    print('ray imported:', 'ray' in sys.modules)")
    ran = subprocess.run([sys.executable, "-c", code, *night.arguments("--max-experiments", "2", "--workers", "2")],
                         cwd=night.repo, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "ray imported: False" in ran.stdout and len(night.rows()) == 2


def test_ctrl_c_during_the_holdout_at_the_end_of_a_night_stops_it(night, monkeypatch):
    night.llm.script(from_now_on_the_baseline(night, monkeypatch, "hang", change("lower val_bpb", BETTER)))
    driver = night.start("--max-experiments", "2", "--keep-rule", "greedy", "--holdout-at-end", "on")
    deadline = time.time() + 60
    while len(night.train_pids()) < 3:  # the baseline's run, the idea's, then the baseline's on the holdout
        assert time.time() < deadline
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=60) == 130
    assert night.ledger()[-1]["reason"] == "interrupted" and events(night, "holdout") == []
    assert not alive(night.train_pids()[2])


def test_a_baseline_that_failed_runs_again_once_the_setup_is_fixed(night, monkeypatch):
    from_now_on_the_baseline(night, monkeypatch, "crash", None)()  # a broken setup
    result = night.run("--max-experiments", "1")
    assert result.returncode == 1 and "the unmodified train.py did not produce val_bpb" in result.stderr
    (night.tmp / "mode_at").unlink()  # the setup, fixed
    assert night.run("--max-experiments", "1").returncode == 0
    assert [row[3:] for row in night.rows()] == [["keep", "baseline"]]


def writes_into_the_repository(night):
    return change("write into the repository",
                  ('MODE = "ok"', f'MODE = "ok"\nopen({str(night.repo / "program.md")!r}, "a").write("x")'))


@pytest.mark.skipif(not sandbox.probe()["landlock"], reason="no Landlock on this machine")
def test_a_run_cannot_write_into_the_repository(night):
    night.llm.script(writes_into_the_repository(night))
    assert night.run("--max-experiments", "2", "--keep-rule", "greedy", "--max-fix-attempts", "0").returncode == 0
    assert [r["status"] for r in events(night, "result")][1:] == ["crash"] and night.is_clean()
    assert "PermissionError" in events(night, "run")[-1]["log_tail"]


def test_without_a_sandbox_a_run_that_writes_into_the_repository_stops_the_night(night, no_sandbox):
    night.llm.script(writes_into_the_repository(night))
    result = night.run("--max-experiments", "2", "--keep-rule", "greedy")
    assert result.returncode == 1 and "tracked files of the repository changed during the night (program.md)" \
        in result.stderr and "git diff" in result.stderr
