#!/usr/bin/env bash
# dev/gpu_check.py on a lent GPU machine that has torch but not this project's other packages, and no network.
#
#   bash dev/device_gpu_check.sh prepare REFERENCE   # here: the wheels into .whl/, the reference's two files
#                                                    # (a karpathy/autoresearch checkout) into .reference/
#   bash dev/device_gpu_check.sh run [OPTIONS]       # there (carry .whl and .reference): the check, its table
#
# The wheels are for the machine's Python 3.12 (x86-64), at the versions uv.lock pins; the rest (torch,
# safetensors, numpy, pyarrow, psutil, filelock, requests, matplotlib, tiktoken) is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9
        greenlet==3.5.6 colorlog==6.12.0 mako==1.4.3 rustbpe==0.1.0"

case "${1:-}" in
  prepare)
    reference="${2:?the path of a karpathy/autoresearch checkout}"
    exclude="$(git rev-parse --git-path info/exclude)"  # also in a worktree, where .git is a file
    for folder in .whl .reference; do
      grep -qx "/$folder/" "$exclude" 2>/dev/null || echo "/$folder/" >> "$exclude"
    done
    mkdir -p .whl .reference
    # shellcheck disable=SC2086  # one word per wheel
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl $WHEELS
    cp "$reference/prepare.py" "$reference/train.py" .reference/
    du -sh .whl .reference
    ;;
  run)
    shift
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    command -v git >/dev/null || { echo "device_gpu_check: no git on this machine: the loop needs it"; exit 1; }
    if ! git rev-parse HEAD >/dev/null 2>&1; then  # the working tree came without its history
      git init -q -b main && git add -A
      git -c user.name=gpu-check -c user.email=gpu-check@localhost commit -qm "the working tree"
    fi
    python3 dev/gpu_check.py --reference .reference --logs "${OUT:-/tmp}/gpu-check-logs.tar.gz" "$@"
    ;;
  *)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
