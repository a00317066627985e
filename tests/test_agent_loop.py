"""agent_loop.py end to end: a temp git repo with a fake train.py, and local stand-ins for the
Anthropic Messages API, an OpenAI-compatible endpoint and the claude CLI. CPU only, no network.

Most tests call agent_loop.main() in this process (the SDK import alone takes seconds per
process); the signal tests run `python agent_loop.py` as its own process."""

import json
import re
import signal
import socket
import time

import pytest

import agent_loop
from autoresearch import agents, options, runner
from autoresearch import night as night_module
from fake_llm import CHAT, change, chat_change, chat_json, chat_text, overloaded
from night_repo import BETTER, CRASH, FAKE_PREPARE, HANG, SUPPORT, WORSE
from processes import alive


def last_user_content(request):
    return json.dumps(request["messages"][-1]["content"])


# -----------------------------------------------------------------------------
# Keep, discard, crash, timeout

def test_baseline_runs_first_and_an_improvement_is_kept(night):
    night.llm.script(change("lower val_bpb", BETTER))
    result = night.run("--max-experiments", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = night.rows()
    assert [row[1:] for row in rows] == [["1.000000", "2.0", "keep", "baseline"],
                                         ["0.990000", "2.0", "keep", "lower val_bpb"]]
    assert rows[0][0] == night.base[:7] and rows[1][0] == night.head()[:7]
    assert night.git("rev-parse", "--abbrev-ref", "HEAD") == "autoresearch/t"
    assert night.git("log", "-1", "--format=%s") == "lower val_bpb"
    assert night.git("rev-parse", "HEAD~1") == night.base
    assert "VAL_BPB = 0.990000" in night.train_py()
    assert night.refs() == [night.base, night.head()]
    assert night.is_clean()


def test_a_worse_result_is_discarded_and_the_branch_reset_to_the_best(night):
    night.llm.script(change("raise val_bpb", WORSE))
    assert night.run("--max-experiments", "2").returncode == 0
    assert [row[1:] for row in night.rows()][1] == ["1.010000", "2.0", "discard", "raise val_bpb"]
    assert night.head() == night.base
    assert night.train_py() == (SUPPORT / "fake_train.py").read_text()
    discarded = night.refs()[1]
    assert night.rows()[1][0] == discarded[:7]
    assert night.git("log", "-1", "--format=%s", discarded) == "raise val_bpb"
    assert night.is_clean()


def test_a_crash_shows_the_agent_the_fenced_log_tail_and_its_fix_is_run(night):
    night.llm.script(change("try a crash", CRASH),
                     change("fix the crash", ('MODE = "crash"', 'MODE = "ok"'), BETTER))
    assert night.run("--max-experiments", "2").returncode == 0
    assert [row[1:] for row in night.rows()][1] == ["0.990000", "2.0", "keep", "try a crash"]
    base, crashed, fixed = night.refs()
    assert night.head() == fixed and night.git("rev-parse", f"{fixed}~1") == crashed
    fix_prompt = night.requests()[1]["messages"][0]["content"]
    assert "fix attempt 1 of 2" in fix_prompt
    fenced = fix_prompt.split("<untrusted-program-output-")[1].split("</untrusted-program-output-")[0]
    assert "fake failure: CUDA out of memory" in fenced
    assert "step 00002" in fenced and "step 00001" not in fenced  # the \r progress display collapsed
    assert night.is_clean()


def test_a_crash_still_there_after_two_fixes_is_given_up(night):
    night.llm.script(change("try a crash", CRASH),
                     change("fix 1", ("PEAK_VRAM_MB = 2048.0", "PEAK_VRAM_MB = 1024.0")),
                     change("fix 2", ("PEAK_VRAM_MB = 1024.0", "PEAK_VRAM_MB = 512.0")))
    assert night.run("--max-experiments", "2").returncode == 0
    assert len(night.requests()) == 3
    rows = night.rows()
    assert rows[1][1:] == ["0.000000", "0.0", "crash", "try a crash"]
    assert len(night.refs()) == 4 and rows[1][0] == night.refs()[-1][:7]
    assert night.head() == night.base
    assert night.is_clean()


def test_a_run_over_the_time_limit_is_killed_and_counts_as_a_crash(night):
    night.llm.script(change("hang", HANG))
    started = time.time()
    assert night.run("--max-experiments", "2", "--timeout", "1").returncode == 0
    assert time.time() - started < 30
    assert night.rows()[1][1:] == ["0.000000", "0.0", "crash", "hang"]
    assert len(night.requests()) == 1  # no fix attempt for a hang
    assert not alive(night.train_pids()[4])
    assert night.head() == night.base and night.is_clean()


def test_without_timeout_a_run_is_killed_after_twice_the_baseline_s_first_run_plus_the_margin(night, monkeypatch):
    monkeypatch.setattr(night_module, "TIMEOUT_MARGIN", 1)  # seconds; the fake runs take a fraction of one
    night.llm.script(change("hang", HANG))
    result = night.run("--max-experiments", "2", "--keep-rule", "greedy", timeout=None)
    assert result.returncode == 0
    baseline = next(r for r in night.ledger() if r["event"] == "run" and r["experiment"] == 0)
    assert "until the baseline's first run sets the limit" in result.stdout.splitlines()[0]
    assert baseline["limit"] == 10 * 1 + 1  # ten budgets of the stand-in cache (1 s), and the margin
    hung = [r for r in night.ledger() if r["event"] == "run" and r["experiment"] == 1][0]
    assert hung["timed_out"] and hung["limit"] == pytest.approx(2 * baseline["seconds"] + 1)
    assert night.rows()[1][3] == "crash" and f"killed at the {hung['limit']:.0f}s time limit" in \
        night.ledger()[-2]["reason"]


def test_a_baseline_killed_at_its_time_limit_says_so_and_what_to_do(night):
    (night.repo / "train.py").write_text(night.train_py().replace(*HANG))
    night.git("commit", "-qam", "hangs")
    result = night.run("--timeout", "1")
    assert result.returncode == 1 and "the unmodified train.py was killed at the 1s time limit: on a slow or busy " \
        "machine, run again with a longer --timeout" in result.stderr


def test_a_baseline_that_does_not_run_stops_with_an_error(night):
    (night.repo / "train.py").write_text(night.train_py().replace(*CRASH))
    night.git("commit", "-qam", "broken")
    result = night.run()
    assert result.returncode == 1
    assert "the unmodified train.py did not produce val_bpb" in result.stderr
    assert night.rows() == [] and night.llm.requests["/v1/messages"] == []


# -----------------------------------------------------------------------------
# Replies that cannot be applied

def test_an_edit_to_another_file_makes_the_experiment_invalid_and_nothing_is_applied(night):
    night.llm.script(change("edit the harness", ("prepare.py", "TIME_BUDGET = 1", "TIME_BUDGET = 9")))
    assert night.run("--max-experiments", "2").returncode == 0
    assert night.rows()[1] == ["0000000", "0.000000", "0.0", "invalid", "edit the harness"]
    assert "only train.py may change" in night.ledger()[-2]["reason"]
    assert len(night.requests()) == 1  # a broken rule is not a typo: it is not sent back for another try
    assert (night.repo / "prepare.py").read_text() == FAKE_PREPARE
    assert night.head() == night.base and night.is_clean()


def test_an_unmatched_search_block_is_sent_back_and_the_repair_applied(night):
    night.llm.script(change("typo", ("VAL_BPB = 2.000000", "VAL_BPB = 0.5"), BETTER),
                     change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "2").returncode == 0
    assert "Edit 1: its search text occurs 0 times" in last_user_content(night.requests()[1])
    assert len(night.requests()[1]["messages"]) == 3  # the same conversation
    assert night.rows()[1][1:] == ["0.990000", "2.0", "keep", "lower val_bpb"]
    assert night.git("log", "--format=%s", "-2") == "lower val_bpb\ninitial"


def test_a_train_py_already_run_in_the_tag_is_not_run_again_and_the_agent_is_told_its_outcome(night):
    night.llm.script(change("raise val_bpb", WORSE), change("raise val_bpb again", WORSE),
                     change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "3").returncode == 0
    told = last_user_content(night.requests()[2])  # the reply to the repeat, in the same conversation
    assert "byte-identical to that of experiment #1 (discard, val_bpb 1.010000): it is not run again" in told
    assert [row[3:] for row in night.rows()] == [["keep", "baseline"], ["discard", "raise val_bpb"],
                                                 ["keep", "lower val_bpb"]]
    assert len(night.train_pids()) == 4 + 1 + 4 + 4  # the repeat never ran (the gain ran 4 times, the best beside it)


def test_a_reply_cut_off_by_the_token_limit_is_never_applied(night):
    night.llm.script(change("cut off", BETTER, stop_reason="max_tokens"), change("raise val_bpb", WORSE))
    assert night.run("--max-experiments", "2").returncode == 0
    assert "cut off at the token limit" in last_user_content(night.requests()[1])
    assert night.rows()[1][1:] == ["1.010000", "2.0", "discard", "raise val_bpb"]
    assert "cut off" not in night.git("log", "--all", "--format=%s")


def test_an_agent_that_never_gives_a_usable_edit_skips_the_idea(night):
    night.llm.script(*[change("typo", ("nowhere", "x"))] * 3, change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "2").returncode == 0
    failed = [r for r in night.ledger() if r["event"] == "proposal" and not r["ok"]]
    assert len(failed) == 1 and len(failed[0]["calls"]) == 3
    assert [row[4] for row in night.rows()] == ["baseline", "lower val_bpb"]


# -----------------------------------------------------------------------------
# Lab notes, steering, plateaus: what the agent learns across the night

def test_the_hypothesis_and_notes_reach_the_next_prompt_the_ledger_and_the_report(night, capsys):
    night.llm.script(change("raise val_bpb", WORSE, hypothesis="more loss teaches more",
                            notes="Raising VAL_BPB: try it once."),
                     change("lower val_bpb", BETTER, hypothesis="less is more"))
    assert night.run("--max-experiments", "3", "--keep-rule", "greedy").returncode == 0
    prompt = night.requests()[1]["messages"][0]["content"]
    assert "\traise val_bpb\tmore loss teaches more" in prompt
    assert re.search(r"<untrusted-notes-\w+>\nRaising VAL_BPB: try it once.\n</untrusted-notes-", prompt)
    rows = [r for r in night.ledger() if r["event"] == "result"]
    assert [r["hypothesis"] for r in rows] == ["", "more loss teaches more", "less is more"]
    capsys.readouterr()
    assert agent_loop.main(["report", "--tag", "t"]) == 0
    assert "lab notes at the end (written with #1)\n  Raising VAL_BPB: try it once." in capsys.readouterr().out


def test_steer_md_is_created_untracked_and_each_change_reaches_the_next_prompt_and_the_ledger(night, capsys):
    def steer_then(text, reply):
        def act():
            (night.repo / "steer.md").write_text(text)
            return reply
        return act
    night.llm.script(steer_then("Now try wider models.", change("raise val_bpb", WORSE)),
                     change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "1").returncode == 0  # the baseline only: steer.md is made
    assert "It is read before every\nproposal" in (night.repo / "steer.md").read_text() and night.is_clean()
    (night.repo / "steer.md").write_text("<!-- mine -->\nTry deeper models.\n")
    assert night.run("--max-experiments", "3").returncode == 0
    first, second = (request["messages"][0]["content"] for request in night.requests())
    assert "Guidance from the researcher" in first and "Try deeper models." in first and "mine" not in first
    assert "Now try wider models." in second and "deeper" not in second
    assert [r["text"] for r in night.ledger() if r["event"] == "steer"] == ["Try deeper models.",
                                                                            "Now try wider models."]
    capsys.readouterr()
    agent_loop.main(["report", "--tag", "t"])
    out = capsys.readouterr().out
    assert out.index("Try deeper models.") < out.index("Now try wider models.") and night.is_clean()


def test_after_k_experiments_not_kept_the_prompt_asks_for_another_kind_of_change(night):
    night.llm.script(change("raise val_bpb", WORSE), change("crash", CRASH), change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "4", "--keep-rule", "greedy", "--max-fix-attempts", "0",
                     "--plateau", "2").returncode == 0
    prompts = [request["messages"][0]["content"] for request in night.requests()]
    assert ["Plateau: the last 2 experiments were not kept" in prompt for prompt in prompts] == [False, False, True]
    [plateau] = [r for r in night.ledger() if r["event"] == "plateau"]
    assert (plateau["since"], plateau["streak"]) == (1, 2)


# -----------------------------------------------------------------------------
# The Anthropic API

def test_the_model_sees_cached_instructions_prepare_py_train_py_and_the_history(night):
    night.llm.script(change("raise val_bpb", WORSE), change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "3").returncode == 0
    first, second = night.requests()
    system = first["system"][0]
    assert system["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert (night.repo / "program.md").read_text() in system["text"] and FAKE_PREPARE in system["text"]
    assert first["tool_choice"] == {"type": "tool", "name": "propose_change"}
    assert first["model"] == "claude-sonnet-4-6"
    prompt = second["messages"][0]["content"]
    assert 'MODE = "ok"' in prompt  # the current train.py
    assert f"{night.base[:7]}\t1.000000\t+0.000000\tkeep\tbaseline" in prompt
    assert "\t1.010000\t+0.010000\tdiscard\traise val_bpb" in prompt


def test_an_overloaded_api_is_retried_until_it_answers(night):
    night.llm.script(overloaded(), overloaded(), change("lower val_bpb", BETTER))
    result = night.run("--max-experiments", "2")
    assert result.returncode == 0
    assert len(night.requests()) == 3
    assert result.stdout.count("retrying in") == 2
    assert night.rows()[1][3] == "keep"


def test_a_refused_request_stops_with_the_error_and_a_clean_tree(night):
    result = night.run("--max-experiments", "2")  # the stand-in answers 400 when nothing is scripted
    assert result.returncode == 1
    assert "retrying will not help" in result.stderr and "the test scripted no more replies" in result.stderr
    assert night.ledger()[-1]["event"] == "stop"
    assert night.head() == night.base and night.is_clean()


def test_token_usage_and_cost_are_in_the_ledger_and_max_cost_stops(night):
    night.llm.script(change("lower val_bpb", BETTER), change("unused", WORSE))
    assert night.run("--max-cost", "0.01").returncode == 0
    assert len(night.requests()) == 1
    proposal = next(r for r in night.ledger() if r["event"] == "proposal")
    assert proposal["calls"][0]["input_tokens"] == 2000 and proposal["calls"][0]["cache_read_tokens"] == 5000
    # 2000 x $3 + 5000 x $0.30 (cache reads) + 300 x $15, per million tokens
    assert proposal["cost_usd"] == pytest.approx(0.012)
    assert "VAL_BPB = 0.990000" in proposal["diff"]
    assert night.ledger()[-1]["reason"].startswith("spent $0.01")


def test_the_loop_names_the_idea_shows_a_run_s_progress_and_each_baseline_run(night, monkeypatch):
    monkeypatch.setattr(runner, "PROGRESS_EVERY", 0.2)  # 30 s in a real redirected log
    night.llm.script(change("train a while", ('print("---")', 'time.sleep(1.0)\nprint("---")')))
    out = night.run("--max-experiments", "2", "--keep-rule", "greedy").stdout
    assert re.search(r"#0 baseline run 1 of 1: val_bpb 1\.000000 \(\d+s\)", out)
    assert "#1 the idea: train a while" in out
    assert "#1 step 2 (2.0%), loss 8.0000" in out  # the run's own progress line, read from its log
    assert out.index("#1 the idea") < out.index("#1 step 2") < out.index("#1 discard")


# -----------------------------------------------------------------------------
# Stopping and resuming

def test_max_experiments_counts_the_rows_of_the_tag_across_resumes(night):
    night.llm.script(change("raise val_bpb", WORSE), change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "2").returncode == 0
    assert night.run("--max-experiments", "2").returncode == 0
    assert len(night.requests()) == 1 and len(night.rows()) == 2
    assert night.run("--max-experiments", "3").returncode == 0
    assert len(night.requests()) == 2
    assert [row[3] for row in night.rows()] == ["keep", "discard", "keep"]


def test_max_hours_stops_before_starting_another_experiment(night):
    result = night.run("--max-hours", "0")
    assert result.returncode == 0 and "reached --max-hours 0" in result.stdout
    assert night.rows() == [] and night.requests() == []
    assert night.ledger()[-1]["reason"] == "reached --max-hours 0"


def a_measured_night(minutes_gone, max_hours=0.1, slots=1, holdout="on"):
    """A night whose tag has run a 60 s baseline and one 2-run experiment whose idea took 30 s to ask for."""
    records = ([{"event": "run", "ok": True, "seconds": 60.0}] * 3
               + [{"event": "result", "experiment": 0, "status": "keep", "runs": [1.0]},
                  {"event": "proposal", "experiment": 1, "ok": True, "calls": 1, "seconds": 30.0},
                  {"event": "result", "experiment": 1, "status": "discard", "runs": [1.0, 1.0]}])
    args = options.parse_args(["--max-hours", str(max_hours), "--holdout-at-end", holdout])
    return night_module.Night(args, None, None, None, night_module.Ledger(records=records), None, {}, {},
                              executor=type("Slots", (), {"slots": slots})(), started=time.time() - 60 * minutes_gone)


@pytest.mark.parametrize("minutes_gone, slots, holdout, asked, takes", [
    (1.0, 1, "on", False, None),  # 5 minutes left: 2 runs + the call + 2 holdout runs take 4.5
    (2.0, 1, "on", False, 4.5),  # 4 left
    (2.0, 2, "on", False, None),  # its first run, its second, then the holdout's two at once: 3.5
    (3.0, 1, "off", False, None),  # 3 left: 2.5 without the holdout
    (3.6, 1, "off", False, 2.5),
    (3.6, 1, "off", True, None)])  # its idea is in hand: 2.0, the call is not counted again
def test_max_hours_starts_no_experiment_that_this_tag_s_measured_runs_say_cannot_finish(minutes_gone, slots, holdout,
                                                                                        asked, takes):
    why = night_module.why_stop(a_measured_night(minutes_gone, slots=slots, holdout=holdout), asked=asked)
    if takes is None:
        assert why is None
    else:
        assert why.startswith(f"reached --max-hours 0.1: {6 - minutes_gone:.1f} minutes are left, and an experiment "
                              f"takes about {takes:.1f} here")


def test_a_night_under_max_hours_shows_the_time_left(night):
    result = night.run("--max-experiments", "1", "--max-hours", "1")
    assert re.search(r"#0 running \w+ \(time limit \d+s, \d+\.\d of 60 minutes left\)", result.stdout), result.stdout


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_kills_the_run_and_leaves_train_py_at_the_best_commit(night, signum):
    night.llm.script(change("hang", HANG))
    driver = night.start()
    hung = night.wait_for_runs(5, running=True)[4]  # after the four runs of the baseline
    driver.send_signal(signum)
    assert driver.wait(timeout=20) == 130, driver.stdout.read()
    assert not alive(hung)
    assert [row[4] for row in night.rows()] == ["baseline"]
    assert night.head() == night.base and night.is_clean()
    assert night.git("log", "-1", "--format=%s", night.refs()[-1]) == "hang"  # still reachable
    assert night.ledger()[-1]["event"] == "stop" and night.ledger()[-1]["reason"] == "interrupted"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_resume_after_sigkill_goes_on_with_the_unfinished_experiment_and_runs_nothing_twice(night, workers):
    night.llm.script(change("slow gain", BETTER, ("SLEEP = 0.0", "SLEEP = 1.0")))
    driver = night.start("--max-experiments", "2", "--workers", workers)
    orphan = night.wait_for_runs(5, timeout=120, running=True)[4]  # the idea's first run, after the baseline's four
    driver.kill()
    driver.wait()
    result = night.run("--max-experiments", "2", "--workers", workers)  # the same command
    assert result.returncode == 0, result.stdout + result.stderr
    assert not alive(orphan)  # the orphaned run was stopped
    assert '#1 resumed: "slow gain"' in result.stdout and len(night.requests()) == 1  # not proposed again
    assert [row[3:] for row in night.rows()] == [["keep", "baseline"], ["keep", "slow gain"]]
    assert len(night.train_pids()) == 4 + 1 + 4 + 4  # the killed run, then the idea's four and the best's four
    runs = [e for e in night.ledger() if e["event"] == "run"]
    assert [sum(r["experiment"] == n for r in runs) for n in (0, 1)] == [4, 8]  # the baseline was not run again
    assert sum(r.get("reference", False) for r in runs) == 4  # the best's runs, paired with the idea's four
    assert night.git("log", "--format=%s", "-2") == "slow gain\ninitial" and night.is_clean()
    assert [r["event"] for r in night.ledger()].count("start") == 2


def test_a_resumed_tag_goes_on_with_the_agent_and_options_it_was_started_with(night):
    assert night.run("--agent", "optuna", "--keep-rule", "greedy", "--max-experiments", "2").returncode == 0
    result = night.run("--max-experiments", "3")  # no --agent: the tag's, not the default anthropic
    assert result.returncode == 0, result.stdout + result.stderr
    assert [(r["agent"], r["keep_rule"]) for r in night.ledger() if r["event"] == "start"] == [("optuna", "greedy")] * 2
    assert night.requests() == [] and len(night.rows()) == 3
    assert "agent optuna, runs one at a time" in result.stdout  # no "(default model)" for an agent without one


def test_a_resumed_tag_refuses_another_agent_and_names_both(night):
    assert night.run("--agent", "optuna", "--max-experiments", "1").returncode == 0
    result = night.run("--agent", "anthropic", "--keep-rule", "greedy")
    assert result.returncode == 1
    assert "--agent anthropic (it was started with optuna); --keep-rule greedy (it was started with noise)" in result.stderr


def test_the_hint_to_go_on_raises_the_limit_that_was_reached(night):
    result = night.run("--agent", "optuna", "--max-experiments", "1")
    assert "To go on, raise the limit: uv run agent_loop.py --tag t --max-experiments 11" in result.stdout
    night.llm.script(change("lower val_bpb", BETTER))
    result = night.run("--agent", "optuna", "--max-experiments", "11", "--max-hours", "0")
    assert "Resume with: uv run agent_loop.py --tag t\n" in result.stdout  # --max-hours counts per invocation


def test_the_loop_counts_experiments_and_kept_ideas_as_the_report_does(night, capsys):
    night.llm.script(change("lower val_bpb", BETTER), change("raise val_bpb", ("VAL_BPB = 0.990000", "VAL_BPB = 1.01")))
    result = night.run("--max-experiments", "3")
    assert "stopped: reached --max-experiments 3. 3 experiments (baseline included), 1 idea kept" in result.stdout
    assert agent_loop.main(["report"]) == 0
    assert "experiments  3 (baseline included): 1 idea kept, 1 discarded" in capsys.readouterr().out


def test_an_agent_endpoint_that_nothing_answers_stops_the_night_after_a_while(night, monkeypatch):
    monkeypatch.setattr(agents, "UNREACHABLE_LIMIT", 0.5)
    with socket.socket() as closed:  # a port that was free a moment ago: nothing listens there
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    result = night.run("--agent", "openai", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "m",
                       "--max-experiments", "2")
    assert result.returncode == 1 and "nothing answered at the agent's endpoint for 0.00833333 minutes" in result.stderr
    assert "then run the same command again to resume" in result.stderr and night.is_clean()


def test_a_driver_killed_after_the_baseline_runs_records_the_baseline_without_running_it_again(night):
    assert night.run("--max-experiments", "1").returncode == 0
    # As if killed right after the baseline's last run: its result and stop were never written.
    night.keep_records(lambda r: r["event"] not in ("result", "stop"))
    assert night.run("--max-experiments", "1").returncode == 0
    assert len(night.train_pids()) == 4
    assert [row[3:] for row in night.rows()] == [["keep", "baseline"]]


# -----------------------------------------------------------------------------
# Refusals

def test_refuses_uncommitted_changes_to_tracked_files(night):
    (night.repo / "prepare.py").write_text("changed\n")
    result = night.run()
    assert result.returncode == 1 and "uncommitted changes to tracked files: prepare.py" in result.stderr
    assert night.git("branch", "--list", "autoresearch/*") == ""


def test_refuses_an_unprepared_cache_and_says_what_to_run(night, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(night.tmp / "empty"))
    result = night.run()
    assert result.returncode == 1 and "uv run prepare.py" in result.stderr
    assert "with no network: `uv run prepare.py --dataset stdlib --preset small`" in result.stderr
    assert night.git("branch", "--list", "autoresearch/*") == ""


def test_a_missing_api_key_names_the_other_agents(night, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    result = night.run()
    assert result.returncode == 1
    assert "ANTHROPIC_API_KEY" in result.stderr and "--agent claude-code" in result.stderr
    assert "--agent openai" in result.stderr
    assert not (night.repo / "steer.md").exists() and not (night.repo / ".autoresearch" / "t").exists()  # no trace


# -----------------------------------------------------------------------------
# The other agents

def test_openai_compatible_endpoint(night):
    night.llm.script(chat_change("raise val_bpb", WORSE, hypothesis="a guess", notes="VAL_BPB is all that matters"),
                     chat_change("lower val_bpb", BETTER), path=CHAT)
    result = night.run("--agent", "openai", "--base-url", f"{night.llm.url}/v1", "--model", "local-model",
                       "--max-experiments", "3", "--keep-rule", "greedy")
    assert result.returncode == 0, result.stderr
    request = night.requests(CHAT)[0]
    system = request["messages"][0]
    assert system["role"] == "system" and "## Driven by agent_loop.py" in system["content"]
    assert request["tools"][0]["function"]["name"] == "propose_change"
    assert night.rows()[2][1:] == ["0.990000", "2.0", "keep", "lower val_bpb"]
    prompt = night.requests(CHAT)[1]["messages"][1]["content"]
    assert "\traise val_bpb\ta guess" in prompt and "\nVAL_BPB is all that matters\n</untrusted-notes-" in prompt
    assert night.is_clean()


def openai_night(night, *args):
    return night.run("--agent", "openai", "--base-url", f"{night.llm.url}/v1", "--model", "local-model",
                     "--keep-rule", "greedy", *args)


def test_json_output_gets_a_model_without_tool_calling_s_proposals_applied(night):
    night.llm.script(chat_json("lower val_bpb", BETTER, notes="JSON works"), path=CHAT)
    assert openai_night(night, "--openai-output", "json", "--max-experiments", "2").returncode == 0
    [request] = night.requests(CHAT)
    assert "tools" not in request and request["response_format"]["type"] == "json_schema"
    assert request["response_format"]["json_schema"]["schema"]["required"] == ["description", "hypothesis", "edits"]
    assert night.rows()[1][3:] == ["keep", "lower val_bpb"]
    assert [r["notes"] for r in night.ledger() if r["event"] == "proposal"] == ["JSON works"]


def test_auto_switches_to_json_output_for_the_rest_of_the_night_when_a_reply_holds_no_tool_call(night):
    night.llm.script(chat_text("Let me think about the learning rate first."),  # a template without tool calling
                     chat_json("raise val_bpb", WORSE), chat_json("lower val_bpb", BETTER), path=CHAT)
    result = openai_night(night, "--max-experiments", "3")
    assert result.returncode == 0, result.stderr
    first, second, third = night.requests(CHAT)
    assert "tools" in first and "tools" not in second and "response_format" in second and "response_format" in third
    assert "held no call of the propose_change tool" in second["messages"][-1]["content"]  # the same conversation
    assert [r["using"] for r in night.ledger() if r["event"] == "openai_output"] == ["json"]
    assert result.stdout.count("asks for JSON output (response_format) from now on") == 1
    assert [row[3:] for row in night.rows()[1:]] == [["discard", "raise val_bpb"], ["keep", "lower val_bpb"]]


def test_a_server_with_neither_tool_calls_nor_json_output_stops_the_night_naming_both_modes(night):
    night.llm.script(*[chat_text("Sure! Here is my idea: make it better.")] * 15, path=CHAT)
    result = openai_night(night, "--max-experiments", "9")
    stop = [r for r in night.ledger() if r["event"] == "stop"][-1]["reason"]
    assert "no usable change 5 times in a row" in stop and "tool calls, then JSON output (response_format)" in stop
    assert "--openai-output tools" in stop and "--openai-output json" in stop and result.returncode == 0
    told = [r["messages"][-1]["content"] for r in night.requests(CHAT)[2:3]]
    assert "not one JSON object of the requested schema: it is not JSON" in told[0]


def test_a_model_whose_json_replies_parse_but_whose_edits_never_apply_is_named_as_the_cause(night):
    night.llm.script(*[chat_json("better", ("no such line in train.py", "x = 1"))] * 15, path=CHAT)
    result = openai_night(night, "--openai-output", "json", "--max-experiments", "9")
    stop = [r for r in night.ledger() if r["event"] == "stop"][-1]["reason"]
    assert "no usable change 5 times in a row" in stop and result.returncode == 0
    assert "12 of the model's last 12 replies came in that form, but their edits could not be used" in stop
    assert "gives neither" not in stop


def test_without_max_tokens_a_reply_may_use_what_the_server_s_context_leaves(night):
    night.llm.props = {"default_generation_settings": {"n_ctx": 40000}}
    raise_it, lower_it = ("VAL_BPB = 0.990000", "VAL_BPB = 1.1"), ("VAL_BPB = 0.990000", "VAL_BPB = 0.98")
    night.llm.script(chat_change("lower val_bpb", BETTER), chat_change("raise", raise_it),
                     chat_change("lower", lower_it), path=CHAT)
    assert openai_night(night, "--max-experiments", "3").returncode == 0
    first, second = night.requests(CHAT)
    characters = [sum(len(m["content"] or "") for m in r["messages"]) for r in (first, second)]
    assert first["max_tokens"] == int(40000 - characters[0] / 2.5 - 256)  # 2.5 characters a token, before a count
    ratio = characters[0] / 3000  # the stand-in counted 3000 prompt tokens
    assert second["max_tokens"] == int(40000 - characters[1] / ratio - 256)
    night.llm.props = None
    assert openai_night(night, "--max-experiments", "4", "--max-tokens", "1234").returncode == 0
    assert night.requests(CHAT)[-1]["max_tokens"] == 1234


def test_claude_code_edits_only_train_py_and_other_files_are_undone(night):
    (night.tmp / "claude_script.json").write_text(json.dumps([
        {"edits": [{"file": "prepare.py", "search": "TIME_BUDGET = 1", "replace": "TIME_BUDGET = 9"},
                   {"file": "notes.txt", "search": "", "replace": "scratch"}],
         "result": "Done.\nDESCRIPTION: edit the harness\nHYPOTHESIS: a shorter budget scores better\n"
                   "NOTES:\nThe harness is read-only."},
        {"edits": [{"file": "train.py", "search": BETTER[0], "replace": BETTER[1]}],
         "result": "Lowered it.\nDESCRIPTION: lower val_bpb\nHYPOTHESIS: lower is better\n"
                   "NOTES:\nThe harness cannot be edited.\nVAL_BPB decides."},
    ]))
    result = night.run("--agent", "claude-code", "--max-experiments", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    first, second = [json.loads(line) for line in (night.tmp / "claude_calls").read_text().splitlines()]
    assert first["argv"][:2] == ["-p", "--output-format"] and "--append-system-prompt" in first["argv"]
    assert "VAL_BPB = 1.000000" in first["stdin"]  # the prompt carries the current train.py
    assert "--resume" not in second["argv"]  # a new experiment, a new conversation
    assert re.search(r"<untrusted-notes-\w+>\nThe harness is read-only.\n</untrusted-notes-", second["stdin"])
    assert (night.repo / "prepare.py").read_text() == FAKE_PREPARE
    assert not (night.repo / "notes.txt").exists()
    assert [row[3:] for row in night.rows()[1:]] == [["invalid", "edit the harness"], ["keep", "lower val_bpb"]]
    proposals = [r for r in night.ledger() if r["event"] == "proposal"]
    assert [p["ok"] for p in proposals] == [False, True]
    assert proposals[1]["hypothesis"] == "lower is better"
    assert proposals[1]["notes"] == "The harness cannot be edited.\nVAL_BPB decides."
    assert sum(p["cost_usd"] for p in proposals) == pytest.approx(0.10)  # total_cost_usd of each call
    assert night.is_clean()

