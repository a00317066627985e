"""The models a night keeps (autoresearch/weights.py): the baseline's and the best's weights, saved by the harness
from the model the scorer scored, kept by the driver, and loaded back to the same val_bpb (through a real train.py
and `agent_loop.py rescore`: tests/test_gpu_check.py)."""

import dataclasses
import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

import agent_loop
from autoresearch import runner
from fake_llm import change
from night_repo import BETTER, ROOT
from test_prepare import FixedLogits

WORSE_THAN_BETTER = ("GAIN_A = 0.0", "GAIN_A = -0.01")
SCORED_THEN_CRASH = ('print("training_seconds: 1.0")', 'print("training_seconds: 1.0")\nraise SystemExit(3)')


def saved_val_bpb(path):
    return float(load_file(path)["val_bpb"][0])  # the fake harness's "model": the val_bpb it was scored with


def models(night):
    return night.repo / ".autoresearch" / "t" / "models"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_night_keeps_the_baseline_s_and_the_best_s_weights_and_removes_the_others(night, workers):
    night.llm.script(change("lower val_bpb", BETTER), change("raise val_bpb", WORSE_THAN_BETTER),
                     change("crash after its evaluation", SCORED_THEN_CRASH))
    result = night.run("--max-experiments", "4", "--keep-rule", "greedy", "--workers", str(workers),
                       "--max-fix-attempts", "0")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(row[3] for row in night.rows()) == ["crash", "discard", "keep", "keep"]  # in any order
    folder = models(night)
    assert saved_val_bpb(folder / "baseline.safetensors") == 1.0 and saved_val_bpb(folder / "best.safetensors") == 0.99
    assert sorted(saved_val_bpb(path) for path in (folder / "runs").iterdir()) == [0.99, 1.0]  # no others
    best = json.loads((folder / "best.json").read_text())
    runs = {r["commit"]: r for r in night.ledger() if r["event"] == "run" and r.get("weights")}
    assert best["commit"] == night.head() and best["val_bpb"] == 0.99 and best["experiment"] == 1
    assert best["sha256"] == runs[best["commit"]]["weights"]["sha256"] == hashlib.sha256(
        (folder / "best.safetensors").read_bytes()).hexdigest()
    assert best["constants"]["time_budget"] == 1 and "rescore" in best["load"]


def test_the_report_says_where_the_models_are_and_how_to_load_them(night, capsys):
    night.llm.script(change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "2", "--keep-rule", "greedy").returncode == 0
    capsys.readouterr()
    assert agent_loop.main(["report", "--tag", "t"]) == 0
    printed = capsys.readouterr().out
    best = f"best model   {models(night) / 'best.safetensors'} (#1 {night.head()[:7]}, its run scored 0.990000"
    assert best in printed
    assert f"baseline model {models(night) / 'baseline.safetensors'} (#0" in printed
    assert "safetensors.torch.load_model(model, path)" in printed
    page = (night.repo / ".autoresearch" / "t" / "report.html").read_text()
    assert "<dt>best model</dt>" in page and "best.safetensors" in page


def test_a_model_saved_by_a_run_that_never_ended_is_removed_on_resume(night):
    night.llm.script(change("lower val_bpb", BETTER))
    assert night.run("--max-experiments", "2", "--keep-rule", "greedy").returncode == 0
    orphan = models(night) / "runs" / "7.safetensors"  # copied out by a driver killed before it ledgered the run
    shutil.copy(models(night) / "best.safetensors", orphan)
    assert night.run("--max-experiments", "2").returncode == 0
    assert not orphan.exists() and (models(night) / "best.safetensors").exists()


def test_a_compiled_file_left_as_a_link_to_another_file_is_not_copied(tmp_path):
    secret = tmp_path / "val.bin"
    secret.write_bytes(b"validation tokens")
    (tmp_path / "kernel.so").symlink_to(secret)
    assert not runner.copy_plain_file(tmp_path / "kernel.so", tmp_path / "kept" / "kernel.so")
    os.link(secret, tmp_path / "linked.so")  # a second name of a file it could not read
    assert not runner.copy_plain_file(tmp_path / "linked.so", tmp_path / "kept" / "kernel.so")
    assert not (tmp_path / "kept" / "kernel.so").exists()


def test_a_compiled_file_left_as_a_pipe_is_not_copied_and_a_plain_one_is(tmp_path):
    os.mkfifo(tmp_path / "kernel.so")  # opening it to read would wait for a writer forever
    assert not runner.copy_plain_file(tmp_path / "kernel.so", tmp_path / "kept.so")
    (tmp_path / "plain.so").write_bytes(b"x" * 1000)
    assert runner.copy_plain_file(tmp_path / "plain.so", tmp_path / "kept.so")
    assert (tmp_path / "kept.so").read_bytes() == b"x" * 1000


def test_a_compile_cache_left_as_a_link_to_another_folder_is_not_copied(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "val.bin").write_bytes(b"validation tokens")
    (tmp_path / "compiled").symlink_to(tmp_path / "secrets")
    runner.copy_plain_files(tmp_path / "compiled", tmp_path / "kept")
    assert list((tmp_path / "kept").iterdir()) == []


def test_a_compile_cache_that_cannot_be_written_whole_is_not_kept(tmp_path, monkeypatch):
    (tmp_path / "compiled" / "inductor").mkdir(parents=True)
    for name in ("a.so", "b.so"):
        (tmp_path / "compiled" / "inductor" / name).write_bytes(b"code")
    copy, copied = runner.copy_plain_file, []

    def disk_full_at_the_second(source, destination):  # the first file is written, then the disk is full
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(source)
        return copy(source, destination)
    monkeypatch.setattr(runner, "copy_plain_file", disk_full_at_the_second)
    (tmp_path / "tag").mkdir()
    runner.keep_compile_cache(tmp_path / "compiled", tmp_path / "tag" / "compile-cache")
    assert len(copied) == 1 and list((tmp_path / "tag").iterdir()) == []  # neither the cache nor its partial copy


def test_rescore_without_a_tag_says_what_to_run_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="has no tag: run the loop first"):
        agent_loop.main(["rescore"])
    with pytest.raises(SystemExit, match="there is no tag nov23: .* Tags here: none"):
        agent_loop.main(["rescore", "--tag", "nov23"])


def test_the_driver_and_the_harness_name_the_weights_alike():
    source = (ROOT / "prepare.py").read_text()
    assert f'SAVE_WEIGHTS = "{runner.SAVE_WEIGHTS}"' in source and f'LOAD_WEIGHTS = "{runner.LOAD_WEIGHTS}"' in source


@dataclasses.dataclass
class Config:
    vocab_size: int


class Unigram(FixedLogits):
    """A unigram model with a config, as train.py's GPT has one."""

    def __init__(self, logits):
        super().__init__(logits)
        self.config = Config(len(logits))


def test_the_harness_saves_the_model_it_scored_and_loads_it_back_to_the_same_val_bpb(prepare_module, tmp_path,
                                                                                     monkeypatch):
    tokenizer = prepare_module.Tokenizer.from_directory()
    V, saved = tokenizer.get_vocab_size(), tmp_path / "model.safetensors"
    monkeypatch.setenv(prepare_module.SAVE_WEIGHTS, str(saved))
    scored = prepare_module.evaluate_bpb(Unigram(torch.linspace(-3, 3, V)), tokenizer, batch_size=8)
    with safe_open(saved, framework="pt") as file:
        metadata = file.metadata()
    assert metadata == {"max_seq_len": "64", "time_budget": "2", "eval_tokens": "4096", "vocab_size": "512",
                        "config": json.dumps({"vocab_size": V})}
    monkeypatch.delenv(prepare_module.SAVE_WEIGHTS)
    monkeypatch.setenv(prepare_module.LOAD_WEIGHTS, str(saved))
    uniform = Unigram(torch.zeros(V))  # another model, into which the saved weights are loaded before it is scored
    assert prepare_module.evaluate_bpb(uniform, tokenizer, batch_size=8) == pytest.approx(scored, abs=1e-9)
    assert torch.equal(uniform.logits.detach(), torch.linspace(-3, 3, V))


def test_a_best_whose_runs_saved_no_weights_is_not_named_by_an_older_best_s_files(tmp_path):
    from autoresearch import state, weights

    folder = tmp_path / "models"
    (folder / "runs").mkdir(parents=True)
    (folder / "runs" / "1.safetensors").write_bytes(b"baseline")
    run = dict(event="run", experiment=0, commit="a" * 40, ok=True, val_bpb=1.0, seconds=9.0, log="logs/1.log",
               weights={"file": "models/runs/1.safetensors", "sha256": "0", "bytes": 8})
    records = [run, dict(event="result", experiment=0, commit="a" * 40, status="keep")]
    weights.tidy(tmp_path, state.Ledger(records=records), {})
    assert (folder / "best.safetensors").read_bytes() == b"baseline"  # the baseline is the best so far
    records += [dict(event="run", experiment=1, commit="b" * 40, ok=True, val_bpb=0.9, log="logs/2.log"),
                dict(event="result", experiment=1, commit="b" * 40, status="keep")]  # a run that saved none
    weights.tidy(tmp_path, state.Ledger(records=records), {})
    assert not (folder / "best.safetensors").exists() and not (folder / "best.json").exists()
    assert json.loads((folder / "baseline.json").read_text())["commit"] == "a" * 40


def test_tidying_leaves_the_files_of_the_runs_still_out_even_half_copied(tmp_path):
    from autoresearch import state, weights

    runs = tmp_path / "models" / "runs"
    runs.mkdir(parents=True)
    for name in ("3.safetensors", "4.safetensors.tmp", "9.safetensors"):  # 3 and 4: runs out; 9: a killed driver's
        (runs / name).write_bytes(b"weights")
    weights.tidy(tmp_path, state.Ledger(records=[]), {}, busy=[runs / "3.safetensors", runs / "4.safetensors"])
    assert sorted(path.name for path in runs.iterdir()) == ["3.safetensors", "4.safetensors.tmp"]
