"""
Where the documents of a prepared cache come from (prepare_data.py prepares them): the Hugging Face hub's climbmix
shards and TinyStories file, downloaded in parallel with retries and written only when complete; your own corpus
(--text: parquet, .txt/.md, .jsonl); Python's own standard library, offline. Each source is a stream of document
batches per split: climbmix's shards are split (and were shuffled) as the reference's, the others split by a hash
of each document's text (5 % val, the next 5 % holdout) and shuffled by another.
"""

import contextlib
import hashlib
import itertools
import json
import os
import queue
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import requests

from prepare import (CLIMBMIX_HOLDOUT_SHARD, CLIMBMIX_SHARD, CLIMBMIX_VAL_SHARD, DATA_DIR, SPLITS, TINYSTORIES_FILE,
                     TOKENS_DIR)

# ---------------------------------------------------------------------------
# Where the documents come from

HF_ENDPOINT = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
CLIMBMIX_URL = HF_ENDPOINT + "/datasets/karpathy/climbmix-400b-shuffle/resolve/main/{name}"
TINYSTORIES_URL = HF_ENDPOINT + "/datasets/karpathy/tinystories-gpt4-clean/resolve/main/" + TINYSTORIES_FILE
DOWNLOAD_CHUNK = 1 << 20
VAL_PERCENT = 5                          # single-file and own corpora: documents hashed into val...
HOLDOUT_PERCENT = 5                      # ...and the next 5 % into the holdout
DOC_BATCH = 128                          # documents tokenized (and fed to the packer) together
SHUFFLE_MEMORY = 1 << 28                 # characters of one split shuffled in memory; beyond, through...
SHUFFLE_BUCKETS = 64                     # ...this many files on disk, each shuffled in memory
SHUFFLE_FOLDERS = ".shuffle-*"           # in the cache, while they exist (the sandbox denies them)

def _progress(label):
    """Return update(text, final=False): a rewritten line on a terminal, a line every 5 s in a log."""
    tty = sys.stdout.isatty()
    start = last = time.time()

    def update(text, final=False):
        nonlocal last
        now = time.time()
        if final or now - last > (0.2 if tty else 5):
            last = now
            line = f"{label}: {text} ({now - start:.0f}s)"
            print("\r" + line.ljust(100) if tty else line, end="\n" if final or not tty else "", flush=True)

    return update


# ---------------------------------------------------------------------------
# Data sources: downloads, own corpora, the offline stdlib demo corpus


class PrepareError(Exception):
    """A problem with the user's input or environment; main() prints it without a traceback."""


OFFLINE_HINT = (
    "No network, or no access to the hub? Prepare offline instead:\n"
    "    uv run prepare.py --dataset stdlib --preset small   # Python's own sources, nothing to download\n"
    "    uv run prepare.py --text PATH                       # your .parquet/.txt/.md/.jsonl corpus\n"
    "or point HF_ENDPOINT at a mirror of the hub."
)


def _check_parquet(path):
    """Open the footer and schema: catches truncated or corrupt files before anything trusts them."""
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as e:
        raise PrepareError(f"{path} is not a readable parquet file ({e})") from None
    if "text" not in schema.names:
        raise PrepareError(f"{path} has no 'text' column (columns: {', '.join(schema.names)})")


class Stop:
    """Ctrl-C's flag for the download threads: once set, no download opens a file.

    The check and the open hold one lock, so after set() returns the main thread can remove every
    `.tmp` there is: none appears later (a daemon thread still writing writes to a removed file).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._set = False

    def set(self):
        with self._lock:
            self._set = True

    def is_set(self):
        return self._set

    def open(self, path):
        with self._lock:
            if self._set:
                raise KeyboardInterrupt
            return open(path, "wb")


def download_file(url, dest, attempts=5, backoff=2.0, stop=None):
    """Stream url to dest.tmp in 1 MiB chunks, check length and parquet footer, then rename into place.

    Connection errors, 5xx/429, truncated or corrupt files are retried with backoff**attempt seconds
    between tries; any other 4xx (no such file) fails at once.
    """
    tmp = dest.with_name(dest.name + ".tmp")
    stop = stop or Stop()
    for attempt in range(1, attempts + 1):
        try:
            with requests.get(url, stream=True, timeout=(10, 60), headers={"Accept-Encoding": "identity"}) as r:
                if 400 <= r.status_code < 500 and r.status_code != 429:
                    raise PrepareError(f"could not download {url}: {r.status_code} {r.reason}")
                r.raise_for_status()
                expected = int(r.headers.get("Content-Length", -1))
                received = 0
                with stop.open(tmp) as f:
                    for chunk in r.iter_content(DOWNLOAD_CHUNK):
                        if stop.is_set():
                            raise KeyboardInterrupt
                        f.write(chunk)
                        received += len(chunk)
            if expected >= 0 and received != expected:
                raise OSError(f"truncated: received {received} of {expected} bytes")
            try:
                _check_parquet(tmp)
            except PrepareError as e:
                raise OSError(f"corrupt download: {e}") from None
            os.replace(tmp, dest)
            return
        except (requests.RequestException, OSError) as e:
            if stop.is_set():  # the main thread removed our .tmp: this is Ctrl-C, not a bad download
                raise KeyboardInterrupt from None
            if attempt == attempts:
                raise PrepareError(f"could not download {url} after {attempts} attempts: {e}") from None
            wait = backoff**attempt
            print(f"  {dest.name}: attempt {attempt}/{attempts} failed ({e}); retrying in {wait:g}s", flush=True)
            time.sleep(wait)
        finally:
            tmp.unlink(missing_ok=True)


def download_all(files, workers, attempts=5, backoff=2.0):
    """files: [(url, dest)]. Skips files already present and valid; re-fetches corrupt ones."""
    if not files:
        return
    todo = []
    for url, dest in files:
        if dest.exists():
            try:
                _check_parquet(dest)
                continue
            except PrepareError as e:
                print(f"{dest.name} is corrupt ({e}); fetching it again", flush=True)
                dest.unlink()
        todo.append((url, dest))
    if not todo:
        print(f"data: all {len(files)} files already in {files[0][1].parent}", flush=True)
        return
    folders = sorted({dest.parent for _, dest in todo})  # where the files go, and nowhere else
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.tmp"):  # left by a run that was killed: never trusted
            stale.unlink()
    print(f"data: downloading {len(todo)} of {len(files)} files to {', '.join(map(str, folders))} ({workers} "
          "workers)", flush=True)
    # Daemon threads, not an executor: on Ctrl-C we must not wait for a download stuck in a slow read.
    pending, results, stop = queue.Queue(), queue.Queue(), Stop()
    for item in todo:
        pending.put(item)

    def worker():
        while not stop.is_set():
            try:
                url, dest = pending.get_nowait()
            except queue.Empty:
                return
            try:
                download_file(url, dest, attempts, backoff, stop)
                results.put(None)
            except BaseException as e:
                results.put(e)

    failures = []
    try:  # from the first thread's start: a Ctrl-C while the others start must also stop it and remove its .tmp
        for _ in range(min(workers, len(todo))):
            threading.Thread(target=worker, daemon=True).start()
        update = _progress("downloaded")
        for done in range(1, len(todo) + 1):
            error = results.get()
            if isinstance(error, PrepareError):
                failures.append(str(error))
            elif error is not None:
                raise error
            update(f"{done}/{len(todo)} files, {len(failures)} failed", final=done == len(todo))
    except BaseException:
        stop.set()
        for _, dest in todo:
            dest.with_name(dest.name + ".tmp").unlink(missing_ok=True)
        raise
    if failures:
        raise PrepareError("\n".join(failures) + "\n" + OFFLINE_HINT)


def _parquet_texts(path):
    """Yield the 'text' column of a parquet file, one list per row group."""
    _check_parquet(path)
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        yield pf.read_row_group(i, columns=["text"]).column("text").to_pylist()


def _parquet_batches(path):
    """The reference's document stream: row group by row group, in batches of DOC_BATCH."""
    for texts in _parquet_texts(path):
        for i in range(0, len(texts), DOC_BATCH):
            yield texts[i : i + DOC_BATCH]


def _split_of(text):
    # a hash of the content, not the position: deterministic, and duplicates never straddle the splits
    bucket = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest(), "big") % 100
    return "val" if bucket < VAL_PERCENT else "holdout" if bucket < VAL_PERCENT + HOLDOUT_PERCENT else "train"


def _split_batches(documents, split):
    """Keep one split's documents (by content hash), shuffled, and cut them into batches of DOC_BATCH."""
    docs = _shuffled(d for d in documents if _split_of(d) == split)
    while batch := list(itertools.islice(docs, DOC_BATCH)):
        yield batch


def _order_key(text):
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8, person=b"autoresearch-ord").digest()


def _shuffled(documents):
    """The documents in an order fixed by their text (the same corpus, the same order), not the files' order:
    the reference's shards are shuffled, and a short run on a corpus in file order would see its first files only.
    In memory up to SHUFFLE_MEMORY characters; a larger corpus goes through SHUFFLE_BUCKETS files on disk."""
    held, size = [], 0
    for doc in documents:
        held.append(doc)
        size += len(doc)
        if size > SHUFFLE_MEMORY:
            yield from _shuffled_on_disk(itertools.chain(held, documents))
            return
    yield from sorted(held, key=_order_key)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def _shuffled_on_disk(documents):
    """Each document into one of SHUFFLE_BUCKETS files by its key, then each file's documents in key order."""
    TOKENS_DIR.parent.mkdir(parents=True, exist_ok=True)  # the cache, which a first prepare has yet to make
    for stale in TOKENS_DIR.parent.glob(SHUFFLE_FOLDERS):  # a killed prepare's (not one still running)
        pid = stale.name.split("-")[1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix=f"{SHUFFLE_FOLDERS.rstrip('*')}{os.getpid()}-", dir=TOKENS_DIR.parent,
                                     ignore_cleanup_errors=True) as folder:
        paths = [Path(folder) / str(i) for i in range(SHUFFLE_BUCKETS)]
        with contextlib.ExitStack() as files:
            buckets = [files.enter_context(open(path, "wb")) for path in paths]
            for doc in documents:
                key, data = _order_key(doc), doc.encode("utf-8", "surrogatepass")
                buckets[int.from_bytes(key, "big") % SHUFFLE_BUCKETS].write(len(data).to_bytes(8, "little") + data)
        for path in paths:
            raw, docs, at = path.read_bytes(), [], 0
            while at < len(raw):
                length = int.from_bytes(raw[at : at + 8], "little")
                docs.append(raw[at + 8 : at + 8 + length].decode("utf-8", "surrogatepass"))
                at += 8 + length
            path.unlink()
            yield from sorted(docs, key=_order_key)


TEXT_SUFFIXES = (".parquet", ".txt", ".md", ".jsonl")


def text_files(paths):
    """Expand --text arguments into a sorted list of usable files, with clear errors."""
    files = []
    for arg in paths:
        path = Path(arg).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise PrepareError(f"--text {arg}: the folder has no {'/'.join(TEXT_SUFFIXES)} files")
            files += found
        elif path.is_file():
            if path.suffix.lower() not in TEXT_SUFFIXES:
                raise PrepareError(f"--text {arg}: unsupported file type (use {', '.join(TEXT_SUFFIXES)})")
            files.append(path)
        else:
            raise PrepareError(f"--text {arg}: no such file or folder")
    return [p.resolve() for p in files]


def _file_documents(path, split_lines=False):
    """The documents of one corpus file; every problem names the file (and the line, where there is one)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        for texts in _parquet_texts(path):
            yield from (t for t in texts if t)
        return
    try:
        with open(path, "rb") as f:
            if suffix != ".jsonl" and not split_lines:
                if text := _decode(f.read(), path):
                    yield text
                return
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                line = _decode(raw, where)
                if not line.strip():
                    continue
                if text := _jsonl_text(line, where) if suffix == ".jsonl" else line.rstrip("\r\n"):
                    yield text
    except OSError as e:
        raise PrepareError(f"{path}: cannot be read ({e.strerror or e})") from None


def _decode(raw, where):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{where}: not UTF-8 text ({e})") from None


def _jsonl_text(line, where):
    try:
        text = json.loads(line)["text"]
    except (ValueError, KeyError, TypeError):
        raise PrepareError(f"{where}: expected a JSON object with a 'text' field") from None
    if not isinstance(text, str):
        raise PrepareError(f"{where}: 'text' is not a string")
    return text


SINGLE_FILE_HINT = "one document per .txt file: give a folder of files, a .jsonl, or --split-lines"


def survey_corpus(files, split_lines, given):
    """Read every document of an own corpus once, before anything in the cache changes: a bad file fails
    here, naming itself, and a corpus that cannot fill both splits says how to fix it."""
    counts = {split: 0 for split in SPLITS}
    update = _progress("corpus: documents read")
    for path in files:
        for doc in _file_documents(path, split_lines):
            counts[_split_of(doc)] += 1
        update(f"{sum(counts.values()):,} in {path.name}")
    documents = sum(counts.values())
    update(f"{documents:,} document{'s' * (documents != 1)} ({counts['val']:,} for val, {counts['holdout']:,} for "
           f"the holdout) in {len(files)} "
           f"file{'s' * (len(files) != 1)}", final=True)
    if documents == 0:
        raise PrepareError(f"the corpus is empty: --text {' '.join(given)} holds no non-empty documents")
    for split, n in counts.items():
        if n == 0 and split != "holdout":  # a holdout too small to score is a warning, later
            one_per_file = not split_lines and any(p.suffix.lower() in (".txt", ".md") for p in files)
            raise PrepareError(
                f"--text {' '.join(given)}: {documents} document{'s' * (documents != 1)}, and none of them falls in the "
                f"{split} split ({VAL_PERCENT}% of documents, chosen by a hash of their text, are val); "
                + (SINGLE_FILE_HINT if one_per_file else "give more documents"))
    return counts


def stdlib_files():
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def _stdlib_documents():
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8
        if text:
            yield text


def resolve_source(args):
    """Describe what to prepare: a JSON-able key (for 'nothing changed'), files to fetch, and parts.

    A part is (name, split, make_batches): one pre-tokenized file made from a stream of document batches.
    """
    if args.text:
        files = text_files(args.text)
        fingerprint = hashlib.sha256(
            json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode()
        ).hexdigest()
        key = {"dataset": "text", "paths": [str(p) for p in files], "fingerprint": fingerprint,
               "holdout_percent": HOLDOUT_PERCENT, "order": "shuffled"}
        if args.split_lines:  # only when set: caches prepared before the option existed stay current
            key["split_lines"] = True
        documents = lambda: itertools.chain.from_iterable(_file_documents(p, args.split_lines) for p in files)
        return key, [], [(f"text-{s}", s, lambda s=s: _split_batches(documents(), s)) for s in SPLITS]
    if args.dataset == "stdlib":
        key = {"dataset": "stdlib", "python": sys.version.split()[0], "files": len(stdlib_files()),
               "holdout_percent": HOLDOUT_PERCENT, "order": "shuffled"}
        return key, [], [(f"stdlib-{s}", s, lambda s=s: _split_batches(_stdlib_documents(), s)) for s in SPLITS]
    if args.dataset == "tinystories":
        path = DATA_DIR / TINYSTORIES_FILE
        documents = lambda: itertools.chain.from_iterable(_parquet_texts(path))
        parts = [(f"tinystories-{s}", s, lambda s=s: _split_batches(documents(), s)) for s in SPLITS]
        return ({"dataset": "tinystories", "holdout_percent": HOLDOUT_PERCENT, "order": "shuffled"},
                [(TINYSTORIES_URL, path)], parts)
    num = CLIMBMIX_HOLDOUT_SHARD if args.num_shards == -1 else args.num_shards
    if not 1 <= num <= CLIMBMIX_HOLDOUT_SHARD:
        raise PrepareError(f"--num-shards {args.num_shards}: use 1 to {CLIMBMIX_HOLDOUT_SHARD}, or -1 for all "
                           f"(shard {CLIMBMIX_HOLDOUT_SHARD} is the holdout, {CLIMBMIX_VAL_SHARD} the val shard)")
    splits = {CLIMBMIX_SHARD.format(i): "train" for i in range(num)}
    splits[CLIMBMIX_SHARD.format(CLIMBMIX_HOLDOUT_SHARD)] = "holdout"
    splits[CLIMBMIX_SHARD.format(CLIMBMIX_VAL_SHARD)] = "val"
    downloads = [(CLIMBMIX_URL.format(name=n), DATA_DIR / n) for n in splits]
    parts = [(n.removesuffix(".parquet"), split, lambda p=DATA_DIR / n: _parquet_batches(p))
             for n, split in splits.items()]
    return {"dataset": "climbmix", "num_shards": num, "holdout_shard": CLIMBMIX_HOLDOUT_SHARD}, downloads, parts
