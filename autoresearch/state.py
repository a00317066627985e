"""
The repository and the tag's records: git through GitPython, the ledger, results.tsv.

Every experiment is a commit of train.py beside the branch autoresearch/<tag>, which points at the best, kept
reachable by its own ref refs/autoresearch/<tag>/<n>. The ledger (.autoresearch/<tag>/ledger.jsonl) is
append-only JSON lines, one per event: start, proposal, run_started, run, requeued, result, steer,
plateau, openai_output, holdout_run, holdout, stop. results.tsv is rewritten whole from it after each result.
steer.md, untracked, is the researcher's guidance to the agent, read before each proposal.
"""

import datetime
import hmac
import json
import os
import re
import tempfile
from pathlib import Path

import git

from autoresearch.console import fail, log

STATE_ROOT = Path(".autoresearch")  # ignored by git; one folder per tag
NO_COMMIT = "0" * 40  # the commit of a row whose change was refused whole
STATUSES = ("keep", "discard", "crash", "invalid")  # invalid: broke a rule of the metric (see integrity.py)
RESULTS_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
STEER_FILE = Path("steer.md")
STEER_TEMPLATE = """<!--
steer.md: your guidance to the research agent, in your words, below this comment. It is read before every
proposal and shown to the agent above the history, so you can steer a night that is already going (no restart).
The ledger and the report record each change. Text inside HTML comments like this one is not shown.
Examples: "Stop tuning learning rates; try architecture changes." "Keep peak memory under 40 GB."
-->
"""

# -----------------------------------------------------------------------------
# Git


def open_repo(path="."):
    """The git repository around path, or a clear error."""
    root = worktree_root(path)
    if root is None:
        fail("not inside a git repository: run agent_loop.py from the autoresearch checkout.")
    return git.Repo(root)


def worktree_root(path="."):
    """The top of the git work tree around path, or None outside one."""
    try:
        return Path(git.Repo(path, search_parent_directories=True).working_tree_dir)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None


def head_commit(repo):
    return repo.head.commit.hexsha


def current_branch(repo):
    return None if repo.head.is_detached else repo.active_branch.name


def dirty_tracked_files(repo):
    """Tracked files that differ from HEAD, staged or not."""
    return sorted({diff.a_path for diff in repo.head.commit.diff(None)})


def changed_files(repo, old, new):
    return sorted({diff.b_path or diff.a_path for diff in repo.commit(old).diff(new)})


def file_at(repo, commit, path):
    return repo.commit(commit).tree[path].data_stream.read().decode()


def keep_out_of_git(repo, *paths):
    """Make sure our outputs never count as changes and are never committed."""
    exclude = Path(repo.common_dir) / "info" / "exclude"  # shared by all worktrees
    ignored = set(repo.ignored(*paths))
    for path in paths:
        if path not in ignored and path.rstrip("/") not in ignored:
            exclude.parent.mkdir(parents=True, exist_ok=True)
            with open(exclude, "a") as f:
                f.write(f"\n{path}\n")


def keep_reachable(repo, tag, commit):
    """Give the commit its own ref so that a reset never loses it; return the ref's number (the number it has
    already, when the tag gave it one: a resumed baseline keeps its logs' names)."""
    prefix = f"refs/autoresearch/{tag}/"
    refs = {int(ref.path[len(prefix):]): ref.commit.hexsha
            for ref in git.Reference.iter_items(repo, common_path=prefix)}
    if mine := [number for number, at in refs.items() if at == commit]:
        return min(mine)
    number = max(refs, default=0) + 1
    git.Reference.create(repo, f"{prefix}{number}", commit)
    return number


def commit_source(repo, parent, source, message):
    """A commit whose train.py is source, on top of parent, made without touching the working tree, the index or
    a branch: candidates are committed beside the branch, which stays at the best."""
    with tempfile.TemporaryDirectory() as folder:  # a temporary index, gone with the folder
        (Path(folder) / "train.py").write_text(source)
        index = {"GIT_INDEX_FILE": str(Path(folder) / "index")}
        blob = repo.git.hash_object("-w", str(Path(folder) / "train.py"))
        repo.git.read_tree(parent, env=index)
        mode = repo.commit(parent).tree["train.py"].mode
        repo.git.update_index("--cacheinfo", f"{mode:o},{blob},train.py", env=index)
        tree = repo.git.write_tree(env=index)
    return repo.git(c="commit.gpgsign=false").commit_tree(tree, "-p", parent, "-m", message)


def merge_train_py(repo, base, ours, theirs):
    """train.py of ours with the change base -> theirs applied to it (git merge-file, a three-way merge), or None
    when the two changes conflict."""
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for name, commit in (("ours", ours), ("base", base), ("theirs", theirs)):
            paths.append(Path(folder) / name)
            paths[-1].write_text(file_at(repo, commit, "train.py"))
        try:
            return repo.git.merge_file("-p", "-q", *map(str, paths), strip_newline_in_stdout=False)
        except git.GitCommandError as error:
            if isinstance(error.status, int) and 0 < error.status < 128:  # the number of conflicts
                return None
            raise


def add_scratch_worktree(repo, path, commit):
    """A detached worktree of commit at path, for an agent that edits files itself; a repo object for it."""
    repo.git.worktree("add", "--detach", "--force", str(path), commit)
    return git.Repo(path)


def remove_scratch_worktree(repo, path):
    repo.git.worktree("remove", "--force", str(path))


def move_branch(repo, branch, commit):
    """Point the night's branch at commit. The work tree follows when the branch is checked out (git reset --keep:
    a change of the user's that the move would overwrite stops the night, saying so); a checkout of another
    branch is left alone, so that `git checkout main` during a night never rewrites main."""
    if repo.heads[branch].commit.hexsha == commit:
        return
    if current_branch(repo) != branch:
        repo.heads[branch].commit = commit
        log(f"{branch} moved to {commit[:7]} (your checkout, {current_branch(repo) or 'a detached HEAD'}, is left "
            "as it is)")
        return
    repo.git.update_index("-q", "--refresh", with_exceptions=False)  # stat data only: no false "not uptodate"
    try:
        repo.git.reset("--keep", commit)
    except git.GitCommandError:
        fail(f"cannot move {branch} to {commit[:7]}: your uncommitted changes ({', '.join(dirty_tracked_files(repo))})"
             " are in the way. Commit or stash them, then run the same command again to resume.")


def check_branch(repo, tag, ledger):
    """Whether autoresearch/<tag> can be started or resumed; refuse to touch uncommitted work."""
    branch = f"autoresearch/{tag}"
    exists = branch in repo.heads
    if exists != bool(ledger.records):
        fail(f"branch {branch} exists but it has no ledger: choose another --tag." if exists else
             f"there is a ledger for tag {tag} but no branch {branch}: choose another --tag.")
    if dirty := dirty_tracked_files(repo):  # the loop never edits the work tree: these are the user's
        fail(f"uncommitted changes to tracked files: {', '.join(dirty)}. Commit or stash them first: "
             "every experiment starts from a commit.")
    return branch, exists


# -----------------------------------------------------------------------------
# steer.md


def read_steering(path=STEER_FILE):
    """The researcher's guidance in steer.md, without its comments; "" when there is none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return re.sub(r"<!--.*?(-->|$)", "", text, flags=re.DOTALL).strip()


# -----------------------------------------------------------------------------
# The ledger

class Ledger:
    """The tag's ledger.jsonl as records, and the questions the loop and the report ask of them.

    Each record the loop writes is sealed: an HMAC of it and of the record before it, under the tag's ledger.key
    (which train.py's sandbox cannot read), so that `altered()` finds a record changed, or removed, afterwards."""

    def __init__(self, path=None, records=None):
        self.path = path
        self.records = records if records is not None else read_records(path) if path else []
        self.by_event = {}  # event: its records, in order (the loop asks many times a second)
        for record in self.records:
            self.by_event.setdefault(record["event"], []).append(record)
        self.key_path = path.with_name("ledger.key") if path else None

    def key(self, create=False):
        """(key, how many records came before the first sealed one), or None without a key; create: make one
        now, when there is none. A key file that is there but unreadable stops the loop."""
        if self.key_path is None:
            return None
        try:
            secret, unsealed = self.key_path.read_text().split()
            return bytes.fromhex(secret), int(unsealed)
        except FileNotFoundError:
            if not create:
                return None
        except ValueError:
            fail(f"{self.key_path} is damaged: the ledger beside it can no longer be checked. Start a new --tag.")
        descriptor = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as f:
            f.write(f"{os.urandom(32).hex()} {len(self.records)}\n")  # the records of a ledger from before seals
        return self.key()

    def altered(self):
        """Where the ledger was changed after the loop wrote it ("record N (event at time)"), or None. Records
        from before seals existed (a key file says how many) are read as they are."""
        found = self.key()
        if found is None:
            sealed = next((n for n, r in enumerate(self.records, 1) if "seal" in r), None)
            return f"its key, {self.key_path}, is gone" if sealed else None
        key, unsealed, previous = *found, ""
        for number, record in enumerate(self.records[unsealed:], unsealed + 1):
            if record.get("seal") != seal(key, previous, record):
                return f"record {number} ({record.get('event')} at {record.get('time')})"
            previous = record["seal"]
        return None

    def append(self, **record):
        record = {"time": datetime.datetime.now().isoformat(timespec="seconds"), **record}
        if self.path:
            previous = next((r["seal"] for r in reversed(self.records) if "seal" in r), "")
            record["seal"] = seal(self.key(create=True)[0], previous, record)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.records.append(record)
        self.by_event.setdefault(record["event"], []).append(record)
        return record

    def events(self, event):
        return list(self.by_event.get(event, ()))

    def results(self):
        return self.events("result")

    def best(self):
        """The last kept result is the best (the baseline is kept); None before the baseline."""
        kept = [r for r in self.results() if r["status"] == "keep"]
        return kept[-1] if kept else None

    def kept_val_bpbs(self):
        return [r["val_bpb"] for r in self.results() if r["status"] == "keep"]

    def valid_runs(self):
        """Runs that gave a val_bpb and broke no rule."""
        return [r for r in self.events("run") if r["ok"]]

    def measured(self, commit):
        """The val_bpb of every valid run of a commit, repeats included."""
        return [r["val_bpb"] for r in self.valid_runs() if r["commit"] == commit]

    def run_groups(self):
        """{(commit, experiment): [val_bpb of each valid run]}: what the noise is measured on. The best's runs
        beside each candidate (paired rule) are a group of their own: runs hours apart would measure the
        machine's drift as noise."""
        groups = {}
        for r in self.valid_runs():
            groups.setdefault((r["commit"], r["experiment"]), []).append(r["val_bpb"])
        return groups

    def experiment_runs(self, experiment, commit):
        """({pair: run} of the commit's runs in the experiment, {pair: run} of the best's runs made beside them),
        valid or not: what its next decision reads. The pair of a run is its repeat."""
        candidate, reference = {}, {}
        for r in self.events("run"):
            if r["experiment"] == experiment and r.get("reference") and r["beside"] == commit:
                reference[r["repeat"]] = r
            elif r["experiment"] == experiment and not r.get("reference") and r["commit"] == commit:
                candidate[r["repeat"]] = r
        return candidate, reference

    def next_experiment(self):
        """The next experiment's number: numbers are given as ideas are asked for, and never given twice."""
        numbered = self.results() + self.events("proposal")
        return max((r["experiment"] for r in numbered), default=0) + 1

    def open_experiments(self):
        """{experiment: its last committed proposal} of the experiments proposed but not decided: those in flight
        when the driver stopped, which the next start resumes."""
        closed = {r["experiment"] for r in self.results()}
        return {r["experiment"]: r for r in self.events("proposal") if r["ok"] and r["experiment"] not in closed}

    def description(self, experiment):
        """The description its idea was proposed with (fixes keep it)."""
        return next(r["description"] for r in self.events("proposal") if r["experiment"] == experiment and r["ok"])

    def hypothesis(self, experiment):
        """The hypothesis of the experiment's idea ("" when its agent gave none)."""
        ideas = [r for r in self.events("proposal") if r["experiment"] == experiment and r["ok"] and not r["attempt"]]
        return ideas[-1].get("hypothesis", "") if ideas else ""

    def notes(self):
        """The agent's lab notes as it last wrote them: the last proposal record with notes, or None."""
        written = [r for r in self.events("proposal") if r.get("notes")]
        return written[-1] if written else None

    def steering(self):
        """steer.md's text as the ledger last recorded it ("" before any)."""
        changes = self.events("steer")
        return changes[-1]["text"] if changes else ""

    def base_commit(self):
        return self.events("start")[0]["base_commit"]

    def last_start(self):
        starts = self.events("start")
        return starts[-1] if starts else None

    def spent_usd(self):
        return sum(r.get("cost_usd") or 0 for r in self.events("proposal"))


def near_misses(rows):
    """The discarded rows whose mean was below the best of their time: better, but within the noise."""
    misses, best = [], None
    for r in rows:
        if r["status"] == "keep":
            best = r["val_bpb"] if best is None else min(best, r["val_bpb"])
        elif r["status"] == "discard" and best is not None and r["val_bpb"] < best:
            misses.append(r)
    return misses


def plateau_streak(rows):
    """How many experiments in a row, since the last keep, were not kept."""
    kept = [i for i, r in enumerate(rows) if r["status"] == "keep"]
    return len(rows) - 1 - kept[-1] if kept else len(rows)


def seal(key, previous, record):
    body = json.dumps({k: v for k, v in record.items() if k != "seal"}, sort_keys=True)
    return hmac.new(key, (previous + body).encode(), "sha256").hexdigest()[:32]


def read_records(path):
    """The ledger's records; an unfinished last line (a killed driver, or one writing now) is skipped."""
    text = path.read_text() if path.exists() else ""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # that unfinished line
    return records


def end_unfinished_line(path):
    """End the line a killed driver left unfinished, so that the next record starts clean."""
    if path.exists() and (text := path.read_text()) and not text.endswith("\n"):
        with open(path, "a") as f:
            f.write("\n")


# -----------------------------------------------------------------------------
# results.tsv


def write_results_tsv(rows, state_dir):
    lines = [RESULTS_HEADER] + [
        f"{r['commit'][:7]}\t{r['val_bpb']:.6f}\t{r['memory_gb']:.1f}\t{r['status']}\t{r['description']}\n"
        for r in rows
    ]
    # Written whole from the ledger, so a killed run can never leave a duplicate row.
    for target in (Path("results.tsv"), state_dir / "results.tsv"):
        temporary = state_dir / "results.tsv.tmp"
        temporary.write_text("".join(lines))
        os.replace(temporary, target)


def read_results_tsv(path):
    """The rows of a results.tsv, shaped like the ledger's result events."""
    lines = path.read_text().splitlines()
    if not lines or lines[0].split("\t") != RESULTS_HEADER.split():
        fail(f"{path}, line 1: not a results.tsv: the header must be {RESULTS_HEADER.strip()!r}")
    rows = []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            commit, val_bpb, memory_gb, status, description = line.split("\t", 4)
            row = dict(experiment=len(rows), commit=commit, val_bpb=float(val_bpb), memory_gb=float(memory_gb),
                       status=status, description=description)
        except ValueError:
            fail(f"{path}, line {number}: malformed row {line!r}: expected commit, val_bpb, memory_gb, status "
                 "and description, separated by tabs")
        if status not in STATUSES:
            fail(f"{path}, line {number}: unknown status {status!r} (expected one of {', '.join(STATUSES)})")
        rows.append(row)
    return rows
