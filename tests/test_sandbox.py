"""The sandbox train.py runs in (autoresearch/sandbox.py): real runs through runner.run_in_folder with the stand-in
harness, each trying what a model optimising val_bpb might; and the words the run's record and the report use."""

import json
import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest

import agent_loop
from autoresearch import run_folders, runner, sandbox

FOUND = sandbox.probe()
needs_landlock = pytest.mark.skipif(not FOUND["landlock"], reason="no Landlock on this machine")
needs_namespaces = pytest.mark.skipif(not FOUND["namespaces"], reason="no user namespaces on this machine")

# A train.py that tries each thing its lines name and says whether it could.
TRIES = '''
import os, socket, sys
def attempt(name, action):
    try:
        action()
        print(name, "done", flush=True)
    except Exception as error:
        print(name, "refused", type(error).__name__, flush=True)
{lines}
'''


def run_trying(tmp_path, lines, timeout=30, **options):
    return runner.run_in_folder(TRIES.format(lines=lines), options.pop("harness"), "00" * 32, timeout,
                                tmp_path / "train.pid", **options)


def outcomes(result):
    return dict(line.split(" ", 1) for line in result["log"].splitlines() if line.startswith("try-"))


def a_cache_with_one_part_per_split(tmp_path):
    cache = tmp_path / "cache"
    (cache / "tokens").mkdir(parents=True)
    manifest = json.loads((runner.integrity.cache_dir() / "manifest.json").read_text())
    manifest["splits"] = {split: {"parts": [f"x-{split}"]} for split in ("train", "val", "holdout")}
    (cache / "manifest.json").write_text(json.dumps(manifest))
    for split in ("train", "val", "holdout"):
        (cache / "tokens" / f"x-{split}.bin").write_bytes(b"tokens")
    return cache


@needs_landlock
def test_train_py_cannot_read_the_validation_tokens_but_reads_the_training_tokens(tmp_path, stand_in):
    cache = a_cache_with_one_part_per_split(tmp_path)
    lines = "\n".join(f"attempt('try-{split}', lambda: open({str(cache / 'tokens' / f'x-{split}.bin')!r}).read())"
                      for split in ("train", "val", "holdout"))
    result = run_trying(tmp_path, lines, harness=stand_in, cache=cache)
    assert outcomes(result) == {"try-train": "done", "try-val": "refused PermissionError",
                                "try-holdout": "refused PermissionError"}, result["log"]


def test_a_validation_file_with_a_second_hard_link_is_named_in_the_run_s_record(tmp_path, stand_in):
    cache = a_cache_with_one_part_per_split(tmp_path)
    os.link(cache / "tokens" / "x-val.bin", tmp_path / "elsewhere.bin")
    result = run_trying(tmp_path, "print('try-nothing done')", harness=stand_in, cache=cache)
    assert f"another hard link, by which train.py can read them: {cache / 'tokens' / 'x-val.bin'} (2 links)" in (
        result["sandbox"])
    (tmp_path / "elsewhere.bin").unlink()
    assert "hard link" not in run_trying(tmp_path, "print('try-nothing done')", harness=stand_in, cache=cache)[
        "sandbox"]


@needs_landlock
def test_train_py_cannot_read_your_credentials(tmp_path, stand_in, monkeypatch):
    home, token = tmp_path / "home", tmp_path / "elsewhere" / "ray-token"
    for path in (home / ".ssh" / "id_ed25519", home / ".ray" / "auth_token", home / ".claude.json", token,
                 home / ".cache" / "pip" / "readable"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(token)}
    tries = {"ssh": home / ".ssh" / "id_ed25519", "ray": home / ".ray" / "auth_token", "claude": home / ".claude.json",
             "token-path": token, "cache": home / ".cache" / "pip" / "readable"}
    lines = "\n".join(f"attempt('try-{name}', lambda: open({str(path)!r}).read())" for name, path in tries.items())
    result = run_trying(tmp_path, lines, harness=stand_in, env=env)
    assert outcomes(result) == {"try-ssh": "refused PermissionError", "try-ray": "refused PermissionError",
                                "try-claude": "refused PermissionError", "try-token-path": "refused PermissionError",
                                "try-cache": "done"}, result["log"]


def test_a_folder_train_py_may_also_write_that_holds_a_denied_path_is_said_to_open_it(tmp_path, stand_in,
                                                                                     monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    words = runner.sandbox_words(runner.integrity.cache_dir(), {"AUTORESEARCH_SANDBOX_WRITABLE": str(home)})
    assert f"train.py may also write {home} ($AUTORESEARCH_SANDBOX_WRITABLE): state can pass from run to run, " \
           f"and to its probe run, which can then replay what the run was shown; missing: so it can also read " \
           f"{home / '.ssh'}" in words


@needs_landlock
def test_train_py_writes_only_its_folder_and_its_own_temp_folder(tmp_path, stand_in):
    outside = tmp_path / "outside.txt"
    lines = (f"attempt('try-outside', lambda: open({str(outside)!r}, 'w').write('state'))\n"
             "attempt('try-folder', lambda: open('checkpoint.pt', 'w').write('weights'))\n"
             "import tempfile\n"
             "attempt('try-temp', lambda: open(os.path.join(tempfile.gettempdir(), 'x'), 'w').write('x'))\n"
             "attempt('try-home', lambda: open(os.path.expanduser('~/.x'), 'w').write('x'))\n")
    result = run_trying(tmp_path, lines, harness=stand_in)
    assert outcomes(result) == {"try-outside": "refused PermissionError", "try-folder": "done", "try-temp": "done",
                                "try-home": "done"}, result["log"]
    assert not outside.exists()


@needs_landlock
def test_train_py_cannot_read_the_folder_of_another_run_beside_it(tmp_path, stand_in):
    other = Path(tempfile.mkdtemp(prefix="autoresearch-run-", dir=run_folders.runs_folder()))  # as a run beside it makes
    try:
        (other / "task").mkdir()
        (other / "task" / "rows.bin").write_bytes(b"validation rows a run saw")
        lines = (f"attempt('try-other', lambda: open({str(other / 'task' / 'rows.bin')!r}).read())\n"
                 f"attempt('try-list', lambda: os.listdir({str(run_folders.runs_folder())!r}))\n"
                 "attempt('try-own', lambda: open('train.py').read())\n")
        result = run_trying(tmp_path, lines, harness=stand_in)
    finally:
        shutil.rmtree(other)
    assert outcomes(result) == {"try-other": "refused PermissionError", "try-list": "refused PermissionError",
                                "try-own": "done"}, result["log"]


@needs_namespaces
def test_train_py_has_no_network(tmp_path, stand_in):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        lines = f"attempt('try-connect', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=5))"
        result = run_trying(tmp_path, lines, harness=stand_in)
    assert outcomes(result)["try-connect"].startswith("refused"), result["log"]


@needs_namespaces
def test_what_train_py_starts_in_a_new_session_dies_with_it(tmp_path, stand_in):
    marker = f"left-behind-{uuid.uuid4().hex}"
    lines = ("import subprocess\n"
             f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {marker!r}], "
             "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
             "print('try-detach done')\n")
    result = run_trying(tmp_path, lines, harness=stand_in)
    assert outcomes(result) == {"try-detach": "done"}
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]
    for process in left:  # should there be one, it does not outlive the test
        process.kill()
    assert left == []


@needs_namespaces
def test_train_py_sees_no_process_outside_its_sandbox(tmp_path, stand_in):
    lines = ("pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
             "print('try-processes', 'only its own' if pids == [str(os.getpid())] else pids)\n"
             f"attempt('try-signal', lambda: os.kill({psutil.Process().pid}, 0))\n")
    result = run_trying(tmp_path, lines, harness=stand_in)
    assert outcomes(result) == {"try-processes": "only its own", "try-signal": "refused ProcessLookupError"}, \
        result["log"]


@needs_landlock
def test_train_py_cannot_reach_a_unix_socket_of_your_user_s_services_but_has_socket_pairs(tmp_path, stand_in):
    path = tmp_path / "service.sock"  # a tmux, systemd or D-Bus socket would run commands outside the sandbox
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        lines = (f"attempt('try-connect', lambda: socket.socket(socket.AF_UNIX).connect({str(path)!r}))\n"
                 "attempt('try-pair', lambda: socket.socketpair())\n")
        result = run_trying(tmp_path, lines, harness=stand_in)
    assert outcomes(result) == {"try-connect": "refused PermissionError", "try-pair": "done"}, result["log"]


@needs_namespaces
@needs_landlock
def test_train_py_has_a_dev_shm_of_its_own_for_multiprocessing(tmp_path, stand_in):
    lines = ("import multiprocessing\nattempt('try-lock', lambda: multiprocessing.Lock())\n"
             "attempt('try-shm', lambda: open('/dev/shm/x', 'w').write('x'))\n")
    result = run_trying(tmp_path, lines, harness=stand_in)
    assert outcomes(result) == {"try-lock": "done", "try-shm": "done"}, result["log"]
    assert not os.path.exists("/dev/shm/x")


def test_train_py_may_drive_an_nvidia_or_a_rocm_gpu_and_no_other_device():
    def gpus(names, render_nodes):
        return [p for p in sandbox.device_paths(names, render_nodes) if p.removeprefix("/dev/") not in sandbox.DEVICES]

    listed, dri = ["nvidia0", "nvidiactl", "nvidia-uvm", "kfd", "dri", "sda", "kvm", "mem"], ["card0", "renderD128"]
    assert gpus(listed, dri) == ["/dev/kfd", "/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidiactl", "/dev/dri/renderD128"]
    assert gpus(["nvidia0", "dri"], dri) == ["/dev/nvidia0"]  # no ROCm: not even a render node


def test_the_run_says_which_sandbox_it_had(tmp_path, stand_in):
    result = run_trying(tmp_path, "print('try-nothing done')", harness=stand_in)
    assert result["sandbox"] == sandbox.describe(FOUND) and result["returncode"] == 0


def test_a_machine_without_a_sandbox_says_what_train_py_can_then_do():
    words = sandbox.describe({"landlock": 0, "namespaces": False, "missing": ["Landlock (...)", "namespaces (...)"]},
                             ["the stdlib corpus's validation text is Python's own source"])
    assert words == ("none; missing: Landlock (...); missing: namespaces (...); missing: the stdlib corpus's "
                     "validation text is Python's own source")
    assert sandbox.wrap([sys.executable, "train.py"], {}, {"landlock": 0, "namespaces": False}) == [
        sys.executable, "train.py"]


def test_the_probe_names_what_this_machine_lacks():
    assert bool(FOUND["landlock"]) != any(m.startswith("Landlock (") for m in FOUND["missing"])
    assert FOUND["namespaces"] != any(m.startswith("user namespaces") for m in FOUND["missing"])


def test_a_night_without_a_sandbox_says_so_in_its_first_lines_its_runs_and_its_report(night, no_sandbox, capsys):
    result = night.run("--max-experiments", "1")
    assert result.returncode == 0
    first_lines = result.stdout.splitlines()[:3]
    assert any("train.py's sandbox: none; missing: a sandbox (this test runs without one)" in line
               for line in first_lines), first_lines
    words = ("none; missing: a sandbox (this test runs without one); missing: train.py may also write "
             f"{night.tmp / 'shared'} ($AUTORESEARCH_SANDBOX_WRITABLE): state can pass from run to run, and to its "
             "probe run, which can then replay what the run was shown")  # where the tests keep their bookkeeping
    assert {r["sandbox"] for r in night.ledger() if r["event"] == "run"} == {words}
    capsys.readouterr()
    assert agent_loop.main(["report", "--tag", "t"]) == 0
    assert f"sandbox      {words}" in capsys.readouterr().out
