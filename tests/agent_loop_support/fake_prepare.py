"""Stand-in for prepare.py in the agent_loop tests: the client's side of the scorer's protocol, with no data and no
model (fake_scorer.py is the other side).

`evaluate_bpb(val_bpb)` asks the scorer (the driver's, through $AUTORESEARCH_SCORER_FD) to attest `val_bpb` as if it
had measured it; run by hand, with no scorer, it returns `val_bpb`. Scored, it saves a "model" where
$AUTORESEARCH_SAVE_WEIGHTS says, as the real harness does: one tensor, the val_bpb.
"""
import json
import os
import socket
import struct

TIME_BUDGET = 1
_scorer = None


def evaluate_bpb(val_bpb):
    global _scorer
    if not os.environ.get("AUTORESEARCH_SCORER_FD"):
        return val_bpb
    if _scorer is None:
        _scorer = socket.socket(fileno=int(os.environ["AUTORESEARCH_SCORER_FD"])).makefile("rwb")
    _scorer.write(json.dumps({"evaluate": 8, "val_bpb": val_bpb}).encode() + b"\n")
    _scorer.flush()
    answer = json.loads(_scorer.readline())
    if "refused" in answer:
        raise ValueError(answer["refused"])
    if os.environ.get("AUTORESEARCH_SAVE_WEIGHTS"):  # written by hand: importing numpy would add 0.3 s to each run
        header = json.dumps({"val_bpb": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(os.environ["AUTORESEARCH_SAVE_WEIGHTS"], "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + struct.pack("<d", answer["val_bpb"]))
    return answer["val_bpb"]
