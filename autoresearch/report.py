"""
The morning report: what a night did, from the tag's ledger or any results.tsv, and progress.png; with --html,
the same as one web page (html_report.py), which the loop also keeps up to date during the night.

    uv run agent_loop.py report [--tag TAG | --tsv PATH] [--json] [--png PATH] [--html [PATH]]
"""

import argparse
import datetime
import json
from pathlib import Path

from autoresearch import holdout, html_report, state, weights
from autoresearch.console import fail, plural
from autoresearch.demo import DEMO_CACHE

DEMO_RUNS = DEMO_CACHE / "runs"  # where `agent_loop.py demo` keeps each run (with its default --cache)


def tag_ledgers():
    """(the checkout's root, its tags' ledgers, the one written last at the end)"""
    root = state.worktree_root() or Path.cwd()  # where the loop writes
    # By the ledger's own time: a tag directory's time does not change when its ledger grows.
    return root, sorted((root / state.STATE_ROOT).glob("*/ledger.jsonl"), key=lambda p: p.stat().st_mtime)


def report_source(tag=None, tsv=None, ledger_path=None):
    """(result rows, the Ledger or None, where they came from, a name for the title, default png path)"""
    if ledger_path:
        path = Path(ledger_path)
        if not path.is_file():
            fail(f"{path} does not exist: pass the path of a ledger.jsonl (the demo keeps one in each of "
                 f"{DEMO_RUNS}'s folders).")
        ledger = state.Ledger(path)
        return ledger.results(), ledger, str(path), path.parent.name, path.with_name("progress.png")
    if tsv:
        path = Path(tsv)
        if not path.is_file():
            fail(f"{path} does not exist: pass the path of a results.tsv, or leave out --tsv for the loop's ledger.")
        return state.read_results_tsv(path), None, str(path), path.name, path.with_name("progress.png")
    root, ledgers = tag_ledgers()
    asked, tag = tag, tag or (ledgers[-1].parent.name if ledgers else None)
    path = root / state.STATE_ROOT / str(tag) / "ledger.jsonl"
    if tag and path.is_file():
        ledger = state.Ledger(path)  # reads only: the loop may be writing it now
        return ledger.results(), ledger, f"tag {tag} ({path})", tag, root / "progress.png"
    if asked:
        fail(f"there is no ledger for tag {tag}: {path} does not exist. Tags here: "
             f"{', '.join(p.parent.name for p in ledgers) or 'none'}.")
    tsv = root / "results.tsv"
    demos = sorted(DEMO_RUNS.glob("*/ledger.jsonl"))  # folders named by the time the demo ended
    if not tsv.is_file() and demos:  # nothing of the user's own here
        rows, ledger, path, name, png = report_source(ledger_path=demos[-1])
        return rows, ledger, f"the demo's last run ({path})", name, png
    if not tsv.is_file():
        fail(f"nothing to report: neither {root / state.STATE_ROOT}/<tag>/ledger.jsonl nor {tsv} exists. Run the loop "
             "first (uv run agent_loop.py), or pass --tsv PATH.")
    return state.read_results_tsv(tsv), None, str(tsv), tsv.name, root / "progress.png"


def wall_seconds(records):
    """Each invocation from its start to its last record: its stop, or where it was killed (or is now)."""
    spans, invocation = {}, 0
    for record in records:
        invocation += record["event"] == "start"
        now = datetime.datetime.fromisoformat(record["time"])
        spans[invocation] = (spans.get(invocation, (now,))[0], now)
    return round(sum((last - first).total_seconds() for first, last in spans.values()), 1)


def summarize(rows, ledger=None):
    """The report's numbers, JSON-ready; None where there is nothing to say (no baseline, no ledger)."""
    kept, best = [], None
    for r in rows:
        if r["status"] == "keep":  # the delta is to the best before it: the improvement this keep brought
            delta = None if best is None else round(r["val_bpb"] - best["val_bpb"], 6)
            kept.append(dict(experiment=r["experiment"], commit=r["commit"][:7], val_bpb=r["val_bpb"], delta=delta,
                             description=r["description"], **({"reason": r["reason"]} if "reason" in r else {})))
            best = kept[-1] if best is None or r["val_bpb"] < best["val_bpb"] else best
    baseline = kept[0] if kept else None
    ideas = len(rows) - (baseline is not None)  # every experiment but the baseline, crashes included
    count = {status: sum(r["status"] == status for r in rows) for status in state.STATUSES}
    improvement = baseline["val_bpb"] - best["val_bpb"] if baseline else None
    noise = [r for r in rows if r.get("noise_dof")]  # the ledger's estimate after each decision
    starts = ledger.events("start") if ledger else []
    return dict(
        keep_rule=starts[-1].get("keep_rule", "greedy") if starts else None,
        sandbox=sorted({r["sandbox"] for r in ledger.events("run") if r.get("sandbox")}) if ledger else [],
        altered=ledger.altered() if ledger else None,
        noise_sigma=noise[-1]["noise_sigma"] if noise else None, noise_dof=noise[-1]["noise_dof"] if noise else None,
        baseline=baseline, best=best, improvement=None if improvement is None else round(improvement, 6),
        improvement_pct=None if improvement is None else round(100 * improvement / baseline["val_bpb"], 3),
        experiments=len(rows), kept=len(kept[1:]), keep_rate=round(len(kept[1:]) / ideas, 4) if ideas else None,
        discarded=count["discard"], crashes=count["crash"], invalid=count["invalid"],
        seconds=wall_seconds(ledger.records) if ledger else None,
        training_seconds=round(sum(r["seconds"] for r in ledger.events("run")), 1) if ledger else None,
        cost_usd=round(ledger.spent_usd(), 4) if ledger else None,
        kept_list=kept, top_improvements=sorted((k for k in kept[1:] if k["delta"] < 0), key=lambda k: k["delta"])[:5],
        decisions=[dict(experiment=r["experiment"], status=r["status"], val_bpb=r["val_bpb"], runs=len(r["runs"]),
                        reason=r["reason"], hypothesis=r.get("hypothesis", "")) for r in rows if "reason" in r],
        steering=[dict(time=r["time"], text=r["text"]) for r in ledger.events("steer")] if ledger else [],
        plateaus=[dict(time=r["time"], streak=r["streak"]) for r in ledger.events("plateau")] if ledger else [],
        notes=(notes := ledger and ledger.notes()) and dict(experiment=notes["experiment"], text=notes["notes"]),
        holdout=(ledger.events("holdout") or [None])[-1] if ledger else None,
        undecided=undecided(ledger) if ledger else [], models=saved_models(ledger))


def saved_models(ledger):
    """The models the tag keeps (weights.py): [{role, path, commit, experiment, val_bpb, bytes, load}]; the JSON
    beside each says it, and only the driver writes it, for a run the scorer scored."""
    if not ledger or not ledger.path:
        return []
    folder, models = ledger.path.parent / weights.MODELS, []
    for role in weights.ROLES:
        try:
            about = json.loads((folder / f"{role}.json").read_text())
        except (OSError, ValueError):
            continue
        if (folder / f"{role}.safetensors").is_file():
            models.append(dict(role=role, path=str(folder / f"{role}.safetensors"), commit=about["commit"][:7],
                               experiment=about["experiment"], val_bpb=about["val_bpb"], bytes=about["bytes"],
                               load=about["load"]))
    return models


def undecided(ledger):
    """The experiments in flight when the loop last stopped, with how many valid runs each had: a resume goes on
    with them (a demo's tag is gone: they were cut off). None while the loop runs, or after it was killed: the
    ledger then has no stop after its last start."""
    at = max((i for i, r in enumerate(ledger.records) if r["event"] == "start"), default=-1)
    stops = [r for r in ledger.records[at + 1:] if r["event"] == "stop"]
    if not stops:
        return []
    return [dict(experiment=number, description=ledger.description(number),
                 runs=len(ledger.measured(proposal["commit"])), stopped=stops[-1]["reason"])
            for number, proposal in sorted(ledger.open_experiments().items())]


def write_html(ledger, path, title, live=False):
    """The page of the tag's ledger (live: it reloads itself while the night goes on)."""
    rows = ledger.results()
    return html_report.write_page(rows, ledger, summarize(rows, ledger), title, path, live)


def plot_progress(rows, title, path):
    """progress.png as the reference's notebook draws it. Returns the Figure, whose texts the tests read."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here, not at the top: the loop never pays for it
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    kept = [r for r in rows if r["status"] == "keep"]  # crashes have no val_bpb and invalid ones a wrong one
    near_misses = state.near_misses(rows)  # lower than the best of their time, but within the noise
    discarded = [r for r in rows if r["status"] == "discard" and r not in near_misses]
    running = [min(r["val_bpb"] for r in kept[:i + 1]) for i in range(len(kept))]  # the best after each keep
    values = [r["val_bpb"] for r in kept + discarded + near_misses]
    # From the best to a bit above the baseline: a diverged run must not flatten the curve that matters.
    # A discard can lie below the best: under the noise rule a mean a bit lower is not always a keep.
    low, high = (min(values), running[0]) if kept else (min(values), max(values))
    span = max(high - low, 1e-3 * high, 1e-6)
    cap = high + max(span, 0.1 * high)  # ideas up to 10 % worse than the baseline are shown; a diverged run is not
    hidden = sum(v > cap for v in values)
    shown = max([v for v in values if v <= cap] + [high])
    top = max(high + 0.4 * span, shown + 0.05 * (shown - low))  # room for labels
    fig = Figure(figsize=(14, 7), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.scatter([r["experiment"] for r in discarded], [r["val_bpb"] for r in discarded], s=16, color="#aaaaaa",
               alpha=0.5, zorder=2, label=f"discarded ({hidden} above the plot)" if hidden else "discarded")
    if near_misses:
        ax.scatter([r["experiment"] for r in near_misses], [r["val_bpb"] for r in near_misses], s=30,
                   facecolors="none", edgecolors="#e08000", linewidths=1.2, zorder=3,
                   label="discarded: lower than the best, but within the noise")
    ax.scatter([r["experiment"] for r in kept], [r["val_bpb"] for r in kept], s=44, color="#2ca02c",
               edgecolors="black", linewidths=0.5, zorder=4, label="kept")
    last = max(r["experiment"] for r in rows)  # with workers, rows are in the order experiments were decided
    if kept:  # the best holds from each keep until the next one, to the last experiment
        ax.step([r["experiment"] for r in kept] + [last], running + running[-1:], where="post",
                color="#2ca02c", alpha=0.7, linewidth=1.5, zorder=3, label="running best")
    for r in kept:  # rotated and small: consecutive keeps are often a few experiments apart
        text = r["description"] if len(r["description"]) <= 40 else r["description"][:39].rstrip() + "…"
        ax.annotate(text, (r["experiment"], r["val_bpb"]), xytext=(5, 5), textcoords="offset points",
                    rotation=45, fontsize=7.5, color="#1b5e20", zorder=5)
    ax.set_ylim(low - 0.05 * (top - low), top)
    ax.ticklabel_format(axis="y", useOffset=False)  # a narrow range (one point) reads as the values, no "+2.45"
    ax.set_xlim(-0.5, last + max(1.5, 0.2 * len(rows)))  # room right for the last label
    ax.xaxis.get_major_locator().set_params(integer=True)  # experiments are numbered
    ax.set(title=title, xlabel="experiment", ylabel="val_bpb (lower is better)")
    ax.grid(alpha=0.25)
    ax.legend(loc="upper right")
    fig.savefig(path)
    return fig


def print_report(s, source):
    print(f"autoresearch report: {source}")
    if not s["experiments"]:
        return print("no experiments yet: no rows, so no progress.png either.")
    if s["best"]:
        b = s["best"]
        print(f"baseline     val_bpb {s['baseline']['val_bpb']:.6f}\nbest         val_bpb {b['val_bpb']:.6f}  "
              f"#{b['experiment']} {b['commit']}  {b['description']}\n"
              f"improvement  {s['improvement']:.6f} ({s['improvement_pct']:.2f} %)")
    else:
        print("no baseline: no experiment has a val_bpb yet (every one crashed or is invalid)")
    rate = "n/a" if s["keep_rate"] is None else f"{100 * s['keep_rate']:.0f} %"
    print(f"experiments  {s['experiments']} (baseline included): {plural(s['kept'], 'idea')} kept, "
          f"{s['discarded']} discarded, "
          f"{s['crashes']} crashed, {s['invalid']} invalid; keep rate {rate}")
    if s["noise_sigma"] is not None:
        print(f"noise        sigma {s['noise_sigma']:.6f} of val_bpb between runs of one commit ({s['noise_dof']} "
              f"degrees of freedom); keep rule {s['keep_rule']}")
    if s["holdout"]:
        print(f"holdout      {holdout.holdout_text(s['holdout'])}")
    for line in s["sandbox"]:
        print(f"sandbox      {line}")
    for cut in s["undecided"]:
        print(f"undecided    {html_report.undecided_text(cut)}")
    for model in s["models"]:
        print(f"{model['role'] + ' model':<12} {html_report.model_text(model)}")
    if s["models"]:
        print(f"{'':13}load: {s['models'][-1]['load']}")
    if s["altered"]:
        print(f"WARNING      the ledger was changed after the loop wrote it: {s['altered']}; do not trust this report")
    if s["seconds"] is None:
        print("time, cost   unknown: results.tsv does not record them (the tag's ledger does)")
    else:
        wall, training = (f"{t // 3600:.0f}h {t % 3600 // 60:02.0f}m" for t in (s["seconds"], s["training_seconds"]))
        print(f"time         {wall} wall clock, {training} running train.py\n"
              f"API cost     ${s['cost_usd']:.2f}")
    if s["kept_list"]:
        print("\nkept, in order (delta: to the best before it)\n     #  commit   val_bpb    delta      description")
        for k in s["kept_list"]:
            delta = "" if k["delta"] is None else f"{k['delta']:+.6f}"
            print(f"  {k['experiment']:>4}  {k['commit']:<7}  {k['val_bpb']:.6f}  {delta:<9}  {k['description']}")
            if k.get("reason"):
                print(f"{'':34}why: {k['reason']}")
    if s["top_improvements"]:
        print("\ntop improvements")
        for rank, k in enumerate(s["top_improvements"], 1):
            print(f"  {rank}. {k['delta']:+.6f}  #{k['experiment']} {k['description']}")
    if s["steering"]:
        print("\nsteering (steer.md, from when the agent was shown it)")
        for change in s["steering"]:
            print(f"  {change['time']}  " + ("\n" + " " * 23).join(change["text"].splitlines() or ["(emptied)"]))
    for plateau in s["plateaus"]:
        print(f"plateau      {plateau['time']}: {plateau['streak']} experiments in a row not kept; asked for "
              "another kind of change")
    if s["notes"]:
        print(f"\nthe agent's lab notes at the end (written with #{s['notes']['experiment']})")
        print("\n".join(f"  {line}" for line in s["notes"]["text"].splitlines()))
    print(f"\nprogress.png: {s['png'] or 'not drawn: nothing has a val_bpb'}")
    if s.get("html"):
        print(f"report.html:  {s['html']}")


def report_main(argv):
    parser = argparse.ArgumentParser(
        prog="agent_loop.py report",
        description="Summarize a research night: baseline and best val_bpb, the improvement, keep rate, crashes,\n"
        "time and API cost, the kept experiments with their deltas and the top improvements; and draw\n"
        "progress.png (discarded runs grey, kept runs green and labelled, the running best as a step line).\n"
        "Reads .autoresearch/<tag>/ledger.jsonl (the most recent tag by default), else the repo's results.tsv,\n"
        "else the demo's last run.",
        epilog="examples:\n  uv run agent_loop.py report\n  uv run agent_loop.py report --tag nov22 --json\n"
        "  uv run agent_loop.py report --tsv ~/old/results.tsv --png /tmp/progress.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tag", help="report this tag's ledger (default: the tag whose ledger changed last)")
    source.add_argument("--tsv", metavar="PATH", help="report any results.tsv instead; time and cost are then unknown")
    source.add_argument("--ledger", metavar="PATH", help="report any ledger.jsonl, such as one the demo kept")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    parser.add_argument("--png", metavar="PATH", help="where to write the plot (default: "
                        "progress.png next to results.tsv)")
    parser.add_argument("--html", metavar="PATH", nargs="?", const="", help="also write the report as one "
                        "self-contained web page: the plot, every experiment with its diff and the keep rule's "
                        "reason, a crash's log tail, the steering and the agent's notes (default PATH: report.html "
                        "beside the tag's ledger, or beside results.tsv)")
    args = parser.parse_args(argv)
    rows, ledger, source, name, png = report_source(args.tag, args.tsv, args.ledger)
    summary = summarize(rows, ledger)
    if args.html is not None:
        beside = ledger.path.parent if ledger else png.parent
        summary["html"] = str(html_report.write_page(rows, ledger, summary, f"autoresearch {name}",
                                                     args.html or beside / "report.html"))
    summary["png"] = str(Path(args.png or png)) if summary["baseline"] or summary["discarded"] else None
    if summary["png"]:  # else nothing has a val_bpb: no empty plot
        invalid = f", {summary['invalid']} invalid" if summary["invalid"] else ""
        plot_progress(rows, f"autoresearch {name}: {plural(summary['experiments'], 'experiment')}, "
                      f"{plural(summary['kept'], 'idea')} kept, "
                      f"{summary['crashes']} crashed{invalid}", summary["png"])
    if args.json:
        print(json.dumps({"source": source, **summary}, indent=2))
    else:
        print_report(summary, source)
    return 0
