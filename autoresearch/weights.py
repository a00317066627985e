"""
The models a night keeps: the weights of the baseline's and the best's runs, in .autoresearch/<tag>/models/.

- Each run scored on val has the harness save the model it scored (prepare.SAVE_WEIGHTS, a safetensors file);
  the driver copies it out of the run's folder (runner.run_in_folder; from a Ray worker, through the object store)
  to models/runs/<its log's name>.safetensors, keeps it only if the run is valid, and names it in the run's ledger
  record with its sha256.
- After each run and each result, tidy() keeps the files of the experiments not decided yet and, of the
  baseline's commit and of the best's, the valid run that scored lowest: models/baseline.safetensors and
  models/best.safetensors (hard links), each with a JSON beside it saying what it is and how to load it.
- rescore() loads a kept model into its commit's train.py and has the scorer score it again.
"""

import argparse
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from autoresearch import integrity, runner, state
from autoresearch.console import fail
from autoresearch.options import TIMEOUT_MARGIN

MODELS = "models"
RUNS = "runs"  # in MODELS: each run's weights, until tidy() removes them
ROLES = ("baseline", "best")
# how far a model scored again may be from its run's val_bpb: the scorer shuffles other rows beside each row
SAME_VAL_BPB = 1e-3

# -----------------------------------------------------------------------------
# One run's file


def run_file(state_dir, log_path):
    """Where a run's weights go: models/runs/, named as its log."""
    return Path(state_dir) / MODELS / RUNS / (Path(log_path).stem + ".safetensors")


def describe(path, state_dir):
    """{file (relative to the tag's folder), sha256, bytes} of a saved model; None when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy"):  # its header parses, and its tensors fit in the file
            pass
        with open(path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256")
    except Exception:  # noqa: BLE001 -- whatever train.py's process wrote there, it is not a model we keep
        return None
    return {"file": str(Path(path).relative_to(state_dir)), "sha256": digest.hexdigest(),
            "bytes": Path(path).stat().st_size}


# -----------------------------------------------------------------------------
# Which to keep: pure functions of the ledger


def chosen(ledger):
    """{"baseline": run, "best": run}: of the baseline's commit and of the best's, the valid run with saved weights
    that scored lowest (a roles' commit with none is left out)."""
    baseline = next((r for r in ledger.results() if r["experiment"] == 0 and r["status"] == "keep"), None)
    commits = {"baseline": baseline and baseline["commit"], "best": (ledger.best() or {}).get("commit")}
    saved = [r for r in ledger.valid_runs() if r.get("weights")]
    picks = {role: min((r for r in saved if r["commit"] == commit), key=lambda r: r["val_bpb"], default=None)
             for role, commit in commits.items() if commit}
    return {role: run for role, run in picks.items() if run}


def kept_files(ledger, picks):
    """The files of models/runs/ still needed: the chosen runs' (picks: chosen()), and every run's of an experiment
    not decided yet (the baseline's before its row, an idea's before its row)."""
    decided = {r["experiment"] for r in ledger.results()}
    undecided = [r for r in ledger.valid_runs() if r.get("weights") and r["experiment"] not in decided]
    return {run["weights"]["file"] for run in [*picks.values(), *undecided]}


# -----------------------------------------------------------------------------
# Keeping them


def tidy(state_dir, ledger, constants, busy=()):
    """Remove the runs' files no longer needed (not those of `busy`, the runs out, whose ledger records are yet to
    come), and point models/<role>.safetensors and its JSON at the chosen runs'."""
    state_dir, picks = Path(state_dir), chosen(ledger)
    folder = state_dir / MODELS
    keep = {state_dir / name for name in kept_files(ledger, picks)}
    keep |= {Path(path) for path in busy} | {Path(f"{path}.tmp") for path in busy}  # their copy may be under way
    for path in (folder / RUNS).glob("*"):
        if path not in keep:
            path.unlink(missing_ok=True)
    for role in ROLES:
        link, sidecar = folder / f"{role}.safetensors", folder / f"{role}.json"
        run = picks.get(role)
        if run is None or not (state_dir / run["weights"]["file"]).is_file():  # none saved (a tag begun before
            link.unlink(missing_ok=True)                                     # weights were kept), or removed
            sidecar.unlink(missing_ok=True)
            continue
        fields = {"role": role, "commit": run["commit"], "experiment": run["experiment"], "val_bpb": run["val_bpb"],
                  "seconds": run["seconds"], "log": run["log"], **run["weights"], "constants": constants,
                  "load": how_to_load(run["commit"])}
        if link.is_file() and sidecar.is_file() and sidecar.read_text() == json.dumps(fields, indent=2) + "\n":
            continue
        replace_with(link, lambda partial: os.link(state_dir / run["weights"]["file"], partial),
                     lambda partial: shutil.copyfile(state_dir / run["weights"]["file"], partial))
        replace_with(sidecar, lambda partial: partial.write_text(json.dumps(fields, indent=2) + "\n"))


def replace_with(path, write, fallback=None):
    """Write `path` anew through a partial file and a rename: a driver killed meanwhile leaves the old one whole."""
    partial = path.with_name(path.name + ".tmp")
    partial.unlink(missing_ok=True)
    try:
        write(partial)
    except OSError:
        if fallback is None:
            raise
        fallback(partial)  # a file system without hard links
    os.replace(partial, path)


def how_to_load(commit):
    """How to use a kept model of `commit`, in a line the report and the JSON show."""
    return (f"`git show {commit[:7]}:train.py > train_{commit[:7]}.py`, build its model as its main() does, then "
            "`safetensors.torch.load_model(model, path)` (metadata: the constants and the model's config); or "
            "score it again: `uv run agent_loop.py rescore --tag TAG`")


# -----------------------------------------------------------------------------
# Scoring a kept model again


def rescore(state_dir, repo, ledger, role, log_path):
    """Load models/<role>.safetensors into its commit's train.py (which then trains only a moment) and have the
    scorer score it on this machine's cache. Returns (the val_bpb the scorer attests, or None; its JSON; why not)."""
    folder = Path(state_dir) / MODELS
    try:
        about = json.loads((folder / f"{role}.json").read_text())
    except FileNotFoundError:
        return None, None, f"{folder} holds no {role} model: the tag kept none (yet)"
    except ValueError:
        return None, None, f"{folder / (role + '.json')} is not JSON: run the loop again to write it anew"
    path = folder / f"{role}.safetensors"
    if (described := describe(path, state_dir)) is None or described["sha256"] != about["sha256"]:
        return None, about, f"{path} is not the file its run saved (its sha256 differs): it was changed since"
    start = ledger.events("start")[0]
    if changed := integrity.fingerprint_changes(start["fingerprint"], integrity.harness_fingerprint()):
        return None, about, (f"the harness or the prepared cache changed since the tag started ({', '.join(changed)})"
                             ": its score here would not be comparable")
    train_source = state.file_at(repo, about["commit"], "train.py")
    harness = {name: state.file_at(repo, about["commit"], name) for name in integrity.HARNESS}
    key = secrets.token_hex(32)
    # it trains a moment: twice its run's time, as the night limits a run once the baseline has measured one
    limit = start["timeout"] or 2 * about.get("seconds", 300) + TIMEOUT_MARGIN
    result = runner.run_in_folder(train_source, harness, key, limit, None, log_path=log_path, load=path)
    record, missing = integrity.verify_record(bytes.fromhex(key), result["record"])
    evaluated = None if missing else integrity.evaluation(record)
    if not evaluated or result["returncode"] != 0:
        return None, about, f"the run did not score it (exit code {result['returncode']}; its log: {log_path})"
    return evaluated["val_bpb"], about, ""


def rescore_main(argv):
    parser = argparse.ArgumentParser(
        prog="agent_loop.py rescore",
        description="Load a model a tag kept (.autoresearch/<tag>/models/) into its commit's train.py and have the\n"
        "scorer score it again on this machine's prepared cache: the number its run was kept with, reproduced\n"
        "from the weights alone (train.py then trains only a moment, which the loaded weights replace).",
        epilog="examples:\n  uv run agent_loop.py rescore\n  uv run agent_loop.py rescore --tag nov22 --model baseline",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", help="the tag whose model to score (default: the tag whose ledger changed last)")
    parser.add_argument("--model", choices=ROLES, default="best", help="which of its models (default: best)")
    args = parser.parse_args(argv)
    from autoresearch import report  # here: report imports runs, which imports this module

    root, ledgers = report.tag_ledgers()
    tag = args.tag or (ledgers[-1].parent.name if ledgers else None)
    if not tag:
        fail(f"rescore scores a model a tag kept, and {root / state.STATE_ROOT} has no tag: run the loop first "
             "(uv run agent_loop.py), or name a tag with --tag.")
    state_dir = root / state.STATE_ROOT / tag
    if not (state_dir / "ledger.jsonl").is_file():
        fail(f"there is no tag {tag}: {state_dir / 'ledger.jsonl'} does not exist. Tags here: "
             f"{', '.join(path.parent.name for path in ledgers) or 'none'}.")
    os.chdir(root)  # the harness and the cache as the loop sees them
    log_path = state_dir / "logs" / f"rescore-{args.model}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"rescore: the {args.model} model of tag {tag}, loaded into its train.py; log: {log_path}", flush=True)
    val_bpb, about, why = rescore(state_dir, state.open_repo(root), state.Ledger(state_dir / "ledger.jsonl"),
                                 args.model, log_path)
    if val_bpb is None:
        fail(f"rescore: {why}")
    difference = val_bpb - about["val_bpb"]
    print(f"val_bpb {val_bpb:.6f} (its run scored {about['val_bpb']:.6f}: {difference:+.6f}); #{about['experiment']} "
          f"{about['commit'][:7]}, {state_dir / MODELS / (args.model + '.safetensors')}")
    if abs(difference) > SAME_VAL_BPB:
        print(f"rescore: these weights do not score what their run did (more than {SAME_VAL_BPB} apart): the run's "
              "train.py saved another model than the one it evaluated, or this machine computes differently")
        return 1
    return 0
