"""The repository and the tag's records (autoresearch/state.py): the ledger on hand-made records,
results.tsv, and the git functions on a real temporary repository made with GitPython."""

import datetime
import json
import os
import re
from pathlib import Path

import git
import pytest

from autoresearch import state
from autoresearch.state import Ledger

TRAIN_PY, PREPARE_PY = "LR = 0.04\n", "TIME_BUDGET = 300\n"


def fails(message):
    """pytest.raises for the error state.fail stops with, which must contain `message`."""
    return pytest.raises(SystemExit, match="^agent_loop.py: error: .*" + re.escape(message))


# -----------------------------------------------------------------------------
# The ledger


def test_append_writes_one_json_line_stamped_with_the_time_and_syncs_it_to_disk(tmp_path, monkeypatch):
    path = tmp_path / "ledger.jsonl"
    on_disk_at_sync = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (on_disk_at_sync.append(path.read_text()), real_fsync(fd)))
    record = Ledger(path).append(event="start", base_commit="abc")
    line = json.loads(path.read_text())
    assert line == record and list(line) == ["time", "event", "base_commit", "seal"]
    assert abs(datetime.datetime.fromisoformat(line["time"]) - datetime.datetime.now()) < datetime.timedelta(seconds=5)
    assert on_disk_at_sync == [path.read_text()]  # the line was written out before the sync, and synced


def test_append_adds_to_the_records_in_memory_and_appends_to_the_file(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.append(event="start")
    ledger.append(event="stop")
    assert [r["event"] for r in ledger.records] == ["start", "stop"]
    assert [r["event"] for r in Ledger(path).records] == ["start", "stop"]


def sealed_ledger(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for event, val_bpb in (("start", None), ("run", 1.0), ("result", 1.0), ("stop", None)):
        ledger.append(event=event, val_bpb=val_bpb)
    return ledger.path


def test_a_sealed_ledger_as_written_is_not_altered(tmp_path):
    path = sealed_ledger(tmp_path)
    assert Ledger(path).altered() is None and oct((tmp_path / "ledger.key").stat().st_mode)[-3:] == "600"


@pytest.mark.parametrize("change", [
    lambda lines: lines[:2] + [lines[2].replace('"val_bpb": 1.0', '"val_bpb": 0.5')] + lines[3:],  # a number changed
    lambda lines: lines[:1] + lines[2:],  # a record removed
    lambda lines: [line.split(', "seal"')[0] + "}" for line in lines],  # every seal removed
    lambda lines: ['{"event": "result", "status": "keep", "val_bpb": 0.1}'] + lines,  # a record put first
])
def test_a_record_changed_or_removed_after_the_loop_wrote_it_is_found(tmp_path, change):
    path = sealed_ledger(tmp_path)
    path.write_text("\n".join(change(path.read_text().splitlines())) + "\n")
    assert Ledger(path).altered() is not None


def test_a_sealed_ledger_whose_key_is_gone_is_altered(tmp_path):
    path = sealed_ledger(tmp_path)
    (tmp_path / "ledger.key").unlink()
    assert Ledger(path).altered().startswith("its key")


def test_a_ledger_written_before_seals_is_read_as_it_is_and_what_follows_is_sealed(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"event": "start"}\n{"event": "stop"}\n')
    assert Ledger(path).altered() is None
    Ledger(path).append(event="start")
    assert Ledger(path).altered() is None and "seal" in Ledger(path).records[-1]
    path.write_text(path.read_text().replace('{"event": "stop"}', '{"event": "stop", "reason": "changed"}'))
    assert Ledger(path).altered() is None  # an unsealed record stays unchecked: the key says how many there are
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ['{"event": "result"}'] + lines[2:]) + "\n")
    assert Ledger(path).altered() is not None


def test_a_ledger_without_a_path_keeps_its_records_in_memory_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ledger = Ledger(records=[{"event": "start"}])
    ledger.append(event="stop")
    assert [r["event"] for r in ledger.records] == ["start", "stop"] and list(tmp_path.iterdir()) == []


def test_read_records_skips_an_unfinished_last_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"event": "start"}\n{"event": "run"}\n{"event": "res')
    assert state.read_records(path) == [{"event": "start"}, {"event": "run"}]


def test_read_records_of_no_file_is_empty(tmp_path):
    assert state.read_records(tmp_path / "ledger.jsonl") == []


def test_end_unfinished_line_lets_the_next_record_start_on_a_line_of_its_own(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"event": "start"}\n{"event": "res')
    state.end_unfinished_line(path)
    Ledger(path).append(event="stop")
    assert [r["event"] for r in state.read_records(path)] == ["start", "stop"]


@pytest.mark.parametrize("text", ['{"event": "start"}\n', ""])
def test_end_unfinished_line_leaves_a_finished_or_empty_ledger_as_it_is(tmp_path, text):
    path = tmp_path / "ledger.jsonl"
    path.write_text(text)
    state.end_unfinished_line(path)
    assert path.read_text() == text


def test_end_unfinished_line_creates_no_ledger(tmp_path):
    state.end_unfinished_line(tmp_path / "ledger.jsonl")
    assert not (tmp_path / "ledger.jsonl").exists()


def run(commit, val_bpb, ok=True):
    return {"event": "run", "commit": commit, "val_bpb": val_bpb, "ok": ok}


def result(commit, val_bpb, status):
    return {"event": "result", "commit": commit, "val_bpb": val_bpb, "status": status}


# A tag started, resumed once: the baseline run twice, an idea kept (one of its runs invalid), one
# discarded, one crashed; proposals priced, unpriced and of unknown price.
NIGHT = [
    {"event": "start", "base_commit": "base", "agent": "anthropic"},
    run("base", 1.00), run("base", 1.02), result("base", 1.01, "keep"),
    {"event": "proposal", "cost_usd": 0.25}, run("c1", 0.98), run("c1", 0.0, ok=False), result("c1", 0.98, "keep"),
    {"event": "start", "base_commit": "c1", "agent": "anthropic", "resumed": True},
    {"event": "proposal", "cost_usd": None}, run("c2", 1.05), result("c2", 1.05, "discard"),
    {"event": "proposal"}, result("c3", 0.0, "crash"),
]


def test_results_are_the_result_events_in_order():
    assert [r["commit"] for r in Ledger(records=NIGHT).results()] == ["base", "c1", "c2", "c3"]


def test_the_best_is_the_last_kept_result():
    assert Ledger(records=NIGHT).best() == result("c1", 0.98, "keep")


def test_there_is_no_best_before_the_baseline():
    assert Ledger(records=NIGHT[:3]).best() is None


def proposal(experiment, attempt=0, ok=True, **fields):
    return {"event": "proposal", "experiment": experiment, "attempt": attempt, "ok": ok, **fields}


def test_an_experiment_s_hypothesis_is_that_of_its_idea_not_of_a_fix():
    ledger = Ledger(records=[proposal(3, hypothesis="wider is better"), proposal(3, 1, hypothesis="fix the shape"),
                             proposal(4)])
    assert (ledger.hypothesis(3), ledger.hypothesis(4), ledger.hypothesis(5)) == ("wider is better", "", "")


def test_the_notes_are_the_last_written_even_by_a_proposal_that_failed():
    ledger = Ledger(records=[proposal(1, notes="first"), proposal(2), proposal(3, ok=False, notes="third")])
    assert ledger.notes()["notes"] == "third" and Ledger(records=[proposal(1)]).notes() is None


def test_near_misses_are_discards_below_the_best_of_their_time():
    rows = [result("a", 1.0, "keep"), result("b", 0.99, "discard"), result("c", 0.98, "keep"),
            result("d", 0.985, "discard"), result("e", 0.97, "discard"), result("f", 0.0, "crash")]
    assert [r["commit"] for r in state.near_misses(rows)] == ["b", "e"]


@pytest.mark.parametrize("statuses, streak", [
    (["keep"], 0), (["keep", "discard", "crash", "invalid"], 3), (["keep", "discard", "keep", "discard"], 1),
])
def test_the_plateau_streak_counts_the_experiments_since_the_last_keep(statuses, streak):
    assert state.plateau_streak([result("c", 1.0, status) for status in statuses]) == streak


def test_the_steering_is_steer_md_without_its_comments(tmp_path):
    path = tmp_path / "steer.md"
    path.write_text(state.STEER_TEMPLATE)
    assert state.read_steering(path) == "" and state.read_steering(tmp_path / "missing.md") == ""
    path.write_text(state.STEER_TEMPLATE + "Try deeper models.\n<!-- not this -->\nKeep memory low.\n<!-- nor")
    assert state.read_steering(path) == "Try deeper models.\n\nKeep memory low."


def test_kept_val_bpbs_are_those_of_each_kept_result_baseline_first():
    assert Ledger(records=NIGHT).kept_val_bpbs() == [1.01, 0.98]


def test_measured_is_every_valid_run_of_a_commit_repeats_included():
    ledger = Ledger(records=NIGHT)
    assert ledger.measured("base") == [1.00, 1.02]
    assert ledger.measured("c1") == [0.98]  # its invalid run measured nothing
    assert ledger.measured("c3") == []


def test_run_groups_gather_the_valid_runs_by_commit_and_experiment():
    records = [dict(r, experiment=0 if r.get("commit") == "base" else 1) for r in NIGHT]
    records.append(dict(run("base", 1.03), experiment=2, reference=True))  # the best's run beside #2's
    assert Ledger(records=records).run_groups() == {("base", 0): [1.00, 1.02], ("c1", 1): [0.98],
                                                    ("c2", 1): [1.05], ("base", 2): [1.03]}


def test_experiment_runs_are_the_candidate_s_and_the_best_s_beside_it_by_pair_number_valid_or_not():
    records = [dict(run("c1", 0.98), experiment=3, repeat=1), dict(run("base", 1.0), experiment=3, repeat=1,
                                                                    reference=True, beside="c1"),
               dict(run("base", 1.01), experiment=3, repeat=2, reference=True, beside="c1"),
               dict(run("c1", 0.0, ok=False), experiment=3, repeat=2), dict(run("base", 1.1), experiment=4, repeat=1),
               dict(run("base", 1.2), experiment=3, repeat=1, reference=True, beside="c0")]  # beside an earlier commit
    candidate, reference = Ledger(records=records).experiment_runs(3, "c1")
    assert {pair: r["val_bpb"] for pair, r in candidate.items()} == {1: 0.98, 2: 0.0} and not candidate[2]["ok"]
    assert {pair: r["val_bpb"] for pair, r in reference.items()} == {1: 1.0, 2: 1.01}


def test_spent_usd_sums_the_priced_proposals():
    assert Ledger(records=NIGHT).spent_usd() == 0.25


def test_the_base_commit_is_the_first_start_s_and_the_last_start_the_latest():
    ledger = Ledger(records=NIGHT)
    assert ledger.base_commit() == "base"
    assert ledger.last_start()["base_commit"] == "c1"


def test_there_is_no_last_start_in_an_empty_ledger():
    assert Ledger(records=[]).last_start() is None


# -----------------------------------------------------------------------------
# results.tsv

ROWS = [
    {"commit": "0123456789abcdef", "val_bpb": 1.0, "memory_gb": 2.04, "status": "keep", "description": "baseline"},
    {"commit": "fedcba9876543210", "val_bpb": 0.0, "memory_gb": 0.0, "status": "crash", "description": "try: OOM"},
    {"commit": "0000000000000000", "val_bpb": 0.98765432, "memory_gb": 3.0, "status": "discard",
     "description": "lower LR, then warm up"},
]


def test_results_tsv_is_written_in_the_repository_and_the_tag_s_folder_alike(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state_dir = tmp_path / ".autoresearch" / "t"
    state_dir.mkdir(parents=True)
    state.write_results_tsv(ROWS, state_dir)
    assert (tmp_path / "results.tsv").read_text() == (state_dir / "results.tsv").read_text() == (
        "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
        "0123456\t1.000000\t2.0\tkeep\tbaseline\n"
        "fedcba9\t0.000000\t0.0\tcrash\ttry: OOM\n"
        "0000000\t0.987654\t3.0\tdiscard\tlower LR, then warm up\n")
    assert sorted(p.name for p in state_dir.iterdir()) == ["results.tsv"]  # no temporary file left


def test_results_tsv_read_back_gives_the_rows_numbered_at_the_precision_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state.write_results_tsv(ROWS, tmp_path)
    assert state.read_results_tsv(tmp_path / "results.tsv") == [
        dict(experiment=0, commit="0123456", val_bpb=1.0, memory_gb=2.0, status="keep", description="baseline"),
        dict(experiment=1, commit="fedcba9", val_bpb=0.0, memory_gb=0.0, status="crash", description="try: OOM"),
        dict(experiment=2, commit="0000000", val_bpb=0.987654, memory_gb=3.0, status="discard",
             description="lower LR, then warm up"),
    ]


def test_read_results_tsv_skips_blank_lines(tmp_path):
    path = tmp_path / "results.tsv"
    path.write_text(state.RESULTS_HEADER + "\naaaaaaa\t1.0\t2.0\tkeep\tbaseline\n  \n")
    assert [row["commit"] for row in state.read_results_tsv(path)] == ["aaaaaaa"]


@pytest.mark.parametrize("text, error", [
    ("", "line 1: not a results.tsv"),
    ("commit,val_bpb,memory_gb,status,description\n", "line 1: not a results.tsv"),
    (state.RESULTS_HEADER + "aaaaaaa\t1.0\t2.0\tkeep\tbaseline\nbbbbbbb\t0.9\tkeep\n", "line 3: malformed row"),
    (state.RESULTS_HEADER + "aaaaaaa\tnan-ish\t2.0\tkeep\tbaseline\n", "line 2: malformed row 'aaaaaaa\\tnan-ish"),
    (state.RESULTS_HEADER + "aaaaaaa\t1.0\t2.0\tmaybe\tbaseline\n", "line 2: unknown status 'maybe'"),
], ids=["empty", "commas", "short row", "not a number", "unknown status"])
def test_read_results_tsv_names_the_file_and_line_of_what_is_wrong(tmp_path, text, error):
    path = tmp_path / "results.tsv"
    path.write_text(text)
    with fails(f"{path}, {error}"):
        state.read_results_tsv(path)


# -----------------------------------------------------------------------------
# Git


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository on branch main with train.py and prepare.py committed, as the current directory; no
    user-wide or system git configuration."""
    for name in os.environ:
        if name.startswith("GIT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    path = tmp_path / "repo"
    repo = git.Repo.init(path, initial_branch="main")
    with repo.config_writer() as config:
        config.set_value("user", "name", "test")
        config.set_value("user", "email", "test@example.com")
    (path / "train.py").write_text(TRAIN_PY)
    (path / "prepare.py").write_text(PREPARE_PY)
    repo.index.add(["train.py", "prepare.py"])
    repo.index.commit("initial")
    monkeypatch.chdir(path)
    return repo


def commit_train(repo, text, message="an experiment"):
    return state.commit_source(repo, state.head_commit(repo), text, message)


def failing_pre_commit_hook(repo):
    hook = Path(repo.git_dir) / "hooks" / "pre-commit"
    hook.parent.mkdir(exist_ok=True)
    hook.write_text("#!/bin/sh\necho refused >&2\nexit 1\n")
    hook.chmod(0o755)


def signing_that_fails(repo):
    with repo.config_writer() as config:
        config.set_value("commit", "gpgsign", "true")
        config.set_value("gpg", "program", "false")


@pytest.mark.parametrize("obstacle", [failing_pre_commit_hook, signing_that_fails], ids=["hook", "signing"])
def test_commit_source_runs_no_hook_and_signs_nothing(repo, obstacle):
    obstacle(repo)
    Path("train.py").write_text("LR = 0.05\n")
    with pytest.raises(git.GitCommandError):  # what a plain commit does here
        repo.git.commit("-m", "plain", "--", "train.py")
    commit = state.commit_source(repo, state.head_commit(repo), "LR = 0.05\n", "raise LR")
    assert repo.commit(commit).message.strip() == "raise LR"


def test_commit_source_leaves_nothing_behind_in_the_git_folder(repo):
    before = sorted(path.name for path in Path(repo.git_dir).iterdir())
    for value in ("0.05", "0.06", "0.07"):
        commit_train(repo, f"LR = {value}\n")
    assert sorted(path.name for path in Path(repo.git_dir).iterdir()) == before


def test_keep_reachable_numbers_the_refs_of_a_tag_from_one_and_gives_a_commit_its_number_again(repo):
    first = state.head_commit(repo)
    second = commit_train(repo, "LR = 0.05\n")
    assert [state.keep_reachable(repo, "t", commit) for commit in (first, second, first)] == [1, 2, 1]
    assert state.keep_reachable(repo, "other", second) == 1
    assert [repo.commit(f"refs/autoresearch/t/{n}").hexsha for n in (1, 2)] == [first, second]


def test_a_commit_with_a_ref_stays_reachable_after_the_branch_moves_on(repo):
    discarded = commit_train(repo, "LR = 0.05\n")
    number = state.keep_reachable(repo, "t", discarded)
    state.move_branch(repo, "main", commit_train(repo, "LR = 0.06\n"))
    assert repo.commit(f"refs/autoresearch/t/{number}").hexsha == discarded
    assert state.file_at(repo, discarded, "train.py") == "LR = 0.05\n"


THREE = "LR = 0.04\nDEPTH = 8\nWIDTH = 512\n"  # a line between the first and the last


def test_commit_source_commits_beside_the_branch_leaving_the_work_tree_the_index_and_head_alone(repo):
    base = state.head_commit(repo)
    commit = state.commit_source(repo, base, "LR = 0.05\n", "raise LR")
    assert state.head_commit(repo) == base and Path("train.py").read_text() == TRAIN_PY
    assert state.dirty_tracked_files(repo) == [] and repo.index.diff(None) == []
    assert state.file_at(repo, commit, "train.py") == "LR = 0.05\n" and state.changed_files(repo, base, commit) == [
        "train.py"]
    assert repo.commit(commit).parents[0].hexsha == base and repo.commit(commit).message.strip() == "raise LR"


def test_merge_train_py_applies_one_change_onto_another_that_touched_other_lines(repo):
    base = state.commit_source(repo, state.head_commit(repo), THREE, "three constants")
    lr = state.commit_source(repo, base, THREE.replace("0.04", "0.05"), "raise LR")
    width = state.commit_source(repo, base, THREE.replace("512", "768"), "wider")
    assert state.merge_train_py(repo, base, lr, width) == "LR = 0.05\nDEPTH = 8\nWIDTH = 768\n"


@pytest.mark.parametrize("other", ["LR = 0.03\nDEPTH = 8\nWIDTH = 512\n",   # the same line
                                   "LR = 0.04\nDEPTH = 9\nWIDTH = 512\n"])  # the next line: git calls it a conflict
def test_merge_train_py_is_none_when_the_two_changes_conflict(repo, other):
    base = state.commit_source(repo, state.head_commit(repo), THREE, "three constants")
    lr = state.commit_source(repo, base, THREE.replace("0.04", "0.05"), "raise LR")
    assert state.merge_train_py(repo, base, lr, state.commit_source(repo, base, other, "other")) is None


def test_a_scratch_worktree_holds_the_commit_and_is_gone_after_removal(repo, tmp_path):
    commit = state.commit_source(repo, state.head_commit(repo), "LR = 0.05\n", "raise LR")
    scratch = state.add_scratch_worktree(repo, tmp_path / "scratch" / "1-0", commit)
    assert (tmp_path / "scratch/1-0/train.py").read_text() == "LR = 0.05\n" and state.head_commit(scratch) == commit
    assert Path("train.py").read_text() == TRAIN_PY  # the main tree is untouched
    state.remove_scratch_worktree(repo, tmp_path / "scratch" / "1-0")
    assert not (tmp_path / "scratch/1-0").exists() and len(repo.git.worktree("list").splitlines()) == 1


def test_move_branch_moves_the_checked_out_branch_and_its_work_tree(repo):
    commit = commit_train(repo, "LR = 0.05\n")
    state.move_branch(repo, "main", commit)
    assert state.head_commit(repo) == commit and Path("train.py").read_text() == "LR = 0.05\n"
    assert state.dirty_tracked_files(repo) == []


def test_move_branch_leaves_a_checkout_of_another_branch_alone(repo, capsys):
    base = state.head_commit(repo)
    repo.git.branch("autoresearch/t")
    Path("train.py").write_text("the user's work\n")
    commit = commit_train(repo, "LR = 0.05\n")
    state.move_branch(repo, "autoresearch/t", commit)
    assert repo.heads["autoresearch/t"].commit.hexsha == commit and repo.heads.main.commit.hexsha == base
    assert state.current_branch(repo) == "main" and Path("train.py").read_text() == "the user's work\n"
    assert "your checkout, main, is left as it is" in capsys.readouterr().out


def test_move_branch_refuses_to_overwrite_an_uncommitted_change_of_the_user_s(repo):
    commit = commit_train(repo, "LR = 0.05\n")
    Path("train.py").write_text("the user's work\n")
    with fails("cannot move main to"):
        state.move_branch(repo, "main", commit)
    assert Path("train.py").read_text() == "the user's work\n"


def test_dirty_tracked_files_are_staged_or_unstaged_changes_and_untracked_files_are_apart(repo):
    Path("train.py").write_text("LR = 0.05\n")
    Path("prepare.py").write_text("TIME_BUDGET = 9\n")
    repo.index.add(["prepare.py"])
    Path("notes.txt").write_text("new")
    assert state.dirty_tracked_files(repo) == ["prepare.py", "train.py"]
    assert repo.untracked_files == ["notes.txt"]


def test_changed_files_between_two_commits_and_file_at_a_commit(repo):
    base = state.head_commit(repo)
    new = commit_train(repo, "LR = 0.05\n")
    assert state.changed_files(repo, base, new) == ["train.py"]
    assert state.file_at(repo, base, "train.py") == TRAIN_PY and state.file_at(repo, new, "train.py") == "LR = 0.05\n"


def test_keep_out_of_git_excludes_each_path_once_however_often_asked(repo):
    for _ in range(3):
        state.keep_out_of_git(repo, "results.tsv", ".autoresearch/")
    exclude = (Path(repo.git_dir) / "info" / "exclude").read_text().splitlines()
    assert exclude.count("results.tsv") == 1 and exclude.count(".autoresearch/") == 1
    Path("results.tsv").write_text("rows")
    Path(".autoresearch").mkdir()
    (Path(".autoresearch") / "ledger.jsonl").write_text("{}")
    assert repo.untracked_files == []


def test_keep_out_of_git_leaves_a_path_gitignore_already_ignores(repo):
    Path(".gitignore").write_text("results.tsv\n")
    state.keep_out_of_git(repo, "results.tsv")
    exclude = Path(repo.git_dir) / "info" / "exclude"
    assert not exclude.exists() or "results.tsv" not in exclude.read_text().splitlines()


def test_open_repo_outside_a_repository_says_where_to_run(tmp_path):
    with fails("not inside a git repository"):
        state.open_repo(tmp_path)


def test_current_branch_is_none_on_a_detached_head(repo):
    assert state.current_branch(repo) == "main"
    repo.git.checkout("--detach", "-q")
    assert state.current_branch(repo) is None


def test_check_branch_allows_a_new_tag_on_a_clean_tree(repo):
    assert state.check_branch(repo, "t", Ledger(records=[])) == ("autoresearch/t", False)


@pytest.mark.parametrize("path", ["prepare.py", "train.py"])
def test_check_branch_refuses_uncommitted_changes_to_tracked_files(repo, path):
    Path(path).write_text("changed\n")
    with fails(f"uncommitted changes to tracked files: {path}. Commit or stash them first"):
        state.check_branch(repo, "t", Ledger(records=[]))


def test_check_branch_resumes_a_tag_on_a_clean_tree(repo):
    repo.git.checkout("-q", "-b", "autoresearch/t")
    assert state.check_branch(repo, "t", Ledger(records=[{"event": "start"}])) == ("autoresearch/t", True)


def test_check_branch_refuses_an_uncommitted_train_py_on_the_tag_s_branch_too(repo):
    # the loop never writes the work tree: an uncommitted train.py there is the user's, after a clean stop too
    repo.git.checkout("-q", "-b", "autoresearch/t")
    Path("train.py").write_text("the user's work")
    with fails("uncommitted changes to tracked files: train.py"):
        state.check_branch(repo, "t", Ledger(records=[{"event": "start"}]))


def test_check_branch_refuses_uncommitted_train_py_when_not_on_the_tag_s_branch(repo):
    repo.git.branch("autoresearch/t")
    Path("train.py").write_text("someone's work")
    with fails("uncommitted changes to tracked files: train.py"):
        state.check_branch(repo, "t", Ledger(records=[{"event": "start"}]))


def test_check_branch_refuses_a_branch_without_a_ledger_and_a_ledger_without_a_branch(repo):
    with fails("there is a ledger for tag t but no branch autoresearch/t: choose another --tag"):
        state.check_branch(repo, "t", Ledger(records=[{"event": "start"}]))
    repo.git.branch("autoresearch/t")
    with fails("branch autoresearch/t exists but it has no ledger: choose another --tag"):
        state.check_branch(repo, "t", Ledger(records=[]))
