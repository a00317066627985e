"""Stand-in for scorer.py in the agent_loop tests: the real scorer's request, record and signature, with no data.

It attests the val_bpb its client (fake_prepare.evaluate_bpb) names, on the token count the prepared cache's
constants give; asked for the holdout split, half of its distance from 1.0 (half of a gain on val holds there).
Its clock starts when it reads its request, so a fake train.py that sleeps before evaluating "trains" that long.
It keeps the weights its client hands over; when its client asks for it ("probe": true), it then waits for the probe
run, as the real scorer always does, and answers its one request.
"""
import hmac
import json
import os
import shutil
import socket
import sys
import threading
import time

request = json.loads(sys.stdin.readline())
started = float(request.get("started", time.monotonic()))  # the driver's clock, as the real scorer's
split = request.get("split", "val")
record = {"format": 3, "split": split, "evaluations": [], "problems": [], "stage": "scoring"}
sock = socket.socket(fileno=int(request["fd"]))


def listen():  # "ended": train.py's run is over; EOF: the whole run is
    for line in sys.stdin:
        if line.strip() == "ended":
            break
    sock.shutdown(socket.SHUT_RDWR)


threading.Thread(target=listen, daemon=True).start()


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
                "tokens": manifest["eval_tokens"] // rows * rows, "bytes": 1,
                "probe": {"rows": 8, "future_influence": 0.0, "seconds": 0.0, "run": "apart"}})
            if asked.get("weights") and request.get("weights"):  # kept as the real scorer keeps them
                shutil.copyfile(asked["weights"], request["weights"]["path"])
            if asked.get("probe") and request.get("probe_fd"):
                record["evaluations"][-1]["probe"] = None  # until the probe run has asked
            answer = {"val_bpb": val_bpb}
        write()
        wire.write(json.dumps(answer).encode() + b"\n")
        wire.flush()
    if record["evaluations"] and record["evaluations"][-1]["probe"] is None:
        record["stage"] = "probe"
        write()
        probe = socket.socket(fileno=int(request["probe_fd"])).makefile("rwb")
        line = probe.readline()
        if line:
            record["evaluations"][-1]["probe"] = {"rows": 8, "future_influence": 0.0, "seconds": 0.0, "run": "apart"}
            write()
            probe.write(json.dumps({"val_bpb": record["evaluations"][-1]["val_bpb"]}).encode() + b"\n")
            probe.flush()
        else:
            record["unfinished"] = "the probe run ended before it asked for the rows to score"
except OSError:
    pass
finally:
    record["stage"] = "final"
    write()
