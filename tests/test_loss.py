"""The chunked lm_head + cross-entropy (--loss_chunk_rows) equals the plain full-logits loss, with its gradients."""
import contextlib

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt2
from helpers import FAST, ok, records, train
from train_gpt2 import GPT, GPTConfig, chunked_cross_entropy, parse_args

N, C, V = 96, 24, 500  # rows, width, vocabulary


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(V, C, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    return x, w, targets


def loss_and_grads(loss_fn, amp=contextlib.nullcontext(), upstream=0.37):
    x, w, targets = inputs()
    with amp:
        loss = loss_fn(x, w, targets)
    (upstream * loss).backward()  # the backward scales by whatever comes from above (1/accum, the fp16 scale)
    return loss.detach(), x.grad, w.grad


def plain(x, w, targets):
    return F.cross_entropy(x @ w.t(), targets)


@pytest.mark.parametrize("rows", [1, 7, 32, N, 1000])  # 7 leaves a short last chunk; 1000 is one chunk
def test_loss_and_gradients_equal_the_plain_ones_in_fp32(rows):
    ref = loss_and_grads(plain)
    got = loss_and_grads(lambda x, w, t: chunked_cross_entropy(x, w, t, rows))
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-6 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("rows", [3, 20])
def test_in_fp64_it_is_fp64_and_passes_gradcheck(rows):
    """The gradients come out of the forward, the backward only scales them: autograd's numerical check, with
    an upstream gradient that is not 1, on a vocabulary where every row's target and the rest all matter."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (20,), generator=g)
    loss = chunked_cross_entropy(x, w, targets, rows)
    assert loss.dtype == torch.float64 and abs(loss.item() - F.cross_entropy(x @ w.t(), targets).item()) < 1e-12
    assert torch.autograd.gradcheck(lambda a, b: 2.5 * chunked_cross_entropy(a, b, targets, rows), (x, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_it_matches_the_plain_loss_to_the_dtypes_rounding(dtype):
    amp = torch.autocast("cpu", dtype=dtype)
    ref = loss_and_grads(plain, amp)
    got = loss_and_grads(lambda x, w, t: chunked_cross_entropy(x, w, t, 32), amp)
    exact = loss_and_grads(plain)  # fp32: both must be as close to it as rounding to 8 or 11 bits allows
    assert got[0].dtype == torch.float32
    for a, b, e in zip(got, ref, exact):
        scale = e.abs().max().item()
        assert (a - e).abs().max().item() <= 2 * (b - e).abs().max().item() + 1e-3 * scale
        assert (a - b).abs().max().item() <= 2e-2 * scale


def test_in_fp16_the_weight_gradient_of_a_chunk_does_not_overflow():
    """The weight gradient sums a chunk's rows in an fp16 product before the mean: one target in every row and
    a feature of 10 in every row made -81920 there, inf, though the mean gradient is about 10. No loss scale
    helps (the GradScaler would skip every step); the product is scaled down by a power of 2 instead."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 16, generator=g)
    x[:, 3] = 10.0
    w = 0.02 * torch.randn(50, 16, generator=g)
    targets = torch.zeros(8192, dtype=torch.long)
    grads = {}
    for name, amp, fn in [("fp16", torch.autocast("cpu", dtype=torch.float16), chunked_cross_entropy),
                          ("exact", contextlib.nullcontext(), lambda a, b, t, rows: plain(a, b, t))]:
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        with amp:
            fn(a, b, targets, 8192).backward()
        grads[name] = a.grad, b.grad
    for got, exact in zip(grads["fp16"], grads["exact"]):
        assert torch.isfinite(got).all()
        assert (got - exact).abs().max().item() <= 1e-3 * exact.abs().max().item()
    assert grads["exact"][1].abs().max().item() > 5  # the mean gradient itself is large, far from fp16's limit


def test_without_grad_it_only_computes_the_loss():
    x, w, targets = inputs()
    with torch.no_grad():
        loss = chunked_cross_entropy(x, w, targets, 10)
    assert loss.grad_fn is None
    assert abs(loss.item() - plain(x, w, targets).item()) < 1e-6


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates, and the ops' names."""

    def __init__(self):
        super().__init__()
        self.numel, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def model_grads(rows, idx, compile=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=C))
    model.loss_chunk_rows = rows
    _, loss = (torch.compile(model) if compile else model)(idx[:, :-1], idx[:, 1:])
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_the_model_never_holds_the_full_logits_and_trains_the_same():
    idx = torch.randint(0, V, (4, 33), generator=torch.Generator().manual_seed(1))  # 128 rows of logits
    sizes = {}
    for rows in (0, 16):
        with LargestTensor() as seen:
            sizes[rows] = model_grads(rows, idx)
        sizes[rows] = (*sizes[rows], seen.numel)
    (loss0, grads0, largest0), (loss16, grads16, largest16) = sizes[0], sizes[16]
    assert largest0 >= 128 * V  # the plain loss makes the (128, V) logits
    assert largest16 < 128 * V / 2  # chunks of 16 rows: the largest tensor is a weight, V x C
    assert abs(loss0 - loss16) < 1e-6
    assert (grads0 - grads16).abs().max().item() < 1e-6  # tied wte/lm_head included


def test_compiled_equals_eager():
    idx = torch.randint(0, V, (4, 33), generator=torch.Generator().manual_seed(2))
    loss_e, grads_e = model_grads(16, idx)
    loss_c, grads_c = model_grads(16, idx, compile=True)
    assert abs(loss_e - loss_c) < 1e-5
    assert (grads_e - grads_c).abs().max().item() < 1e-5


def test_eager_it_scatters_the_one_hot_in_place():
    # a comparison with the column index would make a chunk-sized mask and an fp32 p - 1 beside the chunk's p
    x, w, targets = inputs()
    with LargestTensor() as seen:
        chunked_cross_entropy(x, w, targets, 32).backward()
    assert "scatter_add_" in seen.ops and not {"where", "eq"} & seen.ops, seen.ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_it_takes_the_one_hot_by_comparison_and_equals_eager(dtype):
    # compiled, the one-hot is subtracted by comparing column indices with the targets, which inductor fuses
    # with the exp and the cast; a scatter_add_ would make it write the chunk's fp32 softmax first
    graphs = []

    def capture(gm, example_inputs):
        graphs.extend(m for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return gm.forward

    torch._dynamo.reset()
    loss = torch.compile(lambda x, w, t: chunked_cross_entropy(x, w, t, 7), backend=capture)  # 7: a short last chunk
    amp = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    got, ref = loss_and_grads(loss, amp), loss_and_grads(lambda x, w, t: chunked_cross_entropy(x, w, t, 7), amp)
    code = "\n".join(g.code for g in graphs)
    assert "where" in code and "scatter" not in code, code
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and (a.float() - b.float()).abs().max().item() <= 1e-6 * b.abs().max().item()


def test_training_with_the_flag_logs_the_same_losses(tmp_path):
    """The trainer's default is the chunked loss; 0 is the lecture's full logits."""
    assert parse_args([]).loss_chunk_rows == 8192
    runs = {}
    for rows in (0, 50, None):  # 4 x 32 = 128 rows per micro-batch: chunks of 50, 50, 28; None: the default
        log_dir = tmp_path / f"rows{rows}"
        flag = [] if rows is None else ["--loss_chunk_rows", str(rows)]
        ok(train(FAST + ["--max_steps", "6", "--eval_every", "3", "--val_steps", "2", "--log_dir", str(log_dir),
                         *flag]))
        runs[rows] = records(log_dir)
    assert len(runs[0]) == 6 + 3  # train losses of steps 0-5, val losses at 0, 3 and 6
    for chunked in (runs[50], runs[None]):
        assert [(s, k) for s, k, _ in runs[0]] == [(s, k) for s, k, _ in chunked]
        for (_, _, a), (_, _, b) in zip(runs[0], chunked):
            assert abs(a - b) < 1e-4


def test_the_trainer_computes_the_loss_the_flag_asks_for(tmp_path, monkeypatch):
    """The runs above would agree if the trainer ignored the flag: here its calls of the chunked loss are counted."""
    real, calls = train_gpt2.chunked_cross_entropy, []
    monkeypatch.setattr(train_gpt2, "chunked_cross_entropy", lambda x, w, t, rows: calls.append(rows) or real(x, w, t, rows))
    for i, (flag, want) in enumerate([([], 8192), (["--loss_chunk_rows", "50"], 50), (["--loss_chunk_rows", "0"], None)]):
        calls.clear()
        train_gpt2.main(FAST + ["--max_steps", "1", "--eval_every", "1", "--val_steps", "1", "--log_dir",
                                str(tmp_path / f"run{i}"), *flag])
        # 2 micro-steps of training, 2 evaluations of 1 micro-batch (steps 0 and 1)
        assert calls == ([want] * 4 if want else []), (flag, calls)
