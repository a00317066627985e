"""--workers N: different experiments at once on a private local Ray instance that the loop starts (127.0.0.1,
token auth, no dashboard), decided in the order they end, with the outcome of a serial night; a change that beat
its base after the best moved on is merged onto it or discarded; faults (a dead worker, signals, SIGKILL and
resume). The loop runs as its own process: a Ray instance leaves state in the process that started it (its
token, environment variables)."""

import json
import re
import signal
import time
from pathlib import Path

import psutil
from fake_llm import change
from night_repo import BETTER, HANG, WORSE
from processes import alive

GAIN_A, MORE_GAIN_A = ("GAIN_A = 0.0", "GAIN_A = 0.01"), ("GAIN_A = 0.0", "GAIN_A = 0.02")
GAIN_B = ("GAIN_B = 0.0", "GAIN_B = 0.005")
SLOW = ("SLEEP = 0.0", "SLEEP = 1.0")  # a run in flight long enough to kill something
ON_TOP = re.compile(r" on top of [0-9a-f]{7}$")


def apply(source, edit):
    return source.replace(*edit)


def test_four_workers_keep_what_a_serial_night_keeps_and_reapply_a_gain_the_best_overtook(night):
    # Three ideas asked at once on the baseline: two independent gains and a loss. A serial night keeps both gains
    # (each beats the best before it) and discards the loss; here the gain decided second beat its base, which
    # is no longer the best, so its change goes onto the new best as a new experiment, and is kept there.
    night.llm.script(change("gain a", GAIN_A), change("worse", WORSE), change("gain b", GAIN_B))
    driver = night.start("--max-experiments", "4", "--workers", "4")  # its own process: Ray's state stays there
    printed = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, printed
    assert "raise the limit: uv run agent_loop.py --tag t --workers 4 --max-experiments 14" in printed  # as it ran
    rows = night.rows()
    assert len(rows) == 5 and rows[0][3:] == ["keep", "baseline"], printed
    assert sorted(ON_TOP.sub("", r[4]) for r in rows if r[3] == "keep") == ["baseline", "gain a", "gain b"]
    assert [r[4] for r in rows if r[3] == "discard"].count("worse") == 1
    bests = [float(r[1]) for r in rows if r[3] == "keep"]
    assert bests == sorted(bests, reverse=True) and bests[-1] == 0.985  # each keep beats the best before it
    assert night.train_py() == apply(apply(night.git("show", f"{night.base}:train.py") + "\n", GAIN_A), GAIN_B)
    results = [e for e in night.ledger() if e["event"] == "result"]
    [overtaken] = [r for r in results if "re-applied on top of it as #" in r["reason"]]
    again = int(overtaken["reason"].rsplit("#", 1)[1])
    [reapplied] = [r for r in results if r["experiment"] == again]
    [first] = [r for r in results[1:] if r["status"] == "keep" and r["experiment"] != again]
    assert reapplied["description"] == f"{overtaken['description']} on top of {first['commit'][:7]}"
    assert reapplied["status"] == "keep" and night.head() == reapplied["commit"] and night.is_clean()
    events = night.ledger()
    started = [(e["experiment"], e["repeat"], e.get("reference", False)) for e in events if e["event"] == "run_started"]
    pairs = [started.index((again, k, False)) for k in range(2, 5)]  # pair 1: the first run, then the best's
    assert [started[i + 1] for i in pairs] == [(again, k, True) for k in range(2, 5)]  # each pair side by side
    assert started.index((again, 1, True)) > started.index((again, 1, False))
    assert len(reapplied["best_runs_beside"]) == 4
    # the four baseline runs went out together
    assert [e["event"] for e in events if e["event"] in ("run_started", "run")][:5] == ["run_started"] * 4 + ["run"]
    assert all(r["worker"]["gpu"] == "cpu" and r["worker"]["ip"] == "127.0.0.1" for r in events if r["event"] == "run")
    assert night.ledger()[-1]["reason"] == "reached --max-experiments 4"


def test_a_gain_whose_change_conflicts_with_the_new_best_is_discarded_saying_so(night):
    night.llm.script(change("gain a", GAIN_A), change("more gain a", MORE_GAIN_A))
    driver = night.start("--max-experiments", "3", "--workers", "2")
    printed = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, printed
    results = [e for e in night.ledger() if e["event"] == "result"]
    kept, conflicting = results[1], results[2]  # in the order they were decided
    assert kept["status"] == "keep" and conflicting["status"] == "discard" and len(results) == 3
    assert f"but the best is now {kept['commit'][:7]}, and this change conflicts with it: not re-applied" \
        in conflicting["reason"]
    assert night.head() == kept["commit"] and night.is_clean()


def test_claude_code_edits_in_a_scratch_worktree_per_proposal_and_ctrl_c_kills_the_calls_still_running(night):
    steps = [{"edits": [{"file": "train.py", "search": search, "replace": replace}], "result": f"DESCRIPTION: {name}"}
             for name, (search, replace) in (("gain a", GAIN_A), ("gain b", GAIN_B))]
    asleep = {"sleep": 600, "result": "DESCRIPTION: slow"}
    (night.tmp / "claude_script.json").write_text(json.dumps(steps + [asleep] * 2))
    driver = night.start("--agent", "claude-code", "--workers", "2", "--max-experiments", "5")
    calls_path = night.tmp / "claude_calls"
    deadline = time.time() + 120  # both gains decided (one re-applied on top of the other), two calls asleep
    while time.time() < deadline and not (calls_path.exists() and len(calls_path.read_text().splitlines()) == 4
                                          and (night.repo / "results.tsv").exists() and len(night.rows()) == 4):
        time.sleep(0.1)
    calls = [json.loads(line) for line in calls_path.read_text().splitlines()]
    asleep = [call["pid"] for call in calls if call["step"] >= 2]
    assert len(asleep) == 2 and all(alive(pid, wait=0) for pid in asleep)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=60) == 130, driver.stdout.read()
    assert not any(alive(pid, wait=10) for pid in asleep)  # a thread cannot be stopped; its CLI call was
    folders = {Path(call["cwd"]).relative_to(night.repo).parent.as_posix() for call in calls}
    assert len({call["cwd"] for call in calls}) == 4 and folders == {".autoresearch/t/scratch"}  # one each
    assert sorted(ON_TOP.sub("", row[4]) for row in night.rows() if row[3] == "keep") == ["baseline", "gain a",
                                                                                         "gain b"]
    assert not (night.repo / ".autoresearch/t/scratch").exists() and night.is_clean()
    assert night.git("worktree", "list", "--porcelain").count("worktree ") == 1


def test_a_run_whose_worker_dies_goes_out_again_once_and_ctrl_c_then_cancels_it(night):
    # SIGTERM takes the same way out as Ctrl-C (run_night turns it into KeyboardInterrupt: test_agent_loop.py,
    # with the handler Ray's init replaced put back by connect(): test_ray_executor.py)
    night.llm.script(change("hang", HANG))
    driver = night.start("--workers", "2", "--max-experiments", "2")
    first = night.wait_for_runs(5, timeout=120)[4]  # the idea's first run, after the baseline's four
    psutil.Process(first).parent().kill()  # the Ray worker that runs it
    again = night.wait_for_runs(6, timeout=60)[5]
    driver.send_signal(signal.SIGINT)
    printed = driver.communicate(timeout=60)[0]
    assert driver.returncode == 130, printed
    assert "#1 run 1: its worker died (WorkerCrashedError); running it again" in printed
    [requeued] = [e for e in night.ledger() if e["event"] == "requeued"]
    assert requeued["experiment"] == 1 and requeued["repeat"] == 1 and "WorkerCrashedError" in requeued["error"]
    assert not alive(again, wait=15)  # cancelled: the task killed its train.py's process tree
    assert [row[4] for row in night.rows()] == ["baseline"]
    assert night.head() == night.base and night.is_clean()
    assert night.git("log", "-1", "--format=%s", night.refs()[-1]) == "hang"  # committed beside it, reachable
    assert night.ledger()[-1]["event"] == "stop" and night.ledger()[-1]["reason"] == "interrupted"


def test_a_cluster_of_mixed_gpu_models_is_refused_and_left(night, monkeypatch):
    from autoresearch import ray_executor

    mixed = ray_executor.Cluster(address="127.0.0.1:6379", local=False, gpus=True, slots=12,
                                 gpu_models=("A100", "H100"))
    stopped = []
    monkeypatch.setattr(ray_executor, "connect", lambda address, state_dir, workers: mixed)  # no cluster here
    monkeypatch.setattr(ray_executor, "shutdown", stopped.append)
    result = night.run("--workers", "12", "--ray", "10.0.0.1:6379")
    assert result.returncode == 1 and "mixes GPU models (A100, H100)" in result.stderr
    assert "--allow-mixed-gpus" in result.stderr and stopped == [mixed]
    assert night.head() == night.base and night.is_clean()
    assert night.ledger()[-1]["event"] == "stop" and "mixes GPU models" in night.ledger()[-1]["reason"]


def test_resume_after_sigkill_with_runs_on_workers_reruns_only_what_was_in_flight(night):
    night.llm.script(change("slow gain", BETTER, SLOW))
    driver = night.start("--workers", "2", "--max-experiments", "2")
    night.wait_for_runs(5, timeout=120)  # the baseline's four runs are done; the idea's first run is on a worker
    driver.kill()
    driver.wait()
    driver = night.start("--workers", "2", "--max-experiments", "2")  # the same command
    printed = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, printed
    assert '#1 resumed: "slow gain"' in printed and len(night.requests()) == 1  # not proposed again
    assert [row[3:] for row in night.rows()] == [["keep", "baseline"], ["keep", "slow gain"]]  # no duplicates
    runs = [e for e in night.ledger() if e["event"] == "run"]
    assert [sum(r["experiment"] == n for r in runs) for n in (0, 1)] == [4, 8]  # the baseline was not run again
    assert sum(r.get("reference", False) for r in runs) == 4  # the best's runs, paired with the idea's four
    assert night.is_clean()


def test_a_baseline_whose_runs_all_ended_before_a_kill_gets_its_row_on_resume_and_is_not_run_again(night):
    assert night.run("--max-experiments", "1").returncode == 0  # the baseline's four runs, here
    ledger = night.repo / ".autoresearch/t/ledger.jsonl"
    lines = ledger.read_text().splitlines()
    ledger.write_text("".join(line + "\n" for line in lines if '"event": "noise"' not in line
                              and '"event": "result"' not in line))  # as if killed right after its last run
    night.llm.script(change("lower val_bpb", BETTER))
    driver = night.start("--workers", "2", "--max-experiments", "2")
    printed = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, printed
    assert [row[3:] for row in night.rows()] == [["keep", "baseline"], ["keep", "lower val_bpb"]]
    assert len(night.train_pids()) == 4 + 4 + 4  # the baseline's four runs, then the idea's and the best's beside
    assert all("worker" in r for r in night.ledger() if r["event"] == "run" and r["experiment"] == 1)  # on workers
