"""
The scorer: the process that holds the validation tokens and the run's key, and computes val_bpb.

- The driver starts it beside train.py's process (autoresearch/runner.py), in a folder train.py does not work in,
  with one JSON line on stdin: {"key": HEX, "fd": N, "split": "val" or "holdout"}. Its clock starts then. fd N is
  its end of a Unix socket; train.py's process holds the other. By hand, prepare.evaluate_bpb starts one itself.
- It serves one evaluation and refuses a second. evaluate_bpb (prepare.py) is its client: the scorer sends input
  rows, receives the model's logits through shared memory, and computes the cross-entropy itself. The client
  never sees a target it could not already see in its inputs. Its clock is the driver's: the request's "started"
  is when train.py's process started, and the time that counts is when the first logits came back.
- Causality on every batch: beside each scored row goes a spliced copy, its tail from a random position replaced
  by validation text that is never scored, the two shuffled among the others of their step; the loss before the
  splice must not move. One batch goes twice, the second time last and reordered: a model that changed in between
  (it learned from the text it was scored on) scores it differently.
- It prints its record, signed with HMAC-SHA256 under the key, as one JSON line on stdout, after the evaluation
  and when the run ends (its socket closes, or its stdin does). The driver takes the last line.
"""

import functools
import hmac
import json
import math
import mmap
import os
import secrets
import socket
import sys
import threading
import time

import prepare  # the copy beside this file (the driver's, never train.py's)

RECORD_FORMAT = 2
# Written into the run's log as the evaluation begins: the driver shows the agent nothing train.py printed after it,
# which could hold validation text (autoresearch/runner.py has the same line).
EVALUATION_BEGINS = "scorer: the evaluation begins; what the run prints from here on is not shown to the agent"
CHUNK_ROWS = 8  # rows whose fp32 log-softmax is computed at once: the whole batch's would double its memory
DTYPES = ("float32", "bfloat16", "float16")

# -----------------------------------------------------------------------------
# The rows: scored rows, then as many rows of never-scored text for the splices


def validation_rows(split, count):
    """The first `count` rows (T+1 tokens each) of the split's stream, as evaluate_bpb's batches hold them."""
    import torch

    loader = prepare._loader(64, prepare.MAX_SEQ_LEN, split, device="cpu")
    rows = []
    while len(rows) * 64 < count:
        x, y, _ = next(loader)
        rows.append(torch.cat([x, y[:, -1:]], dim=1))
    return torch.cat(rows)[:count]


def splice(real, tails, generator):
    """Each row of `real` with its tokens from a random position on replaced by a row of `tails` (which starts with
    BOS, as a packed document does); returns the rows and where each splice starts."""
    import torch

    T = real.shape[1] - 1
    cuts = torch.randint(1, T, (real.shape[0],), generator=generator)
    spliced = real.clone()
    for i, cut in enumerate(cuts.tolist()):
        spliced[i, cut:] = tails[i, :T + 1 - cut]
    return spliced, cuts


# -----------------------------------------------------------------------------
# One evaluation


class Refused(Exception):
    def __init__(self, why, non_causal=False):
        super().__init__(why)
        self.non_causal = non_causal


def _sealed(fd):
    """Whether train.py's process can no longer shrink this memory, which would kill us (SIGBUS) as we read it:
    a memfd sealed against shrinking, of ordinary pages (a huge-page one could run out of pages under us)."""
    import fcntl

    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK != 0 and os.fstat(fd).st_dev == _memfd_device()
    except OSError:  # not a memfd
        return False


@functools.cache
def _memfd_device():
    """The device of an ordinary memfd (a huge-page one lives on another: hugetlbfs)."""
    probe = os.memfd_create("probe")
    try:
        return os.fstat(probe).st_dev
    finally:
        os.close(probe)


class Evaluation:
    """Serve one evaluation of `batch_size` rows per batch over `wire`; return what the record says of it."""

    def __init__(self, wire, rows, token_bytes, batch_size):
        import torch

        self.wire, self.torch = wire, torch
        T = prepare.MAX_SEQ_LEN
        self.B, self.T = batch_size, T
        self.steps = prepare.EVAL_TOKENS // (batch_size * T) if isinstance(batch_size, int) and batch_size > 0 else 0
        if self.steps < 1:
            raise Refused(f"evaluate_bpb: batch_size {batch_size!r} x MAX_SEQ_LEN {T} must be a positive int no "
                          f"larger than EVAL_TOKENS {prepare.EVAL_TOKENS}")
        n = self.steps * batch_size
        self.real = rows[:n]
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.spliced, self.cuts = splice(self.real, rows[n:2 * n], generator)
        self.batches = []  # each: [(spliced?, row)], B of them; a step's real rows and their copies, shuffled
        for step in range(self.steps):
            mixed = [(j >= batch_size, step * batch_size + j % batch_size)
                     for j in torch.randperm(2 * batch_size, generator=generator).tolist()]
            self.batches += [mixed[:batch_size], mixed[batch_size:]]
        self.repeated = int(torch.randint(len(self.batches), (1,), generator=generator))
        again = self.batches[self.repeated]
        self.batches.append([again[i] for i in torch.randperm(batch_size, generator=generator).tolist()])
        self.token_bytes = token_bytes
        self.memory, self.first_logits = None, None
        self.seen, self.first_losses = {}, {}  # row: (loss, batch) of its first half, until the other is compared
        self.moved, self.repeat_difference, self.nats, self.bytes = 0.0, None, 0.0, 0

    def run(self):
        print(EVALUATION_BEGINS, file=sys.stderr, flush=True)
        for number, batch in enumerate(self.batches):
            rows = self.torch.stack([(self.spliced if spliced else self.real)[row] for spliced, row in batch])
            targets = self.torch.stack([self.real[row, 1:] for _, row in batch])  # the scored row's, for both
            self.wire.send({"inputs": [self.B, self.T]}, rows[:, :-1].contiguous().numpy().tobytes())
            losses = self.losses(targets)
            if (number + 1) * 10 // len(self.batches) > number * 10 // len(self.batches):  # each tenth
                print(f"scorer: evaluated {number + 1} of {len(self.batches)} batches", file=sys.stderr, flush=True)
            if number == self.repeated:
                self.first_losses = {key: loss for key, loss in zip(batch, losses)}
            if number == len(self.batches) - 1:
                self.repeat_difference = max((loss - self.first_losses[key]).abs().max().item()
                                             for key, loss in zip(batch, losses))
                if not self.repeat_difference <= prepare.CAUSALITY_TOLERANCE:
                    raise Refused(f"evaluate_bpb refuses this model: one batch scored twice, at step {self.repeated} "
                                  f"and at the end, moved by {self.repeat_difference:.3g} nats: the model changed "
                                  "while it was evaluated (it must not learn from the text it is scored on, nor "
                                  "carry state from one batch to the next)")
                break
            for (spliced, row), loss in zip(batch, losses):
                self.compare(spliced, row, loss, number)
        return self.result()

    def losses(self, targets):
        """Per-row cross-entropy (nats) of the logits the client sends back, against `targets`."""
        F = self.torch.nn.functional
        logits = self.receive_logits()
        targets = targets.to(logits.device)
        with self.torch.no_grad():
            return self.torch.cat([F.cross_entropy(chunk.float().flatten(0, 1), goal.flatten(), reduction="none")
                                   .view(goal.shape).cpu() for chunk, goal in zip(logits.split(CHUNK_ROWS),
                                                                                  targets.split(CHUNK_ROWS))])

    def receive_logits(self):
        torch = self.torch
        header, _, fds = self.wire.receive(0)
        if header is None:
            raise EOFError
        described = header.get("logits")
        shape = described.get("shape") if isinstance(described, dict) else None
        if (not isinstance(shape, list) or len(shape) != 3 or any(type(n) is not int for n in shape)
                or shape[:2] != [self.B, self.T] or not prepare.VOCAB_SIZE <= shape[2] <= 2 * prepare.VOCAB_SIZE
                or described.get("dtype") not in DTYPES):
            raise Refused(f"evaluate_bpb: model(x) must return logits of shape [{self.B}, {self.T}, vocab] with "
                          f"VOCAB_SIZE {prepare.VOCAB_SIZE} <= vocab <= {2 * prepare.VOCAB_SIZE}, in "
                          f"{', '.join(DTYPES)}, not {str(described)[:200]}")
        dtype, count = getattr(torch, described["dtype"]), math.prod(shape)
        if self.first_logits is None:
            self.first_logits = time.monotonic()
        if fds:
            if prepare._SEALS and not _sealed(fds[0]):
                raise Refused("evaluate_bpb: the logits' shared memory must be a memfd sealed against resizing")
            if self.memory is not None:
                self.memory.close()
            self.memory = mmap.mmap(fds[0], os.fstat(fds[0]).st_size)
            for fd in fds:
                os.close(fd)
        if self.memory is None or len(self.memory) < count * dtype.itemsize:
            raise Refused("evaluate_bpb: the logits' shared memory is smaller than the logits")
        return torch.frombuffer(self.memory, dtype=dtype, count=count).view(shape)

    def compare(self, spliced, row, loss, number):
        """A scored row and its spliced copy agree before the splice, or the model looks ahead."""
        if not spliced:
            nbytes = self.token_bytes[self.real[row, 1:]]
            self.nats += (loss.double() * (nbytes > 0)).sum().item()
            self.bytes += nbytes.sum().item()
        if row not in self.seen:
            self.seen[row] = loss, number
            return
        other, other_number = self.seen.pop(row)
        cut = int(self.cuts[row])
        moved = (loss[:cut] - other[:cut]).abs().max().item()
        self.moved = max(self.moved, moved)
        if not moved <= prepare.CAUSALITY_TOLERANCE:
            raise Refused(f"evaluate_bpb refuses to score this model: on a row whose tokens from position {cut} on "
                          f"were replaced by other text, its loss at earlier positions moved by {moved:.3g} nats, "
                          "so it looks at future tokens" + (" (or it changed between two batches: it must not "
                          "learn from the text it is scored on)" if number != other_number else "")
                          + " and its val_bpb would be meaningless. Keep attention causal (and nothing else mixing "
                          "positions forward)", non_causal=True)

    def result(self):
        return {"batch_size": self.B, "seq_len": self.T, "tokens": self.steps * self.B * self.T, "bytes": self.bytes,
                "val_bpb": self.nats / (math.log(2) * self.bytes) if self.bytes else None,
                "future_influence": self.moved, "probes": len(self.real), "repeat_difference": self.repeat_difference}


# -----------------------------------------------------------------------------
# The process


class Scorer:
    def __init__(self, request):
        self.key, self.split = bytes.fromhex(request["key"]), request.get("split", "val")
        self.started = float(request.get("started", time.monotonic()))  # the driver's clock: train.py's start
        self.record = {"format": RECORD_FORMAT, "split": self.split, "evaluations": [], "problems": [],
                       "unfinished": None}
        self.ready, self.prepared, self.error = threading.Event(), None, None
        threading.Thread(target=self.prepare_rows, daemon=True).start()  # while train.py trains

    def prepare_rows(self):
        try:
            count = 2 * (prepare.EVAL_TOKENS // prepare.MAX_SEQ_LEN)
            self.prepared = validation_rows(self.split, count), prepare.get_token_bytes("cpu")
        except BaseException as error:  # noqa: BLE001 -- reported when the evaluation asks for the rows
            self.error = error
        self.ready.set()

    def serve(self, wire):
        """One evaluation. A second request is refused, and then nothing more is read: whatever train.py does next
        cannot grow the record."""
        header = self.receive(wire)
        if header is None:
            return
        if "evaluate" not in header:
            return self.problem("evaluate_bpb sent the scorer a message out of turn")
        if self.evaluate(wire, header["evaluate"]) and self.receive(wire) is not None:
            self.problem("evaluate_bpb was called again: one evaluation, of the final model, is allowed (more would "
                         "select on the validation data)")
            try:
                wire.send({"refused": self.record["problems"][-1]})
            except OSError:
                pass

    def receive(self, wire):
        """The client's next request (None: it has gone, or broke the protocol, which the record says)."""
        try:
            header, _, fds = wire.receive(0)
        except Exception as error:  # noqa: BLE001 -- whatever the bytes, the record says so
            self.problem(f"evaluate_bpb's messages to the scorer were malformed ({type(error).__name__})")
            return None
        for fd in fds:
            os.close(fd)
        return header

    def evaluate(self, wire, batch_size):
        """Serve the evaluation; whether it finished."""
        self.ready.wait()
        if self.error is not None:
            raise self.error
        rows, token_bytes = self.prepared
        started = time.monotonic()
        try:
            evaluation = Evaluation(wire, rows, token_bytes, batch_size)
            result = evaluation.run()
        except Refused as refused:
            self.problem(str(refused))
            wire.send({"refused": str(refused), "non_causal": refused.non_causal})
            return False
        except Exception as error:  # noqa: BLE001 -- train.py crashed, was killed, or sent what cannot be read
            self.record["unfinished"] = f"{type(error).__name__}: {str(error)[:200]}"
            self.write()
            return False
        self.record["evaluations"].append({"split": self.split, "first_logits": evaluation.first_logits - self.started,
                                           "seconds": time.monotonic() - started, **result})
        self.write()
        wire.send({"val_bpb": result["val_bpb"]})
        return True

    def problem(self, why):
        self.record["problems"].append(why)
        self.write()

    def write(self):
        mac = hmac.new(self.key, json.dumps(self.record, sort_keys=True).encode(), "sha256").hexdigest()
        sys.stdout.write(json.dumps({"record": self.record, "hmac": mac}) + "\n")
        sys.stdout.flush()


def main():
    request = json.loads(sys.stdin.readline())
    scorer = Scorer(request)
    sock = socket.socket(fileno=int(request["fd"]))
    # the run ends when train.py's end of the socket closes, or when the driver closes our stdin (something train.py
    # started may still hold its end)
    threading.Thread(target=lambda: (sys.stdin.read(), sock.shutdown(socket.SHUT_RDWR)), daemon=True).start()
    try:
        scorer.serve(prepare.Wire(sock))
    finally:
        scorer.write()


if __name__ == "__main__":
    main()
