"""
The fixed runtime harness of autoresearch: what train.py imports, and what scores it.

train.py imports the constants (MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, VOCAB_SIZE, read at import from the manifest
of the prepared cache in $AUTORESEARCH_CACHE, so train.py can read them but not change them), the Tokenizer,
make_dataloader (of the train split) and evaluate_bpb, the client of the scorer (scorer.py): the process beside
train.py's that alone reads the validation data and computes val_bpb. Three splits: train, val (what evaluate_bpb
scores) and holdout, which only the driver asks the scorer to score.
Neither the human nor the research agent edits this file during research.

    uv run prepare.py --help     # the data preparation, once, before training: prepare_data.py, data_sources.py
"""

import base64
import bisect
import contextlib
import itertools
import json
import mmap
import os
import socket
import sys
from pathlib import Path

import numpy as np
import tiktoken

# torch is imported inside the runtime helpers below: the data preparation never needs it and starts 3 s sooner.

# ---------------------------------------------------------------------------
# Constants

PRESETS = {
    # the reference's values, tuned for one H100
    "default": {"max_seq_len": 2048, "time_budget": 300, "eval_tokens": 40 * 524288, "vocab_size": 8192},
    # a laptop or this 2-core CPU: short context, small vocabulary, a quick eval
    "small": {"max_seq_len": 256, "time_budget": 30, "eval_tokens": 2**17, "vocab_size": 4096},
}

CACHE_DIR = Path(os.environ.get("AUTORESEARCH_CACHE") or Path.home() / ".cache" / "autoresearch")
DATA_DIR = CACHE_DIR / "data"            # raw downloads (the reference's layout: climbmix shards here)
TOKENIZER_DIR = CACHE_DIR / "tokenizer"
TOKENS_DIR = CACHE_DIR / "tokens"        # pre-tokenized parts, one per source file and split
MANIFEST_PATH = CACHE_DIR / "manifest.json"
MANIFEST_FORMAT = 2                      # 2: parts record split_tokens

CLIMBMIX_SHARD = "shard_{:05d}.parquet"
CLIMBMIX_VAL_SHARD = 6542                # the last shard is pinned as validation
CLIMBMIX_HOLDOUT_SHARD = 6541            # the one before it is never trained on: the holdout
TINYSTORIES_FILE = "tinystories_gpt4_clean.parquet"
SPLITS = ("train", "val", "holdout")

SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]
PACK_BUFFER = 1000                       # documents the best-fit packer chooses from
CAUSALITY_TOLERANCE = 1e-2               # nats a causal model's past loss may move when the future changes
SAVE_WEIGHTS = "AUTORESEARCH_SAVE_WEIGHTS"  # where evaluate_bpb saves the model it hands the scorer, when asked
LOAD_WEIGHTS = "AUTORESEARCH_LOAD_WEIGHTS"  # weights evaluate_bpb loads into the model before scoring it


def _read_manifest():
    try:
        return json.loads(MANIFEST_PATH.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        print(f"warning: ignoring unreadable {MANIFEST_PATH} ({e}); re-run prepare.py", file=sys.stderr)
        return None


MANIFEST = _read_manifest()
_constants = MANIFEST or PRESETS["default"]
MAX_SEQ_LEN = int(_constants["max_seq_len"])   # context length
# seconds of training wall clock; a run that only scores saved weights (LOAD_WEIGHTS) trains a moment
TIME_BUDGET = 1 if os.environ.get(LOAD_WEIGHTS) else int(_constants["time_budget"])
EVAL_TOKENS = int(_constants["eval_tokens"])   # validation tokens scored by evaluate_bpb
VOCAB_SIZE = int(_constants["vocab_size"])     # including the 4 special tokens
# {NAME: (value, the reference's value)} for each constant this cache was prepared with differently
NON_DEFAULT_CONSTANTS = {key.upper(): (int(_constants[key]), default) for key, default in PRESETS["default"].items()
                         if int(_constants[key]) != default}


class NotPreparedError(SystemExit):
    """The cache is not prepared: uncaught, it ends the program with its message (what to run) and no traceback."""


def _require_manifest():
    if MANIFEST is None:
        raise NotPreparedError(
            f"No prepared data in {CACHE_DIR} ({MANIFEST_PATH.name} is missing). Run first:\n"
            f"    uv run prepare.py\n"
            f"or, with no network:\n"
            f"    uv run prepare.py --dataset stdlib --preset small"
        )
    if MANIFEST.get("format") != MANIFEST_FORMAT:
        raise NotPreparedError(f"{MANIFEST_PATH} was written by an older prepare.py: run the same prepare.py command again")
    return MANIFEST


def _atomic_write(path, write):
    """Write through `<path>.tmp` and rename, so an interrupted run never leaves a file we'd trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Tokenizer: rustbpe training, a tiktoken Encoding at runtime, stored as JSON (no pickle)

TOKENIZER_PATH = TOKENIZER_DIR / "tokenizer.json"
TOKEN_BYTES_PATH = TOKENIZER_DIR / "token_bytes.npy"


def _encoding_from_spec(spec):
    ranks = {base64.b64decode(token): rank for rank, token in enumerate(spec["mergeable_ranks"])}
    specials = {name: len(ranks) + i for i, name in enumerate(spec["special_tokens"])}
    return tiktoken.Encoding("autoresearch", pat_str=spec["pattern"], mergeable_ranks=ranks, special_tokens=specials)


class Tokenizer:
    """The reference's tokenizer interface over a tiktoken Encoding."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.bos_token_id = encoding.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        path = Path(tokenizer_dir) / TOKENIZER_PATH.name if tokenizer_dir else TOKENIZER_PATH
        if tokenizer_dir is None:
            _require_manifest()
        return cls(_encoding_from_spec(json.loads(path.read_text())))

    def get_vocab_size(self):
        return self.encoding.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """A str gives a list of ids, a list of str a list of lists; special-token text is plain text."""
        if isinstance(text, str):
            ids = self.encoding.encode_ordinary(text)
            return ids if prepend is None else [prepend] + ids
        batch = self.encoding.encode_ordinary_batch(text, num_threads=num_threads)
        return batch if prepend is None else [[prepend] + ids for ids in batch]

    def decode(self, ids):
        return self.encoding.decode(ids)


def get_token_bytes(device="cpu"):
    import torch

    _require_manifest()
    return torch.from_numpy(np.load(TOKEN_BYTES_PATH, allow_pickle=False).astype(np.int64)).to(device)


# ---------------------------------------------------------------------------
# Pre-tokenization: each part is <name>.bin (token ids, BOS before every document) + <name>.npz
# (document offsets into the tokens, and where each DOC_BATCH batch of documents starts)


def _token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def _part_paths(name):
    return TOKENS_DIR / f"{name}.bin", TOKENS_DIR / f"{name}.npz"


def _part_is_current(name, tokenizer_sha, split_tokens):
    bin_path, index_path = _part_paths(name)
    try:
        with np.load(index_path, allow_pickle=False) as index:
            return (str(index["tokenizer_sha256"]) == tokenizer_sha and int(index["split_tokens"]) == split_tokens
                    and bin_path.exists())
    except (OSError, ValueError, KeyError):
        return False


def _load_part(name, vocab_size, tokenizer_sha, split_tokens):
    bin_path, index_path = _part_paths(name)
    if not _part_is_current(name, tokenizer_sha, split_tokens):
        raise NotPreparedError(f"{bin_path} is missing or stale; re-run prepare.py")
    with np.load(index_path, allow_pickle=False) as index:
        doc_offsets, batch_offsets = index["doc_offsets"], index["batch_offsets"]
    tokens = np.memmap(bin_path, dtype=_token_dtype(vocab_size), mode="r") if doc_offsets[-1] else None
    return tokens, doc_offsets, batch_offsets


# ---------------------------------------------------------------------------
# Dataloader: BOS-aligned best-fit packing (the reference's algorithm, over pre-tokenized documents)


def _default_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _document_batches(parts):
    """Forever: each part's batches of documents in order, as [(tokens, start, length)], with the epoch."""
    for epoch in itertools.count(1):
        for tokens, doc_offsets, batch_offsets in parts:
            starts = doc_offsets.tolist()
            bounds = batch_offsets.tolist()
            for lo, hi in itertools.pairwise(bounds):
                yield [(tokens, starts[d], starts[d + 1] - starts[d]) for d in range(lo, hi)], epoch


SEQ_BITS = 40  # buffer keys are (length << SEQ_BITS) | arrival number: sorted by length, then buffer order
SEQ_MASK = (1 << SEQ_BITS) - 1


def make_dataloader(tokenizer, B, T, split, device=None):
    """Yield (inputs, targets, epoch) forever: B rows of T tokens packed from whole documents of the train split.

    Each row (T+1 tokens) is filled with the longest buffered document that fits the space left
    (the earliest on ties); when none fits, the shortest one (earliest on ties) is cropped to fill
    the row and its rest discarded. The buffer is topped up to PACK_BUFFER documents, one batch of
    DOC_BATCH at a time, before each placement. Every row starts with BOS; there is no padding.
    The val and holdout splits are read by the scorer process only: evaluate_bpb asks it to score a model.
    """
    if split != "train":
        raise ValueError(f"make_dataloader reads the train split only, not {split!r}: the validation data is read "
                         "by the scorer process alone, which evaluate_bpb asks to score the model")
    return _loader(B, T, split, device)


def _loader(B, T, split, device=None):
    """make_dataloader for any split (the scorer reads val and holdout through it)."""
    assert split in SPLITS, f"split must be one of {', '.join(SPLITS)}, not {split!r}"
    manifest = _require_manifest()
    if split not in manifest["splits"]:
        raise NotPreparedError(f"{CACHE_DIR} has no {split} split: it was prepared before holdouts existed. Run the "
                               "same prepare.py command again (it re-makes what changed).")
    tokenizer_sha = manifest["tokenizer_sha256"]
    vocab_size = manifest["vocab_size"]
    parts = [_load_part(name, vocab_size, tokenizer_sha, manifest["split_tokens"]) for name in manifest["splits"][split]["parts"]]
    if not any(doc_offsets[-1] for _, doc_offsets, _ in parts):
        raise NotPreparedError(f"the {split} split in {CACHE_DIR} has no tokens; re-run prepare.py with more data")
    parts = [part for part in parts if part[1][-1]]
    import torch

    device = torch.device(device) if device is not None else _default_device()
    return _pack(_document_batches(parts), B, T, device)  # a generator, but the checks above run now


def _pack(batches, B, T, device):
    import torch

    pin = device.type == "cuda"
    keys, docs = [], {}  # sorted buffer keys; arrival number -> (tokens, start)
    arrivals = itertools.count()
    epoch = 1
    rows = np.empty((B, T + 1), dtype=np.int64)
    while True:
        for r in range(B):
            pos = 0
            while pos <= T:
                while len(keys) < PACK_BUFFER:
                    batch, epoch = next(batches)
                    for tokens, start, length in batch:
                        seq = next(arrivals)
                        docs[seq] = (tokens, start)
                        bisect.insort(keys, (length << SEQ_BITS) | seq)
                space = T + 1 - pos
                i = bisect.bisect_right(keys, (space << SEQ_BITS) | SEQ_MASK)
                if i:  # the longest that fits; bisect_left finds the earliest arrival of that length
                    take = keys[i - 1] >> SEQ_BITS
                    i = bisect.bisect_left(keys, take << SEQ_BITS)
                else:  # nothing fits: crop the shortest
                    take = space
                tokens, start = docs.pop(keys.pop(i) & SEQ_MASK)
                rows[r, pos : pos + take] = tokens[start : start + take]
                pos += take
        host = torch.empty((2, B, T), dtype=torch.long, pin_memory=pin)
        host[0].numpy()[:] = rows[:, :-1]
        host[1].numpy()[:] = rows[:, 1:]
        batch_on_device = host.to(device, non_blocking=pin)
        yield batch_on_device[0], batch_on_device[1], epoch


# ---------------------------------------------------------------------------
# Evaluation: bits per byte, computed by the scorer (scorer.py), a process beside train.py's
#
# evaluate_bpb is the scorer's client. The driver starts the scorer with the run and hands train.py's process one
# end of a Unix socket (its number in $AUTORESEARCH_SCORER_FD); run by hand, evaluate_bpb starts a scorer itself.
# The scorer alone reads the validation tokens and their byte lengths and holds the run's key: it sends input rows,
# evaluate_bpb runs the model and hands back its logits through shared memory, and the scorer computes the loss.
# docs/integrity.md says what it checks.

SCORER_FD = "AUTORESEARCH_SCORER_FD"
MAX_HEADER = 1 << 20  # bytes of one message's JSON header


class NonCausalModelError(ValueError):
    pass


class Wire:
    """Messages over a Unix stream socket: a 4-byte length, a JSON header, then header["bytes"] raw bytes; a file
    descriptor (shared memory) may ride with a header."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, header, payload=b"", fds=()):
        data = json.dumps({**header, "bytes": len(payload)}).encode()
        message = len(data).to_bytes(4, "big") + data
        if fds:
            socket.send_fds(self.sock, [message], list(fds))
        else:
            self.sock.sendall(message)
        if payload:
            self.sock.sendall(payload)

    def receive(self, max_payload):
        """(header, payload, fds), or (None, b"", []) when the other side has gone."""
        prefix, fds = b"", []
        while len(prefix) < 4:
            data, got, _, _ = socket.recv_fds(self.sock, 4 - len(prefix), 1)
            if not data:
                return None, b"", fds
            prefix, fds = prefix + data, fds + list(got)
        length = int.from_bytes(prefix, "big")
        if length > MAX_HEADER:
            raise ValueError(f"a message header of {length} bytes")
        header = json.loads(self._exactly(length))
        if not isinstance(header, dict) or not 0 <= header.get("bytes", 0) <= max_payload:
            raise ValueError("a malformed message")
        return header, self._exactly(header.get("bytes", 0)), fds

    def _exactly(self, n):
        buffer = bytearray(n)
        view, got = memoryview(buffer), 0
        while got < n:
            chunk = self.sock.recv_into(view[got:])
            if not chunk:
                raise EOFError("the other side closed the socket mid-message")
            got += chunk
        return bytes(buffer)


class _Logits:
    """How evaluate_bpb hands logits to the scorer: a copy into shared memory (a memfd) the scorer maps. (Not CUDA
    IPC: its handles would let train.py's process name memory the scorer's process then writes to.)"""

    def __init__(self, wire):
        self.wire, self.memory, self.fd = wire, None, None

    def send(self, logits):
        import torch

        if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
            raise ValueError(f"evaluate_bpb: model(x) must return logits of shape [B, T, vocab], not {logits!r:.80}")
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            logits = logits.float()
        described = {"shape": list(logits.shape), "dtype": str(logits.dtype).removeprefix("torch.")}
        nbytes, fds = logits.numel() * logits.element_size(), []
        if self.memory is None or len(self.memory) < nbytes:
            self.close()
            self.fd = os.memfd_create("logits", os.MFD_ALLOW_SEALING) if _SEALS else _unlinked_file()
            os.ftruncate(self.fd, nbytes)
            if _SEALS:  # the scorer maps only memory whose size cannot change under it (SIGBUS)
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self.memory, fds = mmap.mmap(self.fd, nbytes), [self.fd]
        torch.frombuffer(self.memory, dtype=logits.dtype, count=logits.numel()).view(logits.shape).copy_(logits)
        self.wire.send({"logits": described}, fds=fds)
        return self.wire.receive(1 << 34)[:2]

    def close(self):
        if self.memory is not None:
            self.memory.close()
            os.close(self.fd)
        self.memory = None


_SEALS = hasattr(os, "memfd_create") and hasattr(os, "MFD_ALLOW_SEALING")  # Linux
if _SEALS:
    import fcntl


def _unlinked_file():
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as f:
        fd = os.dup(f.fileno())
    os.unlink(f.name)
    return fd


_DRIVER_SCORER = None  # the driver's scorer, connected once: it serves one evaluation, and refuses a second


@contextlib.contextmanager
def _scorer():
    global _DRIVER_SCORER
    if os.environ.get(SCORER_FD):
        if _DRIVER_SCORER is None:
            _DRIVER_SCORER = Wire(socket.socket(fileno=int(os.environ[SCORER_FD])))
        yield _DRIVER_SCORER
        return
    script = Path(__file__).with_name("scorer.py")  # by hand: a scorer of our own, for this evaluation
    if os.name != "posix":
        raise OSError("evaluate_bpb talks to the scorer through a Unix socket: run on Linux or macOS (or in WSL 2)")
    if not script.exists():
        raise FileNotFoundError(f"evaluate_bpb needs the scorer, {script}, beside prepare.py")
    ours, theirs = socket.socketpair()
    import secrets
    import subprocess

    process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               pass_fds=[theirs.fileno()], env={**os.environ, "AUTORESEARCH_CACHE": str(CACHE_DIR)})
    request = {"key": secrets.token_hex(32), "fd": theirs.fileno()}
    theirs.close()
    try:
        process.stdin.write(json.dumps(request).encode() + b"\n")
        process.stdin.flush()
        yield Wire(ours)
    finally:
        ours.close()
        process.stdin.close()  # its end of the run
        process.wait()


def evaluate_bpb(model, tokenizer, batch_size):
    """Cross-entropy of EVAL_TOKENS validation tokens, in bits per byte of the text they encode.

    Calls `model(x)` for logits [B, T, vocab] on the rows the scorer sends; the scorer computes the per-token loss
    (special tokens, 0 bytes, are left out of the sum). Of each batch, a share of the rows also get a copy whose
    later tokens differ, which must not change the loss before them: run by the driver, a second run of train.py
    scores those copies with the weights this one hands over first (the driver asks for them), and by hand this
    process scores them after the others. A model whose outputs depend on future tokens, or that changes while it
    is evaluated, is refused. The tokens are the val split's, or the holdout's when the driver asked the scorer for
    that run: train.py cannot tell which.
    """
    import torch

    device = next(model.parameters()).device
    if os.environ.get(LOAD_WEIGHTS):
        from safetensors.torch import load_model

        load_model(_unwrapped(model), os.environ[LOAD_WEIGHTS], strict=True, device=str(device))
    request, fds = _handed_weights(model)
    try:
        with _scorer() as wire:
            wire.send({"evaluate": batch_size, **request}, fds=fds)
            for fd in fds:
                os.close(fd)
            fds = []
            header, payload, _ = wire.receive(1 << 34)
            logits = _Logits(wire)
            try:
                with torch.no_grad():
                    while header is not None and "inputs" in header:
                        x = torch.frombuffer(bytearray(payload), dtype=torch.int64).view(header["inputs"]).to(device)
                        header, payload = logits.send(model(x))
            finally:
                logits.close()
    finally:
        for fd in fds:
            os.close(fd)
    if header is None:
        raise RuntimeError("evaluate_bpb: the scorer ended without an answer (its errors are in the run's log)")
    if "refused" in header:
        raise (NonCausalModelError if header.get("non_causal") else ValueError)(header["refused"])
    return header["val_bpb"]


def _handed_weights(model):
    """What the evaluation request carries when the driver asks for the model's weights (SAVE_WEIGHTS): the saved
    file, open, for the scorer to keep before any row goes out; or why it could not be saved."""
    if not os.environ.get(SAVE_WEIGHTS):
        return {}, []
    try:
        _save_weights(model, os.environ[SAVE_WEIGHTS])
        return {}, [os.open(os.environ[SAVE_WEIGHTS], os.O_RDONLY)]
    except Exception as error:  # noqa: BLE001 -- the scorer refuses the evaluation and the record says why
        return {"weights_error": f"{type(error).__name__}: {error}"}, []


def _unwrapped(model):
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the module it compiled


def _save_weights(model, path):
    """The scored model's weights (safetensors), with the constants it was trained with and its config."""
    import dataclasses

    from safetensors.torch import save_model

    module = _unwrapped(model)
    metadata = {name: str(_constants[name]) for name in PRESETS["default"]}
    if dataclasses.is_dataclass(config := getattr(module, "config", None)):
        metadata["config"] = json.dumps(dataclasses.asdict(config))
    save_model(module, path, metadata=metadata, force_contiguous=True)


if __name__ == "__main__":  # `uv run prepare.py`: the data preparation, which nothing at run time imports
    import prepare_data

    prepare_data.main()
