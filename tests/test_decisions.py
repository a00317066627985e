"""What happens next to an experiment (autoresearch/decisions.py), on plain values: runs by pair number in, one
Action out. The engine calls it after every run that ends and on resume; tests/test_engine_properties.py runs it
over whole nights."""

import pytest

from autoresearch.decisions import Rule, baseline_action, next_action

NOISE = (0.001, 10)  # sigma, degrees of freedom
PAIRED, UNPAIRED, GREEDY = Rule(), Rule(paired=False), Rule(keep_rule="greedy")
BASE = [1.0, 1.0, 1.0, 1.0]


def run(val_bpb=1.0, pair=1, ok=True, problems=(), timed_out=False, returncode=0, limit=None):
    return dict(val_bpb=val_bpb if ok else None, repeat=pair, ok=ok, problems=list(problems), timed_out=timed_out,
                returncode=None if timed_out else returncode, log=f"logs/1-{pair}.log",
                **({"limit": limit} if limit else {}))


def runs(*values):
    """{pair: run} of the given val_bpb, pairs 1, 2, ... (None: a pair that has not ended)."""
    return {pair: run(value, pair) for pair, value in enumerate(values, 1) if value is not None}


def decide(candidate, reference=None, rule=PAIRED, attempt=0, base="b", best="b"):
    return next_action(candidate, reference or {}, BASE, NOISE, 0.02, rule, attempt, base, best)


# -----------------------------------------------------------------------------
# Crashes, fixes, broken rules

def test_a_new_commit_needs_its_first_run():
    assert decide({}).kind == "run" and decide({}).runs == (("candidate", 1),)


def test_a_first_run_that_crashed_asks_for_a_fix_until_the_fixes_are_used_up():
    crashed = {1: run(ok=False, returncode=1)}
    assert decide(crashed).kind == "fix"
    action = decide(crashed, attempt=2)
    assert (action.kind, action.reason) == ("crash", "exit code 1, no val_bpb")


def test_a_run_killed_at_the_time_limit_is_a_crash_without_a_fix_that_names_the_limit():
    action = decide({1: run(ok=False, timed_out=True, limit=420.0)})
    assert (action.kind, action.reason) == ("crash", "killed at the 420s time limit")
    assert decide({1: run(ok=False, timed_out=True)}).reason == "killed at the time limit"  # a ledger from before


def test_a_later_run_that_fails_is_a_crash_of_the_commit_that_ran_before():
    action = decide({1: run(0.99), 2: run(ok=False, pair=2, returncode=1)}, runs(1.0))
    assert action.kind == "crash" and action.reason.startswith("run 2 of the same commit failed")


def test_a_broken_rule_makes_it_invalid_before_anything_else():
    action = decide({1: run(ok=False, returncode=1), 2: run(0.5, 2, ok=False, problems=["opened the val split"])})
    assert (action.kind, action.reason) == ("invalid", "opened the val split")


def test_when_the_best_s_run_beside_it_fails_it_is_discarded_and_the_row_is_its_own_run():
    action = decide(runs(0.99), {1: run(ok=False, returncode=1)})
    assert action.kind == "discard" and "the best's own run beside it failed" in action.reason
    assert action.run["val_bpb"] == 0.99


# -----------------------------------------------------------------------------
# The paired rule, by pair number

def test_a_promising_first_run_asks_for_every_pair_in_a_b_b_a_order():
    action = decide(runs(0.99))
    assert action.kind == "run" and action.runs == (("best", 1), ("best", 2), ("candidate", 2), ("candidate", 3),
                                                     ("best", 3), ("best", 4), ("candidate", 4))


def test_pairs_that_ended_out_of_order_are_judged_by_number_and_only_the_missing_runs_asked_for():
    action = decide(runs(0.99, 0.99, None, 0.99), runs(1.0, 1.0, 1.0))  # candidate {1, 2, 4}, best {1, 2, 3}
    assert action.kind == "run" and action.runs == (("candidate", 3), ("best", 4))


def test_no_complete_pair_yet_waits_for_one():
    action = decide(runs(0.99), runs(None, 1.0))  # the best's pair 2 ended before its pair 1
    assert action.kind == "run" and action.runs == (("best", 1), ("candidate", 2), ("candidate", 3), ("best", 3),
                                                    ("best", 4), ("candidate", 4))


def test_all_pairs_decide_a_keep_against_the_best_it_was_proposed_on():
    assert decide(runs(0.99, 0.99, 0.99, 0.99), runs(1.0, 1.0, 1.0, 1.0)).kind == "keep"


def test_a_winner_whose_base_is_no_longer_the_best_is_rebased_and_a_loser_discarded_against_its_base():
    won = decide(runs(0.99, 0.99, 0.99, 0.99), runs(1.0, 1.0, 1.0, 1.0), base="b0", best="b1")
    assert won.kind == "rebase" and won.reason.startswith("beat its base b0")
    lost = decide(runs(1.01), base="b0", best="b1")
    assert lost.kind == "discard" and lost.reason.startswith("against its base b0")


# -----------------------------------------------------------------------------
# Unpaired and greedy

def test_unpaired_runs_the_missing_runs_up_to_max_runs_and_judges_the_first_contiguous_ones():
    assert decide(runs(0.99), rule=UNPAIRED).runs == (("candidate", 2), ("candidate", 3), ("candidate", 4))
    assert decide(runs(0.99, None, 0.99), rule=UNPAIRED).runs == (("candidate", 2), ("candidate", 4))
    assert decide(runs(0.99, 0.99, 0.99, 0.99), rule=UNPAIRED).kind == "keep"


@pytest.mark.parametrize("candidate, kind", [((0.99,), "keep"), ((1.01,), "discard"), ((0.9,), "run"),
                                             ((0.9, 0.9), "keep")])
def test_greedy_keeps_a_lower_run_and_runs_an_implausible_gain_again(candidate, kind):
    assert decide(runs(*candidate), rule=GREEDY).kind == kind


# -----------------------------------------------------------------------------
# The baseline

def test_the_baseline_needs_its_noise_runs_then_is_kept_with_their_mean():
    assert baseline_action(runs(1.0, None, 1.0), NOISE, PAIRED).runs == (("candidate", 2), ("candidate", 4))
    action = baseline_action(runs(1.0, 1.01, 0.99, 1.0), NOISE, PAIRED)
    assert action.kind == "keep" and action.reason == "mean of 4 runs, noise sigma 0.001000"
    assert baseline_action(runs(1.0), (float("inf"), 0), GREEDY).reason == "one run"


@pytest.mark.parametrize("failed, said", [(run(ok=False, returncode=1), "did not produce val_bpb"),
                                          (run(ok=False, problems=["opened the val split"]), "breaks the rules")])
def test_a_baseline_run_that_fails_stops_the_night(failed, said):
    action = baseline_action({1: run(), 2: failed}, NOISE, PAIRED)
    assert action.kind == "refused" and said in action.reason
