"""autoresearch/ray_executor.py on a Ray cluster of one head node with 3 CPU slots on 127.0.0.1, started with
`ray start` once for the module (Ray takes ~10 s to start here; tests/agent_loop_support/ray_cluster.py), its temp
dir, token and HOME in the test's folders. The runs are the stand-ins of tests/agent_loop_support under the fake
harness (fake_prepare.py, fake_scorer.py), against a small fake cache."""

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import psutil
import pytest
from safetensors.numpy import load_file

from autoresearch import integrity, ray_executor, runs
from conftest import REPO, TINY, run_prepare
from ray_cluster import ray_head
from stand_ins import FAKE_HARNESS, write_harness

SUPPORT = REPO / "tests" / "agent_loop_support"
FAKE_TRAIN = (SUPPORT / "fake_train.py").read_text()


def sleeping_train(seconds, name="", child=False):
    """A train.py that (runs on with `name` in its command line, and starts a child named so too, then) sleeps,
    then reports. In its sandbox it cannot write a pid file, and its pid there is 1: the tests find it by name."""
    return f"""
import os, subprocess, sys, time
from prepare import evaluate_bpb
if {name!r} and sys.argv[1:] != [{name!r}]:
    os.execv(sys.executable, [sys.executable, sys.argv[0], {name!r}])
started = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", {name!r}]) if {child} else None
time.sleep({seconds})
print("---")
print(f"val_bpb:          {{evaluate_bpb(1.0):.6f}}")
"""


def fake_cache(folder, val=b"\x01\x02\x03\x04"):
    """A cache the fake harness accepts: its manifest, a tokenizer, one validation and one training part."""
    (folder / "tokens").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / "manifest.json").write_text(json.dumps(
        {"time_budget": 1, "max_seq_len": 64, "eval_tokens": 4096, "vocab_size": 512, "created": time.ctime(),
         "splits": {"train": {"parts": ["x-train"]}, "val": {"parts": ["x-val"]}}}))
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps({"pattern": ".", "mergeable_ranks": ["YQ=="]}))
    (folder / "tokens" / "x-val.bin").write_bytes(val)
    (folder / "tokens" / "x-train.bin").write_bytes(b"\x05" * 64)
    return folder


@pytest.fixture(scope="module")
def ray_env(tmp_path_factory):
    """The cluster joined by this process, its address and token, the cache and the driver's portable fingerprint
    of it and of prepare.py, and the SIGTERM handler that connect() left."""
    base = tmp_path_factory.mktemp("r")
    saved = dict(os.environ)  # connect() and ray.init() set RAY_* variables for this process: undone at the end
    write_harness(base)
    cache = fake_cache(base / "cache")
    sigterm, cluster = signal.signal(signal.SIGTERM, on_sigterm), None
    with ray_head(base / "head") as head:
        os.environ.update(HOME=str(base / "head"), RAY_USAGE_STATS_ENABLED="0", **head.joining)
        try:
            cluster = ray_executor.connect(head.address, num_workers=3)
            import ray

            # One worker per slot before the tests time anything (a worker's first start takes seconds here).
            ray.get([ray.remote(num_cpus=1)(lambda: time.sleep(1.0)).remote() for _ in range(3)])
            yield SimpleNamespace(cluster=cluster, head=head, base=base, cache=cache,
                                  sigterm=signal.getsignal(signal.SIGTERM),
                                  fingerprint=integrity.portable_fingerprint(base, cache))
        finally:
            if cluster:
                __import__("ray").shutdown()
            signal.signal(signal.SIGTERM, sigterm)
            os.environ.clear()
            os.environ.update(saved)


def on_sigterm(signum, frame):
    """The driver's own SIGTERM handler, which connect() must leave in place."""


def run(ray_env, train_source, key=None, timeout=30, cache=None):
    return ray_executor.submit(ray_env.cluster, train_source, FAKE_HARNESS, ray_env.fingerprint,
                               (key or bytes(32)).hex(), timeout, str(cache or ray_env.cache))


def named(name, count, timeout=60):
    """The processes with `name` in their command line, once there are `count` of them."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [p for p in psutil.process_iter(["cmdline"]) if name in (p.info["cmdline"] or [])]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} processes named {name}")


def ray_processes():
    return psutil.Process().children(recursive=True)


def ended(pids, wait=5.0):
    """Whether every one of these processes has ended (or is a zombie) within `wait` seconds."""
    deadline = time.time() + wait
    while any(running(pid) for pid in pids):
        if time.time() > deadline:
            return False
        time.sleep(0.05)
    return True


def running(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -----------------------------------------------------------------------------
# Runs

def test_a_remote_run_returns_the_log_and_a_record_that_verifies_with_the_key(ray_env):
    key = secrets.token_bytes(32)
    result = ray_executor.result(run(ray_env, FAKE_TRAIN, key))
    assert result["returncode"] == 0 and 0 < result["seconds"] < 10
    assert "val_bpb:          1.000000" in result["log"] and "step 00001" in result["log"]
    record, missing = integrity.verify_record(key, result["record"])
    assert missing is None and integrity.evaluation(record)["val_bpb"] == 1.0
    assert integrity.verify_record(secrets.token_bytes(32), result["record"]) == (
        None, "the scorer's record of the run does not verify: it was altered")
    worker = result["worker"]
    assert (worker["hostname"], worker["ip"], worker["gpu"]) == (socket.gethostname(), "127.0.0.1", "cpu")
    assert worker["worker_pid"] != os.getpid() and result["changed"] == []


def test_a_remote_run_s_weights_come_back_through_the_object_store_to_where_the_driver_keeps_them(ray_env, tmp_path,
                                                                                                  monkeypatch):
    submit = ray_executor.submit  # with the test's cache: the head node was started without it
    monkeypatch.setattr(ray_executor, "submit", lambda *args, **options: submit(*args, **options, cache=ray_env.cache))
    executor = ray_executor.RayExecutor(ray_env.cluster, ray_env.fingerprint)
    kept = tmp_path / "models" / "runs" / "1.safetensors"
    request = runs.Request(FAKE_TRAIN, FAKE_HARNESS, bytes(32).hex(), 30, "val", tmp_path / "1.log", kept)
    executor.submit("run 1", request)
    deadline, ended = time.time() + 60, []
    while not ended and time.time() < deadline:
        ended = executor.wait(1.0)
    [(key, outcome)] = ended
    assert key == "run 1" and outcome["returncode"] == 0 and outcome["weights"] == str(kept)
    assert load_file(kept)["val_bpb"][0] == 1.0  # the fake harness's model: the val_bpb it was scored with


def test_the_run_gets_no_token_of_the_cluster(ray_env):
    source = 'import os\nprint(sorted(k for k in os.environ if k.startswith("RAY_AUTH_TOKEN")))\n'
    result = ray_executor.result(run(ray_env, source))
    assert "RAY_AUTH_TOKEN_PATH" in os.environ and result["log"].strip() == "[]"


def test_three_runs_go_out_at_once_and_take_about_the_time_of_one(ray_env):
    started = time.time()
    measured = ray_executor.result(run(ray_env, sleeping_train(2)))["seconds"]
    single = time.time() - started  # as the driver sees it, like the three below
    started = time.time()
    results = [ray_executor.result(ref) for ref in [run(ray_env, sleeping_train(2)) for _ in range(3)]]
    wall = time.time() - started
    print(f"one run {single:.2f}s ({measured:.2f}s on its node); three at once {wall:.2f}s")
    assert [r["returncode"] for r in results] == [0, 0, 0]
    assert len({r["worker"]["worker_pid"] for r in results}) == 3
    assert wall < 2 * single


def test_a_run_over_its_timeout_comes_back_with_no_exit_code_and_its_process_tree_killed(ray_env):
    name = uuid.uuid4().hex
    ref = run(ray_env, sleeping_train(600, name, child=True), timeout=4)
    train_and_child = named(name, 2)
    result = ray_executor.result(ref)
    assert result["returncode"] is None and 4 <= result["seconds"] < 12
    assert ended([p.pid for p in train_and_child])


def test_a_node_whose_cache_differs_fails_with_an_error_naming_the_node_the_file_and_prepare_py(ray_env, tmp_path):
    other = fake_cache(tmp_path / "other", val=b"\x01\x02\x03\x05")
    with pytest.raises(ray_executor.NodeMismatch) as mismatch:
        ray_executor.result(run(ray_env, "print('ran')", cache=other))
    message = str(mismatch.value)
    assert f"node {socket.gethostname()} (127.0.0.1)" in message and "tokens/x-val.bin differs" in message
    assert "`uv run prepare.py` there with the driver's flags" in message and str(other) in message


def test_a_node_without_the_driver_s_cache_stops_the_night_saying_what_to_run_there(ray_env, tmp_path):
    executor = ray_executor.RayExecutor(ray_env.cluster, ray_env.fingerprint)  # the node's own cache: none
    request = runs.Request(FAKE_TRAIN, FAKE_HARNESS, "00" * 32, 30, "val", tmp_path / "run.log")
    executor.submit("run", request)
    with pytest.raises(SystemExit, match=r"^agent_loop.py: error: node .* has no usable prepared cache .* Run `uv run "
                       r"prepare.py` there"):
        deadline = time.time() + 60
        while time.time() < deadline:
            executor.wait(timeout=0.5)


def test_a_worker_killed_mid_run_is_an_infrastructure_failure_and_not_retried(ray_env):
    import ray

    name = uuid.uuid4().hex
    ref = run(ray_env, sleeping_train(600, name))
    [train] = named(name, 1)
    [worker] = [p for p in train.parents() if " ".join(p.cmdline()).startswith("ray::")]
    worker.kill()
    with pytest.raises(ray.exceptions.WorkerCrashedError) as crashed:
        ray_executor.result(ref)
    assert ray_executor.is_infrastructure_failure(crashed.value)
    train.kill()  # the orphan of the killed worker


def test_cancel_all_stops_every_run_and_kills_its_process_tree(ray_env):
    import ray

    names = [uuid.uuid4().hex for _ in range(2)]
    refs = [run(ray_env, sleeping_train(600, name, child=True)) for name in names]
    trees = [named(name, 2) for name in names]
    started = time.time()
    ray_executor.cancel_all(refs)
    assert time.time() - started < ray_executor.CANCEL_GRACE
    for i, ref in enumerate(refs):
        with pytest.raises(ray.exceptions.TaskCancelledError) as cancelled:
            ray_executor.result(ref)
        assert not ray_executor.is_infrastructure_failure(cancelled.value)
        assert ended([p.pid for p in trees[i]])


# -----------------------------------------------------------------------------
# Nobody else gets in

def test_a_client_without_the_token_is_refused(ray_env):
    cluster = ray_env.cluster
    probe = (f"import ray._raylet\nclient = ray._raylet.GcsClient(address={cluster.address!r})\n"
             "print(len(client.internal_kv_keys(b'', namespace=None, timeout=5)) > 0)")
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    tokens = {"none": {"RAY_AUTH_MODE": "disabled"}, "wrong": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
              "right": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_env.head.token_path)}}
    clients = {name: subprocess.Popen([sys.executable, "-c", probe], env={**plain, **extra}, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for name, extra in tokens.items()}
    said = {name: client.communicate(timeout=60)[0] for name, client in clients.items()}
    assert said["right"].strip() == "True", said["right"]
    for name in ("none", "wrong"):
        assert "AuthenticationError" in said[name] and "InvalidAuthToken" in said[name], said[name]


def test_joining_a_cluster_uses_at_most_workers_of_its_slots_and_all_of_them_by_default(ray_env, tmp_path):
    cluster = ray_env.cluster  # three CPU slots, joined by another driver with the cluster's token
    join = ("from autoresearch import ray_executor\n"
            "for workers in (2, 1):\n"
            f"    joined = ray_executor.connect({cluster.address!r}, workers)\n"
            "    print(joined.slots, joined.gpus)\n    __import__('ray').shutdown()")
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    said = subprocess.run([sys.executable, "-c", join], env={**plain, **ray_env.head.joining}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert said.stdout.split("\n")[:2] == ["2 False", "3 False"], said.stdout + said.stderr


def test_a_wrong_token_is_refused_in_one_line_that_says_where_the_right_one_is(ray_env, tmp_path):
    join = ("from autoresearch import ray_executor\ntry:\n"
            f"    ray_executor.connect({ray_env.cluster.address!r}, 2)\n"
            "except RuntimeError as error:\n    print('refused:', error)")
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    environment = {**plain, "RAY_AUTH_TOKEN": "0" * 64, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                   "RAY_NUM_REDIS_GET_RETRIES": "2"}  # Ray retries 20 times, a second apart, before it gives up
    said = subprocess.run([sys.executable, "-c", join], env=environment, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    [line] = [line for line in said.stdout.splitlines() if line.startswith("refused:")]
    assert f"the Ray cluster at {ray_env.cluster.address} refused this driver's token" in line, said.stdout
    assert "RAY_AUTH_TOKEN_PATH" in line and "ray get-auth-token" in line and "Traceback" not in said.stdout


def test_an_address_where_nothing_listens_is_refused_at_once_in_one_line(tmp_path):
    with socket.socket() as closed:  # a port that was free a moment ago: nothing listens there
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    started = time.time()
    with pytest.raises(RuntimeError) as refused:
        ray_executor.connect(f"127.0.0.1:{port}", 2)
    message = str(refused.value)
    assert time.time() - started < 15 and "\n" not in message
    assert f"nothing answers at the Ray address 127.0.0.1:{port}" in message and "ray start --head" in message


def test_a_wait_for_a_slot_says_when_the_cluster_has_fewer_than_it_started_with(ray_env):
    assert ray_executor.RayExecutor(ray_env.cluster, ray_env.fingerprint).waiting_for().endswith(
        "CPUs of the cluster free")
    started_bigger = dataclasses.replace(ray_env.cluster, slots=12)  # 12 slots when the night started, 3 now
    assert ray_executor.RayExecutor(started_bigger, ray_env.fingerprint).waiting_for() == (
        "the cluster has 3 CPUs now, of the 12 it started with: are its worker nodes gone? (`ray status` on its head "
        "node)")


def test_connecting_leaves_the_drivers_sigterm_handler_in_place(ray_env):
    assert ray_env.sigterm is on_sigterm  # ray.init puts its own there, which exits at once


# -----------------------------------------------------------------------------
# The fingerprint nodes are compared by

def test_caches_prepared_alike_on_two_machines_have_the_same_portable_fingerprint(_tiny_cache_dir, tiny_corpus,
                                                                                    tmp_path):
    corpus = shutil.copytree(tiny_corpus, tmp_path / "elsewhere" / "corpus")  # another path, other mtimes
    there = tmp_path / "cache"
    run_prepare("--text", str(corpus), *TINY, cache=there)
    here = integrity.portable_fingerprint(REPO, _tiny_cache_dir)
    assert integrity.portable_fingerprint(REPO, there) == here
    assert integrity.harness_fingerprint(REPO, there) != integrity.harness_fingerprint(REPO, _tiny_cache_dir)
    val = next((there / "tokens").glob("*-val.bin"))
    val.write_bytes(val.read_bytes()[:-2] + b"\x00\x00")
    changed = integrity.fingerprint_changes(here, integrity.portable_fingerprint(REPO, there))
    assert changed == [f"tokens/{val.name}"]


# -----------------------------------------------------------------------------
# GPU models: runs on different models are not comparable

def test_gpu_models_are_read_from_each_live_gpu_nodes_accelerator_type():
    nodes = [dict(Alive=True, Resources={"CPU": 32.0, "GPU": 8.0, "accelerator_type:H100": 1.0}),
             dict(Alive=True, Resources={"CPU": 16.0, "GPU": 4.0, "accelerator_type:A100": 1.0}),
             dict(Alive=True, Resources={"CPU": 8.0, "GPU": 1.0}),  # Ray did not know its model
             dict(Alive=True, Resources={"CPU": 64.0}),  # no GPU: no model
             dict(Alive=False, Resources={"GPU": 8.0, "accelerator_type:V100": 1.0})]  # gone
    assert ray_executor.gpu_models(nodes) == ("A100", "H100", "unknown")
    assert ray_executor.gpu_models(nodes[:1] * 2) == ("H100",)
