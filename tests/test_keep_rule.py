"""The keep rule, end to end: agent_loop.main() on noisy_train.py, whose true val_bpb is a known
function of its constants plus seeded Gaussian noise, with a scripted agent. CPU only, no network.
Its error rates over many decisions are tested on simulated nights, in tests/test_keep_rule_unit.py."""

import math
import re
import shutil
from pathlib import Path

import pytest

import agent_loop
from autoresearch import agents
from fake_llm import change
from night_repo import SUPPORT, WORSE

SIGMA = 0.002


class Scripted:
    """An agent whose proposal is computed from the current train.py by the test's `propose`."""
    propose = None

    def __init__(self, settings, instructions, repo):
        pass

    def start(self, prompt):
        description, search, replace = Scripted.propose(Path("train.py").read_text())
        return agents.Proposal(description=description, edits=[{"search": search, "replace": replace}])

    def reply(self, error):
        raise AssertionError(f"a scripted proposal was refused: {error}")


@pytest.fixture
def noisy(night, monkeypatch):
    """The night's repository with noisy_train.py as train.py and the scripted agent registered."""
    shutil.copy(SUPPORT / "noisy_train.py", night.repo / "train.py")
    night.git("commit", "-qam", "noisy train.py")
    for name, value in dict(NOISY_TRAIN_SEED="7", NOISY_TRAIN_SIGMA=str(SIGMA),
                            NOISY_TRAIN_RUNS=str(night.tmp / "shared" / "noisy_runs")).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setitem(agent_loop.AGENTS, "scripted", Scripted)
    monkeypatch.setitem(agents.DEFAULT_MODELS, "scripted", None)
    return night


def constant(source, name):
    return float(re.search(rf"^{name} = (\S+)", source, re.MULTILINE)[1])


def gain_of_3_sigma(source):
    """MATRIX_LR moved towards its optimum so that the true val_bpb drops by exactly 3 sigma."""
    lr = constant(source, "MATRIX_LR")
    distance = math.log2(lr / 0.02)  # the true value is 0.1 * distance**2 above its optimum in MATRIX_LR
    new_lr = 0.02 * 2 ** math.sqrt(distance ** 2 - 3 * SIGMA / 0.1)
    return f"MATRIX_LR {new_lr:.5f}", f"MATRIX_LR = {lr!r} ", f"MATRIX_LR = {new_lr!r} "


def test_the_baseline_measures_the_noise_and_the_ledger_keeps_it(noisy):
    assert noisy.run("--max-experiments", "1").returncode == 0
    baseline = next(r for r in noisy.ledger() if r["event"] == "result")
    assert len(baseline["runs"]) == 4 and baseline["noise_dof"] == 3 and 0 < baseline["noise_sigma"] < 5 * SIGMA
    assert baseline["val_bpb"] == pytest.approx(sum(baseline["runs"]) / 4)  # the mean, not the best run
    assert "noise sigma" in baseline["reason"]


@pytest.mark.parametrize("paired, status", [("off", "keep"), ("on", "discard")])
def test_on_a_machine_drifting_down_a_change_that_does_nothing_is_kept_unpaired_and_discarded_paired(
        noisy, monkeypatch, paired, status):
    monkeypatch.setenv("NOISY_TRAIN_DRIFT", str(-SIGMA))  # each run 1 sigma lower than the one before
    Scripted.propose = staticmethod(lambda source: ("SEED 43", "SEED = 42", "SEED = 43"))  # nothing real
    assert noisy.run("--agent", "scripted", "--max-experiments", "2", "--paired", paired).returncode == 0
    result = [r for r in noisy.ledger() if r["event"] == "result"][1]
    assert result["status"] == status, result["reason"]
    beside = [r for r in noisy.ledger() if r["event"] == "run" and r.get("reference")]
    assert [r["repeat"] for r in beside] == ([] if paired == "off" else list(range(1, len(beside) + 1)))
    assert paired == "off" or (beside and result["best_runs_beside"] == [r["val_bpb"] for r in beside])


def test_a_clearly_worse_change_is_discarded_after_one_run(night):
    night.llm.script(change("raise val_bpb", WORSE))
    assert night.run("--max-experiments", "2").returncode == 0
    assert len(night.train_pids()) == 4 + 1  # four baseline runs, one of the candidate
    assert night.rows()[1][3] == "discard"
    assert "not below the best's" in night.ledger()[-2]["reason"]


def test_a_borderline_win_is_run_again_and_judged_by_its_mean(noisy):
    Scripted.propose = staticmethod(gain_of_3_sigma)
    assert noisy.run("--agent", "scripted", "--max-experiments", "2").returncode == 0
    result = [r for r in noisy.ledger() if r["event"] == "result"][1]
    runs = [r for r in noisy.ledger() if r["event"] == "run" and r["commit"] == result["commit"]]
    assert len(runs) >= 2 and result["runs"] == [r["val_bpb"] for r in runs]
    assert result["val_bpb"] == pytest.approx(sum(result["runs"]) / len(result["runs"]))
    assert float(noisy.rows()[1][1]) == pytest.approx(result["val_bpb"], abs=1e-6)


def test_a_gain_below_min_delta_is_not_kept(night):
    night.llm.script(change("a little lower", ("VAL_BPB = 1.000000", "VAL_BPB = 0.999000")))
    assert night.run("--max-experiments", "2", "--min-delta", "0.005").returncode == 0
    assert night.rows()[1][3] == "discard" and "threshold 0.005000" in night.ledger()[-2]["reason"]


def test_greedy_rule_keeps_any_lower_run_after_one_run(night):
    night.llm.script(change("a little lower", ("VAL_BPB = 1.000000", "VAL_BPB = 0.999000")))
    assert night.run("--max-experiments", "2", "--keep-rule", "greedy").returncode == 0
    assert night.rows()[1][3] == "keep" and len(night.train_pids()) == 2


def test_an_implausible_gain_is_run_again_before_it_can_be_kept(night):
    # Scores 0.5 on its first run only, as a bug that leaks now and then would.
    flag = "os.environ['FAKE_TRAIN_STARTS'] + '.fluke'"
    fluke = ("VAL_BPB = 1.000000", f"VAL_BPB = 1.0 if os.path.exists({flag}) else open({flag}, 'w').close() or 0.5")
    night.llm.script(change("a fluke", fluke))
    assert night.run("--max-experiments", "2", "--keep-rule", "greedy").returncode == 0
    assert night.rows()[1][1:4] == ["0.750000", "2.0", "discard"]  # the mean of its two runs, 0.5 and 1.0
    assert "did not reproduce" in night.ledger()[-2]["reason"]
    assert len(night.train_pids()) == 3
