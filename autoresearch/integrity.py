"""
What makes a run `invalid`: the checks that keep val_bpb the harness's number.

train.py is code written by a model that is optimising val_bpb, so the driver does not take its word.
Three layers, each on plain values (docs/integrity.md explains them and their limits):

- before a run, `static_problems`: train.py's source must call prepare's evaluate_bpb and leave the
  harness alone;
- during it, the harness (prepare.attested_run) keeps a signed record of what it saw: evaluate_bpb's own
  val_bpb and token count, the splits opened and by whom, when training started and evaluation began, the
  causality check; `verify_record` checks its signature with the run's key, `record_problems` and
  `wall_clock_problems` read the record;
- around it, `harness_fingerprint`: prepare.py and the prepared cache must not change (and
  `portable_fingerprint`: a node that runs experiments for the driver must have the same cache).

These catch accidents and the shortcuts an optimiser finds; they are not a sandbox.
"""

import ast
import hashlib
import hmac
import json
import os
import re
from pathlib import Path

from autoresearch.console import fail

# -----------------------------------------------------------------------------
# train.py as written

PRIVATE_HARNESS_NAME = re.compile(
    r"_future_influence|_token_losses|CAUSALITY_TOLERANCE|_load_part|_document_batches|NonCausalModelError|"
    r"_ATTESTATION|_Attestation|attested_run|_record_evaluation|_evaluation_begins|_validation_files|_checksum")


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
        elif isinstance(node, (ast.Name, ast.Attribute, ast.alias)) and PRIVATE_HARNESS_NAME.fullmatch(
                getattr(node, "id", None) or getattr(node, "attr", None) or node.name):
            problems.append(f"line {getattr(node, 'lineno', '?')}: train.py uses prepare's internals")
    if holdout := re.search(r"holdout", source, re.IGNORECASE):
        problems.append(f"line {source.count(chr(10), 0, holdout.start()) + 1}: train.py names the holdout split, "
                        "which only the driver may ask evaluate_bpb to score")
    return list(dict.fromkeys(problems))


# -----------------------------------------------------------------------------
# The harness's record of a run

def verify_record(key, text):
    """(record, None) when `text` is a record signed with the run's key; else (None, why there is none).
    text None: the harness wrote none."""
    if text is None:
        return None, ("the harness wrote no record of the run (train.py did not let evaluate_bpb finish, "
                      "or removed the record)")
    try:
        signed = json.loads(text)
        record, mac = signed["record"], signed["hmac"]
    except (ValueError, KeyError, TypeError):
        return None, "the harness's record of the run is unreadable: it was altered"
    expected = hmac.new(key, json.dumps(record, sort_keys=True).encode(), "sha256").hexdigest()
    if not hmac.compare_digest(expected, str(mac)):
        return None, "the harness's record of the run does not verify: it was altered"
    return record, None


def evaluation(record):
    """The harness's evaluation of the run's final model, or None."""
    return record["evaluations"][-1] if record and record["evaluations"] else None


def training_seconds(record):
    """Wall clock from the first training batch to the start of the evaluation, as the harness saw it."""
    evaluated = evaluation(record)
    if evaluated is None or record["first_train_batch"] is None:
        return None
    return evaluated["started"] - record["first_train_batch"]


def record_problems(record, missing, returncode, printed_val_bpb, constants):
    """The rules of the metric a finished run broke, from the harness's record (empty: none).

    record: the verified record or None (then `missing` says why); printed_val_bpb: the number in train.py's
    summary, or None; constants: the prepared cache's max_seq_len and eval_tokens."""
    claims = returncode == 0 and printed_val_bpb is not None  # a crash claims nothing: it is a crash
    if record is None:
        return [missing] if claims else []
    problems = list(record["violations"])
    evaluations = record["evaluations"]
    if len(evaluations) > 1:
        problems.append(f"evaluate_bpb ran {len(evaluations)} times: only one evaluation, of the final model, "
                        "is allowed (more would select on the validation data)")
    if any(not e["causal"] for e in evaluations):
        moved = max(e["future_influence"] or 0.0 for e in evaluations)
        problems.append(f"evaluate_bpb refused to score a model that looks at future tokens (the loss at earlier "
                        f"positions moved by {moved:.3g} nats when only later tokens changed)")
    final = evaluation(record)
    if final and final["val_bpb"] is not None:
        rows = final["batch_size"] * constants["max_seq_len"]
        expected = constants["eval_tokens"] // rows * rows
        if final["seq_len"] != constants["max_seq_len"] or final["tokens"] != expected:
            problems.append(f"evaluate_bpb scored {final['tokens']} tokens at sequence length {final['seq_len']}, "
                            f"not the {expected} at {constants['max_seq_len']} that EVAL_TOKENS and MAX_SEQ_LEN "
                            "give: the harness's constants were changed")
        if printed_val_bpb is not None and abs(printed_val_bpb - final["val_bpb"]) > 1e-6:
            problems.append(f"train.py printed val_bpb {printed_val_bpb:.6f}, but evaluate_bpb measured "
                            f"{final['val_bpb']:.6f}")
    elif claims and not evaluations:
        problems.append("train.py printed a val_bpb, but evaluate_bpb never finished an evaluation")
    return list(dict.fromkeys(problems))


# -----------------------------------------------------------------------------
# The wall clock: the budget is TIME_BUDGET seconds of training, whatever train.py counts

def timing_slack(time_budget):
    """Seconds of jitter (the scheduler, a stall of the machine) no run is blamed for: 2 % of the budget, 1 s at
    least. A run that trained that much longer would gain at most 2 % more steps."""
    return max(1.0, 0.02 * time_budget)


def wall_clock_limits(baseline, time_budget, batch_gap):
    """(training, total): the most seconds a run may spend from its first training batch to its evaluation,
    and in all. Both scale with what the unmodified train.py measured on this machine: `baseline` holds
    (total seconds, training seconds) of its runs. Its start-up inside the training interval (compilation,
    the first steps train.py leaves uncounted, the last step's overshoot) and its time outside it (imports,
    building the model, the evaluation) may each double, as a deeper model's would; plus two steps of the
    run itself (`batch_gap`, its median seconds between training batches), and timing_slack()."""
    start_up = max(max(0.0, (training or 0.0) - time_budget) for _, training in baseline)
    outside = max(total - (training or 0.0) for total, training in baseline)
    training_limit = time_budget + 2 * start_up + 2 * (batch_gap or 0.0) + timing_slack(time_budget)
    return training_limit, training_limit + 2 * outside


def wall_clock_problems(seconds, record, baseline, time_budget):
    """A run that trained, or ran, longer than the budget allows (the driver's clock and the harness's)."""
    if not baseline:
        return []  # the baseline's own runs set the limits
    training_limit, total_limit = wall_clock_limits(baseline, time_budget, record and record["median_batch_gap"])
    problems = []
    trained = training_seconds(record)
    if trained is not None and trained > training_limit:
        problems.append(f"it trained for {trained:.1f}s (first training batch to evaluation), over the "
                        f"{training_limit:.1f}s a {time_budget:g}s budget allows on this machine")
    if seconds > total_limit:
        problems.append(f"the run took {seconds:.0f}s of wall clock, over the {total_limit:.0f}s a "
                        f"{time_budget:g}s budget allows on this machine")
    return problems


def baseline_timings(runs):
    """(total seconds, training seconds) of the given valid runs of the baseline, for wall_clock_limits."""
    return [(r["seconds"], training_seconds(r.get("attestation"))) for r in runs]


# -----------------------------------------------------------------------------
# prepare.py and the prepared cache

def cache_dir():
    return Path(os.environ.get("AUTORESEARCH_CACHE") or "~/.cache/autoresearch").expanduser()


def harness_fingerprint(prepare_py="prepare.py", cache=None):
    """What val_bpb depends on besides train.py: prepare.py and the prepared cache (not the raw downloads).
    sha256 of prepare.py, the manifest, the tokenizer and the validation tokens; size and mtime of the
    training tokens, which can be gigabytes and do not enter the metric."""
    return _fingerprint(Path(prepare_py), Path(cache) if cache else cache_dir(), portable=False)


# What differs between two caches that the same prepare.py command made on two machines: when it ran, and hashes
# over absolute paths and mtimes (a --text source's "fingerprint", and so the tokenizer's sha256, which embeds it).
MACHINE_SPECIFIC = {"created", "fingerprint", "tokenizer_sha256"}


def portable_fingerprint(prepare_py="prepare.py", cache=None):
    """harness_fingerprint as two machines agree on it when they ran the same prepare.py command (a run on another
    node checks its cache against the driver's with it): no mtimes, no MACHINE_SPECIFIC fields, a --text source's
    files by name, the validation tokens' index by its arrays (an .npz is a zip that stores when it was written)."""
    return _fingerprint(Path(prepare_py), Path(cache) if cache else cache_dir(), portable=True)


def _fingerprint(prepare_py, cache, portable):
    manifest = cache / "manifest.json"
    val_parts = set(json.loads(manifest.read_text()).get("splits", {}).get("val", {}).get("parts", []))
    fingerprint = {"prepare.py": hashlib.sha256(prepare_py.read_bytes()).hexdigest()}
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


def fingerprint_changes(then, now):
    return sorted(name for name in then.keys() | now.keys() if then.get(name) != now.get(name))


def harness_constants():
    """The constants of the prepared cache that the driver checks runs against."""
    manifest = cache_dir() / "manifest.json"
    if not manifest.exists():
        fail(f"the data is not prepared: {manifest} does not exist. Run `uv run prepare.py` first "
             "(or set AUTORESEARCH_CACHE to a prepared cache).")
    try:
        written = json.loads(manifest.read_text())
        return {name: float(written[name]) if name == "time_budget" else int(written[name])
                for name in ("time_budget", "max_seq_len", "eval_tokens")}
    except (ValueError, KeyError, TypeError) as error:
        fail(f"{manifest} is damaged ({type(error).__name__}: {error}): run the same `uv run prepare.py` command again.")
