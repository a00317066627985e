"""Stand-in for prepare.py in the agent_loop tests: the real harness's attestation protocol (see
prepare.attested_run and docs/integrity.md), with no data and no model.

`evaluate_bpb(val_bpb)` attests `val_bpb` as if the harness had measured it, on the token count the
prepared cache's constants give; asked for the holdout split, half of its distance from 1.0 (half of a
gain on val holds there). Its clock starts when the harness takes over, which counts as the
first training batch, so a fake train.py that sleeps before evaluating "trains" that long.
"""
import hmac
import json
import os
import runpy
import sys
import time

TIME_BUDGET = 1
BATCH_SIZE = 8

_started = time.monotonic()
_request = None
_record = {"format": 1, "loaders": [], "train_batches": 1, "first_train_batch": 0.0, "median_batch_gap": None,
           "evaluations": [], "violations": []}


def _write():
    mac = hmac.new(bytes.fromhex(_request["key"]), json.dumps(_record, sort_keys=True).encode(), "sha256").hexdigest()
    with open(_request["record"], "w") as f:
        json.dump({"record": _record, "hmac": mac}, f)


def evaluate_bpb(val_bpb):
    if _request:
        split = _request.get("split", "val")
        if split == "holdout":
            val_bpb = 1.0 + 0.5 * (val_bpb - 1.0)
        manifest = json.load(open(os.path.join(os.environ["AUTORESEARCH_CACHE"], "manifest.json")))
        rows = BATCH_SIZE * manifest["max_seq_len"]
        _record["evaluations"].append({
            "split": split, "started": time.monotonic() - _started, "seconds": 0.0, "val_bpb": val_bpb,
            "batch_size": BATCH_SIZE,
            "seq_len": manifest["max_seq_len"], "tokens": manifest["eval_tokens"] // rows * rows, "bytes": 1,
            "future_influence": 0.0, "causal": True})
        _write()
    return val_bpb


def attested_run(script):
    global _request
    _request = json.loads(sys.stdin.readline())
    sys.argv = [script]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        _write()
