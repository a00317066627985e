"""
Many runs of train.py at once on a Ray cluster (--ray): one run per task, one GPU each (a CPU slot on a cluster
without GPUs). Only a night with --ray imports this module, and it imports ray only inside its functions. The engine
drives it through RayExecutor; underneath, submit(cluster, train.py, harness, fingerprint, key, timeout) -> ref,
result(ref) -> the run's dict (or NodeMismatch, or Ray's error: is_infrastructure_failure), cancel_all(refs).

The cluster is joined with the token Ray's documentation says (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or
~/.ray/auth_token); when it cannot be, one line says why and what to do. Nodes share no filesystem: the task
carries train.py and the harness, Ray ships this package (py_modules), and each node's prepared cache must equal
the driver's (integrity.portable_fingerprint). Start Ray from the project's environment (`uv run ray start`).
"""

import functools
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

CANCEL_GRACE = 10  # seconds a cancelled run has to kill its process tree before its worker is killed


# -----------------------------------------------------------------------------
# Connecting

@dataclass(frozen=True)
class Cluster:
    address: str  # the GCS's host:port
    gpus: bool  # one GPU per run; else one CPU slot per run
    slots: int  # how many runs fit at once
    gpu_models: tuple = ()  # of the live nodes with GPUs (gpu_models)


def connect(address, num_workers):
    """Join the Ray cluster at address ("auto": RAY_ADDRESS, or the one `ray start` left on this machine), to use
    at most num_workers of its GPUs at once (all of them when num_workers is 1). Returns a Cluster; RuntimeError,
    in one line that names the cause and the fix, when it cannot be joined."""
    # Under `uv run`, Ray would copy the working directory to every worker and build a virtual environment there
    # (a minute on a 2-core machine, and the repository's state with it). Workers use the Python their node's
    # Ray runs in instead, and get this package from the driver (py_modules): a node needs no checkout of it.
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"  # read when ray is imported; set below for an earlier import
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray turns it on by itself only for clusters it finds locally
    if ":" in address:
        check_reachable(address)
    ray = _import_ray()
    try:
        context = _init(ray, address=address, log_to_driver=False, logging_level=logging.WARNING,
                        runtime_env={"py_modules": [str(Path(__file__).resolve().parent)]})
    except Exception as error:  # Ray wraps what went wrong in RuntimeError or ConnectionError, a traceback inside
        raise RuntimeError(join_failure(address, error)) from None
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    capacity = gpus or int(resources.get("CPU", 0))
    return Cluster(address=context.address_info["gcs_address"], gpus=gpus > 0,
                   slots=min(num_workers, capacity) if num_workers > 1 else capacity,
                   gpu_models=gpu_models(ray.nodes()))


def check_reachable(address, timeout=10):
    """Refuse at once an address where nothing listens: Ray itself would retry silently for minutes."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as error:
        raise RuntimeError(f"nothing answers at the Ray address {address} ({type(error).__name__}: {error}): start "
                           "the cluster's head node (`uv run ray start --head`), or check --ray (host:port of its "
                           "GCS, 6379 unless `ray start --port` said otherwise)") from None


def join_failure(address, error):
    """What went wrong when joining the cluster at address, in one line with the fix."""
    chain, seen = [], error
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    said = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    if "InvalidAuthToken" in said or "Unauthenticated" in said or "AuthenticationError" in said:
        return (f"the Ray cluster at {address} refused this driver's token: give it the cluster's token, in "
                "RAY_AUTH_TOKEN or a file named by RAY_AUTH_TOKEN_PATH (`ray get-auth-token` on the head prints it)")
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if isinstance(error, ConnectionError) or "Could not find any running Ray instance" in said:
        return (f"no Ray cluster could be joined at {address} ({first}): check that it is running (`ray status` on "
                "its head node) and the address")
    return f"Ray could not join the cluster at {address} ({type(error).__name__}: {first})"


def _import_ray():
    import ray
    import ray._private.ray_constants as constants

    # What the environment variables set before `import ray` say, also when ray was imported earlier
    constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        constants.ENABLE_RAY_CLUSTER = False
    return ray


def gpu_models(nodes):
    """The GPU models of the live nodes in ray.nodes(), from the accelerator_type:<model> resource Ray gives a node
    with GPUs ("unknown" for one without it): runs on different models are not comparable."""
    models = set()
    for node in nodes:
        resources = node.get("Resources") or {}
        if node.get("Alive") and resources.get("GPU"):
            models.update([key.split(":", 1)[1] for key in resources if key.startswith("accelerator_type:")]
                          or ["unknown"])
    return tuple(sorted(models))


def _init(ray, **options):
    # ray.init makes SIGTERM exit the driver at once: the driver's own handler (cancel the runs, close the
    # ledger) stays.
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        return ray.init(**options)
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


# -----------------------------------------------------------------------------
# One run, on a node

class NodeMismatch(Exception):
    """A node's prepare.py or prepared cache is not the driver's: its val_bpb would not be comparable."""


def run_experiment(train_source, harness, fingerprint, key_hex, timeout, cache=None, split="val", weights=False):
    """The task: one run of train.py on this node, in a fresh folder (runner.run_in_folder, as on the driver's
    machine), against this node's cache (cache None: AUTORESEARCH_CACHE of the node, or its default), with
    evaluate_bpb scoring `split`. Raises NodeMismatch unless the node's cache has the driver's portable
    `fingerprint`. Returns run_in_folder's dict, with the worker: hostname, ip, gpu, worker_pid; and when
    `weights`, the bytes of the model it scored (or None): they come back through Ray's object store, since the
    node keeps nothing of a run."""
    import ray

    from autoresearch import integrity, run_folders, runner, runs

    hostname, ip = socket.gethostname(), ray.util.get_node_ip_address()
    cache = Path(cache).expanduser() if cache else integrity.cache_dir()
    started, done, outcome = [], threading.Event(), {}
    weights_path = Path(tempfile.mkdtemp(prefix="autoresearch-weights-")) / runner.WEIGHTS_FILE if weights else None

    def target():  # in a thread: the KeyboardInterrupt of ray.cancel arrives in this (main) thread at once
        try:
            outcome["value"] = runner.run_in_folder(
                train_source, harness, key_hex, timeout, None, split, cache=cache,
                check=lambda folder, cache: _check_node(fingerprint, folder, cache, f"{hostname} ({ip})"),
                on_start=lambda process: started.append(process.pid), weights=weights_path)
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error
        done.set()

    threading.Thread(target=target, daemon=True).start()
    # An Event, not Thread.join: a join that an exception interrupts marks the thread as ended (Python 3.11)
    try:
        while not done.wait(0.2):
            pass
        if "error" in outcome:
            raise outcome["error"]
        if weights_path:
            outcome["value"]["weights"] = weights_path.read_bytes() if outcome["value"]["weights"] else None
    except BaseException:
        while not done.wait(0.1):  # until the run has started and is dead
            for pid in started:
                run_folders.kill_tree(pid)
        raise
    finally:
        if weights_path:
            shutil.rmtree(weights_path.parent, ignore_errors=True)
    gpu = runs.local_gpus()[0][1] if ray.get_gpu_ids() else "cpu"  # CUDA_VISIBLE_DEVICES is the task's GPU
    worker = dict(hostname=hostname, ip=ip, gpu=gpu, worker_pid=os.getpid())
    return dict(outcome["value"], worker=worker)


def _check_node(fingerprint, folder, cache, node):
    from autoresearch import integrity

    what_to_do = f"Run `uv run prepare.py` there with the driver's flags (AUTORESEARCH_CACHE={cache})"
    try:
        differ = integrity.fingerprint_changes(fingerprint, integrity.portable_fingerprint(folder, cache))
    except (OSError, ValueError) as error:
        raise NodeMismatch(f"node {node} has no usable prepared cache at {cache} "
                           f"({type(error).__name__}: {error}). {what_to_do}") from None
    if differ:
        raise NodeMismatch(f"node {node}: its prepared cache at {cache} is not the driver's ({', '.join(differ)} "
                           f"differ{'s' if len(differ) == 1 else ''}), so its val_bpb would not be comparable. "
                           f"{what_to_do}")


# -----------------------------------------------------------------------------
# Submitting and collecting

@functools.cache
def _task():
    import ray

    # No retry by Ray: re-running a run whose worker or node died is the engine's decision, once, on the record.
    return ray.remote(max_retries=0)(run_experiment)


def submit(cluster, train_source, harness, fingerprint, key_hex, timeout, cache=None, split="val", weights=False):
    """Start one run (run_experiment) on the cluster; returns its ObjectRef. A run takes one GPU (and no CPU
    slot: train.py's CPU use is not Ray's to ration) on a cluster with GPUs, else one CPU slot."""
    resources = dict(num_gpus=1, num_cpus=0) if cluster.gpus else dict(num_cpus=1)
    return _task().options(**resources).remote(train_source, harness, fingerprint, key_hex, timeout, cache,
                                               split, weights)


def result(ref):
    """The run's dict. Raises NodeMismatch, or Ray's error when the run did not finish (is_infrastructure_failure
    tells a dead worker or node from a cancelled run)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, NodeMismatch):
            raise error.cause from None  # its own words, not Ray's traceback of the node
        raise


def is_infrastructure_failure(error):
    """Whether a run ended because its worker process or node died, not because of the idea: it may run again.
    Ray's memory monitor kills a worker when its node runs short of memory, which another run may have caused."""
    import ray.exceptions as failed

    return isinstance(error, (failed.WorkerCrashedError, failed.NodeDiedError, failed.LocalRayletDiedError,
                              failed.OutOfMemoryError, failed.ObjectLostError))


def cancel_all(refs):
    """Stop every run (Ctrl-C, SIGTERM): a cancel first, on which each task kills its train.py's process tree;
    then, for a task still running after CANCEL_GRACE seconds, a force-cancel that kills its worker."""
    import ray

    refs = list(refs)
    for ref in refs:
        ray.cancel(ref)
    _, running = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE) if refs else ([], [])
    for ref in running:
        ray.cancel(ref, force=True)


def keep_weights(data, path):
    """A worker's weights written where the night keeps a run's, whole; their path, or None when the disk refused
    them (the run goes on without)."""
    from autoresearch import weights

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        weights.replace_with(path, lambda partial: partial.write_bytes(data))
    except OSError:
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        return None
    return str(path)


# -----------------------------------------------------------------------------
# The engine's executor

class RayExecutor:
    """Runs on the cluster's workers, for the engine (runs.Runs): as many at once as the cluster has slots."""
    remote = True

    def __init__(self, cluster, fingerprint):
        self.cluster, self.fingerprint, self.slots = cluster, fingerprint, cluster.slots
        self.pending = {}  # Ray ref: (key, request)

    @property
    def device_type(self):  # as train.py sees it on a worker
        return "cuda" if self.cluster.gpus else "cpu"

    def describe(self):
        kind = "GPU" if self.cluster.gpus else "CPU"
        return f"{self.slots} at once on Ray at {self.cluster.address}, one {kind} each"

    def free_slots(self):
        return self.slots - len(self.pending)

    def submit(self, key, request):
        ref = submit(self.cluster, request.train_source, request.harness, self.fingerprint, request.key_hex,
                     request.timeout, split=request.split, weights=request.weights is not None)
        self.pending[ref] = (key, request)

    def wait(self, timeout):
        """The runs that ended within timeout seconds: every one that has, once at least one has."""
        import ray

        refs = list(self.pending)
        done = ray.wait(refs, num_returns=len(refs), timeout=0)[0] if ray.wait(refs, timeout=timeout)[0] else []
        ended = []
        for ref in done:
            key, request = self.pending.pop(ref)
            try:
                outcome = result(ref)
                request.log_path.write_text(outcome["log"])
                if outcome.get("weights"):  # the bytes, from the worker: kept where a local run's go
                    outcome["weights"] = keep_weights(outcome["weights"], request.weights)
            except NodeMismatch as error:  # a node prepared otherwise: the night stops, saying what to run there
                from autoresearch.console import fail

                fail(str(error))
            except Exception as error:  # the engine sends it again when its worker or node died
                outcome = error
            ended.append((key, outcome))
        return ended

    def is_infrastructure_failure(self, error):
        return is_infrastructure_failure(error)

    def cancel(self, key):  # the task kills its run's process tree; the engine does not wait for it
        import ray

        for ref in [ref for ref, (sent, _) in self.pending.items() if sent == key]:
            del self.pending[ref]
            ray.cancel(ref)

    def cancel_all(self):
        cancel_all(list(self.pending))
        self.pending.clear()

    def waiting_for(self):
        """Why runs may wait for a worker: the cluster's capacity now, when it is below what the night started with."""
        import ray

        kind = "GPU" if self.cluster.gpus else "CPU"
        now, free = (int(resources().get(kind, 0)) for resources in (ray.cluster_resources, ray.available_resources))
        if now < self.slots:
            return (f"the cluster has {now} {kind}s now, of the {self.slots} it started with: are its worker nodes "
                    "gone? (`ray status` on its head node)")
        return f"{free} {kind}s of the cluster free"

    def close(self):
        import ray

        ray.shutdown()  # leave the cluster
