"""Stand-in for train.py that scores a tiny bigram model with the real prepare.evaluate_bpb.

PEEK = True makes the model read the next token (the leak a wrong attention mask causes):
evaluate_bpb must refuse to score it, and the driver must call the experiment invalid.
"""
import torch
import torch.nn.functional as F

from prepare import Tokenizer, evaluate_bpb

PEEK = False


class Bigram(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.table = torch.nn.Embedding(vocab_size, vocab_size)

    def forward(self, x, y, reduction="mean"):
        seen = torch.roll(x, -1, dims=1) if PEEK else x  # position t reads token t+1
        logits = self.table(seen)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction=reduction)


torch.manual_seed(0)
tokenizer = Tokenizer.from_directory()
model = Bigram(tokenizer.get_vocab_size())
val_bpb = evaluate_bpb(model, tokenizer, 8)
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print("training_seconds: 0.0")
print("peak_vram_mb:     0.0")
