"""The holdout check (autoresearch/holdout.py), end to end on the fake harness, whose holdout score keeps half
of a gain on val: the baseline and the best run once more with evaluate_bpb scoring the holdout, at the end of a
tag stopped by a limit or with `agent_loop.py holdout`; no prompt ever holds a holdout number."""

import json

import agent_loop
from fake_llm import change
from night_repo import BETTER, WORSE


def events(night, kind):
    return [r for r in night.ledger() if r["event"] == kind]


def test_a_tag_stopped_by_a_limit_scores_the_baseline_and_the_best_on_the_holdout(night):
    night.llm.script(change("lower val_bpb", BETTER))
    result = night.run("--max-experiments", "2", "--keep-rule", "greedy", "--holdout-at-end", "on")
    assert result.returncode == 0, result.stderr
    [scored] = events(night, "holdout")
    assert scored["val"] == [1.0, 0.99] and scored["holdout"] == [1.0, 0.995]
    assert "holdout: val: -0.0100, holdout: -0.0050 (best #1 against the baseline; 50 % of the val gain" \
        in result.stdout
    assert [r["attestation"]["evaluations"][0]["split"] for r in events(night, "holdout_run")] == ["holdout"] * 2
    assert len(events(night, "run")) == 2  # the holdout's runs are not runs any decision reads
    assert night.head() == scored["best_commit"] and night.is_clean()


def test_no_prompt_ever_holds_a_holdout_number(night):
    night.llm.script(change("lower val_bpb", BETTER), change("raise val_bpb", ("VAL_BPB = 0.990000", "VAL_BPB = 1.01")))
    assert night.run("--max-experiments", "2", "--keep-rule", "greedy", "--holdout-at-end", "on").returncode == 0
    assert night.run("--max-experiments", "3", "--holdout-at-end", "on").returncode == 0  # resumed after the holdout
    assert len(events(night, "holdout")) == 2 and len(night.requests()) == 2
    sent = json.dumps(night.requests())
    assert "0.995" not in sent and "holdout_delta" not in sent and "holdout: " not in sent


def test_the_holdout_verb_scores_them_on_demand_and_the_report_prints_both_deltas(night, capsys):
    night.llm.script(change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "2", "--keep-rule", "greedy").returncode == 0  # no holdout at the end
    assert events(night, "holdout") == []
    assert agent_loop.main(["holdout"]) == 0  # the tag whose ledger changed last
    assert len(events(night, "holdout")) == 1 and night.is_clean()
    capsys.readouterr()
    assert agent_loop.main(["report"]) == 0
    assert "holdout      val: -0.0100, holdout: -0.0050" in capsys.readouterr().out


def test_a_night_whose_best_is_the_baseline_has_nothing_to_score(night):
    night.llm.script(change("raise val_bpb", WORSE))
    result = night.run("--max-experiments", "2", "--keep-rule", "greedy", "--holdout-at-end", "on")
    assert "holdout: the best is still the baseline, nothing to compare" in result.stdout
    assert events(night, "holdout_run") == []


def test_with_workers_the_holdout_s_two_runs_go_to_two_workers_at_once(night):
    night.llm.script(change("lower val_bpb", BETTER))
    driver = night.start("--workers", "2", "--max-experiments", "2", "--keep-rule", "greedy", "--holdout-at-end", "on")
    printed = driver.communicate(timeout=120)[0]
    assert driver.returncode == 0, printed
    [scored] = events(night, "holdout")
    assert scored["holdout"] == [1.0, 0.995] and "holdout: val: -0.0100, holdout: -0.0050" in printed
    runs = events(night, "holdout_run")
    assert len(runs) == 2 and all(r["worker"]["ip"] == "127.0.0.1" for r in runs)
    started = [e["event"] for e in night.ledger() if e["event"] in ("run_started", "holdout_run")][-4:]
    assert started == ["run_started", "run_started", "holdout_run", "holdout_run"]  # both out before either ended
