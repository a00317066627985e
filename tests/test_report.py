"""`agent_loop.py report`: the morning summary and progress.png, from a results.tsv or a tag's ledger.
In this process, on files in tmp_path; no training, no agent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import agent_loop
from autoresearch import report as report_module, state  # noqa: E402

HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
# experiment: commit, val_bpb, status, description. Baseline 1.0, best 0.969 at #8; 4 of 9 ideas kept.
FIXTURE = [
    ("aaaaaaa", 1.000000, "keep", "baseline"),
    ("bbbbbbb", 0.990000, "keep", "halve TOTAL_BATCH_SIZE"),
    ("ccccccc", 1.005000, "discard", "switch to GeLU"),
    ("ddddddd", 0.000000, "crash", "double model width"),
    ("eeeeeee", 0.985000, "keep", "raise matrix LR to 0.05"),
    ("fffffff", 0.000000, "invalid", "evaluate on fewer tokens"),
    ("ggggggg", 0.986000, "discard", "add dropout"),
    ("hhhhhhh", 0.970000, "keep", "add a 9th layer at the same width, with fewer steps to fit the budget"),
    ("iiiiiii", 0.969000, "keep", "warmdown to 0.05 of the peak LR"),
    ("jjjjjjj", 2.500000, "discard", "Muon momentum 0.99 (diverged)"),
]


def write_tsv(path, rows):
    path.write_text(HEADER + "".join(f"{c}\t{v:.6f}\t{0.0 if s == 'crash' else 44.0:.1f}\t{s}\t{d}\n"
                                     for c, v, s, d in rows))
    return path


def report(capsys, *args):
    """agent_loop.main(["report", ...]) in this process: (exit code, stdout)."""
    code = agent_loop.main(["report", *args])
    return code, capsys.readouterr().out


def report_json(capsys, *args):
    code, out = report(capsys, *args, "--json")
    assert code == 0
    return json.loads(out)


def failure(*args):
    """The message agent_loop.main(["report", ...]) stops with."""
    with pytest.raises(SystemExit) as stop:
        agent_loop.main(["report", *args])
    return str(stop.value.code)


@pytest.fixture
def tsv(tmp_path):
    return write_tsv(tmp_path / "results.tsv", FIXTURE)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """An empty git repository as the current directory, as the loop leaves one."""
    for name in list(os.environ):
        if name.startswith("GIT_"):
            monkeypatch.delenv(name)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report_module, "DEMO_RUNS", tmp_path / "demo-cache" / "runs")  # not the user's
    return tmp_path


def test_baseline_best_and_improvement(tsv, capsys):
    summary = report_json(capsys, "--tsv", str(tsv))
    assert summary["baseline"]["val_bpb"] == 1.0
    assert summary["best"] == {"experiment": 8, "commit": "iiiiiii", "val_bpb": 0.969, "delta": -0.001,
                               "description": "warmdown to 0.05 of the peak LR"}
    assert summary["improvement"] == pytest.approx(0.031)
    assert summary["improvement_pct"] == pytest.approx(3.1)


def test_keep_rate_counts_every_idea_crashes_included(tsv, capsys):
    summary = report_json(capsys, "--tsv", str(tsv))
    assert (summary["experiments"], summary["kept"], summary["discarded"]) == (10, 4, 3)
    assert (summary["crashes"], summary["invalid"]) == (1, 1)
    assert summary["keep_rate"] == pytest.approx(4 / 9, abs=1e-4)


def test_kept_list_has_deltas_to_the_best_before(tsv, capsys):
    kept = report_json(capsys, "--tsv", str(tsv))["kept_list"]
    assert [(k["experiment"], k["delta"]) for k in kept] == [(0, None), (1, -0.01), (4, -0.005), (7, -0.015),
                                                             (8, -0.001)]


def test_top_improvements_are_the_largest_deltas(tsv, capsys):
    top = report_json(capsys, "--tsv", str(tsv))["top_improvements"]
    assert [k["experiment"] for k in top] == [7, 1, 4, 8]


def test_top_improvements_stop_at_five(tmp_path, capsys):
    rows = [(f"{i:07d}", 1.0 - 0.01 * i, "keep", f"idea {i}") for i in range(8)]
    top = report_json(capsys, "--tsv", str(write_tsv(tmp_path / "results.tsv", rows)))["top_improvements"]
    assert len(top) == 5


def test_json_prints_nothing_else(tsv, capsys):
    code, out = report(capsys, "--tsv", str(tsv), "--json")
    summary = json.loads(out)  # fails on anything printed around it
    assert code == 0 and summary["png"] == str(tsv.with_name("progress.png"))
    assert summary["seconds"] is None and summary["cost_usd"] is None  # results.tsv does not record them


def test_text_report_has_the_numbers(tsv, capsys):
    code, out = report(capsys, "--tsv", str(tsv))
    assert code == 0
    assert "baseline     val_bpb 1.000000" in out
    assert "best         val_bpb 0.969000  #8 iiiiiii  warmdown to 0.05 of the peak LR" in out
    assert "improvement  0.031000 (3.10 %)" in out
    assert "(baseline included): 4 ideas kept, 3 discarded, 1 crashed, 1 invalid; keep rate 44 %" in out
    assert "time, cost   unknown" in out
    assert "     7  hhhhhhh  0.970000  -0.015000  add a 9th layer" in out
    assert "  1. -0.015000  #7 add a 9th layer" in out
    assert f"progress.png: {tsv.with_name('progress.png')}" in out


def test_png_is_written_next_to_the_tsv(tsv, capsys):
    report(capsys, "--tsv", str(tsv))
    assert tsv.with_name("progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_option_sets_the_path(tsv, tmp_path, capsys):
    target = tmp_path / "elsewhere" / "night.png"
    target.parent.mkdir()
    assert report_json(capsys, "--tsv", str(tsv), "--png", str(target))["png"] == str(target)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not tsv.with_name("progress.png").exists()


def test_plot_labels_kept_runs_and_leaves_out_crashes(tsv, tmp_path):
    rows = state.read_results_tsv(tsv)
    fig = report_module.plot_progress(rows, "autoresearch test", tmp_path / "p.png")
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.texts]
    assert labels[:3] == ["baseline", "halve TOTAL_BATCH_SIZE", "raise matrix LR to 0.05"]
    assert labels[3] == "add a 9th layer at the same width, with…" and len(labels[3]) == 40  # shortened
    assert len(labels) == 5 and ax.get_title() == "autoresearch test"
    plotted = {round(x) for points in ax.collections for x, _ in points.get_offsets()}
    assert plotted == {0, 1, 2, 4, 6, 7, 8, 9}  # not 3 (crash) nor 5 (invalid)


def test_plot_y_range_ignores_crashes_and_diverged_runs(tsv, tmp_path):
    ax = report_module.plot_progress(state.read_results_tsv(tsv), "t", tmp_path / "p.png").axes[0]
    low, high = ax.get_ylim()
    assert 0.9 < low < 0.969 and 1.0 < high < 1.1  # not down to a crash's 0.0, not up to the diverged 2.5
    assert ax.get_legend().get_texts()[0].get_text() == "discarded (1 above the plot)"


def test_plot_shows_ideas_up_to_10_percent_worse_and_a_discard_below_the_best(tmp_path):
    # Under the noise rule a mean a little below the best can still be a discard (within the noise).
    rows = [("aaaaaaa", 2.00, "keep", "baseline"), ("bbbbbbb", 2.15, "discard", "worse"),
            ("ccccccc", 1.99, "discard", "within the noise")]
    tsv = write_tsv(tmp_path / "results.tsv", rows)
    ax = report_module.plot_progress(state.read_results_tsv(tsv), "t", tmp_path / "p.png").axes[0]
    low, high = ax.get_ylim()
    assert low < 1.99 and high > 2.15


def test_a_discard_below_the_best_of_its_time_is_marked_as_within_the_noise(tmp_path):
    rows = [("aaaaaaa", 2.00, "keep", "baseline"), ("bbbbbbb", 1.99, "discard", "within the noise"),
            ("ccccccc", 1.90, "keep", "a real gain"), ("ddddddd", 1.95, "discard", "worse than the new best")]
    tsv = write_tsv(tmp_path / "results.tsv", rows)
    ax = report_module.plot_progress(state.read_results_tsv(tsv), "t", tmp_path / "p.png").axes[0]
    marked = next(c for c, text in zip(ax.collections, ax.get_legend().get_texts())
                  if text.get_text() == "discarded: lower than the best, but within the noise")
    assert [tuple(point) for point in marked.get_offsets()] == [(1, 1.99)]


def test_the_x_axis_fits_the_experiments_with_whole_numbers(tmp_path):
    rows = [("aaaaaaa", 2.00, "keep", "baseline")] + [(f"{i}" * 7, 2.1, "discard", "x") for i in range(1, 6)]
    ax = report_module.plot_progress(state.read_results_tsv(write_tsv(tmp_path / "r.tsv", rows)), "t",
                                  tmp_path / "p.png").axes[0]
    left, right = ax.get_xlim()
    assert left == -0.5 and 5 < right <= 7
    assert all(tick == int(tick) for tick in ax.get_xticks() if left <= tick <= right)


def test_the_plot_of_the_baseline_alone_labels_the_y_axis_with_its_values_and_no_offset(tmp_path):
    rows = [("aaaaaaa", 2.4512, "keep", "baseline")]
    ax = report_module.plot_progress(state.read_results_tsv(write_tsv(tmp_path / "r.tsv", rows)), "t",
                                  tmp_path / "p.png").axes[0]
    ax.figure.canvas.draw()
    labels = [label.get_text() for label in ax.get_yticklabels() if label.get_text()]
    assert ax.yaxis.get_offset_text().get_text() == "" and all(text.startswith("2.45") for text in labels), labels


def test_running_best_steps_after_each_keep(tsv, tmp_path):
    ax = report_module.plot_progress(state.read_results_tsv(tsv), "t", tmp_path / "p.png").axes[0]
    (line,) = ax.lines
    assert list(line.get_ydata())[-2:] == [0.969, 0.969] and line.get_xdata()[-1] == 9  # held to the last run
    assert line.get_drawstyle() == "steps-post"


def test_all_crash_file_reports_what_is_there(tmp_path, capsys):
    rows = [("aaaaaaa", 0.0, "crash", "baseline"), ("bbbbbbb", 0.0, "crash", "fix the import")]
    tsv = write_tsv(tmp_path / "results.tsv", rows)
    code, out = report(capsys, "--tsv", str(tsv))
    assert code == 0 and "no baseline" in out and "2 crashed" in out and "not drawn" in out
    summary = report_json(capsys, "--tsv", str(tsv))
    assert summary["baseline"] is None and summary["best"] is None and summary["improvement"] is None
    assert summary["png"] is None and not (tmp_path / "progress.png").exists()


def test_empty_results_tsv_says_no_experiments_yet(tmp_path, capsys):
    tsv = tmp_path / "results.tsv"
    tsv.write_text(HEADER)
    code, out = report(capsys, "--tsv", str(tsv))
    assert code == 0 and "no experiments yet" in out and not (tmp_path / "progress.png").exists()
    assert report_json(capsys, "--tsv", str(tsv))["experiments"] == 0


def test_missing_tsv_error_names_the_path(tmp_path):
    message = failure("--tsv", str(tmp_path / "nope.tsv"))
    assert str(tmp_path / "nope.tsv") in message and "does not exist" in message


def test_no_results_at_all_says_run_the_loop_first(repo):
    message = failure()
    assert "results.tsv" in message and "uv run agent_loop.py" in message and "--tsv" in message


def test_malformed_row_error_names_file_and_line(tmp_path):
    tsv = tmp_path / "results.tsv"
    tsv.write_text(HEADER + "aaaaaaa\t1.000000\t44.0\tkeep\tbaseline\nbbbbbbb\tnot-a-number\t44.0\tkeep\tx\n")
    message = failure("--tsv", str(tsv))
    assert f"{tsv}, line 3" in message and "malformed" in message


def test_unknown_status_error_names_file_and_line(tmp_path):
    tsv = tmp_path / "results.tsv"
    tsv.write_text(HEADER + "aaaaaaa\t1.000000\t44.0\tmaybe\tbaseline\n")
    assert f"{tsv}, line 2: unknown status 'maybe'" in failure("--tsv", str(tsv))


def test_wrong_header_is_an_error(tmp_path):
    tsv = tmp_path / "results.tsv"
    tsv.write_text("a,b,c\n")
    assert f"{tsv}, line 1: not a results.tsv" in failure("--tsv", str(tsv))


def write_ledger(repo, tag, records, tail=""):
    ledger = repo / ".autoresearch" / tag / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return ledger


def night():
    """Two invocations: 22:00-22:20 stopped, 01:00-01:10 killed (no stop). $0.15 spent, 915 s trained."""
    def at(hour, minute):
        return f"2026-03-0{1 if hour >= 12 else 2}T{hour:02d}:{minute:02d}:00"
    return [
        {"time": at(22, 0), "event": "start", "tag": "t"},
        {"time": at(22, 1), "event": "proposal", "experiment": 1, "ok": False, "cost_usd": 0.05},
        {"time": at(22, 6), "event": "run", "commit": "a" * 40, "ok": True, "val_bpb": 1.0, "seconds": 300.0},
        {"time": at(22, 6), "event": "result", "experiment": 0, "commit": "a" * 40, "status": "keep",
         "val_bpb": 1.0, "memory_gb": 44.0, "description": "baseline"},
        {"time": at(22, 7), "event": "proposal", "experiment": 1, "ok": True, "commit": "b" * 40,
         "description": "switch to GeLU", "cost_usd": 0.06},
        {"time": at(22, 12), "event": "run", "commit": "b" * 40, "ok": True, "val_bpb": 1.01, "seconds": 310.0},
        {"time": at(22, 12), "event": "result", "experiment": 1, "commit": "b" * 40, "status": "discard",
         "val_bpb": 1.01, "memory_gb": 44.0, "description": "switch to GeLU"},
        {"time": at(22, 20), "event": "stop", "reason": "interrupted"},
        {"time": at(1, 0), "event": "start", "tag": "t"},
        {"time": at(1, 1), "event": "proposal", "experiment": 2, "ok": True, "commit": "c" * 40,
         "description": "halve TOTAL_BATCH_SIZE", "cost_usd": 0.04},
        {"time": at(1, 6), "event": "run", "commit": "c" * 40, "ok": True, "val_bpb": 0.98, "seconds": 305.0},
        {"time": at(1, 10), "event": "result", "experiment": 2, "commit": "c" * 40, "status": "keep",
         "val_bpb": 0.98, "memory_gb": 44.0, "description": "halve TOTAL_BATCH_SIZE"},
    ]


def test_reads_the_ledger_with_time_and_cost(repo, capsys):
    write_ledger(repo, "t", night())
    summary = report_json(capsys)
    assert summary["seconds"] == 1800 and summary["training_seconds"] == 915 and summary["cost_usd"] == 0.15
    assert [k["commit"] for k in summary["kept_list"]] == ["aaaaaaa", "ccccccc"]
    assert summary["best"]["val_bpb"] == 0.98 and summary["png"] == str(repo / "progress.png")
    assert (repo / "progress.png").exists()
    out = report(capsys)[1]
    assert "tag t" in out and "0h 30m wall clock, 0h 15m running train.py" in out and "API cost     $0.15" in out


def test_an_experiment_in_flight_when_the_loop_stopped_is_reported_as_undecided(repo, capsys):
    write_ledger(repo, "t", night()[:6] + [{"time": "2026-03-01T22:13:00", "event": "stop", "reason": "interrupted"}])
    assert report_json(capsys)["undecided"] == [dict(experiment=1, description="switch to GeLU", runs=1,
                                                     stopped="interrupted")]
    assert 'undecided    #1 "switch to GeLU": 1 valid run when the loop stopped (interrupted); not decided' in (
        report(capsys)[1])


def test_while_the_loop_runs_nothing_is_called_undecided(repo, capsys):
    write_ledger(repo, "t", night()[:6])  # #1 in flight, no stop after the start
    assert report_json(capsys)["undecided"] == []


def test_any_ledger_can_be_reported_by_its_path(repo, tmp_path, capsys):
    kept = write_ledger(repo, "t", night()).rename(tmp_path / "ledger.jsonl")
    summary = report_json(capsys, "--ledger", str(kept))
    assert summary["source"] == str(kept) and summary["experiments"] == 3 and summary["seconds"] == 1800
    assert f"{tmp_path / 'nope.jsonl'} does not exist" in failure("--ledger", str(tmp_path / "nope.jsonl"))


def test_with_nothing_of_its_own_here_the_report_is_of_the_demo_s_last_run(repo, capsys):
    for name, records in (("20261201-100000", night()[:4]), ("20261202-100000", night())):
        (report_module.DEMO_RUNS / name).mkdir(parents=True)
        write_ledger(repo, name, records).rename(report_module.DEMO_RUNS / name / "ledger.jsonl")
    summary = report_json(capsys)
    assert summary["source"] == f"the demo's last run ({report_module.DEMO_RUNS / '20261202-100000' / 'ledger.jsonl'})"
    assert summary["experiments"] == 3


def test_the_holdout_verb_with_no_tag_here_says_to_run_the_loop_first(repo, tmp_path):
    (tmp_path / "results.tsv").write_text(HEADER)  # a results.tsv is no tag: holdout runs a tag's commits
    with pytest.raises(SystemExit) as stop:
        agent_loop.main(["holdout"])
    assert "has no tag: run the loop first (uv run agent_loop.py), or name a tag with --tag" in str(stop.value.code)


def test_default_tag_is_the_latest_ledger(repo, capsys):
    old, new = write_ledger(repo, "old", night()), write_ledger(repo, "new", night()[:4])
    os.utime(old, (1e9, 1e9))
    assert report_json(capsys)["experiments"] == 1
    os.utime(new, (9e8, 9e8))
    assert report_json(capsys)["experiments"] == 3
    assert report_json(capsys, "--tag", "new")["experiments"] == 1


def test_ledger_wins_over_results_tsv(repo, capsys):
    write_tsv(repo / "results.tsv", FIXTURE)
    write_ledger(repo, "t", night())
    assert report_json(capsys)["experiments"] == 3


def test_results_tsv_in_the_repo_without_a_ledger(repo, capsys):
    write_tsv(repo / "results.tsv", FIXTURE)
    assert report_json(capsys)["experiments"] == 10


def test_unknown_tag_error_lists_the_tags(repo):
    write_ledger(repo, "t", night())
    message = failure("--tag", "nope")
    assert "no ledger for tag nope" in message and "Tags here: t" in message


def test_unfinished_ledger_line_is_skipped_and_left_alone(repo, capsys):
    ledger = write_ledger(repo, "t", night(), tail='{"event": "res')  # a loop writing right now
    before = ledger.read_bytes()
    assert report_json(capsys)["experiments"] == 3
    assert ledger.read_bytes() == before  # the report never writes the ledger


def test_ledger_without_results_says_no_experiments_yet(repo, capsys):
    write_ledger(repo, "t", night()[:1])
    code, out = report(capsys)
    assert code == 0 and "no experiments yet" in out


def test_report_help_explains_it(capsys):
    with pytest.raises(SystemExit) as stop:
        agent_loop.main(["report", "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "agent_loop.py report" in out and "progress.png" in out and "--tsv" in out


def test_shows_the_noise_estimate_and_the_reason_of_each_decision(repo, capsys):
    records = night()
    for start in (r for r in records if r["event"] == "start"):
        start["keep_rule"] = "noise"
    records[3].update(reason="mean of 3 runs", runs=[1.0, 1.0, 1.0], noise_sigma=0.002, noise_dof=2)
    records[-1].update(reason="0.020000 better over 3 runs, above the threshold 0.004000", runs=[0.98] * 3,
                       noise_sigma=0.0015, noise_dof=4)
    write_ledger(repo, "t", records)
    summary = report_json(capsys)
    assert (summary["keep_rule"], summary["noise_sigma"], summary["noise_dof"]) == ("noise", 0.0015, 4)
    assert [d["reason"] for d in summary["decisions"]] == ["mean of 3 runs", records[-1]["reason"]]
    out = report(capsys)[1]
    assert "noise        sigma 0.001500" in out and "keep rule noise" in out
    assert "why: 0.020000 better over 3 runs, above the threshold 0.004000" in out
