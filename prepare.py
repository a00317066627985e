"""
The fixed runtime harness of autoresearch: what train.py imports, and what scores it.

train.py imports the constants (MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, VOCAB_SIZE, read at import from the manifest
of the prepared cache in $AUTORESEARCH_CACHE, so train.py can read them but not change them), the Tokenizer,
make_dataloader and evaluate_bpb. The driver runs train.py under attested_run, which keeps a signed record of the
run. Three splits: train, val (what evaluate_bpb scores) and holdout, which only the driver asks it to score.
Neither the human nor the research agent edits this file during research.

    uv run prepare.py --help     # the data preparation, once, before training: prepare_data.py, data_sources.py
"""

import base64
import bisect
import contextlib
import hmac
import itertools
import json
import math
import os
import random
import runpy
import sys
import threading
from pathlib import Path
from time import monotonic as _monotonic  # bound here: train.py patching time.monotonic later changes nothing

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
TIME_BUDGET = int(_constants["time_budget"])   # seconds of training wall clock
EVAL_TOKENS = int(_constants["eval_tokens"])   # validation tokens scored by evaluate_bpb
VOCAB_SIZE = int(_constants["vocab_size"])     # including the 4 special tokens
# {NAME: (value, the reference's value)} for each constant this cache was prepared with differently
NON_DEFAULT_CONSTANTS = {key.upper(): (int(_constants[key]), default) for key, default in PRESETS["default"].items()
                         if int(_constants[key]) != default}


class NotPreparedError(FileNotFoundError):
    pass


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
    """Yield (inputs, targets, epoch) forever: B rows of T tokens packed from whole documents.

    Each row (T+1 tokens) is filled with the longest buffered document that fits the space left
    (the earliest on ties); when none fits, the shortest one (earliest on ties) is cropped to fill
    the row and its rest discarded. The buffer is topped up to PACK_BUFFER documents, one batch of
    DOC_BATCH at a time, before each placement. Every row starts with BOS; there is no padding.
    """
    assert split in SPLITS, f"split must be one of {', '.join(SPLITS)}, not {split!r}"
    if _ATTESTATION is not None:
        _ATTESTATION.loader_opened(split, B, T, caller=sys._getframe(1))
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
    loader = _pack(_document_batches(parts), B, T, device)  # a generator, but the checks above run now
    return _ATTESTATION.timed(loader) if _ATTESTATION is not None and split == "train" else loader


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
# Evaluation: bits per byte, independent of the vocabulary


class NonCausalModelError(ValueError):
    pass


def _token_losses(model, x, y):
    """Cross-entropy in nats of each target, computed here from the model's logits: a model never sees the
    targets and cannot report its own loss."""
    import torch
    import torch.nn.functional as F

    logits = model(x)
    if logits.ndim != 3 or logits.shape[:2] != x.shape:
        raise ValueError(f"evaluate_bpb: model(x) must return logits of shape [B, T, vocab], not {tuple(logits.shape)}")
    # a few rows at a time: the fp32 log-softmax of a whole batch would double the memory of its logits
    return torch.cat([F.cross_entropy(rows.float().flatten(0, 1), targets.flatten(), reduction="none")
                      for rows, targets in zip(logits.split(8), y.split(8))])


def _future_influence(model, x, y, loss):
    """How far (nats) the loss at positions before t moves when the tokens from t on are replaced: 0 for a
    causal model. (A guard against accidents, such as a wrong attention mask, and against a model that
    leaks on some batches only: evaluate_bpb checks a batch chosen at random. Not against an adversary.)"""
    import torch

    t = x.shape[1] // 2
    changed = x.clone()  # the targets stay: positions before t see the same inputs and score the same tokens
    changed[:, t:] = torch.randint(0, VOCAB_SIZE, changed[:, t:].shape, generator=torch.Generator().manual_seed(0)).to(x.device)
    before = loss.reshape(x.shape)[:, :t]
    after = _token_losses(model, changed, y).reshape(x.shape)[:, :t]
    return (after - before).abs().max().item(), t


def evaluate_bpb(model, tokenizer, batch_size):
    """Cross-entropy of EVAL_TOKENS validation tokens, in bits per byte of the text they encode.

    Calls `model(x)` for logits [B, T, vocab] and computes the per-token loss itself; special tokens
    (0 bytes) are left out of the sum. A model whose outputs depend on future tokens is refused.
    The tokens are the val split's, or the holdout's when the driver asked the harness for that run
    (attested_run's request): train.py cannot tell which.
    """
    import torch

    started = _monotonic()
    steps = EVAL_TOKENS // (batch_size * MAX_SEQ_LEN)
    if steps < 1:
        raise ValueError(f"batch_size {batch_size} x MAX_SEQ_LEN {MAX_SEQ_LEN} exceeds EVAL_TOKENS {EVAL_TOKENS}")
    device = next(model.parameters()).device
    token_bytes = get_token_bytes(device)
    with _evaluation_begins():
        val_loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, _EVAL_SPLIT, device=device)
    total_nats, total_bytes, moved = 0.0, 0, None
    checked_step = random.SystemRandom().randrange(steps)  # which batch train.py cannot know
    with torch.no_grad():
        weights = _checksum(model)
        for step in range(steps):
            x, y, _ = next(val_loader)
            loss = _token_losses(model, x, y)
            if step == checked_step:
                moved, t = _future_influence(model, x, y, loss)
                if not moved <= CAUSALITY_TOLERANCE:
                    _record_evaluation(started, batch_size, steps, None, 0, moved, weights == _checksum(model))
                    raise NonCausalModelError(
                        f"evaluate_bpb refuses to score this model: its loss at positions before {t} moved by "
                        f"{moved:.3g} nats when only the tokens from position {t} on changed, so it looks at future "
                        "tokens and its val_bpb would be meaningless. Keep attention causal (and nothing else "
                        "mixing positions forward).")
            nbytes = token_bytes[y.reshape(-1)]
            total_nats += (loss * (nbytes > 0)).sum().item()
            total_bytes += nbytes.sum().item()
        unchanged = weights == _checksum(model)
    val_bpb = total_nats / (math.log(2) * total_bytes)
    _record_evaluation(started, batch_size, steps, val_bpb, total_bytes, moved, unchanged)
    return val_bpb


def _checksum(model):
    """A sum of every parameter and buffer: it moves if the model learns while it is being evaluated."""
    import torch

    return torch.stack([t.detach().double().nansum() for t in model.state_dict().values()]).tolist()


# ---------------------------------------------------------------------------
# Attested runs: the driver (agent_loop.py) trusts this record of a run, not train.py's printout.
#
# The driver starts `python -c "import prepare; prepare.attested_run('train.py')"` and sends one JSON
# line on stdin: {"record": PATH, "key": HEX} (and "split": "holdout" for a holdout run). It is read
# before train.py's first line runs (stdin is then /dev/null), so train.py never sees the key, nor which
# split evaluate_bpb will score. The harness records what it sees and writes PATH, signed
# with HMAC-SHA256 under the key, when evaluate_bpb finishes and when the run ends. docs/integrity.md
# says what the driver concludes from it, and what this cannot stop: code that patches the harness (or
# torch) in memory. Not a sandbox.

_ATTESTATION = None  # the _Attestation of this process when the driver started it, else None
_EVAL_SPLIT = "val"  # what evaluate_bpb scores: the driver's request may say "holdout"
ATTESTATION_FORMAT = 1


class _Attestation:
    def __init__(self, path, key):
        self.path, self.key = Path(path), key
        self.started = _monotonic()
        self.loaders, self.evaluations, self.violations = [], [], []
        self.batch_times = []  # when each training batch was handed out
        self.val_opener = None  # the thread in which evaluate_bpb opens its own val loader, while it does
        self.evaluating = False  # set for good when evaluate_bpb starts
        self.protected = _validation_files()  # {basename: {realpath}} of every file holding validation text

    def loader_opened(self, split, B, T, caller):
        where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
        self.loaders.append({"split": split, "batch_size": B, "seq_len": T, "caller": where})
        if split != "train" and self.val_opener != threading.get_ident():
            self.violations.append(f"{where} opened the {split} split (make_dataloader(..., {split!r})): only "
                                   "evaluate_bpb may read the validation data")

    def timed(self, loader):
        for batch in loader:
            self.batch_times.append(_monotonic())
            if self.evaluating:
                self.violations.append("a training batch was taken after evaluate_bpb started: training ends "
                                       "before the evaluation")
            yield batch

    def audit(self, event, args):
        """sys.addaudithook: any file of the validation data opened by anything but evaluate_bpb's own loader."""
        if event != "open" or isinstance(args[0], int) or self.val_opener == threading.get_ident():
            return
        try:
            path = os.fsdecode(args[0])
        except TypeError:  # not a path: open() itself refuses it (an exception here would escape from open)
            return
        if os.path.basename(path) in self.protected and os.path.realpath(path) in self.protected[os.path.basename(path)]:
            self.violations.append(f"{path} (validation data) was opened outside evaluate_bpb's loader"
                                   + (", while the model was being evaluated" if self.evaluating else ""))

    def record(self):
        times = self.batch_times
        gaps = sorted(b - a for a, b in itertools.pairwise(times))
        return {"format": ATTESTATION_FORMAT, "max_seq_len": MAX_SEQ_LEN, "eval_tokens": EVAL_TOKENS,
                "time_budget": TIME_BUDGET, "loaders": self.loaders, "train_batches": len(times),
                "first_train_batch": times[0] - self.started if times else None,
                "median_batch_gap": gaps[len(gaps) // 2] if gaps else None,
                "evaluations": self.evaluations, "violations": list(dict.fromkeys(self.violations))}

    def write(self):
        record = self.record()
        mac = hmac.new(self.key, json.dumps(record, sort_keys=True).encode(), "sha256").hexdigest()
        _atomic_write(self.path, lambda f: f.write(json.dumps({"record": record, "hmac": mac}).encode()))


def _validation_files():
    """The files of this cache that hold validation documents: the val and holdout token parts, and the raw files
    they came from where those are known (the climbmix val and holdout shards, TinyStories, --text corpora; for
    stdlib the raw files are Python's own sources, which every import reads)."""
    manifest = _require_manifest()
    paths = [p for split in ("val", "holdout") for name in manifest["splits"].get(split, {}).get("parts", [])
             for p in _part_paths(name)]
    source = manifest["source"]
    if source["dataset"] == "climbmix":
        paths += [DATA_DIR / CLIMBMIX_SHARD.format(n) for n in (CLIMBMIX_VAL_SHARD, CLIMBMIX_HOLDOUT_SHARD)]
    elif source["dataset"] == "tinystories":
        paths.append(DATA_DIR / TINYSTORIES_FILE)
    elif source["dataset"] == "text":
        paths += [Path(p) for p in source["paths"]]
    protected = {}
    for path in paths:
        protected.setdefault(path.name, set()).add(os.path.realpath(path))
    return protected


@contextlib.contextmanager
def _evaluation_begins():
    """From here on training is over; while evaluate_bpb opens its val loader (and runs no code of train.py),
    its thread may read the validation data."""
    if _ATTESTATION is None:
        yield
        return
    _ATTESTATION.evaluating = True
    _ATTESTATION.val_opener = threading.get_ident()
    try:
        yield
    finally:
        _ATTESTATION.val_opener = None


def _record_evaluation(started, batch_size, steps, val_bpb, total_bytes, moved, unchanged):
    if _ATTESTATION is not None:
        if not unchanged:
            _ATTESTATION.violations.append("the model's parameters changed while evaluate_bpb ran: it learned from "
                                           "the validation data it was scored on")
        _ATTESTATION.evaluations.append({
            "started": started - _ATTESTATION.started, "seconds": _monotonic() - started, "val_bpb": val_bpb,
            "split": _EVAL_SPLIT, "batch_size": batch_size, "seq_len": MAX_SEQ_LEN,
            "tokens": steps * batch_size * MAX_SEQ_LEN,
            "bytes": total_bytes, "future_influence": moved, "causal": moved is not None and moved <= CAUSALITY_TOLERANCE})
        _ATTESTATION.write()


def attested_run(script="train.py"):
    """Run `script` as __main__ with the harness keeping the record the driver reads (see above)."""
    global _ATTESTATION, _EVAL_SPLIT
    try:
        request = json.loads(sys.stdin.readline())
        path, key = request["record"], bytes.fromhex(request["key"])
        _EVAL_SPLIT = {"val": "val", "holdout": "holdout"}[request.get("split", "val")]
    except (ValueError, KeyError, TypeError):
        sys.exit("attested_run reads the driver's request on stdin (agent_loop.py sends it); by hand, run "
                 f"`uv run {script}` instead")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    attestation = _ATTESTATION = _Attestation(path, key)
    sys.addaudithook(attestation.audit)
    sys.argv = [script]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        attestation.write()  # also after a crash: the driver learns that nothing was evaluated


if __name__ == "__main__":  # `uv run prepare.py`: the data preparation, which nothing at run time imports
    import prepare_data

    prepare_data.main()
