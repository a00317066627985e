"""The night as one web page (autoresearch/html_report.py): built from hand-made ledger records here, from a
night's ledger end to end, and opened in headless Chromium when the machine has one."""

import re
import shutil

import pytest

from autoresearch import html_report, report
from autoresearch.state import Ledger

INJECTED = '<script>window.pwned = 1; document.title = "pwned"</script>'


def night_records(rows=6):
    """A tag's ledger: the baseline, then ideas kept, discarded and crashed; agent text that tries to inject."""
    records = [{"event": "start", "time": "2026-12-02T01:00:00", "keep_rule": "noise", "base_commit": "a" * 40},
               {"event": "steer", "time": "2026-12-02T01:30:00", "text": f"Try wider models. {INJECTED}"}]
    for n in range(rows):
        status = ["keep", "discard", "crash", "keep", "discard", "invalid"][n % 6]
        commit = f"{n:07d}" + "c" * 33
        records.append({"event": "proposal", "time": "2026-12-02T02:00:00", "experiment": n, "attempt": 0,
                        "ok": True, "commit": commit, "description": f"idea {n}", "diff": f"-LR = 0.04\n+LR = 0.0{n}",
                        "notes": f"notes after {n} {INJECTED}", "cost_usd": 0.05, "calls": []})
        records.append({"event": "run", "time": "2026-12-02T02:05:00", "experiment": n, "commit": commit, "repeat": 1,
                        "ok": status != "crash", "val_bpb": 1.0 - 0.01 * n, "seconds": 300.0,
                        "log_tail": f"Traceback\nRuntimeError: out of memory {INJECTED}" if status == "crash" else ""})
        records.append({"event": "result", "time": "2026-12-02T02:06:00", "experiment": n, "commit": commit,
                        "status": status, "val_bpb": 0.0 if status in ("crash", "invalid") else 1.0 - 0.01 * n,
                        "runs": [1.0 - 0.01 * n], "memory_gb": 1.0, "reason": f"reason {n}",
                        "description": "baseline" if n == 0 else f"idea {n} {INJECTED}",
                        "hypothesis": f"because {n} {INJECTED}" if n else ""})
    return records


def page(records=None, live=False):
    ledger = Ledger(records=records or night_records())
    rows = ledger.results()
    return html_report.page(rows, ledger, report.summarize(rows, ledger), "autoresearch t", live)


def test_every_string_from_the_agent_or_a_log_is_escaped_and_the_page_has_no_script_at_all():
    text = page()
    assert "<script" not in text and text.count("&lt;script&gt;window.pwned") >= 5  # desc, hypothesis, notes, ...
    assert "default-src 'none'" in text  # and its Content-Security-Policy would not run one


def test_the_table_has_one_row_per_experiment_with_its_status_reason_and_hypothesis():
    text = page()
    rows = re.findall(r'<tr class="experiment" id="e(\d+)">', text)
    assert rows == [str(n) for n in range(6)]
    assert 'class="status crash">crash<' in text and "reason 4" in text and "hypothesis: because 3" in text


def test_each_diff_is_collapsed_and_a_crash_shows_its_log_tail():
    text = page()
    assert text.count("<details><summary>diff</summary><pre>-LR = 0.04\n+LR = 0.0") == 6
    assert "<details><summary>log tail of the crash</summary><pre>Traceback\nRuntimeError: out of memory" in text


def test_the_plot_draws_each_experiment_with_a_val_bpb():
    svg = page().split('<svg', 1)[1].split("</svg>")[0]
    assert svg.count("<circle") == 4  # 2 kept, 2 discarded; no crash, no invalid


def test_the_steering_and_the_final_notes_are_shown():
    text = page()
    assert "Try wider models." in text and "notes after 5" in text and "Written with #5" in text


def test_the_live_page_reloads_itself_and_the_morning_s_does_not():
    assert '<meta http-equiv="refresh"' in page(live=True) and '<meta http-equiv="refresh"' not in page()


def test_a_night_keeps_its_page_up_to_date_and_report_html_writes_one(night, capsys):
    from fake_llm import change
    from night_repo import BETTER
    night.llm.script(change("lower val_bpb", BETTER, hypothesis=INJECTED))
    assert night.run("--max-experiments", "2", "--keep-rule", "greedy").returncode == 0
    live = (night.repo / ".autoresearch/t/report.html").read_text()
    assert len(re.findall(r'<tr class="experiment"', live)) == 2 and "&lt;script&gt;" in live
    import agent_loop
    capsys.readouterr()
    assert agent_loop.main(["report", "--html", str(night.tmp / "page.html")]) == 0
    assert f"report.html:  {night.tmp / 'page.html'}" in capsys.readouterr().out
    assert (night.tmp / "page.html").read_text().count('<tr class="experiment"') == 2


# -----------------------------------------------------------------------------
# In a real browser: Debian's chromium, headless, driven by Playwright (.ci/run installs it)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM, reason="no chromium on PATH (apt-get install chromium; .ci/run does)")
def test_in_headless_chromium_the_rows_the_plot_and_the_diffs_show_and_the_injected_script_does_not_run(tmp_path):
    from playwright.sync_api import sync_playwright
    path = tmp_path / "report.html"
    ledger = Ledger(records=night_records(40))
    rows = ledger.results()
    html_report.write_page(rows, ledger, report.summarize(rows, ledger), "autoresearch t", path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(path.as_uri())
            assert page.locator("tr.experiment").count() == 40
            plot = page.locator("svg.progress")
            assert plot.is_visible() and plot.bounding_box()["height"] > 300
            diff = page.locator("#e7 details").first
            assert not diff.locator("pre").is_visible()
            diff.locator("summary").click()
            assert diff.locator("pre").is_visible() and "+LR = 0.07" in diff.locator("pre").inner_text()
            assert page.evaluate("window.pwned") is None and page.title() == "autoresearch t"
            assert "<script>window.pwned" in page.locator("#e1").inner_text()  # shown as text
            page.screenshot(path=tmp_path / "page.png", full_page=False)
        finally:
            browser.close()
    from PIL import Image
    colours = dict((colour, count) for count, colour in Image.open(tmp_path / "page.png").convert("RGB").getcolors(
        1 << 24))
    assert colours.get((0x2c, 0xa0, 0x2c), 0) > 50  # the kept points, green, on screen
