"""train.py: the model, the optimizer and full runs on a tiny prepared cache (CPU, seconds)."""

import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parent.parent

SUMMARY = [  # key, value format, as the reference prints them
    ("val_bpb", r"\d+\.\d{6}"),
    ("training_seconds", r"\d+\.\d"),
    ("total_seconds", r"\d+\.\d"),
    ("peak_vram_mb", r"\d+\.\d"),
    ("mfu_percent", r"\d+\.\d{2}"),
    ("total_tokens_M", r"\d+\.\d"),
    ("num_steps", r"\d+"),
    ("num_params_M", r"\d+\.\d"),
    ("depth", r"\d+"),
]


def run_train(script, cache, timeout=120):
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script)], cwd=script.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(_tiny_cache_dir):
    """One run of the unmodified train.py on the tiny cache, shared by the tests that read it
    (module scope, so it uses the session-scoped cache directory behind `tiny_cache`)."""
    return run_train(REPO / "train.py", _tiny_cache_dir)


def small_model(n_layer=2, pattern="SL", vocab=64, seq=32, n_embd=32, n_head=2):
    config = train.GPTConfig(sequence_len=seq, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                             n_kv_head=n_head, n_embd=n_embd, window_pattern=pattern)
    torch.manual_seed(0)
    model = train.GPT(config)
    model.init_weights()
    return model


def softmax_attention(q, k, v, window):
    """Explicit reference: key j visible from query i iff i - window <= j <= i."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    T = q.size(2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j <= window)), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


# --- full runs ----------------------------------------------------------------------------------


def test_unmodified_run_exits_0_and_prints_the_summary_block_in_reference_format(tiny_run):
    assert tiny_run.returncode == 0, tiny_run.stdout + tiny_run.stderr
    lines = tiny_run.stdout.splitlines()
    block = lines[lines.index("---") + 1:]
    assert len(block) == len(SUMMARY)
    for line, (key, value) in zip(block, SUMMARY):
        assert re.fullmatch(rf"{key}: +{value}", line), line
        assert line.index(line.split()[1]) == 18  # values aligned in one column


def test_unmodified_run_reaches_val_bpb_below_the_uniform_model(tiny_run, prepare_module):
    val_bpb = float(re.search(r"^val_bpb: +(\S+)$", tiny_run.stdout, re.M).group(1))
    tokenizer = prepare_module.Tokenizer.from_directory()
    vocab = tokenizer.get_vocab_size()

    class Uniform(torch.nn.Module):  # predicts every token with probability 1/vocab
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, targets=None, reduction="mean"):  # either calling convention
            if targets is None:
                return torch.zeros(*x.shape, vocab)  # equal logits: probability 1/vocab
            return torch.full(targets.shape, math.log(vocab))

    uniform_bpb = prepare_module.evaluate_bpb(Uniform(), tokenizer, train.DEVICE_BATCH_SIZE)
    assert math.isfinite(val_bpb)
    assert val_bpb < 0.9 * uniform_bpb, (val_bpb, uniform_bpb)


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(tiny_run):
    assert "\r" not in tiny_run.stdout
    assert re.search(r"^step 00000 \(0\.0%\) \| loss: \d+\.\d+ ", tiny_run.stdout, re.M)


def test_run_reports_its_attention_path_and_why_mfu_is_zero_on_cpu(tiny_run):
    assert re.search(r"^attention: SDPA causal", tiny_run.stdout, re.M)
    assert "MFU reported as 0" in tiny_run.stdout
    assert re.search(r"^mfu_percent: +0\.00$", tiny_run.stdout, re.M)


def test_run_prints_the_parameter_counts_by_kind_in_reference_format(tiny_run):
    lines = tiny_run.stdout.splitlines()
    start = lines.index("Parameter counts:")
    keys = ["wte", "value_embeds", "lm_head", "transformer_matrices", "scalars", "total"]
    counts = {}
    for line, key in zip(lines[start + 1:start + 7], keys, strict=True):
        assert re.fullmatch(rf"  {key} *: \d{{1,3}}(,\d{{3}})*", line) and line.index(":") == 26, line
        counts[key] = int(line.split(":")[1].replace(",", ""))
    assert counts.pop("total") == sum(counts.values())


def test_run_names_the_caches_non_default_constants_in_its_first_line(tiny_run):
    assert tiny_run.stdout.splitlines()[0] == (
        "cache prepared with non-default constants: MAX_SEQ_LEN 64 (reference 2048), TIME_BUDGET 2 "
        "(reference 300), EVAL_TOKENS 4096 (reference 20971520), VOCAB_SIZE 512 (reference 8192)")


def test_before_the_data_is_prepared_it_says_what_to_run_without_a_traceback(tmp_path):
    result = run_train(REPO / "train.py", tmp_path / "no-cache")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "uv run prepare.py --dataset stdlib --preset small" in result.stderr


def test_nan_loss_prints_fail_and_exits_1(tmp_path, tiny_cache):
    source = (REPO / "train.py").read_text()
    assert source.count("\nEMBEDDING_LR = 0.6 ") == 1
    script = tmp_path / "train.py"
    script.write_text(source.replace("\nEMBEDDING_LR = 0.6 ", '\nEMBEDDING_LR = float("nan") '))
    result = run_train(script, tiny_cache)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout.splitlines()
    assert "val_bpb" not in result.stdout


# --- attention ----------------------------------------------------------------------------------


def test_cpu_full_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 16, 2, 8).unbind(0)
    out = train.causal_attention(q, k, v, window=16, mask=None)
    torch.testing.assert_close(out, softmax_attention(q, k, v, window=16), atol=1e-5, rtol=1e-5)


def test_cpu_windowed_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 16, 2, 8).unbind(0)
    full, windowed = train.window_masks((16, 5), 16, torch.device("cpu"))
    assert full is None
    out = train.causal_attention(q, k, v, window=5, mask=windowed)
    torch.testing.assert_close(out, softmax_attention(q, k, v, window=5), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, softmax_attention(q, k, v, window=16), atol=1e-3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_used_on_cuda_matches_explicit_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 16, 2, 8).unbind(0)
    block_mask = train.sliding_window_mask(16, 5, torch.device("cpu"), block_mask=True)
    assert not isinstance(block_mask, torch.Tensor)
    out = train.causal_attention(q, k, v, window=5, mask=block_mask)  # eager forward works on CPU
    torch.testing.assert_close(out, softmax_attention(q, k, v, window=5), atol=1e-5, rtol=1e-5)


def test_windows_are_half_context_for_s_and_the_last_layer_is_always_full():
    def windows(n_layer, pattern):
        config = train.GPTConfig(sequence_len=64, vocab_size=8, n_layer=n_layer, n_head=1, n_kv_head=1,
                                 n_embd=8, window_pattern=pattern)
        return train.GPT.compute_window_sizes(config)

    assert windows(8, "SSSL") == [32, 32, 32, 64, 32, 32, 32, 64]
    assert windows(6, "SSSL") == [32, 32, 32, 64, 32, 64]
    assert windows(3, "S") == [32, 32, 64]
    assert windows(2, "L") == [64, 64]


def test_value_embeddings_are_on_alternating_layers_ending_with_the_last():
    assert sorted(small_model(n_layer=4).value_embeds.keys()) == ["1", "3"]
    assert sorted(small_model(n_layer=3).value_embeds.keys()) == ["0", "2"]


def test_windowed_model_output_ignores_tokens_beyond_the_receptive_field():
    model = small_model(n_layer=2, pattern="S", seq=32)  # windows [16, 32]
    with torch.no_grad():  # make the blocks non-trivial (the output projections start at zero)
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.1)
            block.mlp.c_proj.weight.normal_(0, 0.1)
    idx = torch.randint(0, 64, (1, 32))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 64
    model.blocks[1].attn.forward = lambda x, *args: torch.zeros_like(x)  # keep only the S layer
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, 17:], b[0, 17:])  # position 17 sees 1..17 only
    assert not torch.allclose(a[0, 16], b[0, 16])  # position 16 still sees 0


# --- Flash Attention 3 (a fake `kernels` package on a faked CUDA GPU) ------------------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """train.py as on a CUDA GPU with bf16; returns a setter of the compute capability."""
    monkeypatch.setattr(train, "DEVICE_TYPE", "cuda")
    monkeypatch.setattr(train, "COMPUTE_DTYPE", torch.bfloat16)
    return lambda capability: monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)


def install_fake_kernels(monkeypatch, error=None):
    """A `kernels` package whose get_kernel records the repo asked for (and raises `error` if
    given) and returns an FA3 whose flash_attn_func is the explicit softmax on the CPU."""
    asked, calls = [], []

    def flash_attn_func(q, k, v, causal, window_size):
        calls.append((causal, window_size))
        return softmax_attention(q, k, v, window=window_size[0])

    def get_kernel(repo):
        asked.append(repo)
        if error:
            raise error
        interface = types.SimpleNamespace(flash_attn_func=flash_attn_func)
        return types.SimpleNamespace(flash_attn_interface=interface)

    kernels = types.ModuleType("kernels")
    kernels.get_kernel = get_kernel
    monkeypatch.setitem(sys.modules, "kernels", kernels)
    return asked, calls


@pytest.mark.parametrize("capability, repo", [
    ((9, 0), "varunneal/flash-attention-3"),  # Hopper
    ((8, 6), "kernels-community/flash-attn3"),
])
def test_flash_attention_3_repo_is_chosen_as_the_reference_does(monkeypatch, fake_cuda, capability, repo):
    fake_cuda(capability)
    asked, _ = install_fake_kernels(monkeypatch)
    fa3, info = train.load_flash_attention_3()
    assert asked == [repo] and info == repo
    assert callable(fa3.flash_attn_func)


def test_without_the_kernels_package_attention_falls_back_and_says_why(monkeypatch, fake_cuda):
    fake_cuda((9, 0))
    monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` fails
    fa3, reason = train.load_flash_attention_3()
    assert fa3 is None and "kernels" in reason


def test_when_the_kernel_hub_is_unreachable_attention_falls_back_and_says_why(monkeypatch, fake_cuda):
    fake_cuda((9, 0))
    install_fake_kernels(monkeypatch, error=OSError("offline: cannot reach huggingface.co"))
    fa3, reason = train.load_flash_attention_3()
    assert fa3 is None
    assert "varunneal/flash-attention-3" in reason and "offline" in reason


def test_flash_attention_3_is_not_tried_off_cuda(monkeypatch):
    asked, _ = install_fake_kernels(monkeypatch)
    fa3, reason = train.load_flash_attention_3()
    assert fa3 is None and asked == [] and "CUDA" in reason


def test_with_flash_attention_3_every_layer_calls_it_causally_with_its_own_window(monkeypatch):
    model = small_model(n_layer=2, pattern="SL", seq=32)  # windows [16, 32]
    idx = torch.randint(0, 64, (1, 32))
    expected = model(idx)  # through SDPA
    _, calls = install_fake_kernels(monkeypatch)
    monkeypatch.setattr(train, "FA3", sys.modules["kernels"].get_kernel("fa3").flash_attn_interface)
    torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=1e-5)
    assert calls == [(True, (16, 0)), (True, (32, 0))]


# --- model --------------------------------------------------------------------------------------


def test_reference_config_has_50_3m_parameters_and_the_reference_flops_formula():
    config = train.GPTConfig(sequence_len=2048, vocab_size=8192, n_layer=8, n_head=4, n_kv_head=4,
                             n_embd=512, window_pattern="SSSL")
    with torch.device("meta"):
        model = train.GPT(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 50.3
    matmul_params = 8 * 12 * 512 * 512 + 4 * 4 * 32 + 512 * 8192  # blocks, 4 ve gates, lm_head
    attention = 12 * 4 * 128 * (6 * 1024 + 2 * 2048)
    assert model.num_flops_per_token(2048) == 6 * matmul_params + attention


def test_parameter_counts_split_the_reference_config_by_kind():
    config = train.GPTConfig(sequence_len=2048, vocab_size=8192, n_layer=8, n_head=4, n_kv_head=4,
                             n_embd=512, window_pattern="SSSL")
    with torch.device("meta"):
        model = train.GPT(config)
    assert model.parameter_counts() == {
        "wte": 8192 * 512, "value_embeds": 4 * 8192 * 512, "lm_head": 8192 * 512,
        "transformer_matrices": 8 * 12 * 512 * 512 + 4 * 4 * 32, "scalars": 2 * 8,
        "total": sum(p.numel() for p in model.parameters()),
    }


def reference_initial_parameters(config, seed):
    """The reference's init_weights() written out: fresh tensors drawn in its order."""
    torch.manual_seed(seed)
    d, vocab, n_layer = config.n_embd, config.vocab_size, config.n_layer
    kv = config.n_kv_head * (d // config.n_head)
    bound = 3**0.5 * d**-0.5

    def uniform(*shape):
        return torch.empty(shape).uniform_(-bound, bound)

    params = {"wte.weight": torch.empty(vocab, d).normal_(0, 1.0),
              "lm_head.weight": torch.empty(vocab, d).normal_(0, 0.001)}
    for i in range(n_layer):
        params[f"blocks.{i}.attn.c_q.weight"] = uniform(d, d)
        params[f"blocks.{i}.attn.c_k.weight"] = uniform(kv, d)
        params[f"blocks.{i}.attn.c_v.weight"] = uniform(kv, d)
        params[f"blocks.{i}.attn.c_proj.weight"] = torch.zeros(d, d)
        params[f"blocks.{i}.mlp.c_fc.weight"] = uniform(4 * d, d)
        params[f"blocks.{i}.mlp.c_proj.weight"] = torch.zeros(d, 4 * d)
    params["resid_lambdas"] = torch.ones(n_layer)
    params["x0_lambdas"] = torch.full((n_layer,), 0.1)
    value_layers = [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]
    for i in value_layers:
        params[f"value_embeds.{i}.weight"] = uniform(vocab, kv)
    for i in value_layers:
        params[f"blocks.{i}.attn.ve_gate.weight"] = torch.zeros(config.n_kv_head, 32)
    return params


@pytest.mark.parametrize("on_meta", [True, False])  # the reference's meta-device build (with torch.compile), or not
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_starts_from_the_reference_initial_parameters_for_a_fixed_seed(monkeypatch, dtype, on_meta):
    monkeypatch.setattr(train, "COMPUTE_DTYPE", dtype)  # with bf16, the embeddings are cast after drawing
    monkeypatch.setattr(train, "USE_COMPILE", on_meta)
    config = train.GPTConfig(sequence_len=32, vocab_size=96, n_layer=3, n_head=2, n_kv_head=2,
                             n_embd=64, window_pattern="SL")
    expected = reference_initial_parameters(config, seed=42)
    torch.manual_seed(42)
    actual = dict(train.build_model(config).named_parameters())
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        if name.startswith(("wte.", "value_embeds.")):
            tensor = tensor.to(dtype)
        assert actual[name].dtype == tensor.dtype and torch.equal(actual[name], tensor), name


def test_rotary_tables_of_a_meta_built_model_are_computed_at_init(monkeypatch):
    monkeypatch.setattr(train, "USE_COMPILE", True)  # the meta-device build
    config = train.GPTConfig(sequence_len=16, vocab_size=32, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
    model = train.build_model(config)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
    angles = torch.arange(16.0)[:, None] * inv_freq[None, :]
    torch.testing.assert_close(model.cos[0, :, 0], angles.cos())
    torch.testing.assert_close(model.sin[0, :, 0], angles.sin())


def test_initial_loss_is_close_to_log_vocab():
    model = small_model(vocab=64)
    idx = torch.randint(0, 64, (4, 32))
    loss = model(idx, torch.roll(idx, -1, dims=1))
    assert abs(loss.item() - math.log(64)) < 0.05


def test_reduction_none_returns_per_token_nats_that_average_to_the_mean_loss():
    model = small_model()
    idx = torch.randint(0, 64, (3, 32))
    targets = torch.roll(idx, -1, dims=1)
    per_token = model(idx, targets, reduction="none")
    assert per_token.numel() == 3 * 32
    torch.testing.assert_close(per_token.mean(), model(idx, targets))


def test_logits_are_soft_capped_at_15():
    model = small_model()
    with torch.no_grad():
        model.lm_head.weight.fill_(100.0)
    logits = model(torch.randint(0, 64, (1, 8)))
    assert logits.abs().max() <= 15.0
    assert logits.abs().max() > 14.0


# --- optimizer ----------------------------------------------------------------------------------


def test_every_parameter_belongs_to_exactly_one_optimizer_group():
    model = small_model(n_layer=3, n_embd=64, n_head=2)
    optimizer = train.build_optimizer(model)
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        if group["kind"] == "muon":
            assert len({tuple(p.shape) for p in group["params"]}) == 1
            assert all(p.ndim == 2 for p in group["params"])
    muon = {id(p) for g in optimizer.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert muon == {id(p) for p in model.blocks.parameters()}


def test_one_muon_step_yields_a_near_orthogonal_update():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 32))
    # an ill-conditioned gradient: singular values spread over two orders of magnitude
    u, _, vt = torch.linalg.svd(torch.randn(64, 32), full_matrices=False)
    weight.grad = u @ torch.diag(torch.logspace(0, -2, 32)) @ vt
    optimizer = train.MuonAdamW([dict(kind="muon", params=[weight], lr=0.01, momentum=0.0,
                                      beta2=0.95, weight_decay=0.0)])
    before = weight.detach().clone()
    optimizer.step()
    update = (before - weight.detach()) / (0.01 * 2**0.5)  # lr is scaled by sqrt(rows / cols)
    singular_values = torch.linalg.svdvals(update)
    assert singular_values.max() / singular_values.min() < 1.5
    assert 0.8 < singular_values.mean() < 1.2


def test_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8, 4))
    theirs.data.copy_(ours.data)
    ours_opt = train.MuonAdamW([dict(kind="adamw", params=[ours], lr=0.01, betas=(0.8, 0.95),
                                     eps=1e-10, weight_decay=0.1)])
    theirs_opt = torch.optim.AdamW([theirs], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn(8, 4)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
    torch.testing.assert_close(ours.data, theirs.data)


def test_cautious_weight_decay_only_decays_where_update_and_parameter_agree():
    torch.manual_seed(0)
    before, grad = torch.randn(16, 16), torch.randn(16, 16)

    def muon_step(weight_decay):
        weight = torch.nn.Parameter(before.clone())
        weight.grad = grad.clone()
        train.MuonAdamW([dict(kind="muon", params=[weight], lr=0.01, momentum=0.0, beta2=0.95,
                              weight_decay=weight_decay)]).step()
        return weight.detach()

    undecayed, decayed = muon_step(0.0), muon_step(0.5)
    update = before - undecayed  # lr * the orthogonalized gradient
    agree = (update * before) >= 0
    torch.testing.assert_close((undecayed - decayed)[agree], 0.01 * 0.5 * before[agree])
    assert ((undecayed - decayed)[~agree] == 0).all() and (~agree).any()


def test_lr_is_flat_then_warms_down_linearly_to_zero_and_momentum_ramps_over_300_steps():
    assert train.lr_multiplier(0.0) == 1.0
    assert train.lr_multiplier(0.49) == 1.0
    assert train.lr_multiplier(0.75) == pytest.approx(0.5)
    assert train.lr_multiplier(1.0) == pytest.approx(0.0)
    assert train.muon_momentum(0) == pytest.approx(0.85)
    assert train.muon_momentum(150) == pytest.approx(0.90)
    assert train.muon_momentum(1000) == pytest.approx(0.95)


# --- device -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.5e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA A10G", 0.0),  # unknown: not confused with the A10 or the A100
    ("Some Future GPU", 0.0),
])
def test_mfu_peak_is_the_detected_gpus_own_or_zero_when_unknown(monkeypatch, name, peak):
    monkeypatch.setattr(train, "DEVICE_TYPE", "cuda")
    monkeypatch.setattr(train, "COMPUTE_DTYPE", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: name)
    flops, info = train.detect_peak_flops()
    assert flops == peak
    if not peak:
        assert "MFU reported as 0" in info
