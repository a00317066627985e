"""One run of train.py (autoresearch/runner.py): real processes, the stand-in harness (fake_prepare.py,
fake_scorer.py). CPU, seconds."""

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from autoresearch import integrity, run_folders, runner
from night_repo import ROOT
from processes import alive

SLEEP = "import time; time.sleep(60)"
# A run that starts a child of its own, says both pids, then waits: a tree of two processes.
TREE = f"import os, subprocess, sys, time\nchild = subprocess.Popen([sys.executable, '-c', {SLEEP!r}])\n" \
       "print(os.getpid(), child.pid, flush=True)\ntime.sleep(60)\n"


@pytest.fixture
def leftovers():
    """Pids a test started: whatever of them a failing test leaves running is killed after it."""
    pids = []
    yield pids
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def start_tree(leftovers, code=TREE, **options):
    """Start `python -c code` that prints pids on its first line; (the process, the pids it printed)."""
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, **options)
    leftovers.append(process.pid)
    pids = [int(pid) for pid in process.stdout.readline().split()]
    process.stdout.close()
    leftovers.extend(pids)
    return process, pids


@pytest.fixture
def harness(tmp_path, monkeypatch, stand_in):
    """Temp folders for the run (train.py to be written by the test) and the stand-in scorer; run_training's
    arguments."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task").mkdir()
    (tmp_path / "scorer").mkdir()
    for name, source in stand_in.items():
        (tmp_path / "scorer" / name).write_text(source)
    (tmp_path / "task" / "prepare.py").write_text(stand_in["prepare.py"])
    return dict(log_path=tmp_path / "run.log", pid_path=tmp_path / "train.pid", cwd=tmp_path / "task",
                scoring=tmp_path / "scorer", env=dict(os.environ), key_hex="00" * 32)


# -----------------------------------------------------------------------------
# Running


def test_run_training_runs_train_py_beside_the_scorer_and_returns_its_exit_code_and_the_scorer_s_record(
        harness):
    (harness["cwd"] / "train.py").write_text(
        "import sys\nfrom prepare import evaluate_bpb\nprint('stdin', repr(sys.stdin.read()), 'val_bpb', "
        "evaluate_bpb(0.5))\nprint('an error', file=sys.stderr)\nsys.exit(3)\n")
    returncode, seconds, record, probe_seconds = runner.run_training(timeout=30, **harness)
    assert returncode == 3 and 0 < seconds < 30 and probe_seconds is None
    assert harness["log_path"].read_text().splitlines() == ["stdin '' val_bpb 0.5", "an error"]
    verified, missing = integrity.verify_record(bytes(32), record)
    assert missing is None and integrity.evaluation(verified)["val_bpb"] == 0.5
    assert not harness["pid_path"].exists()


def test_run_training_returns_none_at_the_time_limit_and_kills_the_run_s_process_tree(harness, leftovers):
    (harness["cwd"] / "train.py").write_text(TREE)
    returncode, seconds, record, _ = runner.run_training(timeout=2, **harness)
    pids = [int(pid) for pid in harness["log_path"].read_text().split()]
    leftovers.extend(pids)
    assert returncode is None and 2 <= seconds < 10 and not integrity.verify_record(bytes(32), record)[0]["evaluations"]
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)
    assert not harness["pid_path"].exists()


# A train.py that says where it runs, leaves a checkpoint there, writes to its folder's prepare.py if told to,
# and is scored by the stand-in harness (fake_prepare.py).
WHERE = ("import os\nfrom prepare import evaluate_bpb\nprint('in', os.getcwd(), os.listdir('.'))\n"
         "open('ckpt.pt', 'w').write('weights')\nTAMPER = False\n"
         "if TAMPER:\n    open('prepare.py', 'a').write('#')\nprint('---')\nprint('val_bpb:', evaluate_bpb(0.9))\n")


def test_run_in_folder_runs_train_py_in_a_fresh_folder_that_is_gone_with_its_checkpoint(tmp_path, stand_in):
    key = secrets.token_bytes(32)
    result = runner.run_in_folder(WHERE, stand_in, key.hex(), 30, tmp_path / "train.pid",
                                  log_path=tmp_path / "run.log")
    folder, listed = re.search(r"^in (\S+) (.*)$", result["log"], re.MULTILINE).groups()
    assert result["returncode"] == 0 and sorted(eval(listed)) == ["prepare.py", "train.py"]
    run_folder = os.path.dirname(folder)  # the run's task folder and its record, beside it
    assert os.path.basename(run_folder).startswith("autoresearch-run-") and not os.path.exists(run_folder)
    assert (tmp_path / "run.log").read_text() == result["log"] and result["changed"] == []
    record, missing = integrity.verify_record(key, result["record"])
    assert missing is None and integrity.evaluation(record)["val_bpb"] == 0.9


def test_run_in_folder_says_what_the_run_changed_of_the_harness(tmp_path, stand_in):
    result = runner.run_in_folder(WHERE.replace("TAMPER = False", "TAMPER = True"), stand_in, "00" * 32, 30,
                                  tmp_path / "train.pid")
    assert result["changed"] == ["prepare.py"]


# A train.py the stand-in scorer asks a probe run of: each run says what its folder holds and which run it is,
# and leaves a file there; its probe run may hang
PROBED = ("import os, time\nfrom prepare import evaluate_bpb\nloaded = os.environ.get('AUTORESEARCH_LOAD_WEIGHTS')\n"
          "print('in', os.path.basename(os.getcwd()), sorted(os.listdir('.')), 'probe run' if loaded else 'run',\n"
          "      flush=True)\n"
          "open('memory.txt', 'w').write('rows')\nHANG = False\n"
          "if loaded and HANG:\n    time.sleep(600)\nprint('---')\nprint('val_bpb:', evaluate_bpb(0.9, probe=True))\n")


def test_the_probe_run_is_train_py_again_in_a_new_folder_of_its_own_loading_the_weights_the_run_handed_over(
        tmp_path, stand_in):
    key = secrets.token_bytes(32)
    result = runner.run_in_folder(PROBED, stand_in, key.hex(), 30, tmp_path / "train.pid",
                                  log_path=tmp_path / "run.log")
    assert result["returncode"] == 0 and "in task ['prepare.py', 'train.py'] run" in result["log"]
    probe_log = (tmp_path / "run.probe.log").read_text()  # beside the run's log, which shows the agent none of it
    # not the first run's folder, which it left memory.txt in
    assert "in probe-task ['load.safetensors', 'prepare.py', 'train.py'] probe run" in probe_log
    assert "probe" not in result["log"]
    record, missing = integrity.verify_record(key, result["record"])
    assert missing is None and record["stage"] == "final" and integrity.evaluation(record)["probe"]["rows"] == 8
    assert 0 < result["probe_seconds"] < 30 and not (tmp_path / "train.pid").exists()


def test_a_probe_run_that_hangs_is_killed_at_the_time_limit_and_leaves_the_score_unprobed(tmp_path, stand_in):
    key = secrets.token_bytes(32)
    result = runner.run_in_folder(PROBED.replace("HANG = False", "HANG = True"), stand_in, key.hex(), 6,
                                  tmp_path / "train.pid", log_path=tmp_path / "run.log")
    record, missing = integrity.verify_record(key, result["record"])
    assert result["returncode"] == 0 and integrity.evaluation(record)["probe"] is None
    assert 6 <= result["probe_seconds"] < 15 and record["unfinished"].startswith("the probe run ended before it asked")
    scored = integrity.evaluation(record)
    [problem] = integrity.record_problems(record, missing, 0, 0.9,
                                          {"max_seq_len": scored["seq_len"], "eval_tokens": scored["tokens"]})
    assert problem.startswith("the scorer never probed the model it scored")


# A driver: it makes a run folder as run_in_folder does, starts a run there, says its folder and the run's pid, and
# waits (to be killed)
DRIVER = ("import subprocess, sys, time\nfrom autoresearch import run_folders\nroot, lock = run_folders.new_run_folder()\n"
          f"run = subprocess.Popen([sys.executable, '-c', {SLEEP!r}], cwd=root)\n"
          "print(root, run.pid, flush=True)\ntime.sleep(60)\n")


def start_driver(leftovers):
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    leftovers.append(driver.pid)
    folder, run = driver.stdout.readline().split()
    leftovers.append(int(run))
    return driver, Path(folder), int(run)


def test_the_run_folder_of_a_killed_driver_goes_with_what_runs_in_it_when_a_run_starts(leftovers):
    driver, folder, run = start_driver(leftovers)
    driver.kill()
    driver.wait()
    assert folder.exists() and alive(run, wait=0)
    run_folders.remove_abandoned()
    assert not folder.exists() and not alive(run)


def test_the_run_folder_of_a_live_driver_is_left_alone(leftovers):
    driver, folder, run = start_driver(leftovers)
    try:
        run_folders.remove_abandoned()
        assert folder.exists() and alive(run, wait=0)
    finally:
        driver.kill()
        driver.wait()
        run_folders.remove_abandoned()


def test_a_run_s_pid_file_names_its_processes_and_folder_and_kill_leftover_training_removes_them(tmp_path, leftovers):
    root = tmp_path / "autoresearch-run-x"
    (root / "task").mkdir(parents=True)
    (root / "scorer").mkdir()
    (train, _), (scorer, _) = (start_tree(leftovers, TREE, start_new_session=True, cwd=root / name)
                               for name in ("task", "scorer"))
    pid_path = tmp_path / "train.pid"
    pid_path.write_text(f"{train.pid}\n{root / 'task'}\n{scorer.pid}")
    run_folders.kill_leftover_training(pid_path)
    assert not alive(train.pid) and not alive(scorer.pid) and not root.exists() and not pid_path.exists()


def test_kill_tree_kills_a_process_its_child_and_its_grandchild(leftovers):
    tree = "import subprocess, sys, time\n" \
           f"child = subprocess.Popen([sys.executable, '-c', {TREE!r}], stdout=sys.stdout)\ntime.sleep(60)\n"
    process, (child, grandchild) = start_tree(leftovers, tree)
    assert alive(grandchild, wait=0)
    run_folders.kill_tree(process.pid)
    assert not alive(process.pid) and not alive(child) and not alive(grandchild)


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX's")
def test_kill_tree_also_kills_what_left_the_tree_but_kept_the_run_s_process_group(leftovers):
    # The run starts a child and ends: the child is no longer its child, but still in its process group.
    orphaning = f"import subprocess, sys\nprint(subprocess.Popen([sys.executable, '-c', {SLEEP!r}]).pid, flush=True)\n"
    process, (orphan,) = start_tree(leftovers, orphaning, start_new_session=True)
    deadline = time.time() + 10
    while psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
        time.sleep(0.02)
    assert orphan not in [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    run_folders.kill_tree(process.pid)
    assert not alive(orphan)


def test_kill_leftover_training_leaves_a_process_that_is_not_a_training_run_alone(harness, leftovers):
    other = subprocess.Popen([sys.executable, "-c", SLEEP])
    leftovers.append(other.pid)
    harness["pid_path"].write_text(str(other.pid))
    run_folders.kill_leftover_training(harness["pid_path"])
    assert alive(other.pid, wait=0)
    assert not harness["pid_path"].exists()


def test_kill_leftover_training_leaves_a_run_younger_than_its_pid_file_alone(tmp_path, harness, leftovers):
    # A recycled pid: the file names a run of an earlier driver, the pid now belongs to a newer process.
    folder = tmp_path / "autoresearch-run-x" / "task"
    folder.mkdir(parents=True)
    process, _ = start_tree(leftovers, TREE, start_new_session=True, cwd=folder)
    harness["pid_path"].write_text(f"{process.pid}\n{folder}")
    an_hour_ago = time.time() - 3600
    os.utime(harness["pid_path"], (an_hour_ago, an_hour_ago))
    run_folders.kill_leftover_training(harness["pid_path"])
    assert alive(process.pid, wait=0)


@pytest.mark.parametrize("content", [None, "", "not a pid", "4194305"])  # 4194305: above any pid_max
def test_kill_leftover_training_with_no_usable_pid_file_removes_it_and_kills_nothing(harness, content):
    if content is not None:
        harness["pid_path"].write_text(content)
    run_folders.kill_leftover_training(harness["pid_path"])
    assert not harness["pid_path"].exists()


def test_a_run_s_environment_holds_no_key_token_or_password_of_the_driver_s(tmp_path, stand_in, monkeypatch):
    for name in ("ANTHROPIC_API_KEY", "HF_TOKEN", "DB_PASSWORD", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(name, "secret")
    monkeypatch.setenv("PWD", str(ROOT))  # where the driver runs: the repository
    says = "import os\nprint(sorted(os.environ))\n"
    result = runner.run_in_folder(says, stand_in, "00" * 32, 30, tmp_path / "train.pid")
    names = eval(result["log"].strip().splitlines()[0])
    assert "AUTORESEARCH_CACHE" in names and "PATH" in names
    assert not {"ANTHROPIC_API_KEY", "HF_TOKEN", "DB_PASSWORD", "RAY_AUTH_TOKEN_PATH", "PWD"} & set(names)
