"""
How far the reference's token_bytes moves val_bpb on a prepared cache. Prints numbers; not a test.

    export AUTORESEARCH_CACHE=/tmp/tb-web
    uv run prepare.py --text /tmp/webtext --vocab-size 8192 --max-seq-len 2048 --eval-tokens N
    uv run dev/measure_token_bytes.py              # --split train: as many training targets instead

prepare.py counts each token's raw bytes. The reference decoded each token alone to a str
(errors="replace") and re-encoded it as UTF-8, so in a token that is not valid UTF-8 on its own each
maximal invalid subsequence counts as one U+FFFD, 3 bytes. Over exactly the targets evaluate_bpb
scores (the val stream, EVAL_TOKENS // (B * MAX_SEQ_LEN) batches of B rows; the rows do not depend on
B), this prints both byte totals and their ratio. val_bpb divides by the bytes, so
val_bpb_ref = val_bpb_ours * ours / ref. A val split of fewer documents than the packer's buffer is
scored unevenly (the longest documents, over and over): a larger EVAL_TOKENS, or the train split,
then gives the corpus's own factor.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from prepare import (  # noqa: E402
    CACHE_DIR, EVAL_TOKENS, MANIFEST, MAX_SEQ_LEN, Tokenizer, get_token_bytes, make_dataloader,
)


# ---------------------------------------------------------------------------
# Per-token byte lengths, ours and the reference's


def vocabulary(tokenizer):
    """(ours, ref, invalid): byte lengths by id and a mask of the tokens that are not valid UTF-8 alone."""
    enc = tokenizer.encoding
    specials = {enc.encode_single_token(name) for name in enc.special_tokens_set}
    ours = get_token_bytes().numpy()
    ref = np.array([0 if i in specials else len(enc.decode([i]).encode("utf-8")) for i in range(enc.n_vocab)])
    invalid = np.zeros(enc.n_vocab, dtype=bool)
    for i in range(enc.n_vocab):
        if i not in specials:
            try:
                enc.decode_single_token_bytes(i).decode("utf-8")
            except UnicodeDecodeError:
                invalid[i] = True
    assert (ours[~invalid] == ref[~invalid]).all(), "valid tokens must count the same both ways"
    return ours, ref, invalid


# ---------------------------------------------------------------------------
# The scored targets: what evaluate_bpb sees


def target_counts(tokenizer, B, split):
    """How often each token id is a target in the batches evaluate_bpb scores."""
    steps = EVAL_TOKENS // (B * MAX_SEQ_LEN)
    if steps < 1:
        sys.exit(f"batch size {B} x MAX_SEQ_LEN {MAX_SEQ_LEN} exceeds EVAL_TOKENS {EVAL_TOKENS}")
    counts = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    loader = make_dataloader(tokenizer, B, MAX_SEQ_LEN, split, device="cpu")
    for _ in range(steps):
        _, y, _ = next(loader)
        counts += np.bincount(y.reshape(-1).numpy(), minlength=len(counts))
    return counts, steps


# ---------------------------------------------------------------------------
# Report


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16, help="B of evaluate_bpb (default 16)")
    parser.add_argument("--split", choices=["val", "train"], default="val",
                        help="val: the scored targets; train: as many training targets (a larger sample of the corpus)")
    args = parser.parse_args()
    tokenizer = Tokenizer.from_directory()
    ours, ref, invalid = vocabulary(tokenizer)
    counts, steps = target_counts(tokenizer, args.batch_size, args.split)
    n, hit = counts.sum(), counts[invalid].sum()
    ours_bytes, ref_bytes = int(counts @ ours), int(counts @ ref)
    factor = ref_bytes / ours_bytes

    print(f"cache: {CACHE_DIR} ({MANIFEST['source']['dataset']}), vocabulary {len(ours)}, MAX_SEQ_LEN {MAX_SEQ_LEN}")
    print(f"vocabulary: {invalid.sum()} tokens are not valid UTF-8 on their own "
          f"({ours[invalid].sum()} raw bytes, {ref[invalid].sum()} by the reference's count)")
    split = MANIFEST["splits"][args.split]
    print(f"{args.split} targets scored: {n:,} ({steps} batches of {args.batch_size} x {MAX_SEQ_LEN}, "
          f"EVAL_TOKENS {EVAL_TOKENS:,}; the split holds {split['tokens']:,} tokens in "
          f"{split['documents']:,} documents)")
    print(f"  affected (not valid UTF-8 alone): {hit:,} ({hit / n:.4%})")
    print(f"  bytes, ours (raw):                {ours_bytes:,}")
    print(f"  bytes, reference (U+FFFD):        {ref_bytes:,}")
    print(f"  factor ref/ours:                  {factor:.6f}  "
          f"(the reference's val_bpb reads {1 - 1 / factor:.4%} lower)")


if __name__ == "__main__":
    main()
