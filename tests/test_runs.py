"""Where runs go on this machine (autoresearch/runs.py): the GPUs nvidia-smi shows, one slot per GPU given, runs
side by side, a cancelled run killed and never reported. Real processes under the stand-in harness, no GPU: a
stand-in nvidia-smi on PATH says which GPUs there are."""

import os
import secrets
import sys
import time

import psutil
import pytest

from autoresearch import runs
from night_repo import SUPPORT
from stand_ins import FAKE_HARNESS
from processes import alive

SMI = "0, GPU-5a1b, NVIDIA H200\n1, GPU-77c2, NVIDIA H200\n2, GPU-9e00, NVIDIA A100\n"  # --query-gpu's csv
SAYS_ITS_GPU = ("import os, time\nfrom prepare import evaluate_bpb\n"
                "print('gpu', os.environ.get('CUDA_VISIBLE_DEVICES'), flush=True)\n"
                "time.sleep(SLEEP)\nprint('---')\nprint('val_bpb:', evaluate_bpb(0.9))\n")


@pytest.fixture
def machine(tmp_path, monkeypatch, stand_in):
    """A stand-in nvidia-smi on PATH and the stand-in harness; the folder for the logs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(f"#!{sys.executable}\nprint({SMI!r}, end='')\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def request(folder, name, sleep=0.0):
    return runs.Request(SAYS_ITS_GPU.replace("SLEEP", str(sleep)), FAKE_HARNESS,
                        secrets.token_bytes(32).hex(), 60, "val", folder / f"{name}.log")


def ended(executor, count, timeout=60):
    outcomes, deadline = {}, time.time() + timeout
    while len(outcomes) < count and time.time() < deadline:
        outcomes |= dict(executor.wait(timeout=0.2))
    return outcomes


def test_local_gpus_are_those_nvidia_smi_lists_or_those_cuda_visible_devices_names(machine, monkeypatch):
    assert runs.local_gpus() == [("0", "NVIDIA H200"), ("1", "NVIDIA H200"), ("2", "NVIDIA A100")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert runs.local_gpus() == [("2", "NVIDIA A100"), ("0", "NVIDIA H200")]


def test_gpus_named_by_uuid_have_their_model_and_an_unknown_one_is_not_another_model(machine, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-77c2,GPU-5a,MIG-1234,MIG-5678")
    assert runs.local_gpus() == [("GPU-77c2", "NVIDIA H200"), ("GPU-5a", "NVIDIA H200"), ("MIG-1234", "unknown"),
                                 ("MIG-5678", "unknown")]


def test_a_machine_without_nvidia_smi_has_no_gpus(machine, monkeypatch):
    monkeypatch.setenv("PATH", str(machine / "empty"))
    assert runs.local_gpus() == []


def test_each_slot_runs_on_its_own_gpu_and_the_runs_go_side_by_side(machine):
    executor = runs.LocalExecutor(2, machine, runs.local_gpus())
    started = time.time()
    for name in ("a", "b"):
        executor.submit(name, request(machine, name, sleep=1.0))
    outcomes = ended(executor, 2)
    assert time.time() - started < 1.9  # two one-second runs at once, not one after the other
    gpus = {name: outcome["log"].split()[1] for name, outcome in outcomes.items()}
    assert sorted(gpus.values()) == ["0", "1"] and all(o["returncode"] == 0 for o in outcomes.values())
    assert {o["worker"]["gpu"] for o in outcomes.values()} == {"NVIDIA H200"}
    assert (machine / "a.log").read_text() == outcomes["a"]["log"]  # the log, where the night keeps it


def test_a_cancelled_run_is_killed_and_never_reported(machine):
    executor = runs.LocalExecutor(2, machine)
    executor.submit("slow", request(machine, "slow", sleep=600))
    executor.submit("quick", request(machine, "quick"))
    deadline = time.time() + 60
    while "gpu" not in ((machine / "slow.log").read_text() if (machine / "slow.log").exists() else ""):
        assert time.time() < deadline
        time.sleep(0.05)
    started = psutil.Process(executor.processes["slow"].pid)  # in its sandbox train.py's own pid is 1
    tree = [started, *started.children(recursive=True)]
    executor.cancel("slow")
    assert not any(alive(process.pid, wait=10) for process in tree)
    outcomes, deadline = {}, time.time() + 60
    while (executor.threads or not outcomes) and time.time() < deadline:  # both threads ended, quick's outcome in
        outcomes |= dict(executor.wait(timeout=0.2))
    assert list(outcomes) == ["quick"] and sorted(executor.free) == [0, 1]


def test_a_cancelled_run_s_slot_takes_the_next_run_as_soon_as_it_is_dead(machine):
    executor = runs.LocalExecutor(1, machine)
    executor.submit("slow", request(machine, "slow", sleep=600))
    deadline = time.time() + 60
    while executor.free_slots() or not executor.processes:  # until its process has started
        assert time.time() < deadline
        time.sleep(0.05)
    executor.cancel("slow")
    while not executor.free_slots():  # no wait() needed: the slot comes back when the run is dead
        assert time.time() < deadline
        time.sleep(0.05)
    executor.submit("next", request(machine, "next"))
    assert list(ended(executor, 1)) == ["next"]
