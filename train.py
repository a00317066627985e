"""
autoresearch: the one file the research agent edits.

A GPT (rotary attention with sliding windows, value embeddings, squared-ReLU MLP,
soft-capped logits), the Muon+AdamW optimizer, and a training loop that runs for a
fixed wall-clock budget (TIME_BUDGET, from prepare.py) and then reports val_bpb.
It reproduces the reference single-H100 setup on CUDA and also runs on Apple MPS and
the CPU, with smaller defaults there.

Run:  uv run train.py            (after `uv run prepare.py` has prepared the cache)
      uv run train.py > run.log 2>&1 && grep "^val_bpb:" run.log

Hyperparameters are the ALL-CAPS constants below: edit them directly, there are no
CLI flags.
"""

import os

# before torch loads, as the reference: fewer out-of-memory errors from a fragmented CUDA cache
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # no download bars from the kernel hub in run.log

import gc
import math
import platform
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, NON_DEFAULT_CONSTANTS, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb

# -----------------------------------------------------------------------------
# Hyperparameters: the reference's single-H100 values (edit directly, no CLI flags)

# Model architecture
DEPTH = 8               # number of transformer layers; the width follows from it
ASPECT_RATIO = 64       # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128          # channels per attention head
WINDOW_PATTERN = "SSSL" # per-layer attention window, repeated: L = full context, S = half

# Optimization
TOTAL_BATCH_SIZE = 2**19   # tokens per optimizer step (gradient accumulation fills it)
DEVICE_BATCH_SIZE = 128    # rows per forward/backward pass (lower it if memory runs out)
EMBEDDING_LR = 0.6         # AdamW lr of the token and value embeddings
UNEMBEDDING_LR = 0.004     # AdamW lr of lm_head
MATRIX_LR = 0.04           # Muon lr of the 2-D block matrices
SCALAR_LR = 0.5            # AdamW lr of the per-layer x0 mixing scalars (x0.01 for the residual ones)
WEIGHT_DECAY = 0.2         # Muon cautious weight decay, decays linearly to 0 with progress
ADAM_BETAS = (0.8, 0.95)   # AdamW betas (the x0 scalars use (0.96, 0.95))
WARMUP_RATIO = 0.0         # fraction of the time budget spent ramping the lr up
WARMDOWN_RATIO = 0.5       # fraction of the time budget spent ramping the lr down
FINAL_LR_FRAC = 0.0        # lr multiplier at the end of the warmdown
UNCOUNTED_STEPS = 10       # steps 0..UNCOUNTED_STEPS (compilation, warm-up) are not timed in TIME_BUDGET
SEED = 42

# -----------------------------------------------------------------------------
# Small-compute defaults. The values above are sized for an H100 and used unchanged on
# CUDA. On Apple MPS or the CPU one such step would take minutes, so this block replaces
# them (delete it to run the reference values anyway). Sized on a 2-core CPU with the
# small preset (MAX_SEQ_LEN 256, vocab 4096): ~6k tokens/s, so its 30 s budget trains on
# ~0.18M tokens in ~45 optimizer steps of 4k tokens with this 4-layer, 128-wide model
# (a 256-wide or 6-layer one is 2-3x slower per token). The batch is derived from
# MAX_SEQ_LEN so that TOTAL_BATCH_SIZE always divides and any prepared cache works.

DEVICE_TYPE = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
if DEVICE_TYPE != "cuda":
    DEPTH = 4                # width 4 * 32 = 128, 2 heads of 64
    ASPECT_RATIO = 32
    HEAD_DIM = 64
    WINDOW_PATTERN = "L"     # a window saves no compute with a masked SDPA, so all layers are full
    DEVICE_BATCH_SIZE = 16
    TOTAL_BATCH_SIZE = DEVICE_BATCH_SIZE * MAX_SEQ_LEN   # one micro-step per optimizer step
    UNCOUNTED_STEPS = 0      # nothing is compiled: only step 0's warm-up is left out of the budget

# -----------------------------------------------------------------------------
# Device, precision and attention kernel

# bf16 autocast where the hardware has it, plain fp32 elsewhere (no fp16: it would need loss scaling)
def detect_compute_dtype(device_type):
    if device_type == "cuda":
        # without emulation: pre-Ampere GPUs (V100, T4) emulate bf16 slowly
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float32
    if device_type == "mps":
        try:  # bf16 on MPS depends on the macOS version: probe it
            with torch.autocast("mps", dtype=torch.bfloat16):
                y = torch.ones(8, 8, device="mps") @ torch.ones(8, 8, device="mps")
            return torch.bfloat16 if y.dtype == torch.bfloat16 else torch.float32
        except Exception:
            return torch.float32
    return torch.float32  # bf16 matmuls on most CPUs are slower than fp32


COMPUTE_DTYPE = detect_compute_dtype(DEVICE_TYPE)
# torch.compile is reliable on CUDA (Linux); on CPU/MPS/Windows it is slow to start or breaks.
USE_COMPILE = DEVICE_TYPE == "cuda" and platform.system() != "Windows"
FA3 = None  # Flash Attention 3 module, set in main() when it loads and passes its smoke test


def load_flash_attention_3():
    """Flash Attention 3 from the HF kernel hub, as the reference: (module, repo) or (None, why)."""
    if DEVICE_TYPE != "cuda" or COMPUTE_DTYPE != torch.bfloat16:
        return None, "needs a CUDA GPU with bf16"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        return None, f"GPU compute capability {capability} is too old"
    # varunneal's build is for Hopper (9.0) only; the kernels-community one covers other GPUs
    repo = "varunneal/flash-attention-3" if capability == (9, 0) else "kernels-community/flash-attn3"
    try:
        from kernels import get_kernel
        return get_kernel(repo).flash_attn_interface, repo
    except Exception as e:  # `kernels` not installed, offline, no build for this GPU and torch
        return None, f"{repo} failed to load: {type(e).__name__}: {str(e)[:200]}"


def smoke_test_flash_attention_3(fa3, repo):
    """Run the kernel once so that a build failing on this GPU falls back: (fa3, repo) or (None,
    why). Called after init, on fixed inputs: it must not shift the RNG that draws the weights."""
    try:
        q = torch.linspace(-1, 1, 256 * 64, device="cuda").view(1, 256, 1, 64).bfloat16()
        fa3.flash_attn_func(q, q, q, causal=True, window_size=(128, 0))
        torch.cuda.synchronize()
        return fa3, repo
    except Exception as e:
        return None, f"{repo} failed its smoke test: {type(e).__name__}: {str(e)[:200]}"


def sliding_window_mask(T, window, device, block_mask):
    """Causal attention to the last `window` positions: key j is visible from query i iff
    i - window <= j <= i (Flash Attention's window_size=(window, 0)). With block_mask (CUDA
    with torch.compile): a FlexAttention BlockMask, which skips the fully masked blocks.
    Otherwise a boolean [T, T] mask for SDPA (FlexAttention has no CPU backward and is slow
    uncompiled)."""
    if block_mask:
        from torch.nn.attention.flex_attention import create_block_mask

        def in_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
        return create_block_mask(in_window, None, None, T, T, device=device)
    i = torch.arange(T, device=device)
    distance = i[:, None] - i[None, :]
    return (distance >= 0) & (distance <= window)


# Masks are built eagerly, outside the compiled graph: one graph break at the top of forward.
eager = torch.compiler.disable if USE_COMPILE else (lambda fn: fn)
_MASKS = {}


@eager
def window_masks(window_sizes, T, device):
    """Per layer: None where attention is full causal (or done by Flash Attention 3),
    else its cached sliding_window_mask()."""
    masks = []
    for window in window_sizes:
        if FA3 is not None or window >= T - 1:
            masks.append(None)
            continue
        key = (T, window, str(device))
        if key not in _MASKS:
            _MASKS[key] = sliding_window_mask(T, window, device, device.type == "cuda" and USE_COMPILE)
        masks.append(_MASKS[key])
    return masks


def causal_attention(q, k, v, window, mask=None):
    """q, k, v: [B, T, heads, head_dim] -> [B, T, heads, head_dim]. `mask` is the layer's
    entry of window_masks(): None for full causal attention."""
    if FA3 is not None:
        y = FA3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    if mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif isinstance(mask, torch.Tensor):
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    else:
        from torch.nn.attention.flex_attention import flex_attention
        y = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def describe_attention(window_sizes, T):
    if FA3 is not None:
        return "Flash Attention 3 (kernels hub), all layers"
    full = "SDPA causal (full-context layers)"
    if all(w >= T for w in window_sizes):
        return full
    if DEVICE_TYPE == "cuda" and USE_COMPILE:
        return full + " + FlexAttention sliding-window block mask (S layers)"
    return full + " + SDPA with a cached boolean window mask (S layers)"


# bf16 dense tensor-core peak FLOP/s (fp32 accumulate), matched in order against the GPU name
GPU_PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12), ("H800", 989.5e12),
    ("H200", 989.5e12), ("GH200", 989.5e12), ("B200", 2250e12), ("A100", 312e12),
    ("A800", 312e12), ("A30", 165e12), ("A10", 125e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("RTX A6000", 154.8e12), ("RTX 5090", 209.5e12), ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12), ("MI300X", 1307.4e12), ("MI250X", 383e12),
]


def detect_peak_flops():
    """(peak bf16 FLOP/s or 0, description). MFU is 0 rather than wrong when unknown."""
    if DEVICE_TYPE != "cuda":
        return 0.0, f"no bf16 peak for {DEVICE_TYPE}: MFU reported as 0"
    name = torch.cuda.get_device_name()
    if COMPUTE_DTYPE != torch.bfloat16:
        return 0.0, f"{name} has no bf16: MFU reported as 0"
    for key, flops in GPU_PEAK_FLOPS:
        if re.search(rf"\b{key}\b", name):
            return flops, f"{name}, bf16 peak {flops / 1e12:.1f} TFLOP/s"
    return 0.0, f"unknown peak for GPU '{name}': MFU reported as 0"


# -----------------------------------------------------------------------------
# Model

@dataclass
class GPTConfig:
    sequence_len: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    window_pattern: str = "SSSL"


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # RMS norm without a learned weight


def has_value_embedding(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2  # alternating layers, always including the last


def apply_rotary(x, cos, sin):
    """Rotate the two halves of each head against each other. x: [B, T, heads, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.gate_channels = min(32, config.n_embd)
        self.ve_gate = (nn.Linear(self.gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, window, mask):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding through a per-head gate in (0, 2), 1 at init
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        y = causal_attention(q, k, v, window, mask)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, mask):
        x = x + self.attn(norm(x), ve, cos, sin, window, mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        n_layer, head_dim = config.n_layer, config.n_embd // config.n_head
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(n_layer)])
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(n_layer))
        self.x0_lambdas = nn.Parameter(torch.full((n_layer,), 0.1))
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(n_layer) if has_value_embedding(i, n_layer)})
        self.window_sizes = self.compute_window_sizes(config)
        # rotary tables, computed by init_weights(): construction is on the meta device
        rotary_shape = (1, config.sequence_len, 1, head_dim // 2)
        self.register_buffer("cos", torch.empty(rotary_shape), persistent=False)
        self.register_buffer("sin", torch.empty(rotary_shape), persistent=False)

    @staticmethod
    def compute_window_sizes(config):
        """Window per layer from the repeated pattern: L = full context, S = half; the last
        layer is always L."""
        long, short = config.sequence_len, config.sequence_len // 2
        pattern = config.window_pattern.upper()
        assert pattern and set(pattern) <= {"S", "L"}, f"bad WINDOW_PATTERN {pattern!r}"
        sizes = [long if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
        sizes[-1] = long
        return sizes

    @torch.no_grad()
    def init_weights(self):
        """Draw every parameter in the reference's order, so a seed gives its initial weights."""
        n_embd = self.config.n_embd
        bound = 3**0.5 * n_embd**-0.5  # uniform with the std of normal(0, 1/sqrt(dim))
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # every block starts as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate = 2 * sigmoid(0) = 1
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        if COMPUTE_DTYPE == torch.bfloat16:  # the embedding tables are kept in bf16
            self.wte.to(torch.bfloat16)
            self.value_embeds.to(torch.bfloat16)
        # rotary tables for positions 0..sequence_len-1, base 10,000
        head_dim, device = n_embd // self.config.n_head, self.cos.device
        channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        positions = torch.arange(self.config.sequence_len, dtype=torch.float32, device=device)
        angles = torch.outer(positions, 1.0 / 10000 ** (channels / head_dim))
        self.cos.copy_(angles.cos()[None, :, None, :])
        self.sin.copy_(angles.sin()[None, :, None, :])

    def parameter_counts(self):
        """Parameters by kind, as the reference prints them (every parameter in one kind)."""
        counts = dict(wte=self.wte.weight.numel(),
                      value_embeds=sum(p.numel() for p in self.value_embeds.parameters()),
                      lm_head=self.lm_head.weight.numel(),
                      transformer_matrices=sum(p.numel() for p in self.blocks.parameters()),
                      scalars=self.resid_lambdas.numel() + self.x0_lambdas.numel())
        return counts | {"total": sum(counts.values())}

    def num_flops_per_token(self, T):
        """Forward+backward FLOPs per token: 6 per matmul weight (not the embedding lookups or
        the scalars) plus the attention scores."""
        counts = self.parameter_counts()
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w, T) for w in self.window_sizes)
        return 6 * (counts["lm_head"] + counts["transformer_matrices"]) + attn

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.shape
        assert T <= self.config.sequence_len, f"sequence length {T} > {self.config.sequence_len}"
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        windows = [min(w, T) for w in self.window_sizes]
        masks = window_masks(tuple(windows), T, idx.device)
        x = x0 = norm(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, windows[i], masks[i])
        logits = self.lm_head(norm(x)).float()
        logits = 15 * torch.tanh(logits / 15)  # soft cap
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                               ignore_index=-1, reduction=reduction)


# -----------------------------------------------------------------------------
# Optimizer: Muon (with Polar Express and NorMuon) for the block matrices, AdamW for the rest

# (a, b, c) per iteration of X <- aX + (bA + cA^2)X, A = XX^T: pushes all singular values to ~1
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def polar_express(G, dtype):
    """Approximately orthogonalize each matrix of G ([..., rows, cols])."""
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide form so that A = XX^T is the smaller Gram matrix
        X = X.mT
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, wd):
    """AdamW on one parameter; hyperparameters are 0-D tensors so a compiled step never
    recompiles. mul_/add_ (not lerp_) keep bf16 parameters working with fp32 scalars."""
    p.mul_(1 - lr * wd)
    exp_avg.mul_(beta1).add_((1 - beta1) * grad)
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad.square())
    denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + eps
    p.sub_(lr / (1 - beta1**step) * exp_avg / denom)


def muon_step(params, grads, momentum_buffer, second_moment, momentum, lr, wd, beta2, ortho_dtype):
    """Muon on a stack of same-shaped matrices ([n, rows, cols]), updated in place.
    Orthogonalizes in bf16 (as the reference) where bf16 is used, in fp32 elsewhere."""
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp(momentum_buffer, momentum)  # Nesterov
    g = polar_express(g, ortho_dtype)
    # NorMuon: normalize by an EMA of the mean squared update along the longer dimension
    # (per row of a tall matrix, per column of a wide one), then restore the update's norm
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_moment.lerp_(v_mean, 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = (v_mean * red_size * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * norm_before / norm_after.clamp_min(1e-10)).to(g.dtype)
    # cautious weight decay: decay only where the update and the parameter agree in sign
    decay_mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * decay_mask)


if USE_COMPILE:
    adamw_step = torch.compile(adamw_step, dynamic=False, fullgraph=True)
    muon_step = torch.compile(muon_step, dynamic=False, fullgraph=True)


class MuonAdamW:
    """One optimizer for both kinds of groups: group["kind"] is "adamw" or "muon".
    A plain class: torch.optim.Optimizer would import torch.compile's machinery (seconds
    of start-up, exit-time noise in run.log on CPU) for features this loop never uses."""

    def __init__(self, param_groups):
        self.param_groups = [dict(group, params=list(group["params"])) for group in param_groups]
        self.state = {}  # per parameter
        # 0-D CPU tensors holding the hyperparameters, refilled every step
        names = ["step", "lr", "beta1", "beta2", "eps", "wd", "momentum"]
        self.scalars = {name: torch.tensor(0.0, dtype=torch.float32) for name in names}

    def _fill(self, **values):
        for name, value in values.items():
            self.scalars[name].fill_(value)
        return [self.scalars[name] for name in values]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw(group)
            else:
                self._muon(group)

    def _adamw(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state.setdefault(p, {})
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            state["step"] += 1
            beta1, beta2 = group["betas"]
            adamw_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                       *self._fill(step=state["step"], lr=group["lr"], beta1=beta1, beta2=beta2,
                                   eps=group["eps"], wd=group["weight_decay"]))

    def _muon(self, group):
        params = group["params"]
        rows, cols = params[0].shape
        state = self.state.setdefault(params[0], {})  # the group's stacked buffers live with its first param
        if not state:
            red_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state.update(momentum_buffer=torch.zeros(len(params), rows, cols, device=params[0].device),
                         second_moment=torch.zeros(red_shape, device=params[0].device))
        stacked = torch.stack(params)
        grads = torch.stack([p.grad for p in params]).float()
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5  # tall matrices get a larger step
        muon_step(stacked, grads, state["momentum_buffer"], state["second_moment"],
                  *self._fill(momentum=group["momentum"], lr=lr, wd=group["weight_decay"],
                              beta2=group["beta2"]), COMPUTE_DTYPE)
        for p, updated in zip(params, stacked.unbind(0)):
            p.copy_(updated)


def build_optimizer(model):
    """AdamW for the embeddings, lm_head and per-layer scalars; Muon for every block matrix,
    one group per shape. Every parameter is in exactly one group."""
    lr_scale = (model.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768
    adamw = dict(kind="adamw", betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(adamw, params=[model.lm_head.weight], lr=UNEMBEDDING_LR * lr_scale),
        dict(adamw, params=[model.wte.weight], lr=EMBEDDING_LR * lr_scale),
        dict(adamw, params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * lr_scale),
        dict(adamw, params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(adamw, params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ]
    matrices = list(model.blocks.parameters())
    assert all(p.ndim == 2 for p in matrices), "Muon takes only 2-D block matrices"
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                           lr=MATRIX_LR, momentum=0.95, beta2=0.95, weight_decay=WEIGHT_DECAY))
    return MuonAdamW([dict(g, initial_lr=g["lr"]) for g in groups if g["params"]])


# -----------------------------------------------------------------------------
# Schedules (progress = training seconds / TIME_BUDGET)

def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1.0 - cooldown) * FINAL_LR_FRAC


def muon_momentum(step):
    frac = min(step / 300, 1.0)  # 0.85 -> 0.95 over the first 300 steps
    return (1 - frac) * 0.85 + frac * 0.95


def weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


# -----------------------------------------------------------------------------
# Training

def model_config(vocab_size):
    model_dim = math.ceil(DEPTH * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    n_head = model_dim // HEAD_DIM
    return GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=vocab_size, n_layer=DEPTH, n_head=n_head,
                     n_kv_head=n_head, n_embd=model_dim, window_pattern=WINDOW_PATTERN)


def build_model(config):
    """init_weights() draws every parameter: the seed gives the reference's initial weights. The
    constructors draw too, so build on the meta device as the reference (without torch.compile its
    first use costs 5 s of imports: there, let them draw on a forked RNG, with the same result)."""
    if USE_COMPILE:
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=DEVICE_TYPE)
    else:
        with torch.random.fork_rng(devices=[]):
            model = GPT(config).to(DEVICE_TYPE)
    model.init_weights()
    return model


def synchronize():
    if DEVICE_TYPE == "cuda":
        torch.cuda.synchronize()
    elif DEVICE_TYPE == "mps":
        torch.mps.synchronize()


def peak_memory_mb():
    if DEVICE_TYPE == "cuda":
        return torch.cuda.max_memory_allocated() / 1024**2
    if DEVICE_TYPE == "mps":  # MPS has no peak counter: memory held by the driver at the end
        return torch.mps.driver_allocated_memory() / 1024**2
    return 0.0  # CPU: no VRAM to report


def main():
    global FA3
    t_start = time.time()
    if NON_DEFAULT_CONSTANTS:  # e.g. a --preset small cache on an H100: results not comparable
        print("cache prepared with non-default constants: " + ", ".join(
            f"{name} {value} (reference {ref})" for name, (value, ref) in NON_DEFAULT_CONSTANTS.items()))
    torch.manual_seed(SEED)  # every device's generator, CUDA's included
    if DEVICE_TYPE == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls
    device = torch.device(DEVICE_TYPE)
    autocast = (torch.autocast(DEVICE_TYPE, dtype=COMPUTE_DTYPE) if COMPUTE_DTYPE != torch.float32
                else nullcontext())

    FA3, fa3_info = load_flash_attention_3()
    tokenizer = Tokenizer.from_directory()
    model = build_model(model_config(tokenizer.get_vocab_size()))
    if FA3 is not None:
        FA3, fa3_info = smoke_test_flash_attention_3(FA3, fa3_info)
    config = model.config
    param_counts = model.parameter_counts()
    flops_per_token = model.num_flops_per_token(MAX_SEQ_LEN)
    peak_flops, peak_info = detect_peak_flops()

    tokens_per_micro_step = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_micro_step == 0, (
        f"TOTAL_BATCH_SIZE {TOTAL_BATCH_SIZE} must be a multiple of "
        f"DEVICE_BATCH_SIZE * MAX_SEQ_LEN = {tokens_per_micro_step}")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_micro_step

    print(f"device: {DEVICE_TYPE} | dtype: {str(COMPUTE_DTYPE).removeprefix('torch.')} | "
          f"torch.compile: {'on' if USE_COMPILE else 'off'}")
    print(f"attention: {describe_attention(model.window_sizes, MAX_SEQ_LEN)}"
          + ("" if FA3 is not None else f" (Flash Attention 3 not used: {fa3_info})"))
    print(f"mfu: {peak_info}")
    print(f"model: depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads, "
          f"windows {model.window_sizes}, vocab {config.vocab_size}, seq_len {MAX_SEQ_LEN}")
    print("Parameter counts:")
    for key, value in param_counts.items():
        print(f"  {key:24s}: {value:,}")
    print(f"flops/token: {flops_per_token:e}")
    print(f"batch: {TOTAL_BATCH_SIZE:,} tokens/step = {grad_accum_steps} x {DEVICE_BATCH_SIZE} rows "
          f"| time budget: {TIME_BUDGET}s")

    optimizer = build_optimizer(model)
    if USE_COMPILE:
        model = torch.compile(model, dynamic=False)
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
    x, y, epoch = next(train_loader)  # prefetch the first batch

    interactive = sys.stdout.isatty()  # `\r` progress on a terminal, plain lines in a log file
    smooth_loss = training_time = last_print = 0.0
    step = 0
    while True:
        synchronize()
        t0 = time.time()
        for _ in range(grad_accum_steps):
            with autocast:
                loss = model(x, y)
            train_loss = loss.detach()
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)
        progress = min(training_time / TIME_BUDGET, 1.0)
        lrm = lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
                group["weight_decay"] = weight_decay(progress)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss_value = train_loss.item()
        if math.isnan(loss_value) or loss_value > 100:  # diverged: fail fast
            print(f"\nstep {step:05d} | loss: {loss_value}")
            print("FAIL")
            sys.exit(1)
        synchronize()
        dt = time.time() - t0
        if step > UNCOUNTED_STEPS:
            training_time += dt

        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        debiased_loss = smooth_loss / (1 - 0.9 ** (step + 1))
        mfu = 100 * flops_per_token * TOTAL_BATCH_SIZE / dt / peak_flops if peak_flops else 0.0
        remaining = max(0.0, TIME_BUDGET - training_time)
        line = (f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased_loss:.6f} | lrm: {lrm:.2f} "
                f"| dt: {dt * 1000:.0f}ms | tok/sec: {int(TOTAL_BATCH_SIZE / dt):,} | mfu: {mfu:.1f}% "
                f"| epoch: {epoch} | remaining: {remaining:.0f}s")
        if interactive:
            print(f"\r{line}    ", end="", flush=True)
        elif time.time() - last_print >= 5.0:
            print(line, flush=True)
            last_print = time.time()

        if step == 0:  # freeze what exists after the first step: later GC passes stay cheap
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()
        step += 1
        if step > UNCOUNTED_STEPS and training_time >= TIME_BUDGET:
            break

    if interactive:
        print()
    model.eval()
    with autocast:
        val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
    t_end = time.time()
    # the reference's steady-state MFU: (step - 10) steps over the counted training time
    steady_mfu = (100 * flops_per_token * TOTAL_BATCH_SIZE * (step - UNCOUNTED_STEPS) / training_time
                  / peak_flops if peak_flops and training_time > 0 else 0.0)

    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {training_time:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {peak_memory_mb():.1f}")
    print(f"mfu_percent:      {steady_mfu:.2f}")
    print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {param_counts['total'] / 1e6:.1f}")
    print(f"depth:            {DEPTH}")


if __name__ == "__main__":
    main()
