"""--fp8: the blocks' training matmuls in FP8, checked on the CPU's torch._scaled_mm against an emulation in
fp32, with CUDA's operand rules enforced (the CPU kernel accepts layouts the CUDA one refuses)."""
import contextlib

import pytest
import torch
from torch.nn import functional as F

import train_gpt2
from helpers import FAST, TINY, ok, records, train
from train_gpt2 import GPT, FP8Matmul, GPTConfig, UserError, enable_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture
def scaled_mm_calls(monkeypatch):
    """torch._scaled_mm that refuses what CUDA's refuses, and records each call's operands."""
    real, calls = torch._scaled_mm, []

    def strict(a, b, scale_a, scale_b, bias=None, out_dtype=None, **kwargs):
        assert a.is_contiguous(), "the first operand must be row-major"
        assert b.t().is_contiguous(), "the second operand must be column-major"
        assert a.size(1) % 16 == 0 and b.size(0) % 16 == 0 and b.size(1) % 16 == 0, (a.shape, b.shape)
        assert {a.dtype, b.dtype} <= {E4M3, E5M2} and (a.dtype, b.dtype) != (E5M2, E5M2)
        assert scale_a.dtype == scale_b.dtype == torch.float32 and scale_a.numel() == scale_b.numel() == 1
        # "Bias is not supported when out_dtype is set to Float32"; and it must be bf16 for a bf16 output
        assert bias is None or (out_dtype in (torch.bfloat16, torch.float16) and bias.dtype == out_dtype)
        calls.append((a.clone(), b.clone(), scale_a.clone(), scale_b.clone()))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", strict)
    return calls


def dequantized(q, inv_scale):
    return q.float() * inv_scale


def test_the_fp8_matmul_is_its_emulation_in_fp32(scaled_mm_calls):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 24, 32, generator=g)).requires_grad_()
    w = (0.05 * torch.randn(48, 32, generator=g)).requires_grad_()
    b = torch.randn(48, generator=g).requires_grad_()
    y = FP8Matmul.apply(x, w, b, torch.float32)
    grad_y = torch.randn(2, 24, 48, generator=g) * 1e-3
    y.backward(grad_y)
    assert len(scaled_mm_calls) == 3
    (xq, wq_t, x_inv, w_inv), (gq, wq_cm, g_inv, _), (gq_t, xq_cm, _, _) = scaled_mm_calls
    assert xq.dtype == wq_t.dtype == E4M3 and gq.dtype == E5M2
    # each tensor's largest magnitude lands on the format's largest value: the full range is used
    assert dequantized(xq, 1.0).abs().max().item() == torch.finfo(E4M3).max
    assert dequantized(gq, 1.0).abs().max().item() == torch.finfo(E5M2).max
    # and the quantized values are the originals to FP8's precision: 3 mantissa bits, 1/16 relative (and
    # half a step of 2**-9 among the subnormals)
    assert torch.allclose(dequantized(xq, x_inv), x.detach().reshape(48, 32), rtol=1 / 16, atol=x_inv.item() * 2**-10)
    X, W, G = dequantized(xq, x_inv), dequantized(wq_t.t(), w_inv), dequantized(gq, g_inv)
    assert torch.equal(wq_cm, wq_t.t()) and torch.equal(gq_t, gq.t()) and torch.equal(xq_cm, xq)
    close = dict(rtol=1e-5, atol=1e-6)
    assert torch.allclose(y.detach().reshape(48, 48), X @ W.t() + b.detach(), **close)
    assert torch.allclose(x.grad.reshape(48, 32), G @ W, **close)
    assert torch.allclose(w.grad, G.t() @ X, **close)
    assert torch.allclose(b.grad, grad_y.reshape(48, 48).sum(0), **close)


def model_run(fp8, amp=contextlib.nullcontext(), compile=False, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=32))
    if fp8:
        enable_fp8(model, 4 * 64, "cpu")
    idx = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(1))
    run = torch.compile(model) if compile else model
    with amp:
        _, loss = run(idx[:, :-1], idx[:, 1:])
    loss.backward()
    with torch.no_grad(), amp:
        logits, _ = model(idx[:, :-1])
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]), logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_model_trains_in_fp8_close_to_the_plain_numbers(scaled_mm_calls, dtype):
    amp = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
    loss, grads, logits = model_run(False, amp)
    loss8, grads8, logits8 = model_run(True, amp)
    assert len(scaled_mm_calls) == 2 * 4 * 3  # 2 blocks x 4 Linear x (forward, grad of x, grad of w)
    assert abs(loss8 - loss) < 1e-3 * loss
    assert F.cosine_similarity(grads, grads8, dim=0).item() > 0.995
    assert torch.equal(logits, logits8)  # evaluation (no grad) is the plain model, exactly


def test_compiled_fp8_equals_eager():
    """Compiled, the same FP8 computation: the compiled kernels sum in another order, and a value that lands on an
    FP8 rounding boundary may round the other way, so the gradients agree to a small fraction of what FP8 itself
    changes in them (measured: 0.4%; a compile that skipped FP8 would differ by all of it)."""
    loss, grads, _ = model_run(True)
    loss_c, grads_c, _ = model_run(True, compile=True)
    _, grads_plain, _ = model_run(False)
    assert abs(loss - loss_c) < 1e-5
    assert (grads - grads_c).norm() < 0.05 * (grads - grads_plain).norm()


def test_enable_fp8_refuses_shapes_the_kernels_cannot_tile():
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=24))
    with pytest.raises(UserError, match="multiples of 16"):
        enable_fp8(model, 64, "cpu")
    with pytest.raises(UserError, match="not on mps"):
        enable_fp8(model, 64, "mps")
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(UserError, match=r"batch_size x seq_len \(40\)"):
        enable_fp8(model, 40, "cpu")
    enable_fp8(model, 64, "cpu")
    assert [m.fp8 for m in model.modules() if isinstance(m, train_gpt2.Linear)] == [True] * 4
    assert not isinstance(model.lm_head, train_gpt2.Linear)  # the lm_head stays bf16


def test_training_with_fp8_follows_the_plain_run(tmp_path):
    runs = {}
    for name, extra in [("plain", []), ("fp8", ["--fp8"])]:
        log_dir = tmp_path / name
        ok(train(FAST + ["--max_steps", "8", "--eval_every", "4", "--val_steps", "2", "--log_dir", str(log_dir),
                         *extra]))
        runs[name] = records(log_dir)
    assert [r[:2] for r in runs["plain"]] == [r[:2] for r in runs["fp8"]]
    assert all(abs(a[2] - b[2]) < 0.02 * a[2] for a, b in zip(runs["plain"], runs["fp8"])), runs
    assert runs["plain"] != runs["fp8"]  # close, not the same: the FP8 roundings show
    assert runs["fp8"][-1][2] < runs["fp8"][0][2] - 0.5  # and it learns


def test_the_trainer_runs_the_fp8_matmuls_with_the_flag(scaled_mm_calls, tmp_path):
    for flag, want in [([], 0), (["--fp8"], 2 * 4 * 3 * 2)]:  # 2 blocks x 4 Linear x 3 matmuls x 2 micro-steps
        scaled_mm_calls.clear()
        train_gpt2.main(FAST + ["--max_steps", "1", "--eval_every", "1", "--val_steps", "1", "--log_dir",
                                str(tmp_path / str(want)), *flag])
        assert len(scaled_mm_calls) == want  # and evaluation, without grad, runs none


def test_fp8_flag_refuses_an_odd_width(tmp_path):
    r = train(FAST + ["--fp8", "--n_embd", "24", "--max_steps", "1", "--log_dir", str(tmp_path)] + TINY[:4])
    assert r.returncode == 1 and r.stderr.startswith("error: --fp8 needs --n_embd (24)") and "Traceback" not in r.stderr


def test_fp8_with_activation_checkpointing_and_the_chunked_loss_gives_the_same_gradients():
    """Recomputing a block quantizes the same values again, and the chunked loss only changes the lm_head."""
    idx = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointing, chunk in [(False, 0), (True, 0), (True, 40)]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=32))
        enable_fp8(model, 4 * 32, "cpu")
        model.activation_checkpointing, model.loss_chunk_rows = checkpointing, chunk
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])
    # the chunked loss's last-bit differences may flip a few e5m2 roundings upstream: compare the direction
    assert F.cosine_similarity(grads[0], grads[2], dim=0).item() > 0.99999
