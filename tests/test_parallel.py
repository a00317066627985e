"""--workers N: the runs of one commit go out together, on a private local Ray instance that the loop starts
(127.0.0.1, token auth, no dashboard), with the decisions a serial night makes. The loop runs as its own
process: a Ray instance leaves state in the process that started it (its token, environment variables)."""

import signal

from fake_llm import change
from night_repo import BETTER, HANG
from processes import alive

WORSE_THAN_BETTER = ("VAL_BPB = 0.990000", "VAL_BPB = 1.010000")


def test_three_workers_decide_as_a_serial_night_and_send_repeated_runs_out_together(night):
    night.llm.script(change("lower val_bpb", BETTER), change("raise val_bpb", WORSE_THAN_BETTER))
    driver = night.start("--max-experiments", "3", "--workers", "3")  # its own process: Ray's state stays there
    printed = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, printed
    assert "raise the limit: uv run agent_loop.py --tag t --workers 3 --max-experiments 13" in printed  # as it ran
    # as serial: the noise rule runs the baseline 4 times, the gain 4 times, and discards the loss after one run
    assert [row[1:] for row in night.rows()] == [["1.000000", "2.0", "keep", "baseline"],
                                                 ["0.990000", "2.0", "keep", "lower val_bpb"],
                                                 ["1.010000", "2.0", "discard", "raise val_bpb"]]
    events = night.ledger()
    runs = [e for e in events if e["event"] == "run"]
    assert [sum(r["experiment"] == n for r in runs) for n in (0, 1, 2)] == [4, 4, 1]
    assert all(r["worker"]["gpu"] == "cpu" and r["worker"]["ip"] == "127.0.0.1" for r in runs)
    # three slots: three baseline runs were out before the first one ended, then the fourth
    baseline = [e["event"] for e in events if e.get("experiment") == 0 and e["event"] in ("run_started", "run")]
    assert baseline[:3] == ["run_started"] * 3 and baseline[3] == "run"
    assert night.head() == night.refs()[1] and night.is_clean()
    assert night.ledger()[-1]["reason"] == "reached --max-experiments 3"


def test_ctrl_c_cancels_the_runs_on_the_workers_and_leaves_train_py_at_the_best_commit(night):
    night.llm.script(change("hang", HANG))
    driver = night.start("--workers", "2")
    hung = night.wait_for_runs(5, timeout=120)[4]  # after the four runs of the baseline, two at a time
    driver.send_signal(signal.SIGINT)
    assert driver.wait(timeout=60) == 130, driver.stdout.read()
    assert not alive(hung, wait=15)  # cancelled: the task killed its train.py's process tree
    assert [row[4] for row in night.rows()] == ["baseline"]
    assert night.head() == night.base and night.is_clean()
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


def test_resume_after_sigkill_with_runs_on_workers_redoes_only_what_was_in_flight(night):
    night.llm.script(change("hang", HANG))
    driver = night.start("--workers", "2", "--max-experiments", "2")
    night.wait_for_runs(5, timeout=120)  # the four baseline runs are done; the hanging idea is on a worker
    driver.kill()
    driver.wait()
    night.llm.script(change("lower val_bpb", BETTER))
    driver = night.start("--workers", "2", "--max-experiments", "2")
    printed = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, printed
    assert [row[3:] for row in night.rows()] == [["keep", "baseline"], ["keep", "lower val_bpb"]]  # no duplicates
    runs = [e for e in night.ledger() if e["event"] == "run"]
    assert sum(r["experiment"] == 0 for r in runs) == 4  # the baseline was not run again
    assert night.is_clean()
