"""The model is GPT-2: logits equal transformers' GPT-2 on the same weights; init, optimizer and LR as the lecture."""
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import ROOT, ok, save_tiny_hf_gpt2, train
from train_gpt2 import (GPT, GPTConfig, UserError, apply_preset, flops_per_token, generate, get_lr, param_count,
                        parse_args)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("hf_tiny"))
    save_tiny_hf_gpt2(folder)
    return folder


def test_from_pretrained_matches_transformers_logits(hf_dir):
    from transformers import GPT2LMHeadModel
    ours = GPT.from_pretrained(hf_dir).eval()
    ref = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    assert ours.config == GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    idx = torch.randint(0, 50257, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = ours(idx)
        ref_logits = ref(idx).logits
    assert loss is None
    assert logits.shape == ref_logits.shape == (3, 64, 50257)
    assert (logits - ref_logits).abs().max().item() < 1e-5
    # the loss is the mean next-token cross-entropy, as transformers computes it with labels
    with torch.no_grad():
        _, loss = ours(idx[:, :-1], idx[:, 1:])
        ref_loss = ref(idx, labels=idx).loss
    assert abs(loss.item() - ref_loss.item()) < 1e-5


def test_training_from_pretrained_starts_at_transformers_loss(hf_dir, tmp_path):
    """--init_from a folder: its architecture and context (no shape flags needed, --seq_len defaults to its 64), and
    the step-0 val loss is transformers' loss on the same val windows (the last 10% of input.txt, 64 + 1 tokens
    starting 64 apart)."""
    from transformers import GPT2LMHeadModel

    from train_gpt2 import gpt2_tokenizer
    run = ["--data", "input.txt", "--init_from", hf_dir, "--batch_size", "2", "--total_batch_size", "128",
           "--max_steps", "1", "--val_steps", "3", "--hellaswag_every", "0", "--sample_every", "0"]
    r = ok(train(run + ["--log_dir", str(tmp_path / "log")]))
    assert "n_layer=2, n_head=2, n_embd=32" in r.stdout and "1 process(es) x 2 x 64 x 1" in r.stdout
    with open(os.path.join(tmp_path, "log", "log.txt")) as f:
        val = float(f.readline().split()[2])
    with open(os.path.join(ROOT, "input.txt")) as f:
        tokens = gpt2_tokenizer().encode_ordinary(f.read())
    tokens = torch.tensor(np.array(tokens[int(0.9 * len(tokens)):], dtype=np.int64))
    windows = torch.stack([tokens[w * 64:w * 64 + 65] for w in range(6)])
    ref = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = ref(windows[:, :-1]).logits
    losses = [F.cross_entropy(logits[i:i + 2].flatten(0, 1), windows[i:i + 2, 1:].flatten()).item() for i in (0, 2, 4)]
    assert abs(val - sum(losses) / 3) < 1e-4, (val, losses)
    r = train(run + ["--log_dir", str(tmp_path / "other"), "--n_layer", "4"])
    assert r.returncode == 1
    assert r.stderr == f"error: --init_from {hf_dir} brings its own architecture: drop --n_layer\n"
    with pytest.raises(UserError, match="--init_from someone/gpt2 brings its own architecture: drop --n_head"):
        apply_preset(parse_args(["--init_from", "someone/gpt2", "--n_head", "4"]))  # a hub id, before any download
    # its resume needs the --init_from, which brings the architecture: the error names it
    scratch = [a for a in run if a not in ("--init_from", hf_dir)]
    r = train(scratch + ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--log_dir",
                         str(tmp_path / "log"), "--resume", "auto"])
    assert r.returncode == 1 and r.stderr.endswith(f": pass --init_from {hf_dir}, or another --log_dir\n"), r.stderr


def test_a_resumed_init_from_run_needs_no_hf_model(hf_dir, tmp_path):
    """The checkpoint holds the architecture and the weights: an --init_from run resumes with its HF folder gone
    (another machine, the hub out of reach), to the same records as without the stop. The architecture comes from
    the checkpoint --resume auto takes: not from a newer one whose CRC fails (here its n_layer, edited). Where a
    fresh start may follow (--overwrite), the HF weights are loaded: with every checkpoint damaged, the run starts
    from them, not from random weights. A fresh run still needs them."""
    hf = str(tmp_path / "hf")
    shutil.copytree(hf_dir, hf)
    run = ["--data", "input.txt", "--init_from", hf, "--batch_size", "2", "--total_batch_size", "128", "--max_steps",
           "4", "--checkpoint_every", "2", "--eval_every", "2", "--val_steps", "1", "--hellaswag_every", "0",
           "--sample_every", "0"]
    ok(train(run + ["--log_dir", str(tmp_path / "full")]))
    full_log = open(tmp_path / "full" / "log.txt").read()

    def damaged_copy(name, edit):
        """A copy of the run whose checkpoint at each step of edit has its bytes edited: edit[step](bytes)."""
        shutil.copytree(tmp_path / "full", tmp_path / name)
        for step, change in edit.items():
            path = tmp_path / name / f"model_0000{step}.pt"
            path.write_bytes(change(path.read_bytes()))
        return str(tmp_path / name)

    def flip_middle(data):  # among the weights and AdamW moments
        middle = len(data) // 2
        return data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:]

    # every checkpoint damaged: --overwrite starts over, from the HF weights
    over = damaged_copy("over", {2: flip_middle, 4: flip_middle})
    r = ok(train(run + ["--log_dir", over, "--resume", "auto", "--overwrite"]))
    assert r.stdout.count(": skipping it") == 2
    assert open(os.path.join(over, "log.txt")).read() == full_log
    def three_layers(data):  # in the config: 'n_layer', its memo entry (BINPUT or LONG_BINPUT), then BININT1 2 -> 3
        data, edits = re.subn(rb"(n_layer(?:q.|r....))K\x02", lambda m: m[1] + b"K\x03", data, count=1, flags=re.DOTALL)
        assert edits == 1
        return data

    # the newest checkpoint says n_layer 3, which its CRC refuses
    cut = damaged_copy("cut", {4: three_layers})
    shutil.rmtree(hf)
    r = ok(train(run + ["--log_dir", cut, "--resume", "auto"]))
    assert "model_00004.pt is corrupt: its record " in r.stdout
    assert f"resuming from {cut}/model_00002.pt at step 2" in r.stdout
    assert open(os.path.join(cut, "log.txt")).read() == full_log
    r = train(run + ["--log_dir", str(tmp_path / "new")])
    assert r.returncode == 1 and r.stderr.startswith(f"error: unknown model '{hf}'"), r.stderr


def test_from_pretrained_refuses_other_layouts(tmp_path):
    save_tiny_hf_gpt2(str(tmp_path / "cross"), add_cross_attention=True)  # extra crossattention weights
    with pytest.raises(UserError, match="does not match GPT-2's layout"):
        GPT.from_pretrained(str(tmp_path / "cross"))
    save_tiny_hf_gpt2(str(tmp_path / "relu"), activation_function="relu")
    with pytest.raises(UserError, match="not a GPT-2 architecture"):
        GPT.from_pretrained(str(tmp_path / "relu"))
    # config fields that change what transformers computes, which our blocks do not follow
    for field, value in [("layer_norm_epsilon", 1.0), ("scale_attn_weights", False),
                         ("scale_attn_by_inverse_layer_idx", True)]:
        save_tiny_hf_gpt2(str(tmp_path / field), **{field: value})
        with pytest.raises(UserError, match=f"not a GPT-2 architecture \\({field} {value}\\)"):
            GPT.from_pretrained(str(tmp_path / field))
    with pytest.raises(UserError, match="unknown model 'gpt5'"):
        GPT.from_pretrained("gpt5")
    for path in ("./typo", str(tmp_path / "missing"), "log/model_00010.pt"):  # paths, not hub ids: no download
        with pytest.raises(UserError, match=f"unknown model '{re.escape(path)}'"):
            GPT.from_pretrained(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load"):
        GPT.from_pretrained(str(tmp_path / "empty"))


def test_from_pretrained_refuses_a_wrong_shape(hf_dir, tmp_path):
    import safetensors.torch
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    weights = safetensors.torch.load_file(str(bad / "model.safetensors"))
    weights["transformer.h.0.mlp.c_fc.weight"] = weights["transformer.h.0.mlp.c_fc.weight"][:, :100].contiguous()
    safetensors.torch.save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"bad': transformer.h.0.mlp.c_fc.weight has shape \(32, 100\), its config "
                       r"gives \(32, 128\)$"):
        GPT.from_pretrained(str(bad))


def test_124m_parameter_count_and_flops():
    model = GPT(GPTConfig(vocab_size=50304))
    assert model.num_params() == param_count(model.config) == 124_475_904
    assert model.transformer.wte.weight is model.lm_head.weight  # tied
    # SPEC: 6N + 12 L d T with N without wpe = 855 MFLOP per token at T=1024
    assert round(flops_per_token(model.config, 1024) / 1e6) == 855


def test_init_statistics():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50304))
    residual_std = 0.02 * (2 * 12) ** -0.5
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().max().item() == 0, name
        elif ".ln_" in name or "ln_f" in name:
            assert torch.all(p == 1), name
        else:
            expected = residual_std if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() - expected) / expected < 0.02, (name, p.std().item(), expected)
            assert abs(p.mean().item()) < 1e-3, name


def test_optimizer_groups():
    model = GPT(GPTConfig(vocab_size=50304))
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type="cpu")
    decay, no_decay = opt.param_groups
    assert (len(decay["params"]), len(no_decay["params"])) == (50, 98)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert decay["betas"] == (0.9, 0.95) and decay["eps"] == 1e-8 and decay["lr"] == 6e-4
    assert not decay["fused"]  # fused is the CUDA kernel


def test_lr_schedule():
    lr = lambda step: get_lr(step, 6e-4, 6e-5, 715, 19073)  # noqa: E731
    assert lr(0) == pytest.approx(6e-4 / 715)
    assert lr(714) == pytest.approx(6e-4)
    assert lr(715) == pytest.approx(6e-4)
    assert lr(715 + (19073 - 715) // 2) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5), rel=1e-4)
    last = lr(19072)
    assert 6e-5 < last < 6e-5 * 1.0001
    assert lr(19073) == pytest.approx(6e-5) and lr(30000) == 6e-5
    steps = [lr(s) for s in range(715, 19073)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # monotone decay
    assert math.isclose(lr(100), 6e-4 * 101 / 715)
    assert [get_lr(s) for s in (0, 714, 715, 9894, 19072)] == [lr(s) for s in (0, 714, 715, 9894, 19072)]  # defaults


def test_forward_refuses_too_long_input():
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_sampling_outputs_that_are_not_finite_is_a_warning_not_a_traceback(capsys):
    """torch.multinomial fails with a traceback on NaN probabilities; sampling comes before a checkpoint's check,
    and under FSDP every rank must make the same forwards, so it goes on (drawing noise) and warns."""
    import contextlib
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=8))
    rows = generate(model, [1, 2, 3], 2, 6, "cpu", torch.Generator().manual_seed(0), contextlib.nullcontext(), 50257)
    assert [len(r) for r in rows] == [6, 6] and all(r[:3] == [1, 2, 3] for r in rows)
    assert "warning" not in capsys.readouterr().out
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    rows = generate(model, [1, 2, 3], 2, 6, "cpu", torch.Generator().manual_seed(0), contextlib.nullcontext(), 50257)
    assert [len(r) for r in rows] == [6, 6] and all(0 <= t < 50257 for r in rows for t in r)
    assert "warning: sampling: the model's outputs are not finite (inf or NaN)" in capsys.readouterr().out
