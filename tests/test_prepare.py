"""prepare.py: downloads, sources, tokenizer, packing, the val_bpb metric, the manifest, bad input."""

import importlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch

from conftest import REPO, TINY, make_documents, run_prepare, write_parquet

import data_sources
import prepare
import prepare_data

VAL_SHARD, HOLDOUT_SHARD = "shard_06542.parquet", "shard_06541.parquet"


def serve_climbmix(hub, num_train=2, docs_per_shard=700, row_group_size=300):
    for i in range(num_train):
        hub.add_parquet(f"shard_{i:05d}.parquet", make_documents(docs_per_shard, seed=i), row_group_size)
    hub.add_parquet(HOLDOUT_SHARD, make_documents(600, seed=98, max_words=150), row_group_size)
    hub.add_parquet(VAL_SHARD, make_documents(1500, seed=99, max_words=150), row_group_size)


@pytest.fixture(scope="module")
def climbmix_cache(tmp_path_factory):
    """A cache prepared from a local hub: 2 training shards and the val shard, row groups of 300."""
    from conftest import Hub

    hub = Hub()
    serve_climbmix(hub)
    cache = tmp_path_factory.mktemp("climbmix")
    result = run_prepare("--num-shards", "2", *TINY, cache=cache, env_extra={"HF_ENDPOINT": hub.url})
    hub.server.shutdown()
    return cache, hub, result


@pytest.fixture
def climbmix(climbmix_cache, monkeypatch):
    cache, hub, result = climbmix_cache
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(cache))
    importlib.reload(prepare)
    yield cache, hub, result
    monkeypatch.undo()
    importlib.reload(prepare)


def spec_packing(doc_batches, B, T, n):
    """SPEC §5 written as plainly as possible (lists and linear scans), to check ours against."""
    buffer, batches = [], []
    for _ in range(n):
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < 1000:
                    buffer.extend(next(doc_batches))
                space = T + 1 - len(row)
                fitting = [i for i, doc in enumerate(buffer) if len(doc) <= space]
                if fitting:
                    row += buffer.pop(max(fitting, key=lambda i: (len(buffer[i]), -i)))
                else:
                    row += buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))[:space]
            rows.append(row)
        batches.append(rows)
    return batches


def parquet_batches_with_bos(path, tokenizer):
    """The val documents as the reference reads them: row group by row group, 128 at a time, BOS first."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    batches = []
    for g in range(pf.num_row_groups):
        texts = pf.read_row_group(g).column("text").to_pylist()
        batches += [tokenizer.encode(texts[i : i + 128], prepend=tokenizer.get_bos_token_id()) for i in range(0, len(texts), 128)]
    return itertools.cycle(batches)


# --- downloads ---------------------------------------------------------------------------------


def test_download_fetches_training_shards_the_holdout_shard_and_the_pinned_val_shard(climbmix):
    cache, hub, result = climbmix
    assert sorted(p.name for p in (cache / "data").iterdir()) == ["shard_00000.parquet", "shard_00001.parquet",
                                                                   HOLDOUT_SHARD, VAL_SHARD]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["splits"]["train"]["parts"] == ["shard_00000", "shard_00001"]
    assert manifest["splits"]["val"]["parts"] == ["shard_06542"]
    assert manifest["splits"]["val"]["documents"] == 1500
    assert manifest["splits"]["holdout"]["parts"] == ["shard_06541"]  # never trained on: the shard before val
    assert manifest["splits"]["holdout"]["documents"] == 600


def test_all_climbmix_shards_stop_before_the_holdout_shard(tmp_path):
    args = prepare_data.parse_args(["--num-shards", "-1"])
    _, downloads, parts = data_sources.resolve_source(args)
    train = [name for name, split, _ in parts if split == "train"]
    assert len(train) == 6541 and train[-1] == "shard_06540" and "shard_06541" not in train
    with pytest.raises(data_sources.PrepareError, match="use 1 to 6541"):
        data_sources.resolve_source(prepare_data.parse_args(["--num-shards", "6542"]))


def test_rerun_does_nothing_and_says_so(climbmix, hub):
    cache, _, _ = climbmix
    result = run_prepare("--num-shards", "2", *TINY, cache=cache, env_extra={"HF_ENDPOINT": hub.url})
    assert "nothing to do" in result.stdout
    assert hub.requests == {}


def test_download_retries_after_server_errors(tmp_path, hub):
    hub.add_parquet("a.parquet", ["one", "two"])
    hub.fail["a.parquet"] = 2
    data_sources.download_file(f"{hub.url}/a.parquet", tmp_path / "a.parquet", attempts=3, backoff=0.01)
    assert hub.requests["a.parquet"] == 3
    assert (tmp_path / "a.parquet").exists()


def test_download_gives_up_after_the_last_attempt_and_names_the_url(tmp_path, hub):
    hub.add_parquet("a.parquet", ["one"])
    hub.fail["a.parquet"] = 5
    with pytest.raises(data_sources.PrepareError, match=f"{hub.url}/a.parquet after 3 attempts"):
        data_sources.download_file(f"{hub.url}/a.parquet", tmp_path / "a.parquet", attempts=3, backoff=0.01)
    assert list(tmp_path.iterdir()) == []


def test_truncated_download_is_detected_and_never_kept(tmp_path, hub):
    hub.add_parquet("a.parquet", make_documents(50))
    hub.truncate.add("a.parquet")
    with pytest.raises(data_sources.PrepareError):
        data_sources.download_file(f"{hub.url}/a.parquet", tmp_path / "a.parquet", attempts=2, backoff=0.01)
    assert hub.requests["a.parquet"] == 2
    assert list(tmp_path.iterdir()) == []


def test_missing_file_fails_at_once_without_retries(tmp_path, hub):
    with pytest.raises(data_sources.PrepareError, match="404"):
        data_sources.download_file(f"{hub.url}/nope.parquet", tmp_path / "nope.parquet", attempts=5, backoff=0.01)
    assert hub.requests["nope.parquet"] == 1

def test_a_download_that_starts_after_ctrl_c_creates_no_file(tmp_path, hub):
    hub.add_parquet("a.parquet", ["one"])
    stop = data_sources.Stop()
    stop.set()
    with pytest.raises(KeyboardInterrupt):
        data_sources.download_file(f"{hub.url}/a.parquet", tmp_path / "a.parquet", attempts=3, stop=stop)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_shard_in_the_cache_is_fetched_again(tmp_path, hub):
    hub.add_parquet("a.parquet", ["one", "two"])
    dest = tmp_path / "a.parquet"
    dest.write_bytes(hub.files["a.parquet"][:-20])  # e.g. copied by hand and cut short
    data_sources.download_all([(f"{hub.url}/a.parquet", dest)], workers=2, attempts=1)
    assert dest.read_bytes() == hub.files["a.parquet"]


def test_unreachable_hub_names_the_url_and_the_offline_alternatives(tmp_path):
    result = run_prepare("--num-shards", "1", "--download-attempts", "1", cache=tmp_path / "cache", check=False,
                         env_extra={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 1
    assert "http://127.0.0.1:9/datasets/karpathy/climbmix-400b-shuffle/resolve/main/shard_00000.parquet" in result.stderr
    assert "--dataset stdlib" in result.stderr and "--text PATH" in result.stderr
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_ctrl_c_during_download_leaves_nothing_half_written(tmp_path, hub):
    hub.add_parquet("shard_00000.parquet", make_documents(400, seed=1))
    hub.add_parquet(HOLDOUT_SHARD, make_documents(100, seed=3))
    hub.add_parquet(VAL_SHARD, make_documents(100, seed=2))
    hub.slow.update(hub.files)
    cache = tmp_path / "cache"
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "HF_ENDPOINT": hub.url}
    proc = subprocess.Popen([sys.executable, str(REPO / "prepare.py"), "--num-shards", "1", *TINY], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not list((cache / "data").glob("*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Interrupted" in stderr
    assert list((cache / "data").iterdir()) == []
    assert not (cache / "manifest.json").exists()


def test_ctrl_c_while_the_download_threads_start_leaves_nothing_half_written(tmp_path, hub, monkeypatch):
    for name in ("a.parquet", "b.parquet"):
        hub.add_parquet(name, make_documents(30, seed=1, max_words=40))  # about 2 s each, sent slowly
    hub.slow.update(hub.files)
    started, start, caller = [], threading.Thread.start, threading.current_thread()

    def start_then_interrupt(thread):  # Ctrl-C once the first download has its .tmp, as the second thread starts
        start(thread)
        if threading.current_thread() is not caller:  # the hub's threads, one per request, go on as they are
            return
        started.append(thread)
        if len(started) == 2:
            deadline = time.time() + 30
            while not list(tmp_path.glob("*.tmp")) and time.time() < deadline:
                time.sleep(0.01)
            raise KeyboardInterrupt
    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        data_sources.download_all([(f"{hub.url}/{name}", tmp_path / name) for name in ("a.parquet", "b.parquet")],
                                  workers=2)
    monkeypatch.undo()
    for thread in started:
        thread.join(timeout=30)  # each sees the stop at its next chunk
    assert list(tmp_path.iterdir()) == []


def test_tinystories_holds_out_a_fixed_val_slice(tmp_path, hub):
    stories = make_documents(400, seed=7, max_words=60)
    hub.add_parquet(prepare.TINYSTORIES_FILE, stories)
    unsplit = [*TINY, "--max-seq-len", "2048"]  # stories shorter than a row: one document each
    first = run_prepare("--dataset", "tinystories", *unsplit, cache=tmp_path / "a", env_extra={"HF_ENDPOINT": hub.url})
    run_prepare("--dataset", "tinystories", *unsplit, cache=tmp_path / "b", env_extra={"HF_ENDPOINT": hub.url})
    manifests = [json.loads((tmp_path / c / "manifest.json").read_text()) for c in "ab"]
    assert manifests[0]["splits"] == manifests[1]["splits"]
    val_docs = manifests[0]["splits"]["val"]["documents"]
    assert 0 < val_docs < 0.15 * len(stories), first.stdout
    holdout_docs = manifests[0]["splits"]["holdout"]["documents"]
    assert 0 < holdout_docs < 0.15 * len(stories)
    assert val_docs + holdout_docs + manifests[0]["splits"]["train"]["documents"] == len(stories)


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_round_trips_mixed_scripts(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    text = "naïve café — Привет 你好 🤖 <|reserved_0|> 1234"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.get_vocab_size() == 512
    assert tokenizer.encode(["ab", "c"], prepend=tokenizer.get_bos_token_id())[1][0] == tokenizer.get_bos_token_id()


def test_special_token_text_is_encoded_as_plain_text(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    assert tokenizer.get_bos_token_id() not in tokenizer.encode("<|reserved_0|>")


def test_tokenizer_is_stored_without_pickle(tiny_cache):
    files = sorted(p.name for p in (tiny_cache / "tokenizer").iterdir())
    assert files == ["token_bytes.npy", "tokenizer.json"]
    json.loads((tiny_cache / "tokenizer" / "tokenizer.json").read_text())
    np.load(tiny_cache / "tokenizer" / "token_bytes.npy", allow_pickle=False)


def test_token_bytes_are_raw_byte_lengths_and_zero_for_specials(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    token_bytes = prepare_module.get_token_bytes("cpu")
    encoding = tokenizer.encoding
    expected = [len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]
    for name in prepare_module.SPECIAL_TOKENS:
        expected[encoding.encode_single_token(name)] = 0
    assert token_bytes.tolist() == expected
    # the reference's decode-then-encode counts 3 bytes for a lone byte of a multi-byte character
    lone_byte = encoding.encode_single_token(b"\xe4")
    assert token_bytes[lone_byte] == 1 and len(encoding.decode([lone_byte]).encode()) == 3


# --- packing -----------------------------------------------------------------------------------


def test_val_stream_is_token_for_token_the_spec_algorithm(climbmix):
    cache, _, _ = climbmix
    tokenizer = prepare.Tokenizer.from_directory()
    B, T, n = 4, 64, 40
    ours = make_dataloader_batches(tokenizer, B, T, "val", n)
    expected = spec_packing(parquet_batches_with_bos(cache / "data" / VAL_SHARD, tokenizer), B, T, n)
    for step, (x, y, _) in enumerate(ours):
        rows = torch.tensor(expected[step])
        assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:]), f"batch {step} differs"


def make_dataloader_batches(tokenizer, B, T, split, n):
    loader = prepare._loader(B, T, split, device="cpu")
    return [next(loader) for _ in range(n)]


def test_every_row_starts_with_bos_and_targets_are_inputs_shifted(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    for x, y, _ in make_dataloader_batches_for(prepare_module, tokenizer, 8, 64, "train", 5):
        assert x.dtype == torch.long and x.shape == y.shape == (8, 64)
        assert (x[:, 0] == tokenizer.get_bos_token_id()).all()
        assert torch.equal(x[:, 1:], y[:, :-1])


def make_dataloader_batches_for(module, tokenizer, B, T, split, n):
    loader = module._loader(B, T, split, device="cpu")  # make_dataloader's, for any split
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("split", ["val", "holdout"])
def test_train_py_s_loader_reads_the_train_split_only(prepare_module, split):
    with pytest.raises(ValueError, match="the validation data is read by the scorer process alone"):
        prepare_module.make_dataloader(None, 8, 64, split, device="cpu")


def test_rows_are_whole_documents_then_one_cropped_document_with_no_padding(prepare_module, tiny_corpus):
    tokenizer = prepare_module.Tokenizer.from_directory()
    bos = tokenizer.get_bos_token_id()
    documents = {tuple(piece) for ids in tokenizer.encode(make_documents(600), prepend=bos)
                 for piece in prepare_data._split_long(ids, bos, 64)}
    for x, y, _ in make_dataloader_batches_for(prepare_module, tokenizer, 8, 64, "train", 10):
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            pieces = split_at(row, bos)
            assert all(p in documents for p in pieces[:-1])  # whole documents...
            assert any(doc[: len(pieces[-1])] == pieces[-1] for doc in documents)  # ...then one prefix


def split_at(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [tuple(row[a:b]) for a, b in itertools.pairwise(starts)]


def test_long_documents_of_own_corpora_are_split_into_row_sized_pieces_losing_nothing(prepare_module, tiny_cache):
    tokenizer = prepare_module.Tokenizer.from_directory()
    bos = tokenizer.get_bos_token_id()
    with np.load(tiny_cache / "tokens" / "text-train.npz") as index:
        lengths = np.diff(index["doc_offsets"])
    tokens = np.fromfile(tiny_cache / "tokens" / "text-train.bin", dtype=np.uint16)
    assert lengths.max() == 65  # BOS + MAX_SEQ_LEN: a piece fills a row exactly
    documents = [d for d in make_documents(600) if data_sources._split_of(d) == "train"]
    assert int((tokens != bos).sum()) == sum(len(ids) for ids in tokenizer.encode(documents))


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(order=st.permutations(range(40)))
def test_own_corpora_are_shuffled_by_their_text_whatever_order_their_files_give(order):
    documents = [f"document {i}: " + "word " * i for i in range(40)]
    shuffled = [d for batch in data_sources._split_batches((documents[i] for i in order), "train") for d in batch]
    expected = [d for d in documents if data_sources._split_of(d) == "train"]
    assert sorted(shuffled) == sorted(expected) and shuffled != expected  # all of them, not in the files' order
    assert shuffled == [d for batch in data_sources._split_batches(iter(documents), "train") for d in batch]


def test_a_corpus_too_big_to_shuffle_in_memory_is_shuffled_through_files_that_are_then_removed(tmp_path,
                                                                                              monkeypatch):
    cache = tmp_path / "cache"  # not made yet: a first prepare of a big corpus
    monkeypatch.setattr(data_sources, "TOKENS_DIR", cache / "tokens")
    monkeypatch.setattr(data_sources, "SHUFFLE_MEMORY", 100)  # characters: a few documents
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "cache" / f".shuffle-{int(dead.stdout)}-x").mkdir(parents=True)  # a killed prepare's
    (tmp_path / "cache" / f".shuffle-{os.getpid()}-y").mkdir()  # one this process is still using: kept
    documents = [f"document {i} " + "é" * (i % 7) for i in range(300)]
    shuffled = list(data_sources._shuffled(iter(documents)))
    assert sorted(shuffled) == sorted(documents) and shuffled != documents
    assert shuffled == list(data_sources._shuffled(iter(documents[::-1])))  # the same corpus, the same order
    assert [path.name for path in cache.iterdir()] == [f".shuffle-{os.getpid()}-y"]


def test_the_holdout_documents_are_disjoint_from_val_and_train_in_the_token_files(prepare_module, tiny_cache):
    manifest = json.loads((tiny_cache / "manifest.json").read_text())

    def documents(split):
        found = set()
        for name in manifest["splits"][split]["parts"]:
            tokens, offsets, _ = prepare_module._load_part(name, manifest["vocab_size"], manifest["tokenizer_sha256"],
                                                           manifest["split_tokens"])
            found |= {tuple(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])}
        return found
    train, val, holdout = (documents(split) for split in prepare_module.SPLITS)
    assert holdout and val and train and not holdout & val and not holdout & train and not val & train
    assert manifest["splits"]["holdout"]["tokens"] > 0 and manifest["source"]["holdout_percent"] == 5


def test_changing_max_seq_len_re_splits_own_corpora(tmp_path, tiny_corpus):
    cache = tmp_path / "cache"
    run_prepare("--text", str(tiny_corpus), *TINY, cache=cache)
    result = run_prepare("--text", str(tiny_corpus), *TINY, "--max-seq-len", "32", cache=cache)
    assert "tokenizer: reusing" in result.stdout
    with np.load(cache / "tokens" / "text-train.npz") as index:
        assert np.diff(index["doc_offsets"]).max() == 33 and int(index["split_tokens"]) == 32


def test_val_stream_is_deterministic_and_counts_epochs(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    first = make_dataloader_batches_for(prepare_module, tokenizer, 8, 64, "val", 30)
    second = make_dataloader_batches_for(prepare_module, tokenizer, 8, 64, "val", 30)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    assert first[0][2] >= 1 and first[-1][2] > first[0][2]  # a tiny val split loops


def test_crop_rule_takes_the_shortest_document_when_nothing_fits():
    docs = [[0] + [7] * 9, [0] + [8] * 4, [0] + [9] * 2]  # lengths 10, 5, 3
    expected = spec_packing(itertools.cycle([docs]), 1, 3, 1)[0][0]
    assert expected == [0, 9, 9, 0]  # the 3 fits; then nothing fits 1 slot, so the 5 (shortest) is cropped
    assert pack_like_prepare([docs], 1, 3) == expected


def pack_like_prepare(doc_batches, B, T):
    """Run prepare's packer over in-memory token lists (as if they were one pre-tokenized part)."""
    flat = [doc for batch in doc_batches for doc in batch]
    tokens = np.array([t for doc in flat for t in doc], dtype=np.uint16)
    doc_offsets = np.concatenate([[0], np.cumsum([len(d) for d in flat])])
    batch_offsets = np.concatenate([[0], np.cumsum([len(b) for b in doc_batches])])
    original = prepare._load_part, prepare._require_manifest
    try:
        prepare._require_manifest = lambda: {"tokenizer_sha256": "", "vocab_size": 512, "split_tokens": 0, "splits": {"val": {"parts": ["p"]}}}
        prepare._load_part = lambda *a: (tokens, doc_offsets, batch_offsets)
        x, y, _ = next(prepare._loader(B, T, "val", device="cpu"))
    finally:
        prepare._load_part, prepare._require_manifest = original
    return torch.cat([x, y[:, -1:]], dim=1)[0].tolist()


def test_best_fit_prefers_the_longest_fitting_and_the_earliest_on_ties():
    docs = [[0, 1], [0, 2, 2], [0, 3, 3], [0, 4]]  # two of length 3: the first one wins
    assert pack_like_prepare([docs], 1, 4) == spec_packing(itertools.cycle([docs]), 1, 4, 1)[0][0] == [0, 2, 2, 0, 1]


# --- the metric --------------------------------------------------------------------------------


class FixedLogits(torch.nn.Module):
    """Predicts the same distribution at every position: uniform, or a unigram model."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, x, y=None, reduction="mean"):
        logits = self.logits.expand(*x.shape, -1)
        if y is None:
            return logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


def val_targets(module, tokenizer, batch_size):
    steps = module.EVAL_TOKENS // (batch_size * module.MAX_SEQ_LEN)
    return torch.cat([y.reshape(-1) for _, y, _ in make_dataloader_batches_for(module, tokenizer, batch_size, module.MAX_SEQ_LEN, "val", steps)])


def test_uniform_model_scores_ln_v_per_counted_token(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    V = tokenizer.get_vocab_size()
    bpb = prepare_module.evaluate_bpb(FixedLogits(torch.zeros(V)), tokenizer, batch_size=8)
    nbytes = prepare_module.get_token_bytes("cpu")[val_targets(prepare_module, tokenizer, 8)]
    assert bpb == pytest.approx(math.log(V) * int((nbytes > 0).sum()) / (math.log(2) * int(nbytes.sum())), rel=1e-6)


def test_unigram_model_matches_a_computation_by_hand(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    V = tokenizer.get_vocab_size()
    log_probs = torch.log_softmax(torch.linspace(-3, 3, V), dim=0)
    bpb = prepare_module.evaluate_bpb(FixedLogits(log_probs.clone()), tokenizer, batch_size=8)
    token_bytes = prepare_module.get_token_bytes("cpu").tolist()
    nats = total_bytes = 0.0
    for target in val_targets(prepare_module, tokenizer, 8).tolist():
        if token_bytes[target] > 0:
            nats -= log_probs[target].item()
        total_bytes += token_bytes[target]
    assert bpb == pytest.approx(nats / (math.log(2) * total_bytes), rel=1e-5)


class ReportsHalfItsLoss(FixedLogits):
    """Uniform logits, but a loss it computes itself comes out halved: the metric must not ask it."""

    def forward(self, x, y=None, reduction="mean"):
        return super().forward(x) if y is None else 0.5 * super().forward(x, y, reduction)


def test_the_loss_is_computed_by_the_harness_from_the_models_logits(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    V = tokenizer.get_vocab_size()
    honest = prepare_module.evaluate_bpb(FixedLogits(torch.zeros(V)), tokenizer, batch_size=8)
    assert prepare_module.evaluate_bpb(ReportsHalfItsLoss(torch.zeros(V)), tokenizer, batch_size=8) == honest


class PeeksAhead(torch.nn.Module):
    """Predicts each target by looking at the next input token: a perfect score by cheating."""

    def __init__(self, vocab_size):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(50.0))
        self.vocab_size = vocab_size

    def forward(self, x, y=None, reduction="mean"):
        future = torch.roll(x, shifts=-1, dims=1)
        return self.scale * torch.nn.functional.one_hot(future, self.vocab_size).float()


def test_a_model_that_looks_at_future_tokens_is_refused(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    with pytest.raises(prepare_module.NonCausalModelError, match="looks at future tokens"):
        prepare_module.evaluate_bpb(PeeksAhead(tokenizer.get_vocab_size()), tokenizer, batch_size=8)


class PeeksAheadOnOneBatch(PeeksAhead):
    """Causal except on its fifth call: a check of some batches only would pass it."""

    calls = 0

    def forward(self, x, y=None, reduction="mean"):
        self.calls += 1
        return super().forward(x) if self.calls == 5 else 0 * super().forward(x)


class PeeksAheadButNotAtTheMiddle(PeeksAhead):
    """Looks ahead at every position but the one a probe splicing at T/2 would compare last."""

    def forward(self, x, y=None, reduction="mean"):
        logits = super().forward(x)
        logits[:, x.shape[1] // 2 - 1] = 0
        return logits


@pytest.mark.parametrize("model", [PeeksAheadOnOneBatch, PeeksAheadButNotAtTheMiddle])
def test_every_batch_carries_probes_a_model_cannot_predict(prepare_module, model):
    tokenizer = prepare_module.Tokenizer.from_directory()
    with pytest.raises(prepare_module.NonCausalModelError, match="looks at future tokens"):
        prepare_module.evaluate_bpb(model(tokenizer.get_vocab_size()), tokenizer, batch_size=8)


class LearnsWhileEvaluated(FixedLogits):
    """Dynamic evaluation: after each batch, a step towards the tokens it was shown (which hold the targets)."""

    def forward(self, x, y=None, reduction="mean"):
        logits = super().forward(x)
        counts = torch.bincount(x.flatten(), minlength=self.logits.shape[0]).float()
        self.logits.data += counts / counts.sum()
        return logits


def test_a_model_that_changes_while_it_is_evaluated_is_refused(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    with pytest.raises(ValueError, match="changed (between two batches|while it was evaluated)"):
        prepare_module.evaluate_bpb(LearnsWhileEvaluated(torch.zeros(512)), tokenizer, batch_size=8)


def test_eval_batch_larger_than_eval_tokens_is_a_clear_error(prepare_module):
    tokenizer = prepare_module.Tokenizer.from_directory()
    with pytest.raises(ValueError, match="EVAL_TOKENS"):
        prepare_module.evaluate_bpb(FixedLogits(torch.zeros(512)), tokenizer, batch_size=1000)


# --- the manifest ------------------------------------------------------------------------------


def test_module_constants_come_from_the_manifest(prepare_module):
    assert (prepare_module.MAX_SEQ_LEN, prepare_module.VOCAB_SIZE, prepare_module.EVAL_TOKENS, prepare_module.TIME_BUDGET) == (64, 512, 4096, 2)


def test_module_constants_default_to_the_reference_without_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    module = importlib.reload(prepare)
    try:
        assert (module.MAX_SEQ_LEN, module.TIME_BUDGET, module.EVAL_TOKENS, module.VOCAB_SIZE) == (2048, 300, 20971520, 8192)
    finally:
        monkeypatch.undo()
        importlib.reload(prepare)


def test_changing_only_a_constant_rewrites_the_manifest_without_data_work(tmp_path, tiny_corpus):
    cache = tmp_path / "cache"
    run_prepare("--text", str(tiny_corpus), *TINY, cache=cache)
    tokens_before = {p.name: p.stat().st_mtime_ns for p in (cache / "tokens").iterdir()}
    result = run_prepare("--text", str(tiny_corpus), *TINY, "--time-budget", "7", cache=cache)
    assert "Updated the constants" in result.stdout
    assert json.loads((cache / "manifest.json").read_text())["time_budget"] == 7
    assert {p.name: p.stat().st_mtime_ns for p in (cache / "tokens").iterdir()} == tokens_before


def test_small_preset_values_are_recorded(tmp_path, tiny_corpus):
    run_prepare("--text", str(tiny_corpus), "--preset", "small", "--vocab-size", "512", cache=tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {k: manifest[k] for k in prepare.PRESETS["small"]} == {**prepare.PRESETS["small"], "vocab_size": 512}


def test_stdlib_dataset_prepares_with_no_network(tmp_path):
    result = run_prepare("--dataset", "stdlib", "--vocab-size", "300", cache=tmp_path, env_extra={"HF_ENDPOINT": "http://127.0.0.1:9"})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["source"]["dataset"] == "stdlib"
    assert manifest["splits"]["train"]["tokens"] > 1_000_000 and manifest["splits"]["val"]["tokens"] > 10_000, result.stdout


# --- bad input ---------------------------------------------------------------------------------


def test_no_cache_says_which_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    module = importlib.reload(prepare)
    try:
        with pytest.raises(module.NotPreparedError, match="uv run prepare.py"):
            module.Tokenizer.from_directory()
        with pytest.raises(module.NotPreparedError, match="--dataset stdlib"):
            module.make_dataloader(None, 1, 8, "train")
    finally:
        monkeypatch.undo()
        importlib.reload(prepare)


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no .parquet/.txt/.md/.jsonl files"),
    (lambda d: (d / "a.txt").write_text(""), "corpus is empty"),
    (lambda d: write_parquet(d / "a.parquet", ["x"], column="body"), "a.parquet has no 'text' column"),
    (lambda d: (d / "a.jsonl").write_text('{"body": "x"}\n'), "a.jsonl:1: expected a JSON object with a 'text' field"),
    (lambda d: (d / "a.txt").write_bytes(b"\xff\xfe bad"), "a.txt: not UTF-8"),
    (lambda d: (d / "a.jsonl").write_bytes(b'{"text": "x"}\n{"text": "\xff"}\n'), "a.jsonl:2: not UTF-8"),
], ids=["empty-folder", "empty-corpus", "no-text-column", "jsonl-without-text", "not-utf8", "jsonl-not-utf8"])
def test_bad_corpus_is_a_clear_error_naming_the_file(tmp_path, setup, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    setup(corpus)
    result = run_prepare("--text", str(corpus), *TINY, cache=tmp_path / "cache", check=False)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_a_single_text_file_is_one_document_and_the_error_names_the_fix(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text("\n".join(make_documents(200, max_words=12)), encoding="utf-8")
    result = run_prepare("--text", str(book), *TINY, cache=tmp_path / "cache", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--text {book}: 1 document" in result.stderr
    assert "one document per .txt file: give a folder of files, a .jsonl, or --split-lines" in result.stderr


def test_split_lines_makes_each_non_empty_line_a_document(tmp_path):
    lines = make_documents(400, max_words=8)
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    run_prepare("--text", str(book), "--split-lines", *TINY, cache=tmp_path / "cache")
    splits = json.loads((tmp_path / "cache" / "manifest.json").read_text())["splits"]
    assert sum(splits[split]["documents"] for split in prepare.SPLITS) == len(lines)
    assert splits["val"]["documents"] == sum(data_sources._split_of(line) == "val" for line in lines) > 0


def test_split_lines_without_a_text_corpus_is_refused(tmp_path):
    result = run_prepare("--dataset", "stdlib", "--split-lines", cache=tmp_path, check=False)
    assert result.returncode == 2 and "--split-lines applies to --text" in result.stderr


def test_a_corpus_too_small_for_the_vocabulary_says_how_much_text_it_has(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_documents(100, max_words=10)))
    result = run_prepare("--text", str(corpus), *TINY, "--vocab-size", "5000", cache=tmp_path / "cache", check=False)
    assert result.returncode == 1
    assert "not --vocab-size 5000" in result.stderr and "training documents" in result.stderr


@pytest.fixture(scope="module")
def prepared_cache(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(make_documents(200)):
        (corpus / f"{i}.txt").write_text(text, encoding="utf-8")
    cache = tmp_path_factory.mktemp("prepared")
    run_prepare("--text", str(corpus), *TINY, cache=cache)
    return corpus, cache


@pytest.mark.parametrize("bad_input, message", [
    (lambda d: [str(d / "empty.txt")], "corpus is empty"),
    (lambda d: [str(d / "book.txt")], "--split-lines"),
    (lambda d: [str(d / "bad.jsonl")], "bad.jsonl:3"),
    (lambda d: [str(d / "few.jsonl"), "--vocab-size", "5000"], "not --vocab-size 5000"),
], ids=["empty-file", "single-file", "bad-jsonl-line", "vocab-too-large"])
def test_a_failed_prepare_leaves_the_previous_cache_usable(tmp_path, prepared_cache, bad_input, message):
    corpus, prepared = prepared_cache
    cache = tmp_path / "cache"
    shutil.copytree(prepared, cache)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "book.txt").write_text("\n".join(make_documents(50)))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n[1, 2]\n')
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in make_documents(60, max_words=9)))
    result = run_prepare(*TINY, "--text", *bad_input(tmp_path), cache=cache, check=False)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    assert prepare_data._file_sha256(cache / "tokenizer" / "tokenizer.json") == manifest["tokenizer_sha256"]
    assert "nothing to do" in run_prepare("--text", str(corpus), *TINY, cache=cache).stdout


def test_cache_from_an_older_prepare_asks_to_run_it_again(tmp_path, monkeypatch):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, **prepare.PRESETS["small"]}))
    monkeypatch.setenv("AUTORESEARCH_CACHE", str(tmp_path))
    module = importlib.reload(prepare)
    try:
        with pytest.raises(module.NotPreparedError, match="older prepare.py"):
            module.make_dataloader(None, 1, 8, "train")
    finally:
        monkeypatch.undo()
        importlib.reload(prepare)


def test_missing_text_path_is_a_clear_error(tmp_path):
    result = run_prepare("--text", str(tmp_path / "nowhere"), cache=tmp_path / "cache", check=False)
    assert result.returncode == 1 and "no such file or folder" in result.stderr


def test_bad_vocab_size_is_refused_before_any_work(tmp_path):
    result = run_prepare("--dataset", "stdlib", "--vocab-size", "100", cache=tmp_path, check=False)
    assert result.returncode == 2 and "--vocab-size 100" in result.stderr
    assert not tmp_path.joinpath("tokenizer").exists()


def test_interrupted_write_leaves_neither_file_nor_temp(tmp_path):
    def write(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare._atomic_write(tmp_path / "part.bin", write)
    assert list(tmp_path.iterdir()) == []


def test_stale_part_from_another_tokenizer_is_rebuilt(tmp_path, tiny_corpus):
    cache = tmp_path / "cache"
    run_prepare("--text", str(tiny_corpus), *TINY, cache=cache)
    run_prepare("--text", str(tiny_corpus), *TINY[:0], "--vocab-size", "600", "--max-seq-len", "64", cache=cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    with np.load(cache / "tokens" / "text-train.npz") as index:
        assert str(index["tokenizer_sha256"]) == manifest["tokenizer_sha256"]
    assert manifest["vocab_size"] == 600
