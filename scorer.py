"""
The scorer: the process that holds the validation tokens and the run's key, and computes val_bpb.

- The driver starts it beside train.py's process (autoresearch/runner.py), in a folder train.py does not work in,
  with one JSON line on stdin: {"key": HEX, "fd": N, "split": "val" or "holdout", "started": CLOCK, and with a
  probe run "probe_fd": M, "weights": {"path": P, "limit": BYTES}}. fd N is its end of a Unix socket to train.py's
  process; fd M, to the probe run's. By hand, prepare.evaluate_bpb starts one itself, with no probe run.
- It serves one evaluation and refuses a second. evaluate_bpb (prepare.py) is its client: the scorer sends input
  rows, receives the model's logits through shared memory, and computes the cross-entropy itself. The client
  never sees a target it could not already see in its inputs. Its clock is the driver's: the request's "started"
  is when train.py's process started, and the time that counts is when the first logits came back.
- Causality, with probes the model cannot tell from data nor remember: of every scored batch, a share of the rows
  get a spliced copy, its tail from a random position replaced by validation text that is never scored; the loss
  before the splice must not move. With the driver, train.py hands over its model's weights (a file, kept at
  "weights") before any row goes out, and the copies are scored by the probe run: a second run of train.py that
  loads those weights and never saw the scored rows. So a model that looks ahead, that remembers the rows it was
  shown to answer their copies alike, or that changed after it handed its weights over, is refused. By hand, the
  copies follow the scored rows in the same process.
- It prints its record, signed with HMAC-SHA256 under the key, as one JSON line on stdout: as it goes, then, once
  the driver says train.py's run has ended ("ended" on stdin), with "stage" "probe" when it waits for the probe
  run, and last with "stage" "final" (when its stdin closes). The driver takes the last line.
"""

import functools
import hmac
import json
import math
import mmap
import os
import secrets
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import prepare  # the copy beside this file (the driver's, never train.py's)

RECORD_FORMAT = 3
# Of each scored batch, the share of rows that get a spliced copy: the probe run scores them, which costs that share of
# the evaluation's compute
PROBE_SHARE = 0.25
PROBE_ROWS = 64  # and at least this many rows (all of a smaller evaluation): the largest move is over more rows
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
    """One evaluation of `batch_size` rows per batch: the scored rows (`score`), then the spliced copies of some
    (`probe`), each over the wire of the process that runs the model."""

    def __init__(self, rows, token_bytes, batch_size):
        import torch

        self.torch = torch
        T = prepare.MAX_SEQ_LEN
        self.B, self.T = batch_size, T
        self.steps = prepare.EVAL_TOKENS // (batch_size * T) if isinstance(batch_size, int) and batch_size > 0 else 0
        if self.steps < 1:
            raise Refused(f"evaluate_bpb: batch_size {batch_size!r} x MAX_SEQ_LEN {T} must be a positive int no "
                          f"larger than EVAL_TOKENS {prepare.EVAL_TOKENS}")
        n = self.steps * batch_size
        self.real = rows[:n]
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        # rows of every batch, then more to fill the probe run's last batch
        share = min(batch_size, math.ceil(max(PROBE_SHARE * n, PROBE_ROWS) / self.steps))
        probed = [step * batch_size + j for step in range(self.steps)
                  for j in torch.randperm(batch_size, generator=generator)[:share].tolist()]
        others = sorted(set(range(n)) - set(probed))
        fill = -len(probed) % batch_size
        probed += [others[i] for i in torch.randperm(len(others), generator=generator)[:fill].tolist()]
        self.probed = torch.tensor(probed)[torch.randperm(len(probed), generator=generator)]  # in the probes' order
        self.spliced, self.cuts = splice(self.real[self.probed], rows[n:n + len(probed)], generator)
        self.token_bytes = token_bytes
        self.memory, self.first_logits = None, None
        self.kept = dict.fromkeys(probed)  # a probed row: its loss, once scored
        self.moved, self.nats, self.bytes = 0.0, 0.0, 0

    def score(self, wire):
        """The scored rows, in order: val_bpb's sums, and the losses of the rows to be probed."""
        print(EVALUATION_BEGINS, file=sys.stderr, flush=True)
        for step in range(self.steps):
            rows = self.real[step * self.B:(step + 1) * self.B]
            losses = self.losses(wire, rows)
            nbytes = self.token_bytes[rows[:, 1:]]
            self.nats += (losses.double() * (nbytes > 0)).sum().item()
            self.bytes += nbytes.sum().item()
            for j, loss in enumerate(losses):
                if step * self.B + j in self.kept:
                    self.kept[step * self.B + j] = loss
            self.progress("evaluated", step, self.steps)

    def probe(self, wire):
        """The spliced copies, compared before their splice with the rows they were made from."""
        batches = len(self.probed) // self.B
        for number in range(batches):
            picks = range(number * self.B, (number + 1) * self.B)
            rows = self.probed[picks.start:picks.stop]
            losses = self.losses(wire, self.spliced[picks.start:picks.stop], self.real[rows, 1:])
            for i, loss in zip(picks, losses):
                self.compare(int(self.probed[i]), int(self.cuts[i]), loss)
            self.progress("probed", number, batches)

    def progress(self, done, number, count):
        if (number + 1) * 10 // count > number * 10 // count:  # each tenth
            print(f"scorer: {done} {number + 1} of {count} batches", file=sys.stderr, flush=True)

    def losses(self, wire, rows, targets=None):
        """Per-row cross-entropy (nats) of the logits the client sends back for rows[:, :-1], against `targets`
        (by default the rows' own next tokens)."""
        F = self.torch.nn.functional
        wire.send({"inputs": [self.B, self.T]}, rows[:, :-1].contiguous().numpy().tobytes())
        logits = self.receive_logits(wire)
        targets = (rows[:, 1:] if targets is None else targets).to(logits.device)
        with self.torch.no_grad():
            return self.torch.cat([F.cross_entropy(chunk.float().flatten(0, 1), goal.flatten(), reduction="none")
                                   .view(goal.shape).cpu() for chunk, goal in zip(logits.split(CHUNK_ROWS),
                                                                                  targets.split(CHUNK_ROWS))])

    def receive_logits(self, wire):
        torch = self.torch
        header, _, fds = wire.receive(0)
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
            self.close()
            self.memory = mmap.mmap(fds[0], os.fstat(fds[0]).st_size)
            for fd in fds:
                os.close(fd)
        if self.memory is None or len(self.memory) < count * dtype.itemsize:
            raise Refused("evaluate_bpb: the logits' shared memory is smaller than the logits")
        return torch.frombuffer(self.memory, dtype=dtype, count=count).view(shape)

    def close(self):
        if self.memory is not None:
            self.memory.close()
        self.memory = None

    def compare(self, row, cut, loss):
        """A scored row and its spliced copy agree before the splice, or the model looks ahead (or changed)."""
        moved = (loss[:cut] - self.kept[row][:cut]).abs().max().item()
        self.moved = max(self.moved, moved)
        if not moved <= prepare.CAUSALITY_TOLERANCE:
            raise Refused(f"evaluate_bpb refuses to score this model: on a row whose tokens from position {cut} on "
                          f"were replaced by other text, its loss at earlier positions moved by {moved:.3g} nats, "
                          "so it looks at future tokens (or it changed while it was evaluated: it must not learn "
                          "from the text it is scored on, nor differ from the weights it handed over) and its "
                          "val_bpb would be meaningless. Keep attention causal (and nothing else mixing positions "
                          "forward)", non_causal=True)

    def result(self):
        return {"batch_size": self.B, "seq_len": self.T, "tokens": self.steps * self.B * self.T, "bytes": self.bytes,
                "val_bpb": self.nats / (math.log(2) * self.bytes) if self.bytes else None, "probe": None}

    def probe_result(self, seconds, apart):
        """What the record says of the probes: how many rows, the largest move before a splice, in which run."""
        return {"rows": len(self.probed), "future_influence": self.moved, "seconds": seconds,
                "run": "apart" if apart else "same process"}


# -----------------------------------------------------------------------------
# The process


class Scorer:
    def __init__(self, request):
        self.key, self.split = bytes.fromhex(request["key"]), request.get("split", "val")
        self.started = float(request.get("started", time.monotonic()))  # the driver's clock: train.py's start
        self.weights = request.get("weights")  # with a probe run: where the weights handed over are kept
        self.record = {"format": RECORD_FORMAT, "split": self.split, "evaluations": [], "problems": [],
                       "unfinished": None, "stage": "scoring"}
        self.ready, self.prepared, self.error, self.pending = threading.Event(), None, None, None
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
        header, fds = self.receive(wire)
        if header is None:
            return
        if "evaluate" not in header:
            return self.problem("evaluate_bpb sent the scorer a message out of turn")
        if self.evaluate(wire, header, fds) and self.receive(wire)[0] is not None:
            self.problem("evaluate_bpb was called again: one evaluation, of the final model, is allowed (more would "
                         "select on the validation data)")
            try:
                wire.send({"refused": self.record["problems"][-1]})
            except OSError:
                pass

    def receive(self, wire):
        """The client's next request and the file descriptors with it ((None, []): it has gone, or broke the
        protocol, which the record says)."""
        try:
            header, _, fds = wire.receive(0)
        except Exception as error:  # noqa: BLE001 -- whatever the bytes, the record says so
            self.problem(f"evaluate_bpb's messages to the scorer were malformed ({type(error).__name__})")
            return None, []
        return header, fds

    def evaluate(self, wire, header, fds):
        """Serve the evaluation (with no probe run, its probes too); whether it finished."""
        self.ready.wait()
        if self.error is not None:
            raise self.error
        rows, token_bytes = self.prepared
        started, evaluation, result = time.monotonic(), None, {}

        def scored():
            nonlocal evaluation
            if self.weights is not None:
                self.keep_weights(header, fds)
            evaluation = Evaluation(rows, token_bytes, header["evaluate"])
            evaluation.score(wire)
            result.update(evaluation.result())
            if self.weights is None:
                probing = time.monotonic()
                evaluation.probe(wire)
                result["probe"] = evaluation.probe_result(time.monotonic() - probing, apart=False)

        try:
            finished = self.attempt(wire, scored)
        finally:
            for fd in fds:
                os.close(fd)
            if evaluation is not None:
                evaluation.close()
        if not finished:
            return False
        entry = {"split": self.split, "first_logits": evaluation.first_logits - self.started,
                 "seconds": time.monotonic() - started, **result}
        self.record["evaluations"].append(entry)
        self.pending = (evaluation, entry) if self.weights is not None else None
        self.write()
        wire.send({"val_bpb": result["val_bpb"]})
        return True

    def attempt(self, wire, step, whose=""):
        """step(); whether it finished. A refusal goes into the record's problems and back to the client; any other
        error (the client crashed, was killed, or sent what cannot be read) is the record's `unfinished`."""
        try:
            step()
            return True
        except Refused as refused:
            self.problem(str(refused))
            wire.send({"refused": str(refused), "non_causal": refused.non_causal})
        except Exception as error:  # noqa: BLE001 -- whatever the client did, the record says so
            self.record["unfinished"] = f"{whose}{type(error).__name__}: {str(error)[:200]}"
            self.write()
        return False

    def keep_weights(self, header, fds):
        """Keep a copy of the weights train.py's process handed over with its request, before any row goes out: the
        probe run scores the spliced copies with them. A regular file of at most the limit, or the run is refused."""
        if not fds or not stat.S_ISREG(os.fstat(fds[0]).st_mode):
            raise Refused("evaluate_bpb must hand the scorer the model's weights (a file) before the evaluation, "
                          "for the probe run to load; it handed none" + (f" ({str(header['weights_error'])[:200]})"
                                                                         if header.get("weights_error") else ""))
        path, limit = Path(self.weights["path"]), int(self.weights["limit"])
        partial, offset = path.with_name(path.name + ".tmp"), 0
        with open(partial, "wb") as copy:
            while chunk := os.pread(fds[0], 1 << 20, offset):
                offset += len(chunk)
                if offset > limit:
                    break
                copy.write(chunk)
        if offset > limit:
            partial.unlink()
            raise Refused(f"evaluate_bpb: the model's weights are over {limit} bytes, which the scorer keeps at most")
        partial.rename(path)

    def serve_probe(self, wire):
        """The probe run: the spliced copies, scored by a second run of train.py with the weights handed over."""
        evaluation, entry = self.pending
        header, fds = self.receive(wire)
        for fd in fds:
            os.close(fd)
        if header is None or "evaluate" not in header:
            self.record["unfinished"] = "the probe run ended before it asked for the rows to score"
            return
        started = time.monotonic()
        try:
            if not self.attempt(wire, lambda: evaluation.probe(wire), "the probe run: "):
                return
        finally:
            evaluation.close()
        entry["probe"] = evaluation.probe_result(time.monotonic() - started, apart=True)
        self.write()
        wire.send({"val_bpb": entry["val_bpb"]})

    def problem(self, why):
        self.record["problems"].append(why)
        self.write()

    def write(self):
        mac = hmac.new(self.key, json.dumps(self.record, sort_keys=True).encode(), "sha256").hexdigest()
        sys.stdout.write(json.dumps({"record": self.record, "hmac": mac}) + "\n")
        sys.stdout.flush()


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def main():
    request = json.loads(sys.stdin.readline())
    scorer = Scorer(request)
    sock = socket.socket(fileno=int(request["fd"]))
    probe = socket.socket(fileno=int(request["probe_fd"])) if "probe_fd" in request else None

    def listen():  # "ended": train.py's run is over (something it started may still hold its end); EOF: the run is
        for line in sys.stdin:
            if line.strip() == "ended":
                _shut(sock)
        for each in (sock, probe):
            if each is not None:
                _shut(each)

    threading.Thread(target=listen, daemon=True).start()
    try:
        scorer.serve(prepare.Wire(sock))
        _shut(sock)  # train.py's process reads nothing more from us, whatever it asks
        if probe is not None and scorer.pending and not scorer.record["problems"]:  # a refused run needs none
            scorer.record["stage"] = "probe"
            scorer.write()
            print("scorer: the probe run begins", file=sys.stderr, flush=True)
            scorer.serve_probe(prepare.Wire(probe))
    finally:
        scorer.record["stage"] = "final"
        scorer.write()


if __name__ == "__main__":
    main()
