"""Stand-in for the `claude` CLI in the agent_loop tests.

Each call records its arguments, stdin and working directory in $FAKE_CLAUDE_CALLS (JSON lines),
takes the next step of the JSON list in $FAKE_CLAUDE_SCRIPT (calls at the same time each get their
own), sleeps the step's `sleep` seconds if it has one, applies its edits to the files in the working
directory, and prints a JSON result like `claude -p --output-format json` does.
"""
import json
import os
import sys
import time
from pathlib import Path

calls_path = Path(os.environ["FAKE_CLAUDE_CALLS"])
index = 0
while True:  # the step number is claimed by creating its marker file: two calls never take the same one
    try:
        os.close(os.open(f"{calls_path}.{index}", os.O_CREAT | os.O_EXCL))
        break
    except FileExistsError:
        index += 1
step = json.loads(Path(os.environ["FAKE_CLAUDE_SCRIPT"]).read_text())[index]
with open(calls_path, "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "stdin": sys.stdin.read(), "cwd": os.getcwd(), "pid": os.getpid(),
                        "step": index})
            + "\n")
time.sleep(step.get("sleep", 0))
for edit in step.get("edits", []):
    path = Path(edit["file"])
    text = path.read_text() if path.exists() else ""
    path.write_text(text.replace(edit["search"], edit["replace"]) if edit["search"] else edit["replace"])
print(json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": step["result"],
                  "session_id": "session-1", "total_cost_usd": 0.05,
                  "usage": {"input_tokens": 1000, "output_tokens": 100}}))
