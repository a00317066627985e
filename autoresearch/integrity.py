"""
What makes a run `invalid`: the checks that keep val_bpb the scorer's number.

train.py is code written by a model that is optimising val_bpb, so the driver does not take its word.
Three layers, each on plain values (docs/integrity.md explains them and their limits):

- before a run, `static_problems`: train.py's source must call prepare's evaluate_bpb and leave the
  harness alone;
- during it, the scorer (scorer.py, a process beside train.py's) computes val_bpb and signs its record: the
  score, the tokens, the causality probes of the probe run, when the evaluation was asked for;
  `verify_record` checks its signature with the run's key, `record_problems` and `wall_clock_problems` read it;
- around it, `harness_fingerprint`: the harness and the prepared cache must not change (and
  `portable_fingerprint`: a node that runs experiments for the driver must have the same cache).
"""

import ast
import hashlib
import hmac
import json
import os
import re
import stat
from pathlib import Path

from autoresearch.console import fail

# -----------------------------------------------------------------------------
# train.py as written

HARNESS = ("prepare.py", "scorer.py")  # what the driver runs beside train.py, and nobody edits during research
HARNESS_LIMIT = 16 << 20  # bytes of a harness file the driver reads to hash it: prepare.py is 20 kB
PRIVATE_HARNESS_NAME = re.compile(
    r"_loader|_pack|_load_part|_document_batches|_part_paths|_scorer|_DRIVER_SCORER|_Logits|Wire|SCORER_FD|"
    r"CAUSALITY_TOLERANCE|NonCausalModelError")


def static_problems(source):
    """Why train.py, as written, would not report the harness's val_bpb (empty when no reason is seen)."""
    try:
        tree = ast.parse(source)
    except SyntaxError as error:
        return [f"train.py does not compile: {error.msg} at line {error.lineno}"]
    nodes = list(ast.walk(tree))
    problems = []
    imported = any(isinstance(node, ast.ImportFrom) and node.module == "prepare"
                   and any(a.name == "evaluate_bpb" and a.asname in (None, "evaluate_bpb") for a in node.names)
                   for node in nodes)
    called = any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "evaluate_bpb"
                 for node in nodes)
    if not (imported and called):
        problems.append("train.py must import evaluate_bpb from prepare and call it to score the model")
    from_harness = {a.asname or a.name for node in nodes if isinstance(node, ast.ImportFrom)
                    and node.module == "prepare" for a in node.names}
    harness_modules = {a.asname or a.name for node in nodes if isinstance(node, ast.Import) for a in node.names
                       if a.name in ("prepare", "scorer")}
    for node in nodes:
        if isinstance(node, ast.Name) and node.id in from_harness and isinstance(node.ctx, ast.Store):
            problems.append(f"line {node.lineno}: train.py reassigns {node.id}, which prepare.py fixes")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == "evaluate_bpb":
            problems.append(f"line {node.lineno}: train.py defines its own evaluate_bpb")
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del))
              and isinstance(node.value, ast.Name) and node.value.id == "prepare"):
            problems.append(f"line {node.lineno}: train.py changes prepare.{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value == "validation" or re.search(r"(^|[-/\\])val($|[-./])", node.value)):
            problems.append(f"line {node.lineno}: train.py names the validation data ({node.value[:40]!r})")
        elif ((isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in harness_modules
               and PRIVATE_HARNESS_NAME.fullmatch(node.attr))
              or (isinstance(node, ast.ImportFrom) and node.module in ("prepare", "scorer")
                  and any(PRIVATE_HARNESS_NAME.fullmatch(a.name) for a in node.names))
              or (isinstance(node, ast.ImportFrom) and node.module == "scorer")
              or (isinstance(node, ast.Import) and any(a.name == "scorer" for a in node.names))):
            problems.append(f"line {node.lineno}: train.py uses the harness's internals")
    if holdout := re.search(r"holdout", source, re.IGNORECASE):
        problems.append(f"line {source.count(chr(10), 0, holdout.start()) + 1}: train.py names the holdout split, "
                        "which only the driver may ask evaluate_bpb to score")
    return list(dict.fromkeys(problems))


# -----------------------------------------------------------------------------
# The scorer's record of a run

def verify_record(key, text):
    """(record, None) when `text` is a record signed with the run's key; else (None, why there is none).
    text None: the harness wrote none."""
    if text is None:
        return None, "the scorer wrote no record of the run (it was stopped, or could not start)"
    try:
        signed = json.loads(text)
        record, mac = signed["record"], signed["hmac"]
    except (ValueError, KeyError, TypeError):
        return None, "the scorer's record of the run is unreadable: it was altered"
    expected = hmac.new(key, json.dumps(record, sort_keys=True).encode(), "sha256").hexdigest()
    if not hmac.compare_digest(expected, str(mac)):
        return None, "the scorer's record of the run does not verify: it was altered"
    return record, None


def evaluation(record):
    """The scorer's evaluation of the run's final model, or None."""
    return record["evaluations"][-1] if record and record["evaluations"] else None


def record_problems(record, missing, returncode, printed_val_bpb, constants):
    """The rules of the metric a finished run broke, from the scorer's record (empty: none).

    record: the verified record or None (then `missing` says why); printed_val_bpb: the number in train.py's
    summary, or None; constants: the prepared cache's max_seq_len and eval_tokens."""
    claims = returncode == 0 and printed_val_bpb is not None  # a crash claims nothing: it is a crash
    if record is None:
        return [missing] if claims else []
    problems = list(record["problems"])  # what the scorer refused: a model that looks ahead, or changed, ...
    final = evaluation(record)
    if final and final["val_bpb"] is not None:
        rows = final["batch_size"] * constants["max_seq_len"]
        expected = constants["eval_tokens"] // rows * rows
        if final["seq_len"] != constants["max_seq_len"] or final["tokens"] != expected:
            problems.append(f"the scorer scored {final['tokens']} tokens at sequence length {final['seq_len']}, "
                            f"not the {expected} at {constants['max_seq_len']} that EVAL_TOKENS and MAX_SEQ_LEN "
                            "give: the harness's constants were changed")
        if printed_val_bpb is not None and abs(printed_val_bpb - final["val_bpb"]) > 1e-6:
            problems.append(f"train.py printed val_bpb {printed_val_bpb:.6f}, but the scorer measured "
                            f"{final['val_bpb']:.6f}")
        if claims and not final.get("probe") and not problems:
            problems.append("the scorer never probed the model it scored: the probe run, train.py again with the "
                            "weights it handed over, did not score the spliced copies of its rows"
                            + (f" ({record['unfinished']})" if record.get("unfinished") else ""))
    elif claims and not problems:
        problems.append("train.py printed a val_bpb, but the scorer never finished an evaluation"
                        + (f" ({record['unfinished']})" if record.get("unfinished") else ""))
    return list(dict.fromkeys(problems))


# -----------------------------------------------------------------------------
# The wall clock, from outside: the budget is TIME_BUDGET seconds of training, whatever train.py counts

def allowance(time_budget):
    """Seconds a run may take beyond the baseline's, from its start to its evaluation request: 5 % of the budget,
    and at least 5 s, which a busy machine's start-up (imports, compilation) can vary by."""
    return max(5.0, 0.05 * time_budget)


def wall_clock_limits(baseline, time_budget):
    """(until evaluation, total): the most seconds a run may take from its start to asking the scorer for its
    evaluation, and in all. `baseline` holds (total seconds, seconds until evaluation) of the unmodified
    train.py's runs on this machine. The first is the slowest baseline run's (its compilation counted) plus
    allowance(); the time after it may double the baseline's (a bigger model's evaluation takes longer; the
    evaluation cannot hide training: the probe run sees a model that changes)."""
    until = max(first for _, first in baseline) + allowance(time_budget)
    return until, until + 2 * max(total - first for total, first in baseline)


def wall_clock_problems(seconds, record, baseline, time_budget):
    """A run that trained, or ran, longer than the budget allows (the scorer's clock and the driver's)."""
    baseline = [timing for timing in baseline if timing[1] is not None]
    if not baseline:
        return []  # the baseline's own runs set the limits
    until, total = wall_clock_limits(baseline, time_budget)
    problems = []
    final = evaluation(record)
    if final is not None and final["first_logits"] > until:
        problems.append(f"its evaluation began {final['first_logits']:.1f}s after it started, over the "
                        f"{until:.1f}s a {time_budget:g}s budget allows on this machine (the unmodified "
                        f"train.py's, plus {allowance(time_budget):.1f}s): it trained longer than the budget")
    if seconds > total:
        problems.append(f"the run took {seconds:.0f}s of wall clock, over the {total:.0f}s a {time_budget:g}s "
                        "budget allows on this machine")
    return problems


def baseline_timings(runs):
    """(total seconds, seconds until the evaluation request) of the given valid runs of the baseline."""
    return [(r["seconds"], (evaluation(r.get("attestation")) or {}).get("first_logits")) for r in runs]


# -----------------------------------------------------------------------------
# prepare.py and the prepared cache

def cache_dir():
    return Path(os.environ.get("AUTORESEARCH_CACHE") or "~/.cache/autoresearch").expanduser()


def harness_fingerprint(folder=".", cache=None):
    """What val_bpb depends on besides train.py: the harness (HARNESS, those in `folder`) and the prepared cache
    (not the raw downloads). sha256 of the harness, the manifest, the tokenizer and the validation tokens; size and
    mtime of the training tokens, which can be gigabytes and do not enter the metric."""
    return _fingerprint(Path(folder), Path(cache) if cache else cache_dir(), portable=False)


# What differs between two caches that the same prepare.py command made on two machines: when it ran, and hashes
# over absolute paths and mtimes (a --text source's "fingerprint", and so the tokenizer's sha256, which embeds it).
MACHINE_SPECIFIC = {"created", "fingerprint", "tokenizer_sha256"}


def portable_fingerprint(folder=".", cache=None):
    """harness_fingerprint as two machines agree on it when they ran the same prepare.py command (a run on another
    node checks its cache against the driver's with it): no mtimes, no MACHINE_SPECIFIC fields, a --text source's
    files by name, the validation tokens' index by its arrays (an .npz is a zip that stores when it was written)."""
    return _fingerprint(Path(folder), Path(cache) if cache else cache_dir(), portable=True)


def _fingerprint(folder, cache, portable):
    manifest = cache / "manifest.json"
    val_parts = set(json.loads(manifest.read_text()).get("splits", {}).get("val", {}).get("parts", []))
    fingerprint = harness_files(folder)
    for path in [manifest] + sorted(p for folder in ("tokenizer", "tokens") for p in (cache / folder).rglob("*")
                                    if p.is_file()):
        name = path.relative_to(cache).as_posix() if portable else str(path.relative_to(cache))
        if path.parent.name == "tokens" and path.stem not in val_parts:
            stat = path.stat()
            fingerprint[name] = f"{stat.st_size} bytes" + ("" if portable else f", mtime {stat.st_mtime_ns}")
        elif portable and path.suffix == ".json":
            fingerprint[name] = hashlib.sha256(json.dumps(_portable(json.loads(path.read_text())),
                                                          sort_keys=True).encode()).hexdigest()
        elif portable and path.suffix == ".npz":
            fingerprint[name] = _arrays_sha256(path)
        else:
            fingerprint[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return fingerprint


def harness_files(folder, prefix=""):
    """sha256 of each file of the harness in folder (a run's folder too, where train.py could have left a pipe
    that no one writes, or a huge file, in its place: then what it is)."""
    return {prefix + name: _sha256_of_file(folder / name) for name in HARNESS if os.path.lexists(folder / name)}


def _sha256_of_file(path, limit=HARNESS_LIMIT):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        return f"unreadable ({error.strerror})"
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return "not a plain file"
        digest, size = hashlib.sha256(), 0
        while (chunk := file.read(1 << 20)) and size <= limit:
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest() if size <= limit else f"over {limit} bytes"


def _portable(value, key=None):
    if isinstance(value, dict):
        return {k: _portable(v, k) for k, v in value.items() if k not in MACHINE_SPECIFIC}
    if isinstance(value, list):
        return [_portable(v, key) for v in value]
    # a --text source lists its files by absolute path: their names are what two machines share
    return Path(value).name if key == "paths" and isinstance(value, str) else value


def _arrays_sha256(path):
    import numpy as np  # here: the serial driver never needs it

    digest = hashlib.sha256()
    with np.load(path, allow_pickle=False) as arrays:
        for name in sorted(set(arrays.files) - MACHINE_SPECIFIC):
            array = np.ascontiguousarray(arrays[name])
            digest.update(f"{name} {array.dtype.str} {array.shape}\n".encode() + array.tobytes())
    return digest.hexdigest()


def validation_files(cache):
    """(paths train.py's sandbox must not read, what it cannot protect): the val and holdout token files, the raw
    downloads and a --text corpus's own files. The stdlib corpus's raw text is Python's own source, which any Python
    reads to import: nothing keeps train.py from rebuilding its validation documents."""
    manifest = json.loads((cache / "manifest.json").read_text())
    splits = manifest.get("splits", {})
    parts = [name for split in ("val", "holdout") for name in splits.get(split, {}).get("parts", [])]
    paths = [cache / "tokens" / f"{name}{suffix}" for name in parts for suffix in (".bin", ".npz")] + [cache / "data"]
    paths += sorted(cache.glob(".shuffle-*"))  # a killed prepare's shuffle files: documents of every split
    source = manifest.get("source", {})
    paths += [Path(p) for p in source.get("paths", [])] if source.get("dataset") == "text" else []
    caveats = (["the stdlib corpus's validation text is Python's own source, which train.py can read"]
               if source.get("dataset") == "stdlib" else [])
    return paths, caveats + _linked_elsewhere(paths)


def _linked_elsewhere(paths):
    """The sandbox denies paths, not files: a validation file with a second hard link is readable by that name."""
    linked = []
    for path in paths:
        for folder, _, names in os.walk(path) if path.is_dir() else [(path.parent, [], [path.name])]:
            for name in names:
                try:
                    links = os.lstat(os.path.join(folder, name)).st_nlink
                except OSError:  # not there (yet): nothing to link to
                    continue
                if links > 1:
                    linked.append(f"{os.path.join(folder, name)} ({links} links)")
    if not linked:
        return []
    return [f"{len(linked)} validation file(s) have another hard link, by which train.py can read them: "
            f"{linked[0]}{' ...' if len(linked) > 1 else ''}: `find / -samefile FILE` names the other, to remove"]


def fingerprint_changes(then, now):
    return sorted(name for name in then.keys() | now.keys() if then.get(name) != now.get(name))


def harness_constants():
    """The constants of the prepared cache that the driver checks runs against."""
    manifest = cache_dir() / "manifest.json"
    if not manifest.exists():
        fail(f"the data is not prepared: {manifest} does not exist. Run `uv run prepare.py` first (with no network: "
             "`uv run prepare.py --dataset stdlib --preset small`), or set AUTORESEARCH_CACHE to a prepared cache.")
    try:
        written = json.loads(manifest.read_text())
        return {name: float(written[name]) if name == "time_budget" else int(written[name])
                for name in ("time_budget", "max_seq_len", "eval_tokens")}
    except (ValueError, KeyError, TypeError) as error:
        fail(f"{manifest} is damaged ({type(error).__name__}: {error}): run the same `uv run prepare.py` command again.")
