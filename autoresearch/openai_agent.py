"""
--agent openai: any OpenAI-compatible chat completions endpoint (vLLM, Ollama, llama.cpp, LM Studio, ...).

How it asks for a proposal (--openai-output):
  tools  a forced call of the propose_change tool: needs a model whose chat template has tool calling;
  json   no tools: `response_format` carries the proposal's JSON schema, which llama.cpp, vLLM and Ollama
         enforce by constrained decoding, and the reply's content is the proposal: works with small and old
         local models that have no tool calling;
  auto   (the default) tools, until a reply holds no tool call; then json for the rest of the night, which the
         log and the ledger say once.
Without --max-tokens, a reply may use what the server's context leaves after the prompt, when the server says
how big its context is (llama.cpp's /props, vLLM's /v1/models max_model_len); else 16,000 tokens. The prompt's
tokens are estimated at 2.5 characters each until the server has counted one of the night's prompts, then at
the ratio it counted.
"""

import collections
import json
import os

from autoresearch.agents import DEFAULT_MAX_TOKENS, Proposal, cost_usd, proposal_from_tool_input, with_retries
from autoresearch.console import fail, log
from autoresearch.prompts import CHANGE_SCHEMA, CHANGE_TOOL_DESCRIPTION, CHANGE_TOOL_NAME

OUTPUT_MODES = ("auto", "tools", "json")
# A prompt's characters per token until the server has counted one (then its own ratio). Low on purpose: a request
# whose prompt and reply overflow the context is refused whole (llama.cpp: "exceeds the available context size";
# Gemma 3's tokenizer counted 3.3 on our prompt, dev/LOG.md 2026-12-02).
CHARS_PER_TOKEN = 2.5
CONTEXT_MARGIN = 256  # tokens kept free beside the estimate (chat template, special tokens)
JSON_INSTRUCTIONS = (
    "\n\n## How to answer\n\nAnswer with one JSON object and nothing else: {\"description\": one line, "
    "\"hypothesis\": why it should lower val_bpb, \"edits\": [{\"search\": exact text of train.py, \"replace\": its "
    "replacement}, ...], \"notes\": your lab notes (optional)}.")


class OutputMode:
    """How the night's conversations ask for proposals; one object shared by all of them (with workers, each idea
    has an agent of its own), so that auto switches to json once, for the rest of the night."""

    def __init__(self, mode="auto"):
        self.mode = mode
        self.using = "json" if mode == "json" else "tools"
        self.switched = False  # auto gave up on tool calls: the night's ledger records it once
        self.recent = collections.deque(maxlen=12)  # of the last replies, whether each held a proposal in form
        self.chars_per_token = CHARS_PER_TOKEN  # of the prompts sent, as the server counted them

    def no_tool_call(self):
        if self.mode == "auto" and self.using == "tools":
            self.using, self.switched = "json", True
            log("the model answered without a tool call: --openai-output auto asks for JSON output "
                "(response_format) from now on, for the rest of the night")


class OpenAIAgent:
    """Any OpenAI-compatible chat completions endpoint, by tool call or by JSON output."""

    def __init__(self, settings, instructions, repo, output=None):
        if not settings.model:
            fail("--agent openai needs --model: the model name your server serves.")
        api_key = os.environ.get("OPENAI_API_KEY") or ("not-needed" if settings.base_url else None)
        if not api_key:
            fail("--agent openai needs --base-url URL (e.g. http://localhost:8000/v1 for a local server) "
                 "or OPENAI_API_KEY for api.openai.com.")
        import openai
        self.client = openai.OpenAI(base_url=settings.base_url, api_key=api_key, max_retries=0,
                                    timeout=settings.api_timeout)
        self.settings, self.instructions = settings, instructions
        self.output = output or OutputMode()
        self.tool = {"type": "function", "function": {
            "name": CHANGE_TOOL_NAME, "description": CHANGE_TOOL_DESCRIPTION, "parameters": CHANGE_SCHEMA}}
        self.messages, self.tool_call_id = [], None
        self.context = server_context(self.client, settings) if settings.max_tokens is None else None

    def why_no_usable_change(self):
        """What the night's stop says about this agent, when it never gave a usable change."""
        tried = "tool calls, then JSON output (response_format)" if self.output.switched else \
            ("JSON output (response_format)" if self.output.using == "json" else "tool calls")
        if any(self.output.recent):
            return (f"--agent openai asked by {tried}, and {sum(self.output.recent)} of the model's last "
                    f"{len(self.output.recent)} replies came in that form, but their edits could not be used (the "
                    "ledger's proposals say why: search text not found, for instance). The model may be too small "
                    "to copy train.py's lines exactly: use a larger one")
        return (f"--agent openai asked by {tried}: the server or the model gives neither. Use a model with tool "
                "calling (--openai-output tools) or a server that enforces response_format (--openai-output json: "
                "llama.cpp, vLLM, Ollama)")

    def start(self, prompt):
        self.messages = [{"role": "system", "content": self.instructions}, {"role": "user", "content": prompt}]
        return self.ask()

    def reply(self, error):
        if self.tool_call_id:
            self.messages.append({"role": "tool", "tool_call_id": self.tool_call_id, "content": error})
        else:
            self.messages.append({"role": "user", "content": error})
        return self.ask()

    def max_tokens(self):
        """--max-tokens, else what the server's context leaves after the prompt (estimated), else the default."""
        if self.settings.max_tokens is not None:
            return self.settings.max_tokens
        if self.context is None:
            return DEFAULT_MAX_TOKENS
        prompt = prompt_characters(self.messages) / self.output.chars_per_token
        return max(256, int(self.context - prompt - CONTEXT_MARGIN))

    def ask(self):
        json_mode, limit = self.output.using == "json", self.max_tokens()
        if json_mode:
            messages = [dict(self.messages[0], content=self.instructions + JSON_INSTRUCTIONS), *self.messages[1:]]
            request = dict(messages=messages, response_format={"type": "json_schema", "json_schema": {
                "name": CHANGE_TOOL_NAME, "schema": CHANGE_SCHEMA}})
        else:
            request = dict(messages=self.messages, tools=[self.tool],
                           tool_choice={"type": "function", "function": {"name": CHANGE_TOOL_NAME}})
        response = with_retries(lambda: self.client.chat.completions.create(
            model=self.settings.model, max_tokens=limit, **request), self.settings.retry_delay)
        choice = response.choices[0]
        calls = [] if json_mode else (choice.message.tool_calls or [])
        content = choice.message.content or ""
        self.messages.append({"role": "assistant", "content": content, **({"tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.function.arguments}}
            for c in calls]} if calls else {})})
        self.tool_call_id = calls[0].id if calls else None
        truncated = choice.finish_reason == "length"
        usage = {"input_tokens": response.usage.prompt_tokens if response.usage else 0,
                 "output_tokens": response.usage.completion_tokens if response.usage else 0,
                 "output_mode": self.output.using, "max_tokens": limit}
        usage["cost_usd"] = cost_usd(self.settings.price, usage)
        if usage["input_tokens"]:  # the server's count: the next estimate of a prompt's tokens uses its ratio
            self.output.chars_per_token = prompt_characters(request["messages"]) / usage["input_tokens"]
        if json_mode:
            return self.counted(proposal_from_json(content, truncated, usage))
        if not calls:
            self.output.no_tool_call()
            return self.counted(Proposal(truncated=truncated, usage=usage, problem=(
                f"Your reply held no call of the {CHANGE_TOOL_NAME} tool. Answer with the proposal as "
                + ("one JSON object: description, hypothesis, edits, and notes if you like." if
                   self.output.using == "json" else "one tool call, with JSON arguments description, hypothesis "
                   "and edits."))))
        try:
            arguments = json.loads(calls[0].function.arguments)
        except json.JSONDecodeError as error:
            return self.counted(Proposal(truncated=truncated, usage=usage, problem=(
                f"The arguments of your {CHANGE_TOOL_NAME} call are not JSON ({error}). Call it again with JSON "
                "arguments description, hypothesis and edits.")))
        return self.counted(proposal_from_tool_input(arguments, truncated, usage))

    def counted(self, proposal):
        self.output.recent.append(not proposal.problem)
        return proposal


def prompt_characters(messages):
    return sum(len(str(m.get("content") or "")) for m in messages)


def proposal_from_json(content, truncated, usage):
    """The proposal in a JSON-output reply, or one whose problem says, in JSON terms, what is wrong with it."""
    try:
        fields = json.loads(content)
    except json.JSONDecodeError as error:
        fields, why = None, f"it is not JSON ({error.msg} at character {error.pos})"
    else:
        why = "it is JSON, but not an object with description, hypothesis and edits"
    if not isinstance(fields, dict):
        return Proposal(truncated=truncated, usage=usage, problem=(
            f"Your reply was not one JSON object of the requested schema: {why}. Answer with exactly one JSON "
            "object: description, hypothesis, edits (a list of search/replace pairs), and notes if you like."))
    return proposal_from_tool_input(fields, truncated, usage)


def server_context(client, settings):
    """The context length the server advertises, in tokens, or None: llama.cpp's /props
    (default_generation_settings.n_ctx), vLLM's /v1/models (max_model_len of the model)."""
    import httpx
    base = str(client.base_url).rstrip("/")
    for url, read in ((base.removesuffix("/v1") + "/props", lambda body: body["default_generation_settings"]["n_ctx"]),
                      (base + "/models", lambda body: next(m["max_model_len"] for m in body["data"]
                                                           if m.get("id") == settings.model))):
        try:
            response = httpx.get(url, timeout=5.0, headers={"Authorization": f"Bearer {client.api_key}"})
            context = int(read(response.json()))
        except Exception:  # not this server's kind, or it does not say: the next one, then the default
            continue
        if context > 0:
            log(f"the server's context is {context} tokens ({url}): a reply may use what the prompt leaves of it")
            return context
    return None
