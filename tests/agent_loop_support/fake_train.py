"""Stand-in for train.py in the agent_loop tests: it behaves as its constants say.

MODE "ok" prints the summary block with VAL_BPB - GAIN_A - GAIN_B (two ideas that edit different
lines) after SLEEP seconds, "crash" raises, "hang" sleeps. Each start appends a name of its own to the file
named by $FAKE_TRAIN_STARTS (which the tests let the sandbox write), and runs on with that name in its command line,
so tests can wait for a run and find its process. The file $FAKE_TRAIN_MODE_AT, when it exists,
holds "VAL_BPB MODE": runs of that VAL_BPB take that MODE (a commit that fails from some moment on).
"""
import os
import sys
import time
import uuid

from prepare import evaluate_bpb

if os.environ.get("FAKE_TRAIN_STARTS") and sys.argv[1:2] != ["--run"]:  # its pid in its sandbox is 1: a name
    run = uuid.uuid4().hex                                                 # the tests find in its command line
    with open(os.environ["FAKE_TRAIN_STARTS"], "a") as f:
        f.write(f"{run}\n")
    os.execv(sys.executable, [sys.executable, sys.argv[0], "--run", run])

VAL_BPB = 1.000000
GAIN_A = 0.0
PEAK_VRAM_MB = 2048.0
MODE = "ok"
GAIN_B = 0.0  # a line apart from GAIN_A: git's three-way merge takes changes of adjacent lines for a conflict
SLEEP = 0.0

print("step 00001 (1.0%) | loss: 9.0\rstep 00002 (2.0%) | loss: 8.0", flush=True)
mode_at = os.environ.get("FAKE_TRAIN_MODE_AT", "")
if os.path.exists(mode_at) and open(mode_at).read().split()[0] == str(VAL_BPB):
    MODE = open(mode_at).read().split()[1]
if MODE == "crash":
    raise RuntimeError("fake failure: CUDA out of memory")
if MODE == "hang":
    time.sleep(600)
time.sleep(SLEEP)
VAL_BPB -= GAIN_A + GAIN_B
print("---")
print(f"val_bpb:          {evaluate_bpb(VAL_BPB):.6f}")
print("training_seconds: 1.0")
print("total_seconds:    1.2")
print(f"peak_vram_mb:     {PEAK_VRAM_MB:.1f}")
print("mfu_percent:      1.00")
print("total_tokens_M:   0.1")
print("num_steps:        2")
print("num_params_M:     0.1")
print("depth:            2")
