"""prepare.attested_run: the harness's signed record of a run, which the driver trusts instead of train.py's
printout. A small training script runs under the real harness in a subprocess, as agent_loop.py starts
it, on the tiny cache; the driver verifies the record with the run's key. Three runs (each imports torch):
an honest one, one that tries every way of using the validation data, and one that crashes."""

import secrets

import pytest

from autoresearch import integrity, runner
from conftest import REPO

# A bigram model trained for a few batches: small enough to start, train and evaluate in seconds.
HONEST = '''
import json, os, sys
import numpy as np
import torch
import prepare
from prepare import Tokenizer, make_dataloader, evaluate_bpb

print("stdin:", repr(sys.stdin.read()), "env:", [k for k in os.environ if "KEY" in k or "RECORD" in k])

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

VAL_TOKENS = 'prepare.TOKENS_DIR / (json.load(open(prepare.MANIFEST_PATH))["splits"]["v" + "al"]["parts"][0] + ".bin")'
CHEATS = [  # (what the script does, the search text in HONEST, its replacement)
    ("trains on the val split by a computed name", '"train", device="cpu")', '"va" + "l", device="cpu")'),
    ("reads the validation tokens directly", "tokenizer = Tokenizer", f"leaked = np.fromfile({VAL_TOKENS})\ntokenizer = Tokenizer"),
    ("learns from what it is evaluated on, reading the validation tokens as it goes",
     "        logits = self.table(x)\n",
     f"        if y is None:\n            np.fromfile({VAL_TOKENS})\n"
     "            with torch.enable_grad():\n"
     "                self.table.weight.grad = None\n"
     "                self(x[:, :-1], x[:, 1:]).backward()\n"
     "                self.table.weight.data -= self.table.weight.grad\n"
     "        logits = self.table(x)\n"),
    ("trains after the evaluation began", 'print("val_bpb:", evaluate_bpb(model, tokenizer, 8))\n',
     'print("val_bpb:", evaluate_bpb(model, tokenizer, 8))\n'
     'next(make_dataloader(tokenizer, 4, prepare.MAX_SEQ_LEN, "train", device="cpu"))\n'),
]


def run_attested(tmp_path, cache, script, split="val"):
    """(exit code, output, record or None, why there is none): one run as the driver makes it."""
    key = secrets.token_bytes(32)
    result = runner.run_in_folder(script, (REPO / "prepare.py").read_text(), key.hex(), 120, tmp_path / "train.pid",
                                  split, cache=cache)
    record, missing = integrity.verify_record(key, result["record"])
    return result["returncode"], result["log"], record, missing


@pytest.fixture(scope="module")
def honest(tmp_path_factory, _tiny_cache_dir):
    return run_attested(tmp_path_factory.mktemp("honest"), _tiny_cache_dir, HONEST)


@pytest.fixture(scope="module")
def cheating(tmp_path_factory, _tiny_cache_dir):
    script = HONEST
    for _, search, replace in CHEATS:
        assert script.count(search) == 1, search
        script = script.replace(search, replace)
    return run_attested(tmp_path_factory.mktemp("cheating"), _tiny_cache_dir, script)


def test_an_honest_run_is_attested_with_evaluate_bpbs_own_number(honest):
    code, output, record, missing = honest
    assert code == 0, output
    assert missing is None and record["violations"] == []
    [evaluation] = record["evaluations"]
    assert f"val_bpb: {evaluation['val_bpb']}" in output  # the number train.py got is the one attested
    assert (evaluation["tokens"], evaluation["seq_len"], evaluation["causal"]) == (4096, 64, True)
    assert [(loader["split"], loader["caller"].split(":")[0]) for loader in record["loaders"]] == [
        ("train", "train.py"), ("val", "prepare.py")]
    assert record["train_batches"] == 3 and 0 < record["first_train_batch"] < evaluation["started"]
    assert integrity.record_problems(record, missing, code, evaluation["val_bpb"],
                                     {"max_seq_len": 64, "eval_tokens": 4096}) == []


def test_a_run_the_driver_asks_to_score_the_holdout_is_scored_on_it_and_train_py_cannot_tell(
        tmp_path, tiny_cache, honest):
    code, output, record, missing = run_attested(tmp_path, tiny_cache, HONEST, split="holdout")
    assert code == 0 and missing is None and record["violations"] == [], output
    [evaluation] = record["evaluations"]
    assert evaluation["split"] == "holdout" and honest[2]["evaluations"][0]["split"] == "val"
    assert [(loader["split"], loader["caller"].split(":")[0]) for loader in record["loaders"]] == [
        ("train", "train.py"), ("holdout", "prepare.py")]
    assert "stdin: '' env: []" in output  # the request, and with it the split, was read before train.py ran


def test_the_key_never_reaches_train_py(honest):
    code, output, record, _ = honest
    assert "stdin: '' env: []" in output and record is not None


def test_training_on_the_val_split_by_a_computed_name_is_recorded(cheating):
    assert any("train.py:" in v and "opened the val split" in v for v in cheating[2]["violations"])


def test_reading_the_validation_tokens_directly_is_recorded(cheating):
    assert any(v.endswith("(validation data) was opened outside evaluate_bpb's loader")
               for v in cheating[2]["violations"])


def test_a_model_that_reads_the_validation_tokens_while_it_is_evaluated_is_recorded(cheating):
    assert any(v.endswith("was opened outside evaluate_bpb's loader, while the model was being evaluated")
               for v in cheating[2]["violations"])


def test_a_model_that_learns_while_it_is_evaluated_is_recorded(cheating):
    # test-time training: the inputs of each evaluated batch hold its targets, one position on
    assert any("parameters changed while evaluate_bpb ran" in v for v in cheating[2]["violations"])


def test_training_after_the_evaluation_began_is_recorded(cheating):
    assert any("training batch was taken after evaluate_bpb started" in v for v in cheating[2]["violations"])


def test_the_harness_records_cheats_without_stopping_the_run(cheating):
    code, output, record, _ = cheating
    assert code == 0 and len(record["evaluations"]) == 1, output  # the driver, not the harness, decides


def test_a_crash_is_recorded_with_no_evaluation(tmp_path, tiny_cache):
    code, output, record, missing = run_attested(tmp_path, tiny_cache, "1 / 0\n" + HONEST)  # before torch loads
    assert code == 1 and "ZeroDivisionError" in output
    assert record["evaluations"] == [] and record["train_batches"] == 0
    assert integrity.record_problems(record, missing, code, None, {"max_seq_len": 64, "eval_tokens": 4096}) == []
