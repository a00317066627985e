"""agent_loop.py --agent optuna: Optuna's TPE tunes the numeric constants of train.py, no LLM.

Unit tests drive OptunaAgent directly in a temp folder with a hand-written ledger; end-to-end tests
run agent_loop.main() on tests/agent_loop_support/noisy_train.py with the `night` fixture
(tests/conftest.py). CPU only, no network."""

import json
import re
import shutil
from pathlib import Path

import optuna
import pytest

import agent_loop
from autoresearch import agents, optuna_agent
from night_repo import ROOT, SUPPORT

NOISY = (SUPPORT / "noisy_train.py").read_text()
REAL = (ROOT / "train.py").read_text()
# A train.py with a small-compute override block, as the real one has.
OVERRIDE = '''LR = 0.04        # top-level
DEPTH = 8        # layers
DEVICE_TYPE = "cpu"
if DEVICE_TYPE != "cuda":
    DEPTH = 4    # small
'''
DESCRIPTION = re.compile(r"[A-Z][A-Z0-9_]* \S+ -> \S+(, [A-Z][A-Z0-9_]* \S+ -> \S+)*")


class Driver:
    """An OptunaAgent in a temp folder (no git), fed results through its ledger as the loop would."""

    def __init__(self, tmp_path, monkeypatch, source, *args, device="cpu"):
        tmp_path.mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(optuna_agent, "train_device", lambda source: device)
        (tmp_path / "train.py").write_text(source)
        self.ledger = tmp_path / ".autoresearch" / "t" / "ledger.jsonl"
        self.ledger.parent.mkdir(parents=True)
        self.device, self.experiment = device, 0
        settings = agent_loop.agent_settings(agent_loop.parse_args(["--tag", "t", "--agent", "optuna", *args]))
        self.agent = optuna_agent.OptunaAgent(settings, "", repo=None)
        self.result(1.0, "keep")  # the baseline

    def write(self, **record):
        with open(self.ledger, "a") as f:
            f.write(json.dumps(record) + "\n")

    def result(self, val_bpb, status="discard"):
        """The result of the experiment proposed last."""
        self.write(event="result", experiment=self.experiment, status=status, val_bpb=val_bpb)

    def propose(self):
        """(proposal, train.py with it applied), recorded as the loop records it: a new experiment."""
        proposal = self.agent.start("ignored")
        self.experiment += 1
        self.write(event="proposal", experiment=self.experiment, ok=True, trial=proposal.trial)
        return proposal, agents.apply_proposal(proposal, Path("train.py").read_text(), 0)


def changed_lines(old, new):
    """Line numbers (1-based) of old that the diff to new replaces; both have the same number of lines."""
    assert len(old.splitlines()) == len(new.splitlines())
    return [i + 1 for i, (a, b) in enumerate(zip(old.splitlines(), new.splitlines())) if a != b]


def open_study(repo):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(repo / ".autoresearch" / "t" / "optuna.journal")))
    return optuna.load_study(study_name="t", storage=storage)


def asked(study):
    """The trials asked so far, without the probes still waiting in the queue."""
    return [t for t in study.get_trials() if t.state.name != "WAITING"]


def experiments_of(trials, ledger):
    """The experiment of each trial: the baseline's is in the study, the others' in the ledger's proposals."""
    proposed = {r["trial"]: r["experiment"] for r in ledger if r["event"] == "proposal" and "trial" in r}
    return [proposed.get(t.number, t.user_attrs.get("experiment")) for t in trials]


@pytest.fixture
def noisy(night, monkeypatch):
    """The Night repository with noisy_train.py as its train.py."""
    shutil.copy(SUPPORT / "noisy_train.py", night.repo / "train.py")
    night.git("commit", "-qam", "noisy train.py")
    night.base = night.head()
    monkeypatch.setenv("NOISY_TRAIN_SEED", "1")
    monkeypatch.setenv("NOISY_TRAIN_RUNS", str(night.tmp / "shared" / "noisy_runs"))  # the sandbox lets it write there
    return night


# -----------------------------------------------------------------------------
# What it tunes

def test_tunable_constants_of_the_real_train_py_on_cpu_are_the_override_block_values():
    found = optuna_agent.tunable_constants(REAL, "cpu")
    assert set(found) == {"DEPTH", "ASPECT_RATIO", "HEAD_DIM", "DEVICE_BATCH_SIZE", "EMBEDDING_LR", "UNEMBEDDING_LR",
                          "MATRIX_LR", "SCALAR_LR", "WEIGHT_DECAY", "WARMUP_RATIO", "WARMDOWN_RATIO", "FINAL_LR_FRAC"}
    lines = REAL.splitlines()
    assert {name: found[name][0] for name in ("DEPTH", "ASPECT_RATIO", "HEAD_DIM", "DEVICE_BATCH_SIZE")} == \
        {"DEPTH": 4, "ASPECT_RATIO": 32, "HEAD_DIM": 64, "DEVICE_BATCH_SIZE": 16}
    assert lines[found["DEPTH"][1] - 1].startswith("    DEPTH = 4")  # inside `if DEVICE_TYPE != "cuda":`
    assert found["MATRIX_LR"][0] == 0.04 and lines[found["MATRIX_LR"][1] - 1].startswith("MATRIX_LR = 0.04")


def test_tunable_constants_of_the_real_train_py_on_cuda_are_the_top_level_values():
    found = optuna_agent.tunable_constants(REAL, "cuda")
    assert {name: found[name][0] for name in ("DEPTH", "ASPECT_RATIO", "HEAD_DIM", "DEVICE_BATCH_SIZE")} == \
        {"DEPTH": 8, "ASPECT_RATIO": 64, "HEAD_DIM": 128, "DEVICE_BATCH_SIZE": 128}
    assert REAL.splitlines()[found["DEPTH"][1] - 1].startswith("DEPTH = 8")
    assert set(found) == set(optuna_agent.tunable_constants(REAL, "cpu"))
    # Not a literal number, a seed, or what the budget measures:
    assert not {"TOTAL_BATCH_SIZE", "ADAM_BETAS", "WINDOW_PATTERN", "SEED", "UNCOUNTED_STEPS"} & set(found)


def test_search_ranges_follow_the_documented_rules():
    ranges = {name: optuna_agent.search_range(name, value) for name, value in dict(
        MATRIX_LR=0.04, WARMDOWN_RATIO=0.5, FINAL_LR_FRAC=0.0, WEIGHT_DECAY=0.0, SHIFT=-0.5, DEPTH=8, WIDTH=64, STEPS=6, OFF=0,
    ).items()}
    assert ranges == {"MATRIX_LR": ["log", 0.01, 0.16], "WARMDOWN_RATIO": ["uniform", 0.0, 1.0],
                      "FINAL_LR_FRAC": ["uniform", 0.0, 0.5], "WEIGHT_DECAY": ["uniform", 0.0, 0.5],
                      "SHIFT": ["uniform", -2.0, -0.125], "DEPTH": ["int", 4, 16], "WIDTH": ["pow2", 4, 8],
                      "STEPS": ["int", 3, 12],
                      "OFF": None}


def test_max_fix_attempts_defaults_to_none_for_optuna_and_two_for_the_llms():
    assert agent_loop.parse_args(["--agent", "optuna"]).max_fix_attempts == 0
    assert agent_loop.parse_args(["--agent", "openai"]).max_fix_attempts == 2
    assert agent_loop.parse_args(["--agent", "optuna", "--max-fix-attempts", "1"]).max_fix_attempts == 1


# -----------------------------------------------------------------------------
# What it proposes

def test_edits_touch_only_the_tuned_assignment_lines_and_keep_train_py_valid(tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, REAL, device="cpu")
    constants = optuna_agent.tunable_constants(REAL, "cpu")
    for _ in range(5):
        proposal, new = driver.propose()  # apply_proposal compiles it
        lines = changed_lines(REAL, new)
        assert lines and set(lines) <= {line for _, line, _, _ in constants.values()}
        for line in lines:  # only the number changed: the name, spacing and comment are byte-identical
            old_line, new_line = REAL.splitlines()[line - 1], new.splitlines()[line - 1]
            name = next(name for name, c in constants.items() if c[1] == line)
            _, _, col, end_col = constants[name]
            assert new_line[:col] == old_line[:col]
            assert new_line.endswith(old_line[end_col:])
        driver.result(1.0)


def test_values_stay_inside_their_ranges_over_many_asks(tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, REAL, device="cpu")
    space = driver.agent.study.user_attrs["space"]
    for _ in range(25):  # past the 10 random startup trials: TPE proper
        proposal, new = driver.propose()
        values = {name: c[0] for name, c in optuna_agent.tunable_constants(new, "cpu").items()}
        for name, (kind, low, high) in space.items():
            if kind == "pow2":
                assert values[name] in [2 ** e for e in range(low, high + 1)], name
            else:
                assert low <= values[name] <= high, name
            assert type(values[name]) is (float if kind in ("log", "uniform") else int)
        driver.result(1.0 + 0.1 * abs(values["MATRIX_LR"] - 0.02))


def test_descriptions_list_the_changed_constants_as_name_old_to_new(tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, NOISY)
    for _ in range(5):
        proposal, new = driver.propose()
        assert DESCRIPTION.fullmatch(proposal.description), proposal.description
        after = optuna_agent.tunable_constants(new, "cpu")
        for change in proposal.description.split(", "):
            name, old, _, value = change.split()
            assert f"{name} = {old}" in NOISY and repr(after[name][0]) == value and old != value
        driver.result(1.0)


def test_seed_is_never_tuned(tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, NOISY)
    assert "SEED" not in optuna_agent.tunable_constants(NOISY, "cpu")
    for _ in range(15):
        proposal, new = driver.propose()
        assert "SEED = 42\n" in new and "SEED" not in proposal.description
        driver.result(1.0)


def test_by_default_the_floats_are_tuned_and_the_ints_only_when_named(tmp_path, monkeypatch):
    assert set(Driver(tmp_path / "a", monkeypatch, NOISY).agent.space) == {"MATRIX_LR", "WARMDOWN_RATIO"}
    named = Driver(tmp_path / "b", monkeypatch, NOISY, "--optuna-params", "MATRIX_LR,DEPTH").agent.space
    assert set(named) == {"MATRIX_LR", "DEPTH"}


@pytest.mark.parametrize("device, line", [("cpu", "    DEPTH = 4    # small"), ("cuda", "DEPTH = 8        # layers")])
def test_the_device_override_is_edited_off_cuda_and_the_top_level_value_on_cuda(tmp_path, monkeypatch, device, line):
    driver = Driver(tmp_path, monkeypatch, OVERRIDE, "--optuna-params", "DEPTH", device=device)
    proposal, new = driver.propose()
    assert [OVERRIDE.splitlines()[i - 1] for i in changed_lines(OVERRIDE, new)] == [line]
    assert proposal.description.startswith(f"DEPTH {line.split()[2]} -> ")


def test_a_crash_is_told_as_failed_a_result_as_its_val_bpb_and_an_open_experiment_waits_for_its_row(
        tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, NOISY)

    def states():
        trials = asked(driver.agent.study)
        ledger = [json.loads(line) for line in driver.ledger.read_text().splitlines()]
        return list(zip(experiments_of(trials, ledger), [(t.state.name, t.value) for t in trials]))
    driver.propose()
    driver.result(0.0, "crash")
    driver.propose()  # experiment 2: still running (or cut off by a stop, to be resumed): no row yet
    driver.propose()
    driver.result(1.25)
    driver.propose()
    assert states() == [(0, ("COMPLETE", 1.0)), (1, ("FAIL", None)), (2, ("RUNNING", None)), (3, ("COMPLETE", 1.25)),
                        (4, ("RUNNING", None))]
    driver.write(event="result", experiment=2, status="discard", val_bpb=1.5)
    driver.propose()
    assert states()[2] == (2, ("COMPLETE", 1.5))


def test_a_trial_whose_experiment_runs_on_another_worker_waits_for_its_result(tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, NOISY)
    driver.propose()  # still running when the next is asked
    driver.propose()
    driver.result(1.25)  # experiment 2's
    driver.propose()
    assert [(t.state.name, t.value) for t in asked(driver.agent.study)[1:]] == [
        ("RUNNING", None), ("COMPLETE", 1.25), ("RUNNING", None)]


def test_the_first_trials_change_one_constant_at_a_time_up_then_down(tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, NOISY)
    descriptions = []
    for _ in range(5):
        descriptions.append(driver.propose()[0].description)
        driver.result(1.1)
    assert descriptions[:4] == ["MATRIX_LR 0.04 -> 0.08", "MATRIX_LR 0.04 -> 0.02",
                                "WARMDOWN_RATIO 0.5 -> 0.75", "WARMDOWN_RATIO 0.5 -> 0.25"]
    assert descriptions[4].count(" -> ") == 2  # then TPE, over all of them


def test_optuna_s_hypothesis_names_the_probe_or_tpe_and_it_writes_no_notes(tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, NOISY)
    proposals = []
    for _ in range(5):
        proposals.append(driver.propose()[0])
        driver.result(1.1)
    assert [p.hypothesis.split(":")[0] for p in proposals[:2]] == ["probe MATRIX_LR up", "probe MATRIX_LR down"]
    assert proposals[4].hypothesis == "TPE's pick of 2 constants, from the 5 results it has so far"
    assert all(p.notes is None for p in proposals)


def test_probes_start_from_the_best_so_a_kept_probe_is_not_undone(night):
    # the fake train.py reports VAL_BPB: halving it is a real gain, and the next probe must keep it
    result = night.run("--agent", "optuna", "--keep-rule", "greedy", "--max-experiments", "4",
                       "--optuna-params", "VAL_BPB,PEAK_VRAM_MB")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [row[1:] for row in night.rows()[1:]] == [
        ["2.000000", "2.0", "discard", "VAL_BPB 1.000000 -> 2.0"], ["0.500000", "2.0", "keep", "VAL_BPB 1.000000 -> 0.5"],
        ["0.500000", "4.0", "discard", "PEAK_VRAM_MB 2048.0 -> 4100.0"]]


def test_a_probe_that_would_step_back_to_a_value_already_run_is_passed_over(tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, NOISY)
    proposal, new = driver.propose()
    assert proposal.description == "MATRIX_LR 0.04 -> 0.08"
    Path("train.py").write_text(new)  # kept: the loop leaves train.py at the best commit
    driver.result(0.9, "keep")
    assert driver.propose()[0].description == "WARMDOWN_RATIO 0.5 -> 0.75"  # not MATRIX_LR 0.08 -> 0.04: the baseline


def test_reply_cannot_repair_a_proposal(tmp_path, monkeypatch):
    driver = Driver(tmp_path, monkeypatch, NOISY)
    with pytest.raises(agents.EditError, match="cannot repair"):
        agents.apply_proposal(driver.agent.reply("Edit 1: its search text occurs 0 times"), NOISY, 0)


# -----------------------------------------------------------------------------
# The loop

def test_a_run_of_four_experiments_writes_rows_and_a_study(noisy):
    result = noisy.run("--agent", "optuna", "--max-experiments", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = noisy.rows()
    assert [row[4] for row in rows][0] == "baseline" and len(rows) == 4
    assert all(DESCRIPTION.fullmatch(row[4]) and row[3] in ("keep", "discard") for row in rows[1:])
    assert noisy.requests() == [] and noisy.is_clean()
    assert all(r["cost_usd"] == 0 for r in noisy.ledger() if r["event"] == "proposal")
    trials = asked(open_study(noisy.repo))
    assert experiments_of(trials, noisy.ledger()) == [0, 1, 2, 3]
    # The last trial is told at the next start; results.tsv rounds to 6 decimals.
    assert [t.value for t in trials[:3]] == pytest.approx([float(row[1]) for row in rows[:3]], abs=1e-6)
    assert trials[0].params == {"MATRIX_LR": 0.04, "WARMDOWN_RATIO": 0.5}  # the baseline


def test_resuming_the_tag_continues_the_same_study(noisy):
    assert noisy.run("--agent", "optuna", "--max-experiments", "3").returncode == 0
    before = asked(open_study(noisy.repo))
    assert len(before) == 3 and before[2].state.name == "RUNNING"
    result = noisy.run("--agent", "optuna", "--max-experiments", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    after = asked(open_study(noisy.repo))
    rows = noisy.rows()
    assert len(rows) == 5 and len(after) == 5
    assert [t.params for t in after[:3]] == [t.params for t in before]
    assert [t.value for t in after[:4]] == pytest.approx([float(row[1]) for row in rows[:4]], abs=1e-6)
    assert experiments_of(after, noisy.ledger()) == [0, 1, 2, 3, 4]


def test_an_unknown_optuna_param_is_an_error_that_lists_the_tunable_ones(noisy):
    result = noisy.run("--agent", "optuna", "--optuna-params", "MATRIX_LR,SEED,NOPE")
    assert result.returncode == 1
    assert "SEED, NOPE is not a tunable constant" in result.stderr
    assert "MATRIX_LR, DEPTH, WARMDOWN_RATIO" in result.stderr
    assert noisy.git("branch", "--list", "autoresearch/*") == ""
