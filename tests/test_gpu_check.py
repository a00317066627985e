"""dev/gpu_check.py in its --dry-run: the GPU check's own path (prepare, a night, the weights scored again, the
table) on the CPU with the tests' tiny cache, in a fresh git repository holding this checkout's files."""

import os
import re
import shutil
import subprocess
import sys

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
    result = subprocess.run([sys.executable, "dev/gpu_check.py", "--dry-run", "--prepared", str(tiny_cache)], cwd=repo,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    table = dict(re.findall(r"^\| ([^|]+?) \| (.+) \|$", result.stdout, re.MULTILINE))
    assert table["GPU"] == "cpu" and table["integrity"].startswith("valid (future influence")
    assert table["attention"] != "not printed" and float(table["tok/s"].split()[0].replace(",", "")) > 0
    assert table["night"].startswith("#0 keep") and "#1 " in table["night"]
    assert table["best weights"].endswith("MB")
    # the best's weights, loaded into its commit's train.py, score what its run did
    again, scored = map(float, re.match(r"(\S+) \(its run scored (\S+):", table["best, scored again"]).groups())
    assert abs(again - scored) < 1e-4
    assert result.stdout.rstrip().endswith("gpu_check: passed")
    assert sorted(p.name for p in tiny_cache.rglob("*")) == before  # it used the cache as it was
    assert not list(tmp_path.glob("**/gpu-check"))  # its clone, and the tag in it, are gone
