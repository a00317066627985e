"""
--agent optuna: no language model. Optuna's TPE proposes new values for train.py's numeric
constants, a free and offline baseline to compare the LLM agents with.

Each experiment is an Optuna trial (ask/tell); the study lives in .autoresearch/<tag>/optuna.journal
and learns each trial's val_bpb from the ledger (the experiment's proposal record names its trial).
The first trials probe one constant at a time from the current best's values; TPE then searches all
of them together.
"""

import ast
import re
from pathlib import Path

from autoresearch import effect, state
from autoresearch.agents import Proposal
from autoresearch.console import fail

NOT_TUNED = ("SEED", "UNCOUNTED_STEPS")  # a seed only fits noise; UNCOUNTED_STEPS changes what the budget measures
MAX_OPTUNA_ASKS = 20  # samples that round to the current train.py are asked again, this many times at most
OPTUNA_RANGES = """--agent optuna searches around the values in train.py when the tag started (v):
  a float v > 0                          log-uniform in [v/4, 4v]
  a float *_RATIO or *_FRAC in [0, 1]    uniform in [0, min(1, max(2v, 0.5))]
  a float 0                              uniform in [0, 0.5]
  a float v < 0                          uniform in [4v, v/4]
  an int power of two v >= 16            a power of two from v/4 to 4v
  another int v >= 1                     an int in [max(1, v//2), 2v]   (ints below 1 are left alone)
The first trials change one constant at a time (each one step up, then down: x2 or /2, +-0.25 of a
uniform range, +-1), from the best values so far; TPE then searches all of them together.
Floats are rounded to 2 significant digits. By default only the floats are tuned (the learning rates,
weight decay, the schedule); name ints such as DEPTH in --optuna-params to search them too.
SEED and UNCOUNTED_STEPS are never tuned."""


def tunable_constants(source, device_type):
    """{NAME: (value, lineno, col, end_col)} of the constants a run of train.py on device_type uses: the
    module-level `NAME = <number>` assignments before the first def or class. Off CUDA, those of the
    `if DEVICE_TYPE != "cuda":` block replace the top-level ones (editing the latter would change nothing)."""
    def number(node):  # an int or float literal, a unary minus allowed (not a bool, a string or an expression)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
            return None if (value := number(node.operand)) is None else -value
        return node.value if isinstance(node, ast.Constant) and type(node.value) in (int, float) else None

    found = {}
    def scan(statements):
        for node in statements:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                name, value = node.targets[0].id, number(node.value)
                if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and name not in NOT_TUNED:
                    found.pop(name, None)  # re-assigned: only the last assignment counts
                    if value is not None:
                        found[name] = (value, node.lineno, node.value.col_offset, node.value.end_col_offset)
            elif effect.small_compute_block([node]) is not None and device_type != "cuda":
                scan(node.body)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                return  # the end of the hyperparameter section
    scan(ast.parse(source).body)
    return found


def search_range(name, value):
    """[kind, low, high] of the search around a starting value, as OPTUNA_RANGES says (JSON: a user attr)."""
    if isinstance(value, float):
        if name.endswith(("_RATIO", "_FRAC")) and 0 <= value <= 1:
            return ["uniform", 0.0, min(1.0, max(2 * value, 0.5))]
        return ["uniform", 0.0, 0.5] if value == 0 else ["log", value / 4, value * 4] if value > 0 else \
            ["uniform", value * 4, value / 4]
    if value >= 16 and value & (value - 1) == 0:  # a size (a batch, a width): DEPTH 8 -> 9 stays possible
        exponent = value.bit_length() - 1
        return ["pow2", max(0, exponent - 2), exponent + 2]  # sampled as the exponent
    return ["int", max(1, value // 2), 2 * value] if value >= 1 else None


def probe_value(kind, low, high, param, step):
    """One step up (step 1) or down (-1) from a starting param, inside its range: x2 or /2 for a log-uniform
    float, +-0.25 of the range for another float, +-1 for an int or a power of two's exponent."""
    if kind == "log":
        return min(max(param * 2.0 ** step, low), high)
    if kind == "uniform":
        return min(max(param + step * 0.25 * (high - low), low), high)
    return min(max(param + step, low), high)


def constant_value(kind, low, high, param):
    """The value written to train.py for a trial's param: floats rounded to 2 significant digits (kept in range)."""
    if kind == "pow2":
        return 2 ** param
    return param if kind == "int" else min(max(float(f"{param:.2g}"), low), high)


def train_device(source):
    """"cuda" or not, decided as train.py decides; torch (slow to import) only when train.py has an override."""
    if effect.small_compute_block(ast.parse(source).body) is None:
        return "cuda"  # nothing depends on it
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def constant_edits(source, constants, values):
    """Search/replace edits of the assignment lines only: the value's text is replaced, comments stay as they are."""
    lines, edits = source.splitlines(keepends=True), []
    for name, value in sorted(values.items(), key=lambda item: constants[item[0]][1]):
        _, lineno, col, end_col = constants[name]
        i = start = lineno - 1
        new_line = lines[i][:col] + repr(value) + lines[i][end_col:]
        while start > 0 and "".join(lines).count("".join(lines[start:i + 1])) > 1:
            start -= 1  # lines above the assignment, until the search text is unique
        edits.append({"file": "train.py", "search": "".join(lines[start:i + 1]),
                      "replace": "".join(lines[start:i]) + new_line})
        lines[i] = new_line
    return edits


class OptunaAgent:
    """Each experiment is an Optuna trial (ask/tell, TPE) over the numeric constants of train.py. The study
    lives in .autoresearch/<tag>/optuna.journal and learns each trial's val_bpb from the ledger. It answers in
    milliseconds and keeps state: the engine asks it on its own thread, one trial at a time."""
    in_background = False

    def __init__(self, settings, instructions, repo):
        import optuna  # here, so that the other agents do not need it
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.ledger_path = optuna, state.STATE_ROOT / settings.tag / "ledger.jsonl"
        ledger = state.Ledger(self.ledger_path)
        # The ranges come from train.py when the tag started, also when it is resumed later.
        source = state.file_at(repo, ledger.base_commit(), "train.py") if ledger.last_start() else \
            Path("train.py").read_text()
        self.device = train_device(source)
        starting = {name: c[0] for name, c in tunable_constants(source, self.device).items()}
        space = {name: r for name, value in starting.items() if (r := search_range(name, value))}
        # By default the floats: learning rates, weight decay, the schedule. The ints (DEPTH, widths, batch sizes)
        # change the compute per step, so a random sample can take many times the budget: they are opt-in.
        names = settings.optuna_params.split(",") if settings.optuna_params else [
            name for name in space if isinstance(starting[name], float)]
        if unknown := [name for name in names if name not in space]:
            fail(f"--optuna-params: {', '.join(unknown)} is not a tunable constant of train.py; the tunable ones "
                 f"are {', '.join(space)}.")
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
            str(self.ledger_path.parent / "optuna.journal")))
        self.study = optuna.create_study(study_name=settings.tag, storage=storage, direction="minimize",
                                         load_if_exists=True)
        # A seed that differs on resume, so that a resumed run does not replay the first run's random startup trials.
        self.study.sampler = optuna.samplers.TPESampler(multivariate=True, seed=len(self.study.trials))
        if "space" not in self.study.user_attrs:  # a resumed study keeps its space, whatever --optuna-params says
            self.study.set_user_attr("space", {name: space[name] for name in names})
            self.study.set_user_attr("start", {name: starting[name] for name in names})
        self.space = self.study.user_attrs["space"]
        self.distributions = {name: optuna.distributions.FloatDistribution(low, high, log=kind == "log")
                              if kind in ("log", "uniform") else optuna.distributions.IntDistribution(low, high)
                              for name, (kind, low, high) in self.space.items()}

    def start(self, prompt):  # the prompt is for language models: what this agent knows is in the study
        self.tell_results(state.Ledger(self.ledger_path))
        source = Path("train.py").read_text()  # the best commit's: the loop resets to it before asking
        current = tunable_constants(source, self.device)
        params = self.params_of(current)
        self.enqueue_next_probe(params)
        for _ in range(MAX_OPTUNA_ASKS):
            trial = self.study.ask(self.distributions)
            # what the trial moves (a value it leaves as it is stays unrounded)
            values = {name: constant_value(*self.space[name], trial.params[name]) for name in params
                      if trial.params[name] != params[name]}
            changed = {name: value for name, value in values.items() if value != current[name][0]}
            if changed:
                lines = source.splitlines()
                old = {name: lines[line - 1][col:end_col] for name, (_, line, col, end_col) in current.items()}
                description = ", ".join(f"{name} {old[name]} -> {value!r}" for name, value in changed.items())
                return Proposal(description=description, edits=constant_edits(source, current, changed),
                                hypothesis=hypothesis(changed, current, len(self.study.get_trials(
                                    deepcopy=False, states=[self.optuna.trial.TrialState.COMPLETE]))),
                                trial=trial.number)  # the driver's ledger ties it to its experiment
            self.study.tell(trial, state=self.optuna.trial.TrialState.FAIL)  # train.py as it is: nothing to learn
        return Proposal(problem=f"Optuna proposed the current train.py {MAX_OPTUNA_ASKS} times in a row.")

    def reply(self, error):
        return Proposal(problem=f"--agent optuna cannot repair a proposal that does not apply: {error}")

    def params_of(self, current):
        """The study's params for train.py's current values (a power of two as its exponent)."""
        return {name: value.bit_length() - 1 if self.space[name][0] == "pow2" else value
                for name, (value, *_) in current.items() if name in self.space}

    def enqueue_next_probe(self, params):
        """Queue the next one-at-a-time probe, taken from the current best's values so that it changes one constant
        and undoes no kept change; probes that would change nothing (at a range's edge) or repeat a trial already
        run (the step back to the value a kept probe left) are passed over."""
        probes = self.study.user_attrs.get("probes", [])
        done = [trial.params for trial in self.study.get_trials(deepcopy=False)]
        while probes:
            (name, step), probes = probes[0], probes[1:]
            self.study.set_user_attr("probes", probes)
            probe = {**params, name: probe_value(*self.space[name], params[name], step)} if name in params else params
            if probe != params and probe not in done:
                self.study.enqueue_trial(probe)
                return

    def tell_results(self, ledger):
        """Tell each trial still running its outcome, found through the ledger: the proposal that carried the trial
        names its experiment, whose result is its value. Add the baseline first (TPE then knows where it started)."""
        TrialState, results = self.optuna.trial.TrialState, {r["experiment"]: r for r in ledger.results()}
        if not self.study.trials:
            start = self.study.user_attrs["start"]
            params = {name: start[name].bit_length() - 1 if kind == "pow2" else start[name]
                      for name, (kind, _, _) in self.space.items()}
            self.study.add_trial(self.optuna.trial.create_trial(
                params=params, distributions=self.distributions, value=results[0]["val_bpb"],
                user_attrs={"experiment": 0}))
            # Random draws of all constants at once rarely beat tuned values; one-at-a-time probes first say which
            # constants matter, in descriptions a person can read, and give TPE informative history.
            self.study.set_user_attr("probes", [[name, step] for name in self.space for step in (1, -1)])
        experiment_of = {r["trial"]: r["experiment"] for r in ledger.events("proposal") if r["ok"] and "trial" in r}
        still_open = ledger.open_experiments()
        for trial in self.study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
            experiment = experiment_of.get(trial.number)
            if experiment in still_open:  # on another worker, or resumed by the next start: its result comes later
                continue
            result = results.get(experiment)
            if result and result["status"] in ("keep", "discard"):
                self.study.tell(trial.number, result["val_bpb"])
            else:  # a crash, an invalid run, or a change refused: its trial failed
                self.study.tell(trial.number, state=TrialState.FAIL)


def hypothesis(changed, current, results):
    """Optuna's reason for a trial, as the history shows it: a probe of one constant, or TPE's pick."""
    if len(changed) == 1:
        [(name, value)] = changed.items()
        return f"probe {name} {'up' if value > current[name][0] else 'down'}: does val_bpb depend on it, and which way?"
    return f"TPE's pick of {len(changed)} constants, from the {results} results it has so far"
