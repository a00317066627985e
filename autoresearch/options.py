"""
The loop's command line: its options, their defaults, and what a resumed tag keeps of them.

A tag goes on with the options of its last start unless the command names them; those its results depend on
(TAG_IDENTITY: the agent, the model, the keep rule and its settings) cannot change. agent_loop.py calls
parse_args(argv) and, for a resumed tag, parse_args(argv, the options its last start recorded).
"""

import argparse
import datetime
import re

from autoresearch import keep_rule
from autoresearch.agents import (DEFAULT_MAX_TOKENS, DEFAULT_MODELS, MAX_RETRY_DELAY, PRICES_PER_MTOK, AgentSettings,
                                 AnthropicAgent, ClaudeCodeAgent, price_of)
from autoresearch.console import fail
from autoresearch.openai_agent import OUTPUT_MODES, OpenAIAgent
from autoresearch.optuna_agent import OPTUNA_RANGES, OptunaAgent

TIMEOUT_MARGIN = 120  # seconds on top of twice the budget: startup, compilation, evaluation

# The options a tag keeps, with their defaults: a resumed tag goes on with the values of its last start unless
# the command names them; those its results depend on (TAG_IDENTITY) cannot change.
TAG_OPTIONS = {"agent": "anthropic", "model": None, "base_url": None, "keep_rule": "noise", "noise_runs": 4,
               "max_runs": 4, "min_delta": 0.0, "optuna_params": None, "max_fix_attempts": None, "max_edit_retries": 2,
               "max_tokens": None, "timeout": None, "price": None, "max_experiments": None, "max_cost": None,
               "plateau": 10, "paired": "on", "holdout_at_end": "on", "openai_output": "auto"}
TAG_IDENTITY = ("agent", "model", "base_url", "keep_rule", "noise_runs", "max_runs", "min_delta", "optuna_params",
                "paired")

AGENTS = {"anthropic": AnthropicAgent, "claude-code": ClaudeCodeAgent, "openai": OpenAIAgent, "optuna": OptunaAgent}


def agent_settings(args):
    return AgentSettings(model=args.model, base_url=args.base_url, max_tokens=args.max_tokens,
                         api_timeout=args.api_timeout, retry_delay=args.retry_delay,
                         price=price_of(args.price, args.model), tag=args.tag, optuna_params=args.optuna_params)


def parse_args(argv, started_with=None):
    """The options of this invocation: those the command names, else (started_with) the ones a resumed tag last
    started with, else the defaults."""
    parser = argparse.ArgumentParser(
        description="Let an AI agent improve train.py overnight: it proposes one idea, this program runs it for\n"
        "the time budget and keeps it if val_bpb went down by more than the noise, again and again.\n"
        "Run it in the repository. Results go to results.tsv, everything else to .autoresearch/<tag>/.\n"
        "Ctrl-C stops it cleanly; run it again with the same --tag to resume.",
        epilog="examples:\n  uv run agent_loop.py --max-hours 8\n  uv run agent_loop.py --agent claude-code\n"
        "  uv run agent_loop.py --agent openai --base-url http://localhost:11434/v1 --model qwen3-coder\n"
        "  uv run agent_loop.py --agent optuna --optuna-params MATRIX_LR,WARMDOWN_RATIO\n"
        "  uv run agent_loop.py report          # the morning summary and progress.png (see report --help)\n"
        "  uv run agent_loop.py holdout         # is the gain real? the tag's baseline and best on the holdout split\n"
        "                                       #   (the last tag, or --tag; on --workers N or --ray, as the night)\n"
        "  uv run agent_loop.py rescore         # the best model's kept weights, scored again (see rescore --help)\n"
        "  uv run agent_loop.py demo            # the offline demo, in one command (see demo --help)\n\n"
        + OPTUNA_RANGES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=datetime.date.today().strftime("%b%d").lower(),
                        help="run name: the branch is autoresearch/<tag>; an existing tag is resumed "
                        "(default: today, %(default)s)")
    parser.add_argument("--agent", choices=list(AGENTS),
                        help="who proposes: the Anthropic API (ANTHROPIC_API_KEY), the claude CLI, an "
                        "OpenAI-compatible endpoint, or optuna: no LLM, Optuna's TPE tunes the numeric ALL-CAPS "
                        "constants of train.py within the ranges below (default: anthropic)")
    parser.add_argument("--model", help=f"model name (default: {DEFAULT_MODELS['anthropic']} for anthropic, the CLI's "
                        "own for claude-code; required for openai)")
    parser.add_argument("--base-url", help="API endpoint, e.g. http://localhost:8000/v1 for a local OpenAI-compatible "
                        "server (anthropic also honours ANTHROPIC_BASE_URL)")
    parser.add_argument("--max-experiments", type=int, help="stop when results.tsv has this many rows, the baseline "
                        "included (counted over the whole tag, across resumes; default: no limit)")
    parser.add_argument("--max-hours", type=float, help="end within this many hours of this invocation: no "
                        "experiment starts that this tag's measured runs and agent calls say cannot finish by then, "
                        "with the holdout's runs (default: no limit)")
    parser.add_argument("--max-cost", type=float, help="stop starting experiments once the tag's API spend reaches "
                        "this many dollars (default: no limit)")
    parser.add_argument("--price", help="IN,OUT dollars per million input/output tokens, for models without a "
                        "built-in price (known: " + ", ".join(PRICES_PER_MTOK) + ")")
    parser.add_argument("--timeout", type=float, help="seconds before a run is killed (default: twice the "
                        f"baseline's first run on this machine, plus {TIMEOUT_MARGIN}; until that run has ended, ten "
                        f"times TIME_BUDGET plus {TIMEOUT_MARGIN})")
    parser.add_argument("--keep-rule", choices=keep_rule.KEEP_RULES,
                        help="noise: measure run-to-run noise on the baseline, discard a candidate whose mean is not "
                        "below the best's, else run it --max-runs times in all and keep it only when the "
                        "difference of means clears a one-sided t-test at 2.5%% and --min-delta; greedy: the "
                        "reference's rule, one run, keep if lower (default: noise)")
    parser.add_argument("--paired", choices=["on", "off"],
                        help="rule noise: a promising candidate's runs alternate with runs of the best (A B, B A, "
                        "...; with workers, at the same time) and the differences within pairs are tested, so that "
                        "a drift of the machine over the night cancels out; off: compare with the best's own runs, "
                        "made earlier (fewer runs per idea; default: on)")
    parser.add_argument("--noise-runs", type=int,
                        help="runs of the baseline that measure the noise, rule noise (default: 4)")
    parser.add_argument("--max-runs", type=int, help="most runs of one candidate, rule noise (default: 4)")
    parser.add_argument("--min-delta", type=float,
                        help="smallest val_bpb gain worth keeping, whatever the noise (default: 0)")
    parser.add_argument("--optuna-params", help="NAME,NAME: the constants --agent optuna tunes (default: all "
                        "it can; fixed when the tag's study is created)")
    parser.add_argument("--max-fix-attempts", type=int,
                        help="fixes the agent may try after a crash (default: 2; 0 for optuna, which cannot fix one)")
    parser.add_argument("--max-edit-retries", type=int, help="times an unapplicable reply is sent back (default: 2)")
    parser.add_argument("--max-tokens", type=int, help=f"output token limit of one reply (default: "
                        f"{DEFAULT_MAX_TOKENS}; --agent openai: what the server's context leaves after the prompt, "
                        "when it says)")
    parser.add_argument("--openai-output", choices=OUTPUT_MODES,
                        help="--agent openai: how a proposal is asked for. tools: a forced tool call; json: JSON "
                        "output constrained to the proposal's schema (response_format: llama.cpp, vLLM, Ollama), for "
                        "models without tool calling; auto: tools until a reply holds no tool call, then json for the "
                        "rest of the night (default: auto)")
    parser.add_argument("--holdout-at-end", choices=["on", "off"],
                        help="when a limit stops the tag, run the baseline and the best once each with evaluate_bpb "
                        "scoring the holdout split (text no decision saw) and print both deltas: is the gain real? "
                        "(default: on; any time: agent_loop.py holdout)")
    parser.add_argument("--plateau", type=int, metavar="K", help="after K experiments in a row not kept, ask the "
                        "agent for a different kind of change than those (0: never; default: 10)")
    parser.add_argument("--retry-delay", type=float, default=5.0, help="seconds before the first retry of a failed "
                        f"API call; it doubles up to {MAX_RETRY_DELAY}s and never gives up (default: %(default)s)")
    parser.add_argument("--api-timeout", type=float, default=600.0,
                        help="seconds one agent call may take (default: %(default)s)")
    parser.add_argument("--workers", default="1", help="runs at once, each on a GPU of its own (a CPU slot without "
                        "GPUs): different experiments at the same time, ideas asked ahead while runs go on, decisions "
                        "in the order runs end; auto: every visible GPU (default: 1, one experiment at a time)")
    parser.add_argument("--ray", metavar="ADDRESS", help="run on this Ray cluster (host:port of its head node's GCS; "
                        "auto: RAY_ADDRESS), on all its GPUs or at most --workers N of them; its token from "
                        "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")
    parser.add_argument("--allow-mixed-gpus", action="store_true",
                        help="run on GPUs that are not all one model (this machine's, or a cluster's)")
    args = parser.parse_args(argv)
    if args.workers == "auto":
        from autoresearch.runs import local_gpus
        args.workers = len(local_gpus()) or 1
    elif not args.workers.isdigit() or int(args.workers) < 1:
        parser.error(f"--workers {args.workers!r}: a positive number, or auto")
    args.workers = int(args.workers)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.tag):
        parser.error(f"--tag {args.tag!r}: use letters, digits, '.', '_' and '-'")
    if args.price and not re.fullmatch(r"[0-9.]+,[0-9.]+", args.price):
        parser.error(f"--price {args.price!r}: expected IN,OUT, e.g. 3,15")
    started_with = started_with or {}
    changed = [f"--{name.replace('_', '-')} {getattr(args, name)} (it was started with {started_with[name]})"
               for name in TAG_IDENTITY if getattr(args, name) is not None and name in started_with
               and getattr(args, name) != started_with[name]]
    if changed:
        fail(f"tag {args.tag} cannot change {'; '.join(changed)}: its results so far depend on them. Leave them out "
             "to resume it as it was started, or start a new --tag.")
    for name, default in TAG_OPTIONS.items():
        if getattr(args, name) is None:
            setattr(args, name, started_with.get(name, default))
    if args.noise_runs < 2 or args.max_runs < 2:
        parser.error("--noise-runs and --max-runs must be at least 2: noise is measured on repeated runs")
    args.model = args.model or DEFAULT_MODELS[args.agent]
    if args.max_fix_attempts is None:
        args.max_fix_attempts = 0 if args.agent == "optuna" else 2
    if args.optuna_params and args.agent != "optuna":
        parser.error("--optuna-params is for --agent optuna")
    if args.agent == "anthropic" and args.max_cost is not None and not price_of(args.price, args.model):
        parser.error(f"--max-cost needs a price for model {args.model}: pass --price IN,OUT")
    return args
