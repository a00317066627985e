"""
The agents that propose experiments.

A proposal is a one-line description and exact search/replace edits of train.py. Every agent has
start(prompt) -> Proposal for a new conversation and reply(error) -> Proposal to send an error back
in the same one; ask_for_change holds one such conversation until it gives a usable train.py. Here
are two that talk to a language model, the Anthropic API and the claude CLI (which edits train.py
itself); any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp, ...) is in openai_agent.py, and
Optuna in optuna_agent.py. Calls are retried through outages and rate limits (honouring
retry-after) and priced per token. What they are shown is in prompts.py.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from autoresearch import effect, state
from autoresearch.console import fail, log
from autoresearch.prompts import CHANGE_SCHEMA, CHANGE_TOOL_DESCRIPTION, CHANGE_TOOL_NAME, MAX_NOTES

MAX_DESCRIPTION = 300  # characters of an experiment's description kept (results.tsv, commit message)
MAX_HYPOTHESIS = 500  # characters of a proposal's hypothesis kept (the history shows it beside the result)
MAX_RETRY_DELAY = 600  # seconds: an API outage is waited out at this pace, never given up on
DEFAULT_MAX_TOKENS = 16000  # output tokens of one reply, without --max-tokens (openai_agent.py may fit its server)
UNREACHABLE_LIMIT = 30 * 60  # seconds an agent's endpoint may refuse connections before the night stops
DEFAULT_MODELS = {"anthropic": "claude-sonnet-4-6", "claude-code": None, "openai": None, "optuna": None}

# Dollars per million input and output tokens. Anthropic bills a write to the 1-hour prompt
# cache at 2x the input price and a cache read at 0.1x.
PRICES_PER_MTOK = {
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-sonnet-4-6": (3.0, 15.0),
    "claude-opus-4-5": (5.0, 25.0),
    "claude-opus-4-6": (5.0, 25.0),
}
CACHE_WRITE_PRICE, CACHE_READ_PRICE = 2.0, 0.1



@dataclass
class AgentSettings:
    """What an agent is told by the command line."""
    model: str | None = None
    base_url: str | None = None
    max_tokens: int | None = None  # --max-tokens; None: DEFAULT_MAX_TOKENS, or what the server's context allows
    api_timeout: float = 600.0
    retry_delay: float = 5.0
    price: tuple | None = None  # (input, output) dollars per million tokens; None: unknown
    tag: str = ""
    optuna_params: str | None = None


# -----------------------------------------------------------------------------
# Proposals and edits


class EditError(Exception):
    """A proposal that cannot be applied; its message goes back to the agent."""


class RuleViolation(EditError):
    """A proposal that breaks a rule of the experiment (it edits another file): the experiment is invalid."""

    def __init__(self, message, description):
        super().__init__(message)
        self.description = description


@dataclass
class Proposal:
    description: str = ""
    edits: list = field(default_factory=list)
    truncated: bool = False
    problem: str = ""  # what was wrong with the reply itself, if anything
    usage: dict = field(default_factory=dict)  # token counts and cost_usd of the call
    trial: int | None = None  # Optuna's trial number: the ledger ties it to its experiment
    hypothesis: str = ""  # why it should help
    notes: str | None = None  # the agent's lab notes, replacing the last ones; None: unchanged


@dataclass
class Change:
    """What one conversation about an experiment came to: train.py with the change, or why there is none."""
    description: str = ""
    source: str | None = None  # the new train.py; None: no usable change came
    error: str = ""  # why not
    violation: bool = False  # the change breaks a rule (it edits another file): the experiment is invalid
    calls: list = field(default_factory=list)  # the usage of each call
    trial: int | None = None
    hypothesis: str = ""
    notes: str | None = None  # the lab notes of its last reply (kept even when no usable change came)


def apply_proposal(proposal, source, max_tokens):
    """train.py with the proposal applied, or EditError saying why nothing was applied."""
    if proposal.truncated:
        limit = proposal.usage.get("max_tokens") or max_tokens or DEFAULT_MAX_TOKENS
        if proposal.edits:
            raise EditError(f"Your reply was cut off at the token limit ({limit} tokens) and was not applied. "
                            "Propose the change again with smaller edits.")
        raise EditError(f"Your reply was cut off at the token limit ({limit} tokens) before it held any edit, so "
                        "nothing was applied. Answer with the proposal at once, without reasoning at length first.")
    if proposal.problem:
        raise EditError(proposal.problem)
    if not proposal.description.strip():
        raise EditError("The description is empty: give a one-line description of the idea.")
    if not proposal.edits:
        raise EditError("There are no edits: propose at least one edit of train.py.")
    new_source = source
    for number, edit in enumerate(proposal.edits, 1):
        file = os.path.normpath(str(edit.get("file") or "train.py"))
        if file != "train.py":
            raise RuleViolation(f"edit {number} changes {file}: only train.py may change",
                                " ".join(proposal.description.split())[:MAX_DESCRIPTION] or "(no description)")
        search, replace = edit.get("search"), edit.get("replace")
        if not isinstance(search, str) or not isinstance(replace, str) or not search:
            raise EditError(f"Edit {number} needs a non-empty `search` and a `replace` string. Nothing was applied.")
        count = new_source.count(search)
        if count != 1:
            raise EditError(f"Edit {number}: its search text occurs {count} times in train.py (after the edits "
                            f"before it) but must occur exactly once. Copy it exactly from the current train.py, "
                            f"with enough lines around it to be unique. Nothing was applied. The search text "
                            f"began: {search[:300]!r}")
        new_source = new_source.replace(search, replace)
    if new_source == source:
        raise EditError("The edits leave train.py unchanged. Nothing was applied.")
    try:
        compile(new_source, "train.py", "exec")
    except SyntaxError as error:
        raise EditError(f"train.py would not compile: {error.msg} at line {error.lineno}. Nothing was applied.")
    return new_source


def check_takes_effect(source, new_source, device_type):
    """EditError when new_source would run on device_type exactly as source does (effect.py)."""
    if why := effect.no_effect(source, new_source, device_type):
        raise EditError(why)


def ask_for_change(agent, prompt, source, max_edit_retries, max_tokens, label, already_run=None,
                   device_type=None):
    """Start a conversation and send each reply that cannot be applied to source back in it, up to
    max_edit_retries times; a Change. A train.py byte-identical to one in already_run ({source_digest(text):
    what became of it}), or one that runs on device_type as source does, is not run: the agent is told so, in the
    same conversation. Touches no file and no record: with workers it runs beside the night."""
    proposal, calls, notes = agent.start(prompt), [], None
    for retry in range(max_edit_retries + 1):
        calls.append(proposal.usage)
        notes = proposal.notes[:MAX_NOTES] if proposal.notes is not None else notes
        try:
            new_source = apply_proposal(proposal, source, max_tokens)
            if device_type:
                check_takes_effect(source, new_source, device_type)
            if earlier := (already_run or {}).get(source_digest(new_source)):
                raise EditError(f"This train.py is byte-identical to that of {earlier}: it is not run again. "
                                "Propose a different change.")
            break
        except RuleViolation as violation:
            return Change(description=violation.description, error=str(violation), violation=True, calls=calls,
                          notes=notes)
        except EditError as error:
            log(f"{label} the proposal cannot be applied: {str(error)[:200]}")
            if retry == max_edit_retries:
                return Change(error=str(error), calls=calls, notes=notes)
            proposal = agent.reply(str(error))
    return Change(description=" ".join(proposal.description.split())[:MAX_DESCRIPTION], source=new_source,
                  calls=calls, trial=proposal.trial, notes=notes,
                  hypothesis=" ".join(proposal.hypothesis.split())[:MAX_HYPOTHESIS])


def source_digest(source):
    return hashlib.sha256(source.encode()).hexdigest()


# -----------------------------------------------------------------------------
# Calls: retries and prices


class AgentUnavailable(Exception):
    """The agent could not be reached this time (e.g. the claude CLI failed)."""


def is_transient_error(error):
    """Rate limits, overload, server errors, timeouts and lost connections are worth waiting out."""
    status = getattr(error, "status_code", None)
    if status is not None:
        return status in (408, 409, 429) or status >= 500
    return isinstance(error, AgentUnavailable) or any(
        cls.__name__ == "APIConnectionError" for cls in type(error).__mro__)


def is_unreachable(error):
    """Nothing answers at the endpoint (connection refused, no route), as opposed to a busy or slow server."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return "APIConnectionError" in names and "APITimeoutError" not in names


def with_retries(call, first_delay):
    """Wait out rate limits, overload and outages, however long; an endpoint unreachable for UNREACHABLE_LIMIT
    seconds (a server that is not running, a wrong address) stops the night."""
    delay, unreachable_since = first_delay, None
    while True:
        try:
            return call()
        except Exception as error:
            if not is_transient_error(error):
                fail(f"the agent's request failed and retrying will not help: {error}")
            unreachable_since = (unreachable_since or time.time()) if is_unreachable(error) else None
            if unreachable_since and time.time() - unreachable_since >= UNREACHABLE_LIMIT:
                fail(f"nothing answered at the agent's endpoint for {UNREACHABLE_LIMIT / 60:g} minutes ({error}): "
                     "check that its server is running and the address (--base-url, or ANTHROPIC_BASE_URL), then "
                     "run the same command again to resume.")
            wait = retry_after(error) or delay  # the server knows best when it will take requests again
            log(f"agent unavailable ({type(error).__name__}: {str(error)[:200]}); retrying in {wait:.1f}s")
            time.sleep(wait)
            delay = min(2 * delay, MAX_RETRY_DELAY)


def retry_after(error):
    """The seconds an API's error response asks us to wait (retry-after-ms or retry-after in seconds), capped at
    MAX_RETRY_DELAY; None when it does not say."""
    headers = getattr(getattr(error, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name)) * scale
        except (TypeError, ValueError):
            continue  # absent, or an HTTP date: the exponential backoff decides
        if seconds >= 0:
            return min(seconds, MAX_RETRY_DELAY)
    return None


def price_of(price, model):
    """(input, output) dollars per million tokens from --price IN,OUT or the model's known price; None: unknown."""
    if price:
        return tuple(float(x) for x in price.split(","))
    return PRICES_PER_MTOK.get(model)


def cost_usd(price, usage):
    """Dollars for one call's token usage, or None when the model's price is unknown."""
    if price is None:
        return None
    input_price, output_price = price
    return (input_price * (usage["input_tokens"] + CACHE_WRITE_PRICE * usage.get("cache_write_tokens", 0)
                           + CACHE_READ_PRICE * usage.get("cache_read_tokens", 0))
            + output_price * usage["output_tokens"]) / 1e6


# -----------------------------------------------------------------------------
# The language-model agents


class AnthropicAgent:
    def __init__(self, settings, instructions, repo):
        if not os.environ.get("ANTHROPIC_API_KEY"):
            fail("ANTHROPIC_API_KEY is not set. Export it, or use another agent: --agent claude-code (the claude "
                 "CLI, e.g. with a Claude subscription) or --agent openai --base-url URL --model NAME (any "
                 "OpenAI-compatible server, e.g. a local vLLM, Ollama or llama.cpp).")
        import anthropic  # here, so that the other agents do not need it
        # Retries are ours (with_retries): they wait out long outages instead of giving up.
        self.client = anthropic.Anthropic(base_url=settings.base_url, max_retries=0, timeout=settings.api_timeout)
        self.settings = settings
        # The fixed prefix (program.md + prepare.py) is cached, for an hour: calls are a training run
        # (over 5 minutes, the default cache lifetime) apart, and each read renews it.
        self.system = [{"type": "text", "text": instructions, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
        self.tool = {"name": CHANGE_TOOL_NAME, "description": CHANGE_TOOL_DESCRIPTION, "input_schema": CHANGE_SCHEMA}
        self.messages, self.tool_use_id = [], None

    def start(self, prompt):
        self.messages = [{"role": "user", "content": prompt}]
        return self.ask()

    def reply(self, error):
        if self.tool_use_id:
            content = [{"type": "tool_result", "tool_use_id": self.tool_use_id, "content": error, "is_error": True}]
        else:
            content = error
        self.messages.append({"role": "user", "content": content})
        return self.ask()

    def ask(self):
        response = with_retries(lambda: self.client.messages.create(
            model=self.settings.model, max_tokens=self.settings.max_tokens or DEFAULT_MAX_TOKENS, system=self.system,
            tools=[self.tool],
            tool_choice={"type": "tool", "name": CHANGE_TOOL_NAME}, messages=self.messages), self.settings.retry_delay)
        content, tool_input, self.tool_use_id = [], None, None
        for block in response.content:
            if block.type == "text":
                content.append({"type": "text", "text": block.text})
            elif block.type == "tool_use":
                content.append({"type": "tool_use", "id": block.id, "name": block.name, "input": block.input})
                tool_input, self.tool_use_id = block.input, block.id
        self.messages.append({"role": "assistant", "content": content})
        usage = {
            "input_tokens": response.usage.input_tokens,
            "output_tokens": response.usage.output_tokens,
            "cache_write_tokens": response.usage.cache_creation_input_tokens or 0,
            "cache_read_tokens": response.usage.cache_read_input_tokens or 0,
        }
        usage["cost_usd"] = cost_usd(self.settings.price, usage)
        return proposal_from_tool_input(tool_input, response.stop_reason == "max_tokens", usage)


def proposal_from_tool_input(tool_input, truncated, usage):
    if not isinstance(tool_input, dict):
        return Proposal(truncated=truncated, usage=usage, problem=(
            f"Answer by calling the {CHANGE_TOOL_NAME} tool once, with JSON arguments `description`, `hypothesis` "
            "and `edits` (and `notes` to replace your lab notes)."))
    edits, notes = tool_input.get("edits"), tool_input.get("notes")
    return Proposal(description=str(tool_input.get("description") or ""), truncated=truncated, usage=usage,
                    edits=[e for e in edits if isinstance(e, dict)] if isinstance(edits, list) else [],
                    hypothesis=str(tool_input.get("hypothesis") or ""), notes=notes if isinstance(notes, str) else None)


class ClaudeCodeAgent:
    """The claude CLI, headless in a scratch worktree of its own per proposal (the engine makes it). It edits
    with its own tools; we turn what it changed into an edit, undo it, and let the driver
    apply, check and commit it like any other proposal."""

    def __init__(self, settings, instructions, repo):
        if not shutil.which("claude"):
            fail("the claude CLI is not on PATH. Install Claude Code, or use --agent anthropic or --agent openai.")
        self.settings, self.instructions, self.repo, self.session = settings, instructions, repo, None

    def start(self, prompt):
        self.session = None
        return self.ask(prompt + "\n\nMake the change by editing train.py with your Edit tool (no other file: "
                        "do not run anything, the driver runs it). Then end your reply with the line "
                        "`DESCRIPTION: <what this experiment tries>`, the line `HYPOTHESIS: <why it should lower "
                        f"val_bpb>`, and, to replace your lab notes, last, a line `NOTES:` followed by the notes "
                        f"(at most {MAX_NOTES} characters).")

    def reply(self, error):
        return self.ask(error + "\nYour edits were undone: make them again, then end with the DESCRIPTION and "
                        "HYPOTHESIS lines (and NOTES, to replace your notes).")

    def ask(self, prompt):
        command = ["claude", "-p", "--output-format", "json", "--append-system-prompt", self.instructions,
                   "--allowedTools", "Read,Edit,Grep,Glob", "--permission-mode", "acceptEdits"]
        command += ["--model", self.settings.model] if self.settings.model else []
        command += ["--resume", self.session] if self.session else []
        tree = Path(self.repo.working_tree_dir)
        source = (tree / "train.py").read_text()
        untracked_before = set(self.repo.untracked_files)
        result = with_retries(lambda: run_claude(command, prompt, self.settings.api_timeout, tree),
                              self.settings.retry_delay)
        # Every file it changed becomes an edit (the driver rejects any but train.py), then it is all undone.
        new_files = set(self.repo.untracked_files) - untracked_before
        edits = [{"file": path, "search": source if path == "train.py" else "",
                  "replace": (tree / path).read_text(errors="replace") if (tree / path).is_file() else ""}
                 for path in sorted(set(state.dirty_tracked_files(self.repo)) | new_files)]
        self.repo.git.checkout("--", ".")
        for path in new_files:
            (tree / path).unlink(missing_ok=True)
        self.session = result.get("session_id") or self.session
        text = str(result.get("result", ""))
        text, notes = (re.split(r"^\W*NOTES:[ \t]*", text, maxsplit=1, flags=re.MULTILINE) + [None])[:2]
        found = {name: re.findall(rf"^\W*{name}:\s*(.+)$", text, re.MULTILINE)
                 for name in ("DESCRIPTION", "HYPOTHESIS")}
        usage = {key: value for key, value in (result.get("usage") or {}).items() if isinstance(value, int)}
        usage["cost_usd"] = result.get("total_cost_usd")
        description, hypothesis = (values[-1].strip(" `*") if values else "" for values in found.values())
        return Proposal(description=description, hypothesis=hypothesis, edits=edits, usage=usage,
                        notes=notes.strip() if notes is not None else None,
                        problem="" if description else "End your reply with one line `DESCRIPTION: <one line>`.")


def run_claude(command, prompt, timeout, cwd):
    try:
        completed = subprocess.run(command, input=prompt, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        result = json.loads(completed.stdout)
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        raise AgentUnavailable(f"claude CLI: {error}")
    if completed.returncode != 0 or result.get("is_error"):
        raise AgentUnavailable(f"claude CLI exited {completed.returncode}: {str(result.get('result'))[:300]}")
    return result
