"""Small shared pieces for the trainer tests: tiny HF models, shard folders, running the scripts."""
import errno
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a model small enough to train in seconds on 2 cores (the GPT-2 vocabulary dominates its size)
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64"]
# a tiny model on input.txt: about 0.1 s per step on 2 cores
FAST = ["--data", "input.txt", *TINY, "--batch_size", "4", "--seq_len", "32", "--total_batch_size", "256",
        "--hellaswag_every", "0", "--sample_every", "0", "--warmup_steps", "5", "--max_lr", "1e-2"]


def save_tiny_hf_gpt2(folder, seed=0, **overrides):
    """A random transformers GPT-2 saved locally: the independent reference for our model."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    kwargs = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    kwargs.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**kwargs))
    with torch.no_grad():  # biases and LayerNorm gains are 0/1 at init: randomise them so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def write_shards(folder, lengths, prefix="edufineweb", dtype=np.uint16, start=0):
    """Shards whose tokens count up from `start`, so a token's value tells where it came from."""
    os.makedirs(folder, exist_ok=True)
    value = start
    for split, sizes in lengths.items():
        for i, n in enumerate(sizes):
            np.save(os.path.join(folder, f"{prefix}_{split}_{i:06d}.npy"), (np.arange(value, value + n) % 50257).astype(dtype))
            value += n
    return folder


def run_script(args, timeout=600, env=None, **kwargs):
    """Run a command from the repository root; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env, **kwargs)


def train(args, **kwargs):
    return run_script([sys.executable, "train_gpt2.py", *args], **kwargs)


def records(log_dir, kind=None):
    """(step, kind, value) of every record in log_dir/log.txt, or of one kind."""
    with open(os.path.join(log_dir, "log.txt")) as f:
        rows = [line.split() for line in f.read().splitlines()]
    return [(int(s), k, float(v)) for s, k, v in rows if kind in (None, k)]


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


class FullDisk:
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, path, room):
        self.file, self.room = open(path, "wb"), room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()
