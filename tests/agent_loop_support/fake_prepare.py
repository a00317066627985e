"""Stand-in for prepare.py in the agent_loop tests: the client's side of the scorer's protocol, with no data and no
model (fake_scorer.py is the other side).

`evaluate_bpb(val_bpb)` asks the scorer (the driver's, through $AUTORESEARCH_SCORER_FD) to attest `val_bpb` as if it
had measured it, and with `probe=True` to wait for the probe run; run by hand, with no scorer, it returns `val_bpb`.
Asked to, it saves a "model" where $AUTORESEARCH_SAVE_WEIGHTS says before the evaluation, as the real harness does:
one tensor, the val_bpb.
"""
import json
import os
import socket
import struct

TIME_BUDGET = 1
_scorer = None


def evaluate_bpb(val_bpb, probe=False):
    global _scorer
    if not os.environ.get("AUTORESEARCH_SCORER_FD"):
        return val_bpb
    if _scorer is None:
        _scorer = socket.socket(fileno=int(os.environ["AUTORESEARCH_SCORER_FD"])).makefile("rwb")
    weights = os.environ.get("AUTORESEARCH_SAVE_WEIGHTS")
    if weights:  # written by hand: importing numpy would add 0.3 s to each run
        header = json.dumps({"val_bpb": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(weights, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + struct.pack("<d", val_bpb))
    _scorer.write(json.dumps({"evaluate": 8, "val_bpb": val_bpb, "weights": weights, "probe": probe}).encode()
                  + b"\n")
    _scorer.flush()
    answer = json.loads(_scorer.readline())
    if "refused" in answer:
        raise ValueError(answer["refused"])
    return answer["val_bpb"]
