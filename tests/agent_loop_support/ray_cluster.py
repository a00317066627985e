"""A Ray cluster for the tests, started as a user starts one: `ray start --head` on 127.0.0.1 with token
authentication, its temp dir, token and HOME in folders of the test's own; stopped by killing every process that
names its temp dir (never `ray stop`, which would stop the clusters of tests running beside it)."""

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import psutil


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def ray_head(folder, cpus=3):
    """The head node's address and token, and the environment a driver joins it with (`joining`)."""
    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths are at most 107 bytes
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray keeps 127.0.0.1 as the node's address instead of the machine's
    joining = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    port = free_port()
    try:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
                        "--port", str(port), "--temp-dir", str(temp), "--num-cpus", str(cpus), "--include-dashboard",
                        "false", "--disable-usage-stats"], check=True, capture_output=True, timeout=120,
                       env={**plain, **joining, "HOME": str(folder), "RAY_USAGE_STATS_ENABLED": "0"})
        yield SimpleNamespace(address=f"127.0.0.1:{port}", token_path=token, joining=joining, temp_dir=temp)
    finally:
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if process.pid != os.getpid() and any(str(temp) in part for part in process.info["cmdline"] or []):
                    process.kill()
        shutil.rmtree(temp, ignore_errors=True)
