"""
The night as one web page: the report's numbers, the progress plot, every experiment (status, val_bpb, delta,
runs, the keep rule's reason, hypothesis) with its diff and a crash's log tail, the steering and the agent's
notes. One self-contained file: inline CSS, the plot as inline SVG, no script and no network (its
Content-Security-Policy forbids both). Every string that came from the agent or a log is escaped.

    uv run agent_loop.py report --html [PATH]     # default: .autoresearch/<tag>/report.html

The loop rewrites .autoresearch/<tag>/report.html after every experiment (it reloads itself every minute while
the night goes on), so the page can stay open in a browser overnight.
"""

import html
import os
from pathlib import Path

from autoresearch import holdout, state
from autoresearch.console import plural

REFRESH_SECONDS = 60  # how often the live page reloads itself while the night goes on
STATUS_COLOURS = {"keep": "#2ca02c", "discard": "#888888", "crash": "#d62728", "invalid": "#9467bd"}
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: top; padding: 4px 8px; border-bottom: 1px solid #e4e4e4; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.number { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.status { font-weight: 600; } .keep { color: #2ca02c; } .discard { color: #777; } .crash { color: #d62728; }
.invalid { color: #9467bd; } .hypothesis, .reason { color: #555; font-size: 0.92em; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; max-height: 40em; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dl.summary dt { color: #555; } dl.summary dd { margin: 0; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
"""


def write_page(rows, ledger, summary, title, path, live=False):
    """Write the page atomically (a browser reloading it never reads half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(page(rows, ledger, summary, title, live), encoding="utf-8")
    os.replace(temporary, path)
    return path


def page(rows, ledger, summary, title, live=False):
    e = html.escape
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if live else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
{refresh}<title>{e(title)}</title><style>{CSS}</style></head>
<body>
<h1>{e(title)}</h1>
{summary_html(summary)}
<h2>Progress</h2>
{plot_svg(rows)}
{steering_html(summary)}
<h2>Experiments</h2>
{experiments_html(rows, ledger)}
{notes_html(summary)}
</body></html>
"""


# -----------------------------------------------------------------------------
# The numbers, the steering, the notes


def undecided_text(cut):
    """An experiment in flight when the loop stopped, in the report's words."""
    return (f"#{cut['experiment']} \"{cut['description']}\": {plural(cut['runs'], 'valid run')} when the loop "
            f"stopped ({cut['stopped'] or 'killed'}); not decided")


def model_text(model):
    """A model the tag keeps, in the report's words."""
    return (f"{model['path']} (#{model['experiment']} {model['commit']}, its run scored {model['val_bpb']:.6f}; "
            f"{model['bytes'] / 1e6:.1f} MB)")


def summary_html(s):
    e, items = html.escape, []
    if not s["experiments"]:
        return "<p>No experiments yet.</p>"
    if s["best"]:
        b = s["best"]
        items += [("baseline", f"val_bpb {s['baseline']['val_bpb']:.6f}"),
                  ("best", f"val_bpb {b['val_bpb']:.6f} (#{b['experiment']} {e(b['commit'])}: {e(b['description'])})"),
                  ("improvement", f"{s['improvement']:.6f} ({s['improvement_pct']:.2f} %)")]
    rate = "n/a" if s["keep_rate"] is None else f"{100 * s['keep_rate']:.0f} %"
    items.append(("experiments", f"{s['experiments']} (baseline included): {s['kept']} kept, {s['discarded']} "
                  f"discarded, {s['crashes']} crashed, {s['invalid']} invalid; keep rate {rate}"))
    if s["noise_sigma"] is not None:
        items.append(("noise", f"sigma {s['noise_sigma']:.6f} between runs of one commit ({s['noise_dof']} degrees "
                      f"of freedom); keep rule {e(str(s['keep_rule']))}"))
    if s["seconds"] is not None:
        wall, training = (f"{t // 3600:.0f}h {t % 3600 // 60:02.0f}m" for t in (s["seconds"], s["training_seconds"]))
        items += [("time", f"{wall} wall clock, {training} running train.py"), ("API cost", f"${s['cost_usd']:.2f}")]
    if s.get("holdout"):
        items.append(("holdout", e(holdout.holdout_text(s["holdout"]))))
    items += [("sandbox", e(line)) for line in s.get("sandbox", [])]
    items += [("undecided", e(undecided_text(cut))) for cut in s.get("undecided", [])]
    items += [(f"{model['role']} model", e(model_text(model))) for model in s.get("models", [])]
    if s.get("models"):
        items.append(("to load", e(s["models"][-1]["load"])))
    if s.get("altered"):
        items.append(("warning", f"the ledger was changed after the loop wrote it: {e(s['altered'])}; do not trust "
                                 "this page"))
    return '<dl class="summary">' + "".join(f"<dt>{name}</dt><dd>{value}</dd>" for name, value in items) + "</dl>"


def steering_html(s):
    e = html.escape
    parts = []
    if s["steering"]:
        parts.append("<h2>Steering</h2><p>What the researcher wrote in steer.md, from when the agent was shown it."
                     "</p><table><tr><th>time</th><th>steer.md</th></tr>" + "".join(
                         f"<tr><td>{e(c['time'])}</td><td><pre>{e(c['text']) or '(emptied)'}</pre></td></tr>"
                         for c in s["steering"]) + "</table>")
    if s["plateaus"]:
        parts.append("<p>" + "<br>".join(f"Plateau at {e(p['time'])}: {p['streak']} experiments in a row not kept; "
                                         "the agent was asked for another kind of change." for p in s["plateaus"])
                     + "</p>")
    return "\n".join(parts)


def notes_html(s):
    if not s["notes"]:
        return ""
    return (f"<h2>The agent's lab notes at the end</h2><p>Written with #{s['notes']['experiment']}.</p>"
            f'<pre class="notes">{html.escape(s["notes"]["text"])}</pre>')


# -----------------------------------------------------------------------------
# Every experiment, with its diff and a crash's log tail

def experiments_html(rows, ledger):
    e = html.escape
    proposals = ledger.events("proposal") if ledger else []
    runs = ledger.events("run") if ledger else []
    lines = ['<table class="experiments"><thead><tr><th>#</th><th>commit</th><th>status</th><th>val_bpb</th>'
             '<th>delta</th><th>runs</th><th>description, hypothesis and reason</th></tr></thead><tbody>']
    best = None
    for r in rows:
        measured = r["status"] in ("keep", "discard")
        delta = f"{r['val_bpb'] - best:+.6f}" if measured and best is not None else ""
        if r["status"] == "keep":
            best = r["val_bpb"] if best is None else min(best, r["val_bpb"])
        beside = f" + {len(r['best_runs_beside'])} of the best" if r.get("best_runs_beside") else ""
        count = f"{len(r['runs'])}{beside}" if "runs" in r else ""
        details = "".join(f"<details><summary>{diff_title(p)}</summary><pre>{e(p['diff'])}</pre></details>"
                          for p in proposals if p["experiment"] == r["experiment"] and p["ok"] and p.get("diff"))
        if r["status"] == "crash":
            failed = [run for run in runs if run["experiment"] == r["experiment"] and not run["ok"]]
            if failed and failed[-1].get("log_tail"):
                details += (f"<details><summary>log tail of the crash</summary><pre>{e(failed[-1]['log_tail'])}"
                            "</pre></details>")
        hypothesis = f'<div class="hypothesis">hypothesis: {e(r["hypothesis"])}</div>' if r.get("hypothesis") else ""
        reason = f'<div class="reason">{e(r["reason"])}</div>' if r.get("reason") else ""
        value = f"{r['val_bpb']:.6f}" if measured else "-"
        lines.append(
            f'<tr class="experiment" id="e{r["experiment"]}"><td class="number">{r["experiment"]}</td>'
            f'<td><code>{e(r["commit"][:7])}</code></td><td class="status {e(r["status"])}">{e(r["status"])}</td>'
            f'<td class="number">{value}</td><td class="number">{delta}</td><td class="number">{count}</td>'
            f'<td>{e(r["description"])}{hypothesis}{reason}{details}</td></tr>')
    lines.append("</tbody></table>")
    return "\n".join(lines)


def diff_title(proposal):
    return f"diff of fix {proposal['attempt']}" if proposal["attempt"] else "diff"


# -----------------------------------------------------------------------------
# The plot, drawn as SVG: kept green, discarded grey, near misses ringed in orange, the running best as a step

def plot_svg(rows, width=1000, height=380, margin=(20, 20, 40, 70)):
    e = html.escape
    points = [r for r in rows if r["status"] in ("keep", "discard")]
    if not points:
        return "<p>No experiment has a val_bpb yet.</p>"
    kept = [r for r in rows if r["status"] == "keep"]
    misses = {id(r) for r in state.near_misses(rows)}
    values = [r["val_bpb"] for r in points]
    low, high = min(values), (kept[0]["val_bpb"] if kept else max(values))
    span = max(high - low, 1e-3 * high, 1e-6)
    top, bottom = high + 0.3 * span, low - 0.05 * span  # as progress.png: ideas far worse than the baseline are cut
    last = max(r["experiment"] for r in rows)
    top_m, right_m, bottom_m, left_m = margin
    plot_w, plot_h = width - left_m - right_m, height - top_m - bottom_m

    def x(experiment):
        return left_m + plot_w * experiment / max(last, 1)

    def y(value):
        return top_m + plot_h * (top - min(max(value, bottom), top)) / (top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="val_bpb of each experiment" class="progress">',
             f'<rect x="{left_m}" y="{top_m}" width="{plot_w}" height="{plot_h}" fill="#fcfcfc" stroke="#ccc"/>']
    for i in range(5):  # the y axis: five values from bottom to top
        value = bottom + (top - bottom) * i / 4
        parts.append(f'<line x1="{left_m}" x2="{left_m + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     f'stroke="#eee"/><text x="{left_m - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                     f'{value:.4f}</text>')
    step = max(1, round(last / 10))
    for experiment in range(0, last + 1, step):
        parts.append(f'<text x="{x(experiment):.1f}" y="{height - bottom_m + 16}" text-anchor="middle">'
                     f'{experiment}</text>')
    parts.append(f'<text x="{left_m + plot_w / 2}" y="{height - 6}" text-anchor="middle">experiment</text>')
    if kept:  # the running best: level from each keep to the next, then to the last experiment
        best = kept[0]["val_bpb"]
        path = [f"M{x(kept[0]['experiment']):.1f} {y(best):.1f}"]
        for r in kept[1:]:
            best = min(best, r["val_bpb"])
            path.append(f"H{x(r['experiment']):.1f} V{y(best):.1f}")
        path.append(f"H{x(last):.1f}")
        parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="#2ca02c" stroke-width="1.5" opacity="0.7"/>')
    for r in points:
        colour = STATUS_COLOURS[r["status"]]
        ring = 'stroke="#e08000" stroke-width="2"' if id(r) in misses else 'stroke="#333" stroke-width="0.5"'
        radius = 5 if r["status"] == "keep" else 3.5
        above = " (above the plot)" if r["val_bpb"] > top else ""
        parts.append(f'<circle cx="{x(r["experiment"]):.1f}" cy="{y(r["val_bpb"]):.1f}" r="{radius}" '
                     f'fill="{colour}" {ring}><title>#{r["experiment"]} {e(r["status"])} {r["val_bpb"]:.6f}{above}: '
                     f'{e(r["description"])}</title></circle>')
    parts.append("</svg>")
    return "\n".join(parts)
