"""--workers N: different experiments at once, on this machine's slots (CPU slots here) or on a Ray cluster (one
head node on 127.0.0.1, started with `ray start`), decided in the order they end, with the outcome of a serial
night; a change that beat its base after the best moved on is judged again on the new best (merged, or as a whole
program when it conflicts); faults (a dead worker, signals, SIGKILL and resume). The loop runs as its own process
where Ray or a signal is involved (Ray leaves state in the process that joined it)."""

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
from fake_llm import change
from night_repo import BETTER, HANG, WORSE
from processes import alive
from ray_cluster import ray_head

GAIN_A, MORE_GAIN_A = ("GAIN_A = 0.0", "GAIN_A = 0.01"), ("GAIN_A = 0.0", "GAIN_A = 0.02")
GAIN_B = ("GAIN_B = 0.0", "GAIN_B = 0.005")
SLOW = ("SLEEP = 0.0", "SLEEP = 1.0")  # a run in flight long enough to kill something


def apply(source, edit):
    return source.replace(*edit)


def results(night):
    return [e for e in night.ledger() if e["event"] == "result"]


def test_four_workers_keep_what_a_serial_night_keeps_and_merge_a_gain_the_best_overtook_onto_it(night):
    # Three ideas asked at once on the baseline: two independent gains and a loss. A serial night keeps both gains
    # (each beats the best before it) and discards the loss; here the gain decided second beat its base, which
    # is no longer the best, so its change is merged onto the new best and judged again there, in the same row.
    night.llm.script(change("gain a", GAIN_A), change("worse", WORSE), change("gain b", GAIN_B))
    result = night.run("--max-experiments", "4", "--workers", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "raise the limit: uv run agent_loop.py --tag t --workers 4 --max-experiments 14" in result.stdout
    rows = night.rows()
    assert sorted(row[3:] for row in rows) == [["discard", "worse"], ["keep", "baseline"], ["keep", "gain a"],
                                               ["keep", "gain b"]]
    bests = [float(r[1]) for r in rows if r[3] == "keep"]
    assert bests == sorted(bests, reverse=True) and bests[-1] == 0.985  # each keep beats the best before it
    assert night.train_py() == apply(apply(night.git("show", f"{night.base}:train.py") + "\n", GAIN_A), GAIN_B)
    [merged] = [r for r in results(night) if r.get("rebase")]
    assert merged["rebase"] == "merge" and "its change, merged onto the best, runs against it" in merged["reason"]
    assert merged["status"] == "keep" and night.head() == merged["commit"] and night.is_clean()
    [proposal] = [e for e in night.ledger() if e["event"] == "proposal" and e.get("rebase")]
    assert proposal["experiment"] == merged["experiment"] and proposal["commit"] == merged["commit"]
    mine = [(e["repeat"], e.get("reference", False)) for e in night.ledger() if e["event"] == "run_started"
            and merged["commit"] in (e["commit"], e.get("beside"))]
    assert mine.index((1, True)) > mine.index((1, False))  # pair 1: the first run, then the best's beside it
    assert all(abs(mine.index((k, False)) - mine.index((k, True))) == 1 for k in (2, 3, 4))  # side by side
    assert len(merged["best_runs_beside"]) == 4
    # the four baseline runs went out together
    events = night.ledger()
    assert [e["event"] for e in events if e["event"] in ("run_started", "run")][:5] == ["run_started"] * 4 + ["run"]
    assert all(r["worker"]["gpu"] == "cpu" for r in events if r["event"] == "run")
    assert night.ledger()[-1]["reason"] == "reached --max-experiments 4"


def test_a_gain_whose_change_conflicts_with_the_new_best_runs_whole_against_it_and_the_best_measured_stays(night):
    # Two edits of one constant, asked at once: whichever is decided second beat its base, but its change
    # conflicts with the new best's. Its whole train.py runs against the new best: the better of the two is kept.
    night.llm.script(change("gain a", GAIN_A), change("more gain a", MORE_GAIN_A))
    result = night.run("--max-experiments", "3", "--workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = results(night)
    [second] = [r for r in rows if r.get("rebase")]
    assert second["rebase"] == "program" and "its whole train.py runs against the best" in second["reason"]
    assert len(rows) == 3 and night.ledger()[-2]["event"] == "result"  # no row beyond the limit
    assert min(float(row[1]) for row in night.rows() if row[3] == "keep") == 0.98
    assert "GAIN_A = 0.02" in night.train_py() and night.is_clean()


def test_claude_code_edits_in_a_scratch_worktree_per_proposal_and_ctrl_c_kills_the_calls_still_running(night):
    steps = [{"edits": [{"file": "train.py", "search": search, "replace": replace}], "result": f"DESCRIPTION: {name}"}
             for name, (search, replace) in (("gain a", GAIN_A), ("gain b", GAIN_B))]
    asleep = {"sleep": 600, "result": "DESCRIPTION: slow"}
    (night.tmp / "claude_script.json").write_text(json.dumps(steps + [asleep] * 2))
    driver = night.start("--agent", "claude-code", "--workers", "2", "--max-experiments", "5")
    calls_path = night.tmp / "claude_calls"
    deadline = time.time() + 120  # both gains decided (one merged onto the other), two calls asleep
    while time.time() < deadline and not (calls_path.exists() and len(calls_path.read_text().splitlines()) == 4
                                          and (night.repo / "results.tsv").exists() and len(night.rows()) == 3):
        time.sleep(0.1)
    calls = [json.loads(line) for line in calls_path.read_text().splitlines()]
    asleep = [call["pid"] for call in calls if call["step"] >= 2]
    assert len(asleep) == 2 and all(alive(pid, wait=0) for pid in asleep)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=60) == 130, driver.stdout.read()
    assert not any(alive(pid, wait=10) for pid in asleep)  # a thread cannot be stopped; its CLI call was
    folders = {Path(call["cwd"]).relative_to(night.repo).parent.as_posix() for call in calls}
    assert len({call["cwd"] for call in calls}) == 4 and folders == {".autoresearch/t/scratch"}  # one each
    assert sorted(row[4] for row in night.rows() if row[3] == "keep") == ["baseline", "gain a", "gain b"]
    assert not (night.repo / ".autoresearch/t/scratch").exists() and night.is_clean()
    assert night.git("worktree", "list", "--porcelain").count("worktree ") == 1


@pytest.fixture
def ray_cluster(night, monkeypatch):
    """A Ray cluster of one head node with two CPU slots, and this test's environment set to join it."""
    with ray_head(night.tmp / "ray", cpus=2) as head:
        for name, value in head.joining.items():
            monkeypatch.setenv(name, value)
        yield head


def test_a_run_whose_ray_worker_dies_goes_out_again_once_and_ctrl_c_then_cancels_it(night, ray_cluster):
    # SIGTERM takes the same way out as Ctrl-C (run_night turns it into KeyboardInterrupt: test_agent_loop.py,
    # with the handler Ray's init replaced put back by connect(): test_ray_executor.py)
    night.llm.script(change("hang", HANG))
    driver = night.start("--ray", ray_cluster.address, "--workers", "2", "--max-experiments", "2")
    first = night.wait_for_runs(5, timeout=120, running=True)[4]  # the idea's first run, after the baseline's four
    [worker] = [p for p in psutil.Process(first).parents() if " ".join(p.cmdline()).startswith("ray::")]
    worker.kill()  # the Ray worker that runs it
    again = night.wait_for_runs(6, timeout=60, running=True)[5]
    driver.send_signal(signal.SIGINT)
    printed = driver.communicate(timeout=60)[0]
    assert driver.returncode == 130, printed
    assert "#1 run 1: its worker died (WorkerCrashedError); running it again" in printed
    [requeued] = [e for e in night.ledger() if e["event"] == "requeued"]
    assert requeued["experiment"] == 1 and requeued["repeat"] == 1 and "WorkerCrashedError" in requeued["error"]
    assert not alive(again, wait=15)  # cancelled: the task killed its train.py's process tree
    assert [row[4] for row in night.rows()] == ["baseline"]
    assert all(r["worker"]["ip"] == "127.0.0.1" for r in night.ledger() if r["event"] == "run")
    assert night.head() == night.base and night.is_clean()
    assert night.git("log", "-1", "--format=%s", night.refs()[-1]) == "hang"  # committed beside it, reachable
    assert night.ledger()[-1]["event"] == "stop" and night.ledger()[-1]["reason"] == "interrupted"


def test_a_cluster_of_mixed_gpu_models_is_refused_and_left(night, monkeypatch):
    from autoresearch import ray_executor

    mixed = ray_executor.Cluster(address="127.0.0.1:6379", gpus=True, slots=12, gpu_models=("A100", "H100"))
    stopped = []
    monkeypatch.setattr(ray_executor, "connect", lambda address, workers: mixed)  # no cluster here
    monkeypatch.setattr(ray_executor.RayExecutor, "close", lambda executor: stopped.append(executor.cluster))
    result = night.run("--workers", "12", "--ray", "10.0.0.1:6379")
    assert result.returncode == 1 and "mixes GPU models (A100, H100)" in result.stderr
    assert "--allow-mixed-gpus" in result.stderr and stopped == [mixed]
    assert night.head() == night.base and night.is_clean()
    assert night.ledger()[-1]["event"] == "stop" and "mixes GPU models" in night.ledger()[-1]["reason"]


def test_a_machine_of_mixed_gpu_models_is_refused(night, monkeypatch):
    import agent_loop

    monkeypatch.setattr(agent_loop, "local_gpus", lambda: [("0", "NVIDIA A100"), ("1", "NVIDIA H100")])
    result = night.run("--workers", "2")
    assert result.returncode == 1 and "this machine mixes GPU models (NVIDIA A100, NVIDIA H100)" in result.stderr
    assert night.train_pids() == [] and night.is_clean()


def test_a_baseline_whose_runs_all_ended_before_a_kill_gets_its_row_on_resume_and_is_not_run_again(night):
    assert night.run("--max-experiments", "1").returncode == 0  # the baseline's four runs, here
    night.keep_records(lambda r: r["event"] != "result")  # as if killed right after its last run
    night.llm.script(change("lower val_bpb", BETTER))
    driver = night.start("--workers", "2", "--max-experiments", "2")
    printed = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, printed
    assert [row[3:] for row in night.rows()] == [["keep", "baseline"], ["keep", "lower val_bpb"]]
    assert len(night.train_pids()) == 4 + 4 + 4  # the baseline's four runs, then the idea's and the best's beside
    assert all("worker" in r for r in night.ledger() if r["event"] == "run" and r["experiment"] == 1)  # on workers
