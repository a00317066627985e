"""What the loop prints: timestamped lines, a status line rewritten in place on a terminal, counts in words, and
stopping with an error that says what to do."""

import datetime

_status_width = 0  # of the status line on the terminal now (0: none)


def log(message):
    clear_status()
    print(f"{datetime.datetime.now():%H:%M:%S} {message}", flush=True)


def show_status(text):  # a terminal only: one line the next one replaces
    global _status_width
    line = f"{datetime.datetime.now():%H:%M:%S} {text}"
    print("\r" + line.ljust(_status_width), end="", flush=True)
    _status_width = len(line)


def clear_status():
    global _status_width
    if _status_width:
        print("\r" + " " * _status_width + "\r", end="", flush=True)
        _status_width = 0


def plural(count, word):
    return f"{count} {word}{'s' * (count != 1)}"


def fail(message):
    """Stop the program with an error that says what is wrong and what to do."""
    raise SystemExit(f"agent_loop.py: error: {message}")
