"""dev/gpu_check.py in its --dry-run: the GPU check's own path (prepare, a night, the weights scored again, the
table) on the CPU with the tests' tiny cache, in a fresh git repository holding this checkout's files."""

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO
from test_try_it_now import FILES, PACKAGE


@pytest.mark.slow
def test_the_gpu_check_s_dry_run_passes_and_prints_its_table(tmp_path, tiny_cache):
    repo = tmp_path / "autoresearch"
    (repo / "dev").mkdir(parents=True)
    for name in (*FILES, "dev/gpu_check.py"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / PACKAGE, repo / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@example.com"]
    for command in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "autoresearch"]):
        subprocess.run(git + command, cwd=repo, check=True)
    before = sorted(p.name for p in tiny_cache.rglob("*"))
    logs = tmp_path / "logs.tar.gz"
    result = subprocess.run([sys.executable, "dev/gpu_check.py", "--dry-run", "--prepared", str(tiny_cache), "--logs",
                             str(logs)], cwd=repo, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    table = dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", result.stdout, re.MULTILINE))
    assert table["GPU"] == "cpu" and table["integrity"].startswith("valid (future influence")
    assert "scoring 64 spliced rows" in table["probe run"]
    assert table["attention"] != "not printed" and float(table["tok/s"].split()[0].replace(",", "")) > 0
    assert table["night"].startswith("#0 keep") and "#1 " in table["night"]
    assert table["best weights"].endswith("MB")
    # the best's weights, loaded into its commit's train.py, score what its run did
    again, scored = map(float, re.match(r"(\S+) \(its run scored (\S+):", table["best, scored again"]).groups())
    assert abs(again - scored) < 1e-4
    assert result.stdout.rstrip().endswith("gpu_check: passed")
    assert sorted(p.name for p in tiny_cache.rglob("*")) == before  # it used the cache as it was
    with tarfile.open(logs) as archive:
        names = set(archive.getnames())
    assert {"night.log", "rescore.log", "night/ledger.jsonl", "night/logs/1.log"} <= names, names
    assert not list(tmp_path.glob("**/gpu-check"))  # its clone, and the tag in it, are gone


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # on the CPU, here: unfused
def test_the_stand_in_for_the_reference_s_flash_attention_is_causal_attention_in_its_window(tmp_path, monkeypatch):
    import importlib.util

    import torch

    monkeypatch.syspath_prepend(str(REPO / "dev"))
    import gpu_check

    (tmp_path / "kernels.py").write_text(gpu_check.KERNELS_STAND_IN)
    spec = importlib.util.spec_from_file_location("kernels", tmp_path / "kernels.py")
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = kernels  # as the reference's import finds it
    try:
        spec.loader.exec_module(kernels)
        attention = kernels.get_kernel("varunneal/flash-attention-3").flash_attn_interface.flash_attn_func
    finally:
        del sys.modules["kernels"]
    q, k, v = (torch.randn(2, 256, 2, 16) for _ in range(3))  # [B, T, heads, head_dim], as Flash Attention takes them
    distance = torch.arange(256)[:, None] - torch.arange(256)[None, :]
    for window in (40, 256):
        allowed = (distance >= 0) & (distance <= window)  # key j seen from query i iff i - window <= j <= i
        expected = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=allowed).transpose(1, 2)
        assert torch.allclose(attention(q, k, v, causal=True, window_size=(window, 0)), expected, atol=1e-5)


def test_the_gpu_s_busy_seconds_in_each_run_are_counted_from_nvidia_smi_s_samples(monkeypatch):
    import datetime

    monkeypatch.syspath_prepend(str(REPO / "dev"))
    import gpu_check

    # a run from 12:00:00 to 12:00:10: idle for 4 s (compiling), then busy; samples every 0.5 s
    start = datetime.datetime(2026, 12, 5, 12, 0, 0)
    samples = "timestamp, utilization.gpu [%]\n" + "".join(
        f"{start + datetime.timedelta(seconds=0.5 * i):%Y/%m/%d %H:%M:%S.%f}, {0 if i < 8 else 97}\n" for i in range(24))
    spans = [(start, start + datetime.timedelta(seconds=10)), (start, start + datetime.timedelta(seconds=3))]
    assert gpu_check.busy_seconds(samples, spans) == [6.5, 0.0]  # samples at 4.0 .. 10.0 s inclusive
    assert gpu_check.busy_seconds("", spans) == [None, None]
