"""
What a run's log says: the summary block after the last `---` line, the latest progress line while it runs, and a
crashed run's tail (up to where the evaluation began), fenced for the agent.
"""

import os
import re
import secrets

LOG_TAIL_LINES, LOG_TAIL_CHARS = 50, 4000  # how much of a crashed run's log the agent sees
LOG_READ_LIMIT = 64 << 20  # bytes of a run's log the driver reads: its beginning and its end
# Written by the scorer as the evaluation begins (scorer.py has the same line): nothing after it reaches the agent
EVALUATION_BEGINS = "scorer: the evaluation begins; what the run prints from here on is not shown to the agent"

# -----------------------------------------------------------------------------
# Reading


def read_log(path):
    """The run's log, its \r kept; of one over LOG_READ_LIMIT, only its beginning and its end, with the
    evaluation's marker between them: the agent is then shown nothing of the end (log_tail), which could have been
    printed after the evaluation began."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        if size <= LOG_READ_LIMIT:
            data = file.read()
        else:
            head = file.read(LOG_READ_LIMIT // 2)
            file.seek(size - LOG_READ_LIMIT // 2)
            data = head + f"\n[{size - LOG_READ_LIMIT} bytes not read]\n{EVALUATION_BEGINS}\n".encode() + file.read()
    return data.decode(errors="replace")


def visible_lines(log_text):
    """The log's lines as a terminal shows them: of a line rewritten with \\r, only its last version."""
    return [line.rstrip("\r").rsplit("\r", 1)[-1] for line in log_text.split("\n")]


def parse_summary(log_text):
    """The `key: number` lines after the last `---` line of the log."""
    lines = visible_lines(log_text)
    if "---" not in lines:
        return {}
    block = lines[len(lines) - lines[::-1].index("---"):]
    metrics = {}
    for line in block:
        match = re.fullmatch(r"(\w+):\s+(\S+)\s*", line)
        if match:
            try:
                metrics[match[1]] = float(match[2])
            except ValueError:
                pass
    return metrics


def log_tail(log_text):
    """The last lines of a log as the agent sees them: progress lines collapsed, size-capped, and nothing printed
    after the evaluation began (train.py saw validation text then, and could print it), but the name of the error
    it ended with."""
    shown, began, after = log_text.partition(EVALUATION_BEGINS)
    lines = visible_lines(shown.rstrip("\n"))
    if began:
        errors = re.findall(r"^(\w+(?:Error|Exception|Interrupt))\b", after, re.MULTILINE)
        lines.append("[what it printed after its evaluation began is not shown: it could hold validation text"
                     + (f"; it ended with {errors[-1]}]" if errors else "]"))
    return "\n".join(lines[-LOG_TAIL_LINES:])[-LOG_TAIL_CHARS:]


def run_status(log_path):
    """The run's latest progress line, shortened: "step 42 (45.1%), loss 4.1234, 16s left", then "evaluating: 3 of
    11 batches" and "probing: 1 of 3 batches" from the scorer's lines; or None."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    steps = [line for line in visible_lines(tail) if line.startswith(("step ", "scorer: "))]
    if not steps:
        return None
    if steps[-1].startswith("scorer: "):  # its own lines, after train.py's last step line
        done = re.match(r"scorer: (evaluated|probed) (\d+) of (\d+) batches", steps[-1])
        if not done:
            return "probing" if "probe run" in steps[-1] else "evaluating"
        return "{}: {} of {} batches".format("evaluating" if done[1] == "evaluated" else "probing", *done.groups()[1:])
    found = re.match(r"step (\d+) \(([\d.]+)%\) \| loss: ([\d.]+)(?:.*remaining: (\d+)s)?", steps[-1])
    if not found:  # train.py was edited: its own words, cut short
        return " ".join(steps[-1].split())[:100]
    step, percent, loss, left = found.groups()
    return f"step {int(step)} ({percent}%), loss {float(loss):.4f}" + (f", {left}s left" if left else "")


def fence_untrusted(text, kind="program-output"):
    # A random tag the text cannot know, so it cannot close the fence early.
    tag = f"untrusted-{kind}-{secrets.token_hex(4)}"
    return f"<{tag}>\n{text}\n</{tag}>"
