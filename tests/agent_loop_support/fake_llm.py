"""A local stand-in for the Anthropic Messages API and an OpenAI-compatible chat endpoint.

It answers POST /v1/messages and POST /v1/chat/completions from a script of replies (one
queue per endpoint; a callable in it is called when its turn comes, and returns the reply) and
records every request body, so that tests can assert what the model saw; GET /props answers as
llama.cpp's server does when `props` is set. The real SDKs talk to it through ANTHROPIC_BASE_URL
or --base-url.
"""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MESSAGES, CHAT = "/v1/messages", "/v1/chat/completions"


def change(description, *edits, stop_reason="tool_use", **fields):
    """An Anthropic reply calling propose_change; each edit is (search, replace) or (file, search, replace);
    fields: hypothesis, notes."""
    edits = [dict(zip(("file", "search", "replace"), e if len(e) == 3 else ("train.py", *e))) for e in edits]
    return 200, {
        "id": "msg_test", "type": "message", "role": "assistant", "model": "claude-sonnet-4-6",
        "content": [{"type": "tool_use", "id": "toolu_test", "name": "propose_change",
                     "input": {"description": description, "edits": edits, **fields}}],
        "stop_reason": stop_reason, "stop_sequence": None,
        "usage": {"input_tokens": 2000, "output_tokens": 300, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 5000},
    }


def overloaded():
    return 529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


def chat_change(description, *edits, finish_reason="tool_calls", **fields):
    """An OpenAI chat completion calling propose_change; fields: hypothesis, notes."""
    arguments = {"description": description, "edits": [{"search": s, "replace": r} for s, r in edits], **fields}
    return 200, {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "local-model",
        "choices": [{"index": 0, "finish_reason": finish_reason, "message": {
            "role": "assistant", "content": None, "tool_calls": [{
                "id": "call_test", "type": "function",
                "function": {"name": "propose_change", "arguments": json.dumps(arguments)}}]}}],
        "usage": {"prompt_tokens": 3000, "completion_tokens": 200, "total_tokens": 3200},
    }


def chat_text(content, finish_reason="stop"):
    """An OpenAI chat completion with content and no tool call (a model without tool calling, or JSON output)."""
    return 200, {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "local-model",
        "choices": [{"index": 0, "finish_reason": finish_reason, "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 3000, "completion_tokens": 200, "total_tokens": 3200},
    }


def chat_json(description, *edits, **fields):
    """A JSON-output reply: the proposal as the message's content."""
    return chat_text(json.dumps({"description": description, "hypothesis": "h",
                                 "edits": [{"search": s, "replace": r} for s, r in edits], **fields}))


class FakeLLM:
    """props: what GET /props answers (llama.cpp's server properties), or None for a 404."""

    def __init__(self):
        self.replies = {MESSAGES: [], CHAT: []}
        self.requests = {MESSAGES: [], CHAT: []}
        self.props = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?")[0] == "/props" and fake.props is not None:
                    data, status = json.dumps(fake.props).encode(), 200
                else:
                    data, status = b'{"error": "not found"}', 404
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                path = self.path.split("?")[0]
                fake.requests[path].append(body)
                if fake.replies[path]:
                    scripted = fake.replies[path].pop(0)
                    status, reply = scripted() if callable(scripted) else scripted  # a callable acts, then replies
                else:
                    status, reply = 400, {"type": "error", "error": {
                        "type": "invalid_request_error", "message": "the test scripted no more replies"}}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def script(self, *replies, path=MESSAGES):
        self.replies[path].extend(replies)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
