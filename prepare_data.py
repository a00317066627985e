"""
Data preparation for autoresearch: what `uv run prepare.py` does once, before training. prepare.py is the fixed
runtime harness that train.py imports; its command line hands over to this module, which nothing imports at run
time (nor does the research agent see it). Everything lands in $AUTORESEARCH_CACHE (default ~/.cache/autoresearch):

    uv run prepare.py                                  # climbmix: 10 training shards + the val shard
    uv run prepare.py --num-shards 2                   # fewer shards (-1: all 6541)
    uv run prepare.py --dataset tinystories --preset small
    uv run prepare.py --dataset stdlib --preset small  # no network: Python's own sources
    uv run prepare.py --text ./my_corpus/ --text notes.jsonl

It fetches the documents (data_sources.py), trains a BPE tokenizer (rustbpe, wrapped as a tiktoken Encoding), and pre-tokenizes every
document so that training never waits for data. Three splits: train, val (what evaluate_bpb scores), and holdout,
which nothing trains on and only the driver asks evaluate_bpb to score. The constants actually used (sequence
length, time budget, eval tokens, vocabulary size) are written to the cache's manifest, which prepare.py reads.
"""

import argparse
import base64
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import rustbpe

from data_sources import PrepareError, _progress, download_all, resolve_source, survey_corpus
from prepare import (CACHE_DIR, MANIFEST_FORMAT, MANIFEST_PATH, PRESETS, SPECIAL_TOKENS, SPLITS, TOKEN_BYTES_PATH,
                     TOKENIZER_DIR, TOKENIZER_PATH, TOKENS_DIR, Tokenizer, _atomic_write, _encoding_from_spec,
                     _part_is_current, _part_paths, _read_manifest, _token_dtype)

# ---------------------------------------------------------------------------
# Constants of the tokenizer

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
TOKENIZER_DOC_CHARS = 10_000             # each document cut to this for tokenizer training
TOKENIZER_MAX_CHARS = 1_000_000_000      # tokenizer training stops after this many characters


# ---------------------------------------------------------------------------
# Tokenizer training (prepare.py reads it back as a tiktoken Encoding)


def train_tokenizer(train_batches, vocab_size, source_key):
    """Train BPE on the training documents only (never val). Returns the spec (merges, pattern, specials)
    that save_tokenizer stores as JSON: nothing is written here, so a failure leaves the cache as it was."""
    update = _progress("tokenizer: characters read")
    chars = documents = 0

    def texts():
        nonlocal chars, documents
        for batch in train_batches:
            for doc in batch:
                doc = doc[:TOKENIZER_DOC_CHARS]
                yield doc
                chars += len(doc)
                documents += 1
                update(f"{chars / 1e6:.1f}M")
                if chars >= TOKENIZER_MAX_CHARS:
                    return

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts(), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    update(f"{chars / 1e6:.1f}M", final=True)
    if chars == 0:
        raise PrepareError("the training corpus is empty: no non-empty documents to train a tokenizer on")
    ranks = sorted(bpe.get_mergeable_ranks(), key=lambda pair: pair[1])
    assert [rank for _, rank in ranks] == list(range(len(ranks))), "rustbpe returned non-contiguous ranks"
    if len(ranks) != vocab_size - len(SPECIAL_TOKENS):
        raise PrepareError(
            f"the corpus supports only {len(ranks) + len(SPECIAL_TOKENS)} tokens, not --vocab-size {vocab_size}: the "
            f"tokenizer learned from {documents:,} training documents, {chars:,} characters (at most "
            f"{TOKENIZER_DOC_CHARS:,} of each document); give a smaller --vocab-size or more text")
    spec = {
        "pattern": SPLIT_PATTERN,
        "mergeable_ranks": [base64.b64encode(token).decode("ascii") for token, _ in ranks],
        "special_tokens": SPECIAL_TOKENS,
        "source": source_key,
        "vocab_size": vocab_size,
    }
    encoding = _encoding_from_spec(spec)
    sample = "Hello world! 123 4567 naïve café — Привет, мир! 你好，世界。 こんにちは 🤖🚀\n\tdef f(x): return x**2\n"
    assert encoding.decode(encoding.encode_ordinary(sample)) == sample, "tokenizer round trip failed"
    return spec


def save_tokenizer(spec):
    encoding = _encoding_from_spec(spec)
    _atomic_write(TOKEN_BYTES_PATH, lambda f: np.save(f, token_byte_lengths(encoding)))
    _atomic_write(TOKENIZER_PATH, lambda f: f.write(json.dumps(spec).encode()))
    print(f"tokenizer: {encoding.n_vocab} tokens saved to {TOKENIZER_PATH}", flush=True)


def token_byte_lengths(encoding):
    """Each token's raw byte length, 0 for specials. (The reference decoded each token to str and re-encoded
    it: a token that is not valid UTF-8 on its own counted 3 bytes, one U+FFFD, per maximal invalid sequence.)"""
    special_ids = {encoding.encode_single_token(name) for name in encoding.special_tokens_set}
    lengths = [0 if i in special_ids else len(encoding.decode_single_token_bytes(i)) for i in range(encoding.n_vocab)]
    return np.array(lengths, dtype=np.int32)


def _file_sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------
# Pre-tokenization: each part is <name>.bin (token ids, BOS before every document) + <name>.npz
# (document offsets into the tokens, and where each DOC_BATCH batch of documents starts)


def _split_long(ids, bos, split_tokens):
    """[BOS, t1, t2, ...] as pieces [BOS, ...] of at most split_tokens tokens after the BOS."""
    body = ids[1:]
    return [[bos] + body[i : i + split_tokens] for i in range(0, max(len(body), 1), split_tokens)]


def tokenize_part(name, batches, tokenizer, tokenizer_sha, split_tokens=0):
    """Tokenize a stream of document batches into one part; the index is written last, as the commit.

    split_tokens > 0 cuts longer documents into BOS-led pieces, so that a whole row of the packer can
    hold each piece: otherwise everything of a long document past its first row would be cropped
    away (the reference does that; it matters for source files and books, not for web pages)."""
    bin_path, index_path = _part_paths(name)
    dtype = _token_dtype(tokenizer.get_vocab_size())
    bos = tokenizer.get_bos_token_id()
    doc_lengths, batch_sizes = [], []
    update = _progress(f"tokens: {name}")
    n_tokens = 0

    def write_tokens(f):
        nonlocal n_tokens
        for batch in batches:
            token_lists = tokenizer.encode(batch, prepend=bos)
            if split_tokens:
                token_lists = [piece for ids in token_lists for piece in _split_long(ids, bos, split_tokens)]
            lengths = [len(ids) for ids in token_lists]
            f.write(np.fromiter(itertools.chain.from_iterable(token_lists), dtype=dtype, count=sum(lengths)).tobytes())
            doc_lengths.extend(lengths)
            batch_sizes.append(len(lengths))
            n_tokens += sum(lengths)
            update(f"{n_tokens / 1e6:.1f}M tokens in {len(doc_lengths)} documents")

    _atomic_write(bin_path, write_tokens)
    update(f"{n_tokens / 1e6:.1f}M tokens in {len(doc_lengths)} documents", final=True)
    index = {
        "doc_offsets": np.concatenate([[0], np.cumsum(doc_lengths, dtype=np.int64)]),
        "batch_offsets": np.concatenate([[0], np.cumsum(batch_sizes, dtype=np.int64)]),
        "tokenizer_sha256": np.array(tokenizer_sha),
        "split_tokens": np.array(split_tokens),
    }
    _atomic_write(index_path, lambda f: np.savez(f, **index))
    return n_tokens, len(doc_lengths)


# ---------------------------------------------------------------------------
# The command line


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Download data, train the tokenizer and pre-tokenize, once, into $AUTORESEARCH_CACHE "
        f"(now {CACHE_DIR}). Re-running with the same options does nothing.",
        epilog="Presets: " + "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in p.items()) for n, p in PRESETS.items())
        + ". Hub downloads honour HF_ENDPOINT (a mirror).",
    )
    source = parser.add_argument_group("what to prepare (default: climbmix)")
    source.add_argument("--dataset", choices=["climbmix", "tinystories", "stdlib"],
                        help="climbmix: the reference's web corpus; tinystories: one small file of stories; "
                        "stdlib: this Python's standard-library sources, no network needed")
    source.add_argument("--text", action="append", metavar="PATH",
                        help="your own corpus instead (repeatable): a file or folder of .parquet (a 'text' "
                        "column), .txt/.md (one document per file), .jsonl (a 'text' field per line)")
    source.add_argument("--split-lines", action="store_true",
                        help="with --text: each non-empty line of a .txt/.md file is a document")
    source.add_argument("--num-shards", type=int, default=10,
                        help="climbmix training shards to fetch (-1: all); the holdout and val shards come too "
                        "(default 10)")
    source.add_argument("--download-workers", type=_positive_int, default=8, help="parallel downloads (default 8)")
    source.add_argument("--download-attempts", type=_positive_int, default=5,
                        help="tries per file, with 2^n s backoff (default 5)")
    consts = parser.add_argument_group("constants train.py reads (default: the preset's)")
    consts.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="default: the reference's H100 values; small: a laptop or CPU")
    consts.add_argument("--max-seq-len", type=_positive_int, help="context length")
    consts.add_argument("--time-budget", type=_positive_int, help="training seconds")
    consts.add_argument("--eval-tokens", type=_positive_int, help="validation tokens evaluate_bpb scores")
    consts.add_argument("--vocab-size", type=_positive_int, help="tokenizer size, including 4 special tokens")
    args = parser.parse_args(argv)
    if args.text and args.dataset:
        parser.error("--text and --dataset are alternatives: give one")
    if args.split_lines and not args.text:
        parser.error("--split-lines applies to --text corpora only")
    if args.vocab_size is not None and not 256 + len(SPECIAL_TOKENS) <= args.vocab_size <= 2**32:
        parser.error(f"--vocab-size {args.vocab_size}: must be at least {256 + len(SPECIAL_TOKENS)} (all bytes + specials)")
    return args


def prepare(args):
    constants = dict(PRESETS[args.preset])
    for name in constants:
        if getattr(args, name) is not None:
            constants[name] = getattr(args, name)
    source_key, downloads, parts = resolve_source(args)
    # climbmix stays exactly the reference's stream; other corpora have documents far longer than a row
    split_tokens = 0 if source_key["dataset"] == "climbmix" else constants["max_seq_len"]
    old = _read_manifest()
    if old and old.get("format") == MANIFEST_FORMAT and old["source"] == source_key and old["vocab_size"] == constants["vocab_size"] \
            and all(_part_is_current(name, old["tokenizer_sha256"], split_tokens) for name, _, _ in parts):
        if all(old[k] == v for k, v in constants.items()):
            print(f"Already prepared in {CACHE_DIR}: nothing to do.")
            return old
        manifest = {**old, **constants}  # only the constants changed: no data work
        _atomic_write(MANIFEST_PATH, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
        print(f"Updated the constants in {MANIFEST_PATH}: " + ", ".join(f"{k}={v}" for k, v in constants.items()))
        return manifest

    # Everything that can fail on the input (a bad file, too few documents, a vocabulary the text cannot
    # fill, a download) happens before the old cache is touched: a failed prepare leaves it usable.
    if source_key["dataset"] == "text":
        survey_corpus([Path(p) for p in source_key["paths"]], args.split_lines, args.text)
    download_all(downloads, args.download_workers, args.download_attempts)
    spec = json.loads(TOKENIZER_PATH.read_text()) if TOKENIZER_PATH.exists() else None
    if spec and spec.get("source") == source_key and spec.get("vocab_size") == constants["vocab_size"] \
            and TOKEN_BYTES_PATH.exists():
        print(f"tokenizer: reusing {TOKENIZER_PATH}")
        spec = None
    else:
        # unnamed: the documents' generator, and a shuffle's files on disk, end with the tokenizer's training
        spec = train_tokenizer(itertools.chain.from_iterable(make() for _, split, make in parts if split == "train"),
                               constants["vocab_size"], source_key)

    MANIFEST_PATH.unlink(missing_ok=True)  # from here until the end, the cache is not trusted
    if spec:
        save_tokenizer(spec)
    tokenizer = Tokenizer.from_directory(TOKENIZER_DIR)
    tokenizer_sha = _file_sha256(TOKENIZER_PATH)

    splits = {split: {"parts": [], "tokens": 0, "documents": 0} for split in SPLITS}
    for name, split, make in parts:
        if _part_is_current(name, tokenizer_sha, split_tokens):
            with np.load(_part_paths(name)[1], allow_pickle=False) as index:
                n_tokens, n_docs = int(index["doc_offsets"][-1]), len(index["doc_offsets"]) - 1
        else:
            n_tokens, n_docs = tokenize_part(name, make(), tokenizer, tokenizer_sha, split_tokens)
        splits[split]["parts"].append(name)
        splits[split]["tokens"] += n_tokens
        splits[split]["documents"] += n_docs
    for split, info in splits.items():
        if info["tokens"] == 0 and split != "holdout":
            raise PrepareError(f"the {split} split is empty: the corpus needs more (non-empty) documents")
    if splits["holdout"]["tokens"] < constants["eval_tokens"]:
        print(f"warning: the holdout split has {splits['holdout']['tokens']:,} tokens, fewer than EVAL_TOKENS "
              f"({constants['eval_tokens']:,}): a holdout score would repeat its documents "
              "(a bigger corpus gives a better one)", file=sys.stderr)
    keep = {p.name for name in (n for n, _, _ in parts) for p in _part_paths(name)}
    for stale in TOKENS_DIR.iterdir():
        if stale.name not in keep:
            stale.unlink()

    manifest = {"format": MANIFEST_FORMAT, "source": source_key, **constants, "tokenizer_sha256": tokenizer_sha,
                "split_tokens": split_tokens,
                "splits": splits, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _atomic_write(MANIFEST_PATH, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    print(f"Prepared {CACHE_DIR}: " + ", ".join(f"{split} {info['tokens']:,} tokens in {info['documents']:,} documents"
                                                 for split, info in splits.items()) + "; "
          + ", ".join(f"{k}={v}" for k, v in constants.items()))
    print("Next: uv run train.py")
    return manifest


def main(argv=None):
    args = parse_args(argv)
    try:
        prepare(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nInterrupted. Nothing half-written is kept; run the same command again to continue.", file=sys.stderr)
        sys.exit(130)
