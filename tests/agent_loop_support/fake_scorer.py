"""Stand-in for scorer.py in the agent_loop tests: the real scorer's request, record and signature, with no data.

It attests the val_bpb its client (fake_prepare.evaluate_bpb) names, on the token count the prepared cache's
constants give; asked for the holdout split, half of its distance from 1.0 (half of a gain on val holds there).
Its clock starts when it reads its request, so a fake train.py that sleeps before evaluating "trains" that long.
"""
import hmac
import json
import os
import socket
import sys
import threading
import time

request = json.loads(sys.stdin.readline())
started = float(request.get("started", time.monotonic()))  # the driver's clock, as the real scorer's
split = request.get("split", "val")
record = {"format": 2, "split": split, "evaluations": [], "problems": []}
sock = socket.socket(fileno=int(request["fd"]))
threading.Thread(target=lambda: (sys.stdin.read(), sock.shutdown(socket.SHUT_RDWR)), daemon=True).start()


def write():
    mac = hmac.new(bytes.fromhex(request["key"]), json.dumps(record, sort_keys=True).encode(), "sha256").hexdigest()
    print(json.dumps({"record": record, "hmac": mac}), flush=True)


wire = sock.makefile("rwb")
try:
    for line in wire:
        asked = json.loads(line)
        if record["evaluations"]:
            record["problems"].append("evaluate_bpb was called again: one evaluation, of the final model, is allowed")
            answer = {"refused": record["problems"][-1]}
        else:
            val_bpb = asked["val_bpb"] if split == "val" else 1.0 + 0.5 * (asked["val_bpb"] - 1.0)
            manifest = json.load(open(os.path.join(os.environ["AUTORESEARCH_CACHE"], "manifest.json")))
            rows = asked["evaluate"] * manifest["max_seq_len"]
            record["evaluations"].append({
                "split": split, "first_logits": time.monotonic() - started, "seconds": 0.0, "val_bpb": val_bpb,
                "batch_size": asked["evaluate"], "seq_len": manifest["max_seq_len"],
                "tokens": manifest["eval_tokens"] // rows * rows, "bytes": 1, "future_influence": 0.0, "probes": 1,
                "repeat_difference": 0.0})
            answer = {"val_bpb": val_bpb}
        write()
        wire.write(json.dumps(answer).encode() + b"\n")
        wire.flush()
except OSError:
    pass
finally:
    write()
