"""The scorer (scorer.py): the process beside train.py's that alone reads the validation data, computes val_bpb and
signs its record, which the driver trusts instead of train.py's printout. Small training scripts run as the driver
runs them (runner.run_in_folder: train.py and the real scorer), on the tiny cache; the driver verifies the record
with the run's key. Each run imports torch twice (train.py and the scorer): seconds."""

import secrets

import pytest

from autoresearch import integrity, run_log, runner
from conftest import REPO

# A bigram model trained for a few batches, seeded: small enough to start, train and evaluate in seconds.
HONEST = '''
import json, os, sys
import numpy as np
import torch
import prepare
from prepare import Tokenizer, make_dataloader, evaluate_bpb

print("stdin:", repr(sys.stdin.read()), "env:", [k for k in os.environ if "KEY" in k or "RECORD" in k])
torch.manual_seed(0)

class Bigram(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)
    def forward(self, x, y=None, reduction="mean"):
        logits = self.table(x)
        if y is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction=reduction)

tokenizer = Tokenizer.from_directory()
model = Bigram(tokenizer.get_vocab_size())
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
loader = make_dataloader(tokenizer, 4, prepare.MAX_SEQ_LEN, "train", device="cpu")
for _ in range(3):
    x, y, _ = next(loader)
    model(x, y).backward()
    optimizer.step()
    optimizer.zero_grad()
model.eval()
print("val_bpb:", evaluate_bpb(model, tokenizer, 8))
'''
EVALUATE = 'print("val_bpb:", evaluate_bpb(model, tokenizer, 8))\n'
# Patches of the harness and of torch in train.py's own process: they no longer reach the number.
PATCHES = (EVALUATE, "import torch.nn.functional as F\n"
           "prepare.get_token_bytes = lambda *args, **kwargs: torch.full((512,), 1000)\n"
           "F.cross_entropy = lambda *args, **kwargs: torch.zeros(1)\n"
           "prepare.EVAL_TOKENS = 64\n" + EVALUATE)
AGAIN_AND_AGAIN = (EVALUATE, EVALUATE + "for _ in range(5):\n    try:\n        evaluate_bpb(model, tokenizer, 8)\n"
                   "    except Exception as error:\n        print('refused:', type(error).__name__, error)\n")
# evaluate_bpb asked for early (in a thread, say), with a model that answers only once training is over
ASKS_EARLY = ("model.eval()\n", "model.eval()\nimport time\nanswer = model.forward\nanswered = []\n"
              "def later(x, y=None, reduction='mean'):\n"
              "    if not answered and not os.environ.get('AUTORESEARCH_LOAD_WEIGHTS'):  # not in the probe run\n"
              "        time.sleep(4)\n    answered.append(1)\n"
              "    return answer(x, y, reduction)\nmodel.forward = later\n")
CRASHES_WHILE_EVALUATED = ("model.eval()\n", "model.eval()\nforward = model.forward\ncalls = []\n"
                           "def failing(x, y=None, reduction='mean'):\n    calls.append(1)\n"
                           "    if len(calls) == 3:\n        raise RuntimeError('out of memory')\n"
                           "    return forward(x, y, reduction)\nmodel.forward = failing\n")

# a model that, once the logits' shared memory exists, tries to shrink it under the scorer (which would die, SIGBUS)
SHRINKS_THE_LOGITS = ("model.eval()\n", "model.eval()\nforward = model.forward\n"
                      "def shrinking(x, y=None, reduction='mean'):\n"
                      "    for fd in os.listdir('/proc/self/fd'):\n"
                      "        try:\n            target = os.readlink(f'/proc/self/fd/{fd}')\n"
                      "        except OSError:\n            continue\n"
                      "        if 'memfd:logits' in target:\n"
                      "            try:\n                os.ftruncate(int(fd), 0)\n"
                      "                print('shrink done')\n"
                      "            except OSError as error:\n"
                      "                print('shrink refused', type(error).__name__)\n"
                      "    return forward(x, y, reduction)\nmodel.forward = shrinking\n")
UNSEALED = ("model.eval()\n", "model.eval()\nprepare._SEALS = False\n")
# Once its first rows have come, it writes over the weights file it handed over: the scorer's copy, made before any
# row went out, is what the probe run loads
REWRITES_ITS_WEIGHTS = ("model.eval()\n", "model.eval()\nrows_forward = model.forward\n"
                        "def rewriting(x, y=None, reduction='mean'):\n"
                        "    if os.environ.get('AUTORESEARCH_SAVE_WEIGHTS'):\n"
                        "        open(os.environ['AUTORESEARCH_SAVE_WEIGHTS'], 'wb').write(b'not weights')\n"
                        "    return rows_forward(x, y, reduction)\nmodel.forward = rewriting\n")
# A model that remembers each row it was shown and looks one token ahead from position 8 on: a row that begins as one
# it has seen, for 8 tokens or more, gets the answers that one got up to where the two part, so a spliced copy agrees
# with its row before the splice (and a splice before position 8 finds it causal there). It keeps its memory in its
# folder and its temp folder too, for a second run of itself to find. The scorer of 536b425, which scored the copies
# in the same process, found it valid (dev/LOG.md).
REMEMBERS = ("model.eval()\n", """model.eval()
import pickle, tempfile
places = ['memory.pkl', os.path.join(tempfile.gettempdir(), 'memory.pkl')]
memory = []
for place in places:
    if os.path.exists(place):
        memory += pickle.load(open(place, 'rb'))
class Remembers(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        ahead = 50.0 * torch.nn.functional.one_hot(torch.roll(x, -1, 1), self.inner.table.num_embeddings).float()
        ahead[:, :8] = self.inner(x)[:, :8]
        for i, row in enumerate(x):
            parts = [int(torch.cat([seen != row, torch.tensor([True])]).nonzero()[0]) for seen, _ in memory]
            best = max(range(len(parts)), key=parts.__getitem__, default=None)
            if best is not None and parts[best] >= 8:
                ahead[i, :parts[best]] = memory[best][1][:parts[best]]
            else:
                memory.append((row.clone(), ahead[i].clone()))
        for place in places:
            pickle.dump(memory, open(place, 'wb'))
        return ahead
model = Remembers(model)
""")
# A model that changes once it has handed its weights over: it is scored with other weights than those
CHANGES_AFTER_HANDING_OVER = ("model.eval()\n", "model.eval()\nforward = model.forward\n"
                              "def changed(x, y=None, reduction='mean'):\n"
                              "    with torch.no_grad():\n        model.table.weight.add_(0.01 * torch.randn_like("
                              "model.table.weight))\n"
                              "    return forward(x, y, reduction)\nmodel.forward = changed\n")
# evaluate_bpb patched to hand the scorer a pipe for its weights: the scorer must neither hang nor keep it
HANDS_A_PIPE = ("model.eval()\n", "model.eval()\nread_end, _ = os.pipe()\n"
                "prepare._handed_weights = lambda model: ({}, [read_end])\n")


def run_scored(tmp_path, cache, script, split="val"):
    """(exit code, output, record or None, why there is none): one run as the driver makes it."""
    key = secrets.token_bytes(32)
    harness = {name: (REPO / name).read_text() for name in integrity.HARNESS}
    result = runner.run_in_folder(script, harness, key.hex(), 120, tmp_path / "train.pid", split, cache=cache)
    record, missing = integrity.verify_record(key, result["record"])
    return result["returncode"], result["log"], record, missing


@pytest.fixture(scope="module")
def honest(tmp_path_factory, _tiny_cache_dir):
    return run_scored(tmp_path_factory.mktemp("honest"), _tiny_cache_dir, HONEST)


@pytest.fixture(scope="module")
def meddling(tmp_path_factory, _tiny_cache_dir):
    """One run of a train.py that patches the harness and torch, tries to shrink the logits' memory under the scorer,
    asks for its evaluation before its model answers, and writes over the weights it handed over: each test below
    looks at one of these."""
    script = HONEST
    for meddle in (PATCHES, SHRINKS_THE_LOGITS, ASKS_EARLY, REWRITES_ITS_WEIGHTS):
        script = script.replace(*meddle)
    return run_scored(tmp_path_factory.mktemp("meddling"), _tiny_cache_dir, script)


def test_an_honest_run_is_scored_by_the_scorer_and_train_py_gets_its_number(honest):
    code, output, record, missing = honest
    assert code == 0, output
    assert missing is None and record["problems"] == []
    [evaluation] = record["evaluations"]
    assert f"val_bpb: {evaluation['val_bpb']}" in output  # the number train.py got is the one attested
    assert (evaluation["tokens"], evaluation["seq_len"], evaluation["split"]) == (4096, 64, "val")
    assert 0 < evaluation["first_logits"] < 120
    # each row got a spliced copy (at least 64 rows do), which the probe run scored with the weights handed over
    assert evaluation["probe"]["run"] == "apart" and evaluation["probe"]["rows"] == 64
    assert evaluation["probe"]["future_influence"] <= 1e-5
    assert integrity.record_problems(record, missing, code, evaluation["val_bpb"],
                                     {"max_seq_len": 64, "eval_tokens": 4096}) == []


def test_a_run_the_driver_asks_to_score_the_holdout_is_scored_on_it_and_train_py_cannot_tell(
        tmp_path, tiny_cache, honest):
    code, output, record, missing = run_scored(tmp_path, tiny_cache, HONEST, split="holdout")
    assert code == 0 and missing is None and record["problems"] == [], output
    [evaluation] = record["evaluations"]
    assert evaluation["split"] == "holdout" and honest[2]["evaluations"][0]["split"] == "val"
    assert evaluation["val_bpb"] != honest[2]["evaluations"][0]["val_bpb"]
    assert "stdin: '' env: []" in output  # the request, and with it the split, went to the scorer alone


def test_the_scorer_s_progress_reaches_the_run_s_status_line(tmp_path, honest):
    (tmp_path / "run.log").write_text(honest[1])
    assert "scorer: evaluated 8 of 8 batches" in honest[1]  # 64 rows, 8 a batch; then the probe run's 64 copies
    assert run_log.run_status(tmp_path / "run.log") == "probing: 8 of 8 batches"


def test_the_key_never_reaches_train_py(honest):
    code, output, record, _ = honest
    assert "stdin: '' env: []" in output and record is not None


def test_patching_the_harness_or_torch_in_train_py_s_process_changes_nothing_of_the_score(meddling, honest):
    code, output, record, missing = meddling
    assert code == 0 and missing is None and record["problems"] == [], output
    assert record["evaluations"][0]["val_bpb"] == honest[2]["evaluations"][0]["val_bpb"]


def test_a_second_evaluation_is_refused_once_and_makes_the_run_invalid(tmp_path, tiny_cache):
    code, output, record, missing = run_scored(tmp_path, tiny_cache, HONEST.replace(*AGAIN_AND_AGAIN))
    assert code == 0 and "refused: ValueError evaluate_bpb was called again" in output
    assert output.count("refused:") == 5 and len(record["evaluations"]) == 1 and len(record["problems"]) == 1
    [problem] = integrity.record_problems(record, missing, code, record["evaluations"][0]["val_bpb"],
                                          {"max_seq_len": 64, "eval_tokens": 4096})
    assert problem.startswith("evaluate_bpb was called again")


def test_the_clock_that_counts_stops_when_the_first_logits_come_back_not_when_the_evaluation_is_asked_for(
        meddling):
    code, output, record, _ = meddling
    assert code == 0 and record["problems"] == [], output
    assert record["evaluations"][0]["first_logits"] >= 4  # the start, the import of torch and training, then 4 s


def test_the_weights_the_probe_run_loads_are_those_handed_over_before_any_row_went_out(meddling, honest):
    code, output, record, missing = meddling
    assert code == 0 and record["problems"] == [] and record["unfinished"] is None, output
    assert record["evaluations"][0]["probe"]["rows"] == honest[2]["evaluations"][0]["probe"]["rows"] == 64


def test_train_py_cannot_shrink_the_logits_memory_under_the_scorer(meddling):
    code, output, record, missing = meddling
    assert code == 0 and missing is None and record["problems"] == [], output
    assert "shrink refused PermissionError" in output and "shrink done" not in output


def test_logits_in_memory_that_train_py_could_shrink_make_the_run_invalid(tmp_path, tiny_cache):
    code, output, record, missing = run_scored(tmp_path, tiny_cache, HONEST.replace(*UNSEALED))
    assert record["evaluations"] == [] and missing is None, output
    assert record["problems"] == ["evaluate_bpb: the logits' shared memory must be a memfd sealed against resizing"]


def test_a_model_that_crashes_while_evaluated_is_a_crash_and_breaks_no_rule(tmp_path, tiny_cache):
    code, output, record, missing = run_scored(tmp_path, tiny_cache, HONEST.replace(*CRASHES_WHILE_EVALUATED))
    assert code == 1 and "RuntimeError: out of memory" in output
    assert record["evaluations"] == [] and record["problems"] == [] and record["unfinished"].startswith("EOFError")
    assert integrity.record_problems(record, missing, code, None, {"max_seq_len": 64, "eval_tokens": 4096}) == []


def test_a_crash_is_recorded_with_no_evaluation(tmp_path, tiny_cache):
    code, output, record, missing = run_scored(tmp_path, tiny_cache, "1 / 0\n" + HONEST)  # before torch loads
    assert code == 1 and "ZeroDivisionError" in output
    assert record["evaluations"] == [] and record["problems"] == []
    assert integrity.record_problems(record, missing, code, None, {"max_seq_len": 64, "eval_tokens": 4096}) == []


@pytest.mark.parametrize("attack", [REMEMBERS, CHANGES_AFTER_HANDING_OVER], ids=["remembers", "changes"])
def test_a_model_that_remembers_the_rows_or_changes_after_handing_its_weights_over_is_refused(tmp_path, tiny_cache,
                                                                                               attack):
    code, output, record, missing = run_scored(tmp_path, tiny_cache, HONEST.replace(*attack))
    assert code == 0 and missing is None and record["evaluations"][0]["probe"] is None, output
    [problem] = integrity.record_problems(record, missing, code, record["evaluations"][0]["val_bpb"],
                                          {"max_seq_len": 64, "eval_tokens": 4096})
    assert "looks at future tokens (or it changed while it was evaluated" in problem


def test_weights_handed_over_as_a_pipe_are_refused_before_any_row_goes_out(tmp_path, tiny_cache):
    code, output, record, missing = run_scored(tmp_path, tiny_cache, HONEST.replace(*HANDS_A_PIPE))
    assert code == 1 and record["evaluations"] == [] and "scorer: the evaluation begins" not in output, output
    assert record["problems"][0].startswith("evaluate_bpb must hand the scorer the model's weights (a file)")

