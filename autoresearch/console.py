"""What the loop prints: timestamped lines, counts in words, and stopping with an error that says what to do."""

import datetime


def log(message):
    print(f"{datetime.datetime.now():%H:%M:%S} {message}", flush=True)


def plural(count, word):
    return f"{count} {word}{'s' * (count != 1)}"


def fail(message):
    """Stop the program with an error that says what is wrong and what to do."""
    raise SystemExit(f"agent_loop.py: error: {message}")
