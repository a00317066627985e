"""Shared test support: a tiny prepared cache, a local stand-in for the Hugging Face hub, and the Night
(a temp repository for agent_loop.py, tests/agent_loop_support/night_repo.py) as the `night` fixture."""

import getpass
import http.server
import importlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "agent_loop_support"))  # the fakes and helpers, imported by name

# Bytecode compiled once per machine, not once per process: the tests start dozens of Python processes (train.py,
# prepare.py, the loop, Ray's workers), each importing torch and the SDKs, and with PYTHONDONTWRITEBYTECODE (set
# on some machines, this development box among them) each compiled them from source again: 2 s more per torch import.
# The cache lives outside the checkout and outside the venv; Python checks each entry against its source.
PYCACHE = Path(tempfile.gettempdir()) / f"autoresearch-tests-pycache-{getpass.getuser()}"
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
sys.dont_write_bytecode, sys.pycache_prefix = False, str(PYCACHE)
# One thread per process: two test processes share this 2-core machine, each starting train.py, its probe run and the
# scorer, all importing torch. With a thread per core each, OpenMP's threads spin against each other's: the three
# end-to-end tests took 186 s side by side, 84 s with this (2026-12-05, dev/LOG.md).
os.environ["OMP_NUM_THREADS"] = "1"
TINY = ["--vocab-size", "512", "--max-seq-len", "64", "--eval-tokens", "4096", "--time-budget", "2"]

# The user's own caches: every test works in its temp dir, so the suite fails if one of these, or an entry in
# one, appears.
USERS_CACHES = [Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch"),
                Path.home() / ".cache" / "autoresearch-demo"]


def entries(folders):
    return {str(path) for folder in folders if folder.exists() for path in [folder, *folder.iterdir()]}


BEFORE = entries(USERS_CACHES)


def pytest_collection_modifyitems(items):
    """The slow end-to-end tests first: each test process starts one at once, instead of the last file's keeping
    one process busy after the other has finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session):
    if made := sorted(entries(USERS_CACHES) - BEFORE):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nFAILED: the tests made {', '.join(made)}, outside their temp dirs", file=sys.stderr)

WORDS = (
    "the a model learns tokens from text and data while training runs overnight on one small GPU "
    "loss falls slowly because every step counts research agent edits code café naïve déjà vu "
    "Привет мир 你好 世界 こんにちは 🤖 🚀 def return import class 0 1 2 3 42 1024"
).split()


def make_documents(n, seed=0, min_words=5, max_words=400):
    """Deterministic documents of varied length, with multi-byte characters."""
    rng = random.Random(seed)
    invented = ["".join(rng.choice("etaoinshrdlucmfwyp") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    vocabulary = WORDS + invented
    return [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(min_words, max_words))) + "." for _ in range(n)]


def write_parquet(path, texts, row_group_size=None, column="text"):
    pq.write_table(pa.table({column: texts}), path, row_group_size=row_group_size)
    return path


def run_prepare(*args, cache, env_extra=None, check=True, timeout=120):
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), **(env_extra or {})}
    result = subprocess.run([sys.executable, str(REPO / "prepare.py"), *args], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"prepare.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    docs = make_documents(600)
    for i, text in enumerate(docs[:300]):
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    with open(folder / "more.jsonl", "w", encoding="utf-8") as f:
        for text in docs[300:]:
            f.write(json.dumps({"text": text}) + "\n")
    return folder


@pytest.fixture(scope="session")
def _tiny_cache_dir(tmp_path_factory, tiny_corpus):
    cache = tmp_path_factory.mktemp("cache")
    run_prepare("--text", str(tiny_corpus), *TINY, cache=cache)
    return cache


@pytest.fixture
def tiny_cache(_tiny_cache_dir, monkeypatch):
    """A prepared tiny cache (MAX_SEQ_LEN 64, VOCAB_SIZE 512, EVAL_TOKENS 4096, TIME_BUDGET 2):
    AUTORESEARCH_CACHE points at it, for this process and its subprocesses. Don't modify it."""
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(_tiny_cache_dir))
    return _tiny_cache_dir


@pytest.fixture
def prepare_module(tiny_cache):
    """prepare.py imported with the tiny cache's constants (and reloaded back afterwards)."""
    import prepare

    importlib.reload(prepare)
    yield prepare
    importlib.reload(prepare)


# --- a local stand-in for the Hugging Face hub -------------------------------------------------


class Hub:
    """Serves files at /datasets/<repo>/resolve/main/<name>, with faults on request.

    fail[name] = n: answer 503 to the first n requests; truncate: names sent with half their bytes
    (but the full Content-Length); slow: names sent in small chunks with pauses (for Ctrl-C tests).
    Anything not in files is a 404. requests counts the GETs per name.
    """

    def __init__(self):
        self.files, self.fail, self.truncate, self.slow = {}, {}, set(), set()
        self.requests = {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                hub.requests[name] = hub.requests.get(name, 0) + 1
                if name not in hub.files:
                    self.send_error(404)
                    return
                if hub.fail.get(name, 0) > 0:
                    hub.fail[name] -= 1
                    self.send_error(503)
                    return
                body = hub.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in hub.truncate:
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                elif name in hub.slow:
                    for i in range(0, len(body), 256):
                        self.wfile.write(body[i : i + 256])
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add_parquet(self, name, texts, row_group_size=None):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"text": texts}), buffer, row_group_size=row_group_size)
        self.files[name] = buffer.getvalue()


@pytest.fixture
def hub():
    server = Hub()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """The stand-in harness's sources ({name: source}: fake_prepare.py, fake_scorer.py) and a cache it accepts,
    which AUTORESEARCH_CACHE names."""
    from stand_ins import FAKE_HARNESS, stand_in_cache

    monkeypatch.setenv("AUTORESEARCH_CACHE", str(stand_in_cache(tmp_path / "cache")))
    return FAKE_HARNESS


@pytest.fixture
def no_sandbox(monkeypatch):
    """This machine as one without a sandbox for train.py (macOS, Windows, an old kernel): the checks behind it."""
    from autoresearch import sandbox

    monkeypatch.setattr(sandbox, "probe", lambda: {"landlock": 0, "namespaces": False,
                                                   "missing": ["a sandbox (this test runs without one)"]})


# --- the Night: agent_loop.py in a temp repository ----------------------------------------------


@pytest.fixture(scope="session")
def pycache():
    return PYCACHE


@pytest.fixture
def night(tmp_path, pycache, monkeypatch):
    from fake_llm import FakeLLM  # here, not above: only the tests that use a Night import agent_loop
    from night_repo import Night

    llm = FakeLLM()
    night = Night(tmp_path, llm, pycache, monkeypatch)
    yield night
    llm.close()
    for pid in filter(None, night.train_pids()):  # a run a test left orphaned must not outlive it
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
