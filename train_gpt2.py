"""
Train GPT-2 from scratch, as in the lecture "Let's reproduce GPT-2 (124M)".

    python fineweb.py                                       # tokenize FineWeb-Edu into edu_fineweb10B/
    python train_gpt2.py                                    # one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt2.py  # eight GPUs, one node
    python train_gpt2.py --data input.txt --n_layer 4 --n_head 4 --n_embd 128 --batch_size 8 --seq_len 128 \\
        --total_batch_size 1024 --max_steps 200 --warmup_steps 20 --max_lr 3e-3 --eval_every 50 --val_steps 4 \\
        --sample_every 50 --hellaswag_every 0 --log_dir log_shakespeare          # a laptop CPU (README)

The file reads top to bottom: the model (and its speed and memory options), the data loader, the training loop's
pieces, checkpoints and resume, the command line, then main().
`python train_gpt2.py --help` lists every flag; the defaults are the lecture's recipe.
"""
import argparse
import contextlib
import errno
import fcntl
import glob
import hashlib
import io
import itertools
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


class UserError(Exception):
    """Something the user can fix; printed as one line (no traceback) with exit status 1."""


def first_line(e):
    """An exception's message in one line (its type's name if it has none). A first line that only leads in to
    the next ("Error(s) in loading state_dict for GPT:") takes the start of that one, which says what is wrong."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    if lines[0].endswith(":") and len(lines) > 1:
        more = lines[1] if len(lines[1]) <= 300 else lines[1][:300] + "..."
        return f"{lines[0]} {more}"
    return lines[0]


def is_count(x):
    """A whole number, 0 or more (not a bool, not a float)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


# -----------------------------------------------------------------------------
# The model: GPT-2 as OpenAI released it, so its weights load unchanged

@dataclass
class GPTConfig:
    block_size: int = 1024   # longest sequence the position embedding covers
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v of all heads in one matmul
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): the heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention where available
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm block: the residual stream itself is never normalised, so gradients flow straight."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # tokens communicate
        x = x + self.mlp(self.ln_2(x))   # each token thinks on its own
        return x


# sizes of OpenAI's checkpoints: (n_layer, n_head, n_embd)
GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
              "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}
# --model presets: (n_layer, n_head, n_embd, context, tokens per step, max LR). GPT-2 sizes with the lecture's
# recipe; GPT-3 sizes with the paper's context, batch and LR (Brown et al. 2020, Table 2.1). The table's
# 1.3B lists 24 heads of 128, which cannot split 2048: 16 x 128 keeps the head size. 13B's 5140 is 40 x 128.
MODELS = {name: (*size, 1024, 2**19, 6e-4) for name, size in GPT2_SIZES.items()} | {
    "gpt3-125M": (12, 12, 768, 2048, 2**19, 6e-4), "gpt3-350M": (24, 16, 1024, 2048, 2**19, 3e-4),
    "gpt3-760M": (24, 16, 1536, 2048, 2**19, 2.5e-4), "gpt3-1.3B": (24, 16, 2048, 2048, 2**20, 2e-4),
    "gpt3-2.7B": (32, 32, 2560, 2048, 2**20, 1.6e-4), "gpt3-6.7B": (32, 32, 4096, 2048, 2**21, 1.2e-4),
    "gpt3-13B": (40, 40, 5120, 2048, 2**21, 1e-4), "gpt3-175B": (96, 96, 12288, 2048, 1536 * 2048, 0.6e-4),
}


def block_params(d):
    return 12 * d * d + 13 * d  # qkv 3d^2+3d, proj d^2+d, MLP 8d^2+5d, two LayerNorms 4d


def param_count(c):
    """Parameters of a GPT with config c, without building it (wte and lm_head are one matrix)."""
    return (c.vocab_size + c.block_size) * c.n_embd + c.n_layer * block_params(c.n_embd) + 2 * c.n_embd


def flops_per_token(c, T):
    """Training FLOPs per token: 6 per weight (forward + backward; wpe is a lookup) plus attention's 12 L d T."""
    return 6 * (param_count(c) - c.block_size * c.n_embd) + 12 * c.n_layer * c.n_embd * T


def is_hf_model(name):
    """What from_pretrained tries to load: OpenAI's names, a folder, or what reads as a hub id (owner/name) and
    not as a local path (./x, a file, a checkpoint of ours)."""
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) and ".." not in name
    return name in GPT2_SIZES or os.path.isdir(name) or bool(
        hub_id and not os.path.exists(name) and not name.endswith((".pt", ".dcp")))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output projection are one matrix
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        self.activation_checkpointing = False  # recompute each block in the backward instead of storing it
        self.loss_chunk_rows = 0  # > 0: the loss (given targets) by chunked_cross_entropy, never the full logits

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # every block adds to the residual stream twice; keep its variance from growing with depth
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None and self.loss_chunk_rows:  # the loss alone, never the full logits
            return None, chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                               self.loss_chunk_rows)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self):
        """Parameters, counted on the model (the tied wte/lm_head once)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """OpenAI's weights through transformers: a hub name (gpt2, gpt2-medium, ...) or a local HF folder."""
        if not is_hf_model(name_or_dir):
            raise UserError(f"unknown model '{name_or_dir}': use one of {', '.join(GPT2_SIZES)}, a hub id such as "
                            "openai-community/gpt2, or a folder saved by transformers' save_pretrained")
        from huggingface_hub.utils import logging as hub_logging
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
        hub_logging.set_verbosity_error()  # not a line per retry of a failed request: the error below says it
        hf_logging.set_verbosity_error()  # nor config warnings and a progress bar: errors here are one line
        hf_logging.disable_progress_bar()
        try:
            hf, info = GPT2LMHeadModel.from_pretrained(name_or_dir, output_loading_info=True,
                                                       ignore_mismatched_sizes=True)  # refused below, by name
        except Exception as e:  # no network, a broken folder, not a GPT-2 checkpoint, ...
            raise UserError(f"cannot load '{name_or_dir}' with transformers: {first_line(e)}")
        # transformers fills the weights a folder lacks with random ones (another architecture's folder: all of
        # them), and (ignore_mismatched_sizes) those of another shape, and says so only in a warning
        absent = sorted(k for k in info["missing_keys"] if not k.endswith(".attn.bias"))
        if absent:
            raise UserError(f"'{name_or_dir}' is not a GPT-2 checkpoint: it lacks {len(absent)} of GPT-2's weights, "
                            f"such as {absent[0]}")
        if info["mismatched_keys"]:  # (key, shape in the folder, shape its config gives)
            key, found, wanted = sorted(info["mismatched_keys"])[0]
            raise UserError(f"'{name_or_dir}': {key} has shape {tuple(found)}, its config gives {tuple(wanted)}")
        c = hf.config
        if not c.tie_word_embeddings:  # our lm_head is the token embedding; another lm_head would be dropped
            raise UserError(f"'{name_or_dir}' has an lm_head of its own (tie_word_embeddings false): GPT-2 ties it "
                            "to the token embedding")
        # what our blocks compute, against the config fields that change it in transformers' GPT-2
        ours = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "n_inner": (None, 4 * c.n_embd),
                "layer_norm_epsilon": (1e-5,), "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}
        other = {k: getattr(c, k, ok[0]) for k, ok in ours.items() if getattr(c, k, ok[0]) not in ok}
        if other:
            raise UserError(f"'{name_or_dir}' is not a GPT-2 architecture ("
                            + ", ".join(f"{k} {v}" for k, v in other.items()) + ")")
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size,
                           n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
        model = cls(config)
        sd = model.state_dict()
        # the causal-mask buffers of older transformers versions are not weights
        sd_hf = {k: v for k, v in hf.state_dict().items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        missing, unexpected = sorted(set(sd) - set(sd_hf)), sorted(set(sd_hf) - set(sd))
        if missing or unexpected:
            raise UserError(f"'{name_or_dir}' does not match GPT-2's layout: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        # HF's Conv1D keeps these as (in, out); nn.Linear wants (out, in)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k, v in sd_hf.items():
                if k.endswith(transposed):
                    v = v.t()
                if v.shape != sd[k].shape:
                    raise UserError(f"'{name_or_dir}': {k} has shape {tuple(v.shape)}, expected {tuple(sd[k].shape)}")
                sd[k].copy_(v)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        # decay the 2D tensors (matmul weights, embeddings); biases and LayerNorm gains are left alone
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # the fused CUDA kernel updates all tensors in one launch
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8,
                                 fused=device_type == "cuda")


# -----------------------------------------------------------------------------
# Speed and memory: the loss without the full logits (--loss_chunk_rows, on by default), FP8 matmuls (--fp8,
# opt-in, through the Linear class the blocks use)

class ChunkedLMHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of the logits x @ weight.T, computed `rows` rows at a time.

    A B=64, T=1024 batch has 65536 x 50304 logits: 6.6 GB in bf16, and the softmax works on an fp32 copy.
    Here one chunk's logits exist at a time. The loss is the graph's last op, so its gradient is known in
    the forward: each chunk's (softmax - one-hot) goes straight into the grads of x and of the weight, and
    the backward only scales them. The matmuls are the same three as the plain lm_head's, in the same dtype."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows, dtype, want_grads):
        n = x.size(0)
        w = weight.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # what the softmax is computed in: fp32 (fp64 for fp64)
        losses = torch.empty(n, device=x.device, dtype=acc)  # by row, averaged once at the end
        grad_x = torch.empty_like(x) if want_grads else None
        grad_w = torch.zeros_like(weight, dtype=acc) if want_grads else None
        # compiled, the one-hot goes by comparison with the column index, which inductor fuses with the exp and
        # the cast; a scatter would make it write the chunk's softmax in fp32 and read it back. Eager, a
        # comparison would make a chunk-sized mask, so there the one-hot is scattered in place
        fused = want_grads and torch.compiler.is_compiling()
        columns = torch.arange(weight.size(0), device=x.device) if fused else None
        for i in range(0, n, rows):
            xc, tc = x[i:i + rows].to(dtype), targets[i:i + rows, None]
            logits = (xc @ w.t()).to(acc)
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            losses[i:i + rows] = (lse - logits.gather(1, tc)).squeeze(1)
            if want_grads:
                # d(loss sum)/d(logits) = softmax - one-hot, not yet divided by n: in fp16, small probabilities
                # divided by n would underflow. In place: the chunk's fp32 logits are not needed after the loss
                p = logits.sub_(lse).exp_()
                if fused:
                    g = torch.where(columns == tc, p - 1, p).to(dtype)
                else:
                    g = p.scatter_add_(1, tc, torch.full_like(lse, -1.0)).to(dtype)
                grad_x[i:i + rows] = g @ w
                if dtype == torch.float16:  # each entry of g.T @ xc sums a chunk of rows, which can pass fp16's
                    # 65504 where the mean does not, whatever the loss scale: g goes down by a power of 2 (exact)
                    # when a column's sum of |g| times the largest |x| says it might
                    bound = g.abs().sum(0, dtype=torch.float32).max() * xc.abs().max().float()
                    s = torch.exp2(torch.log2(bound / 2**15).ceil().clamp(min=0))  # 1 unless needed
                    grad_w += (g.div_(s).t() @ xc).to(acc) * s
                else:
                    grad_w += g.t() @ xc
        if want_grads:
            ctx.save_for_backward(grad_x, grad_w)
            ctx.n, ctx.weight_dtype = n, weight.dtype
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.n
        return grad_x * scale, (grad_w * scale).to(ctx.weight_dtype), None, None, None, None


def chunked_cross_entropy(x, weight, targets, rows):
    """F.cross_entropy(x @ weight.T, targets) without the full logits; x is (N, C), targets (N,)."""
    want_grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return ChunkedLMHeadLoss.apply(x, weight, targets, rows, compute_dtype(x), want_grads)


def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's, or x's own outside autocast."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def to_fp8(t, dtype):
    """t in an FP8 format, scaled so its largest magnitude is the format's largest; and the scale undoing that."""
    top = torch.finfo(dtype).max
    scale = top / t.abs().max().float().clamp(min=1e-12)
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


class FP8Matmul(torch.autograd.Function):
    """x @ weight.T + bias with x and the weight in FP8 e4m3, and in the backward the incoming gradient in
    e5m2 (more range, less precision). Each tensor gets its own scale, from its largest value at this call.
    The products accumulate in fp32. torch._scaled_mm wants its first operand row-major, its second
    column-major: hence the transposes."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype):
        xq, x_inv = to_fp8(x.reshape(-1, x.size(-1)), torch.float8_e4m3fn)
        wq, w_inv = to_fp8(weight, torch.float8_e4m3fn)
        fused_bias = bias is not None and out_dtype != torch.float32  # CUDA's kernel adds no bias to fp32 output
        y = torch._scaled_mm(xq, wq.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype,
                             bias=bias.to(out_dtype) if fused_bias else None)
        if bias is not None and not fused_bias:
            y = y + bias
        ctx.save_for_backward(xq, x_inv, wq, w_inv)  # FP8 copies: a quarter of fp32 activations' memory
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        xq, x_inv, wq, w_inv = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.size(-1))
        gq, g_inv = to_fp8(g, torch.float8_e5m2)
        grad_x = torch._scaled_mm(gq, wq.t().contiguous().t(), scale_a=g_inv, scale_b=w_inv, out_dtype=grad_y.dtype)
        grad_w = torch._scaled_mm(gq.t().contiguous(), xq.t().contiguous().t(), scale_a=g_inv, scale_b=x_inv,
                                  out_dtype=torch.float32)
        grad_b = None if ctx.b_dtype is None else g.float().sum(0).to(ctx.b_dtype)
        return grad_x.view(ctx.x_shape).to(ctx.x_dtype), grad_w.to(ctx.w_dtype), grad_b, None


class Linear(nn.Linear):
    """The blocks' nn.Linear; with fp8 set (--fp8), its training matmuls run in FP8 (evaluation: autocast's dtype)."""
    fp8 = False

    def forward(self, x):
        if self.fp8 and torch.is_grad_enabled():
            return FP8Matmul.apply(x, self.weight, self.bias, compute_dtype(x))
        return super().forward(x)


# -----------------------------------------------------------------------------
# The data: uint16 token shards from fineweb.py, or one text file, cut into windows of T+1 tokens

def gpt2_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "unset")
        raise UserError(f"cannot load the GPT-2 tokenizer ({type(e).__name__}); offline, seed tiktoken's cache with "
                        f"tools/offline_tokenizer.py, with the same TIKTOKEN_CACHE_DIR (now {cache}) as here "
                        "(README, 'Offline use')")


def load_shard(path):
    if not os.path.isfile(path):  # a folder, or a pipe that np.load would wait on for ever
        raise UserError(f"shard {path} is not a regular file")
    try:
        tokens = np.load(path, mmap_mode="r")  # memory-mapped: a shard costs no RAM until read
    except Exception as e:
        raise UserError(f"cannot read shard {path}: {first_line(e)}")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"shard {path} holds a {tokens.ndim}-D {tokens.dtype} array; "
                        "expected 1-D uint16 GPT-2 tokens as written by fineweb.py")
    return tokens


def load_splits(data, need_val):
    """{'train': [token arrays], 'val': [...]} from a folder of shards or from one text file."""
    if os.path.isfile(data) and data.endswith(".npy"):
        raise UserError(f"{data} is one shard: --data takes the folder of *_train_*/*_val_* shards, or a text file")
    if os.path.isfile(data):
        # like the lecture's first loader, tokenize the whole file in memory; 90% train, 10% val
        try:
            with open(data, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read text file {data}: {e}")
        tokens = np.array(gpt2_tokenizer().encode_ordinary(text), dtype=np.uint16)
        n = int(0.9 * len(tokens))
        return {"train": [tokens[:n]], "val": [tokens[n:]]}
    how = "make it with `python fineweb.py`, or train on a text file with --data input.txt"
    if not os.path.isdir(data):
        raise UserError(f"no data at '{data}': {how}")
    # the last _train_ or _val_ in a name decides: a prefix such as my_val_set_ does not put a shard in both
    named = [(m[1], p) for p in sorted(glob.glob(os.path.join(glob.escape(data), "*.npy")))
             if (m := re.search(r".*_(train|val)_", os.path.basename(p)))]
    splits = {}
    for split in ("train", "val"):
        paths = [p for s, p in named if s == split]
        if not paths and (split == "train" or need_val):
            if named and split == "train":  # fineweb.py on a corpus smaller than two shards
                how = "its first shard is the val split: make it again with fineweb.py and a smaller --shard_size"
            raise UserError(f"no *_{split}_*.npy shards in '{data}': {how}")
        splits[split] = [load_shard(p) for p in paths]
    return splits


class DataLoader:
    """Serves micro-batches x, y of shape (B, T) to one rank.

    Each shard is cut into windows of T+1 tokens that start T apart: a window gives one row of x and,
    shifted by one token, the same row of y. All ranks walk one shared cursor: a micro-step takes the
    next B * world_size windows and rank r gets the r-th run of B of them. A micro-step may take windows
    from the end of one shard and the start of the next, so every rank changes shard on the same step
    and fewer than T+1 tokens at a shard's end go unused. With shuffle, the shard order and the window
    order inside each shard are permuted, seeded by (seed, epoch), so the position is three integers.
    """

    def __init__(self, shards, B, T, rank=0, world_size=1, shuffle=False, seed=0, split="train", pin_memory=False,
                 vocab_size=2**16):
        self.shards, self.B, self.T, self.pin_memory = shards, B, T, pin_memory
        self.split, self.vocab_size = split, vocab_size
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed
        self.shard_tokens = [len(s) for s in shards]
        self.windows = [max(n - 1, 0) // T for n in self.shard_tokens]
        if sum(self.windows) < B * world_size:
            raise UserError(f"the {split} data holds {sum(self.shard_tokens):,} tokens, too few for one micro-batch of "
                            f"{world_size} x {B} x {T} tokens: use a smaller --batch_size or --seq_len")
        for shard in shards:  # a look at each shard's start (2 MB): data of another kind fails here, before training
            self.check_ids(shard[:2**20])
        self.reset()

    def check_ids(self, tokens):
        if len(tokens) and tokens.max() >= self.vocab_size:  # an embedding lookup would fail (on a GPU: an assert)
            raise UserError(f"the {self.split} data holds token id {tokens.max()}, beyond the model's vocab_size "
                            f"{self.vocab_size}: are these GPT-2 tokens?")

    def reset(self):
        self.set_state({"epoch": 0, "shard_pos": 0, "cursor": 0})

    def state_dict(self):
        """The position, and what it is a position in: the shards' lengths and the order they are read in."""
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "cursor": self.cursor,
                "shard_tokens": self.shard_tokens, "shuffle": self.shuffle, "seed": self.seed}

    def set_state(self, state):
        """Go to a position; one from other data or another order (a checkpoint's) is refused."""
        if not isinstance(state, dict) or not {"epoch", "shard_pos", "cursor"} <= set(state):
            raise UserError(f"the checkpoint's {self.split} position is not a loader state: {state!r:.100}")
        had, has = state.get("shard_tokens"), self.shard_tokens
        if had is not None and had != has:
            raise UserError(f"the checkpoint's run read other {self.split} data ({len(had)} shards, {sum(had):,} "
                            f"tokens; this --data has {len(has)}, {sum(has):,} tokens): resume with the same data")
        # the seed orders shuffled data only
        if "shuffle" in state and (state["shuffle"] != self.shuffle or (self.shuffle and state.get("seed") != self.seed)):
            raise UserError("the checkpoint's run read its data " + (f"shuffled with --seed {state.get('seed')}"
                            if state["shuffle"] else "in order, without --shuffle") + ": resume it the same way")
        position = [state["epoch"], state["shard_pos"], state["cursor"]]
        bad = UserError(f"the checkpoint's {self.split} position (epoch, shard, window) {position} is not in this data")
        if not all(map(is_count, position)) or position[1] >= len(self.shards):
            raise bad
        self.epoch = position[0]
        self._order_shards()
        if position[2] > self.windows[self.order[position[1]]]:  # checked before a shard without windows is passed
            raise bad
        self.shard_pos, self.cursor = position[1:]
        self._enter_shard()

    def _order_shards(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))

    def _enter_shard(self):
        while self.windows[self.order[self.shard_pos]] == 0:  # a shard shorter than one window
            self._advance_shard()
        shard = int(self.order[self.shard_pos])
        self.perm = None
        if self.shuffle:
            self.perm = np.random.default_rng([self.seed, self.epoch, shard]).permutation(self.windows[shard])

    def _advance_shard(self):
        self.shard_pos, self.cursor = self.shard_pos + 1, 0
        if self.shard_pos == len(self.shards):  # wrap around to the first shard of the next epoch
            self.epoch, self.shard_pos = self.epoch + 1, 0
            self._order_shards()
        self._enter_shard()

    def next_batch(self):
        picks = []  # (shard, window) of every row of this micro-step, all ranks, in order
        need = self.B * self.world_size
        while need:
            shard = int(self.order[self.shard_pos])
            take = min(need, self.windows[shard] - self.cursor)
            ids = np.arange(self.cursor, self.cursor + take)
            picks += [(shard, int(w)) for w in (ids if self.perm is None else self.perm[ids])]
            self.cursor += take
            need -= take
            if self.cursor == self.windows[shard]:
                self._advance_shard()
        mine = picks[self.rank * self.B:(self.rank + 1) * self.B]
        T = self.T
        buf = np.stack([self.shards[s][w * T:w * T + T + 1] for s, w in mine]).astype(np.int64)
        self.check_ids(buf)
        x, y = torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())
        if self.pin_memory:  # page-locked: the copy to the GPU runs while the host goes on to the next batch
            x, y = x.pin_memory(), y.pin_memory()
        return x, y


# -----------------------------------------------------------------------------
# The training loop's pieces: learning rate, one optimizer step, evaluation, sampling, MFU

def get_lr(step, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073):
    """Linear warmup, then cosine decay from max_lr to min_lr at max_steps (defaults: the lecture's 124M run)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    decay_ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


def train_step(model, optimizer, loader, grad_accum_steps, lr, amp, scaler, grad_clip, device, skip_nonfinite=False,
               cuda_graphs=False):
    """One optimizer step over grad_accum_steps micro-batches; returns (mean loss, grad norm) as tensors.

    skip_nonfinite leaves the weights and optimizer untouched when the step diverged (see nonfinite);
    deciding that before the update costs a host sync, so it is only done when asked for. cuda_graphs: the
    model is compiled with CUDA graphs, whose outputs the next replay overwrites; a .grad made by the first
    micro-step's backward would be such an output, and the next micro-steps would add into freed memory. So
    the gradients live outside the graphs, allocated once and zeroed in place."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    if cuda_graphs:
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    optimizer.zero_grad(set_to_none=not cuda_graphs)
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # DDP all-reduces the gradients during the backward of the last micro-step only (FSDP reduce-scatters
        # every micro-step: its gradients stay sharded, which is the memory it saves)
        last = micro_step == grad_accum_steps - 1
        with model.no_sync() if isinstance(model, DDP) and not last else contextlib.nullcontext():
            with amp:
                _, loss = model(x, y)
            # each micro-loss is a mean over B*T tokens; dividing makes the sum the mean over the whole batch
            loss = loss / grad_accum_steps
            loss_accum += loss.detach()
            scaler.scale(loss).backward()
    mean_over_ranks(loss_accum)
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, the same on every rank
        norm = norm.full_tensor()
    if not (skip_nonfinite and nonfinite(loss_accum, norm, scaler)):
        scaler.step(optimizer)
    scaler.update()
    return loss_accum, norm


def mean_over_ranks(t):
    """t, averaged in place over the ranks of a launch (SUM, then divide: gloo has no AVG)."""
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def nonfinite(loss, norm, scaler):
    """Did a step diverge: is its loss or grad norm inf or NaN? (floats, or tensors at the cost of a sync)

    Under fp16 an inf grad norm is the GradScaler's routine overflow: it skips that update and lowers its
    scale by itself. So with the scaler on, only a non-finite loss counts."""
    return not math.isfinite(loss) or (not scaler.is_enabled() and not math.isfinite(norm))


@torch.no_grad()
def evaluate_loss(model, loader, steps, amp, device):
    """Mean loss over the first `steps` micro-batches of the loader, averaged over ranks."""
    model.eval()
    loader.reset()  # the same batches every time, so evaluations compare
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with amp:
            _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        total += loss.detach() / steps
    model.train()
    return mean_over_ranks(total).item()


@torch.no_grad()
def generate(model, tokens, num_samples, length, device, generator, amp, vocab_limit, top_k=50):
    """Top-k sampling until each row is `length` tokens long, prompt included.

    Outputs that are not finite (an overflow, or weights gone to NaN) would make torch.multinomial fail: such a
    row draws uniformly from its top k instead, and a warning says the samples are noise. No rank stops early, so
    an FSDP model's forwards stay in step across ranks."""
    model.eval()
    x = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(0).repeat(num_samples, 1)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    while x.size(1) < length:
        with amp:
            logits, _ = model(x[:, -model.config.block_size:])
        # only real tokens: the padded vocabulary rows (50257..50303) cannot be decoded
        probs = F.softmax(logits[:, -1, :vocab_limit].float(), dim=-1)
        topk_probs, topk_indices = torch.topk(probs, min(top_k, vocab_limit), dim=-1)
        bad = ~topk_probs.isfinite().all(dim=-1, keepdim=True)
        nonfinite |= bad.any()  # read once at the end: no host sync per token
        choice = torch.multinomial(torch.where(bad, 1.0, topk_probs), 1, generator=generator)
        x = torch.cat((x, torch.gather(topk_indices, -1, choice)), dim=1)
    model.train()
    if nonfinite:
        print("warning: sampling: the model's outputs are not finite (inf or NaN): these samples are noise")
    return x.tolist()


# dense bf16 tensor-core peak of common cards (V100, T4: fp16), for MFU; the first name in the card's wins, as a
# whole model number ("A100" is not the RTX A1000's)
PEAK_BF16_FLOPS = {"H200 NVL": 835e12, "H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12,
                   "A100": 312e12, "L40S": 362e12, "L40": 181e12, "A10": 125e12, "L4": 121e12, "4090": 165e12,
                   "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device_type):
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if re.search(rf"(?<![0-9A-Za-z]){k}(?![0-9])", name)), None)


# -----------------------------------------------------------------------------
# Checkpoints and resume: atomic writes, sharded (FSDP) checkpoints, and what --resume continues from

CHECKPOINT_NAME = re.compile(r"model_(\d+)\.(pt|dcp)$")  # .dcp: a folder of FSDP shards
CHECKPOINT_TMP = re.compile(r"model_\d+\.(pt\.tmp\d+|dcp\.tmp)$")  # what save_checkpoint and FSDP write first


def nonfinite_weight(weights):
    """The name of the first tensor in a state dict that holds inf or NaN, or None."""
    return next((k for k, v in weights.items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()), None)


def save_checkpoint(path, state):
    """Write to a temporary name, flush to disk, then rename: a crash never leaves half a checkpoint."""
    bad = nonfinite_weight(state.get("model", {}))
    if bad is not None:
        raise UserError(f"not writing {path}: its weight {bad} holds inf or NaN")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:  # a Python file, so a full disk is an OSError (torch.save(tmp) hides it)
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = os_error_in(e)  # torch.save may wrap the OSError
        if cause is None:
            raise
        raise UserError(f"cannot write checkpoint {path}: {cause.strerror or cause}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def os_error_in(e):
    """The OSError that e is, or that it was raised from or while handling (torch wraps them), or None."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


class UnreadableCheckpoint(UserError):
    """A checkpoint that may be fine but cannot be read (permissions, I/O): --resume auto stops at it."""


def load_checkpoint(path, part=(0, 1)):
    """A checkpoint of ours as a dict of plain values; UserError if missing, truncated or foreign.

    An FSDP checkpoint is a folder: its plain values in meta.pt, the sharded model and optimizer beside
    them for load_sharded_state. part (rank, world): the CRCs of that rank's share of its items alone
    (check_shards_together); a verdict of the ranks stands for them all."""
    sharded = os.path.isdir(path)
    meta = os.path.join(path, "meta.pt") if sharded else path
    named = CHECKPOINT_NAME.search(os.path.basename(os.path.normpath(path)))
    if sharded and not named:
        raise UserError(f"{path} is a folder, not a checkpoint: pass a model_<step>.pt file or a "
                        "model_<step>.dcp folder")
    try:
        if sharded:
            os.listdir(path)  # a folder that cannot be read is not an incomplete one
    except OSError as e:
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: {e.strerror or e}")
    if os.path.exists(meta) and not os.path.isfile(meta):  # a FIFO, a device
        raise UserError(f"checkpoint {path} is not a regular file")
    if not os.path.isfile(meta):
        raise UserError(f"checkpoint {path} does not exist" + (" or is incomplete" if sharded else ""))
    try:
        ckpt = torch.load(meta, map_location="cpu", weights_only=True)
    except OSError as e:  # not a broken file (--resume auto would pass over it, then overwrite it): stop
        if e.errno == errno.EINVAL:  # torch's reader seeking past the end of a file cut short: a broken file
            raise UserError(f"checkpoint {path} is truncated or corrupt (OSError: {e.strerror})")
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: {e.strerror or e}")
    except Exception as e:
        if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
            raise
        if "Weights only load failed" in str(e):  # such as the lecture's own checkpoints, with their GPTConfig
            raise UserError(f"checkpoint {path} holds pickled Python objects, which torch.load(weights_only=True) "
                            "refuses: it was not written by this train_gpt2.py")
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__})")
    damaged = failed_crc(meta, path)
    if damaged:
        raise UserError(f"checkpoint {path} is corrupt: {damaged}")
    needs = {"config", "step"} if sharded else {"model", "config", "step"}
    if not isinstance(ckpt, dict) or not needs <= set(ckpt) or not isinstance(ckpt.get("model", {}), dict) \
            or not all(isinstance(k, str) for k in ckpt.get("model", {})) or not is_count(ckpt["step"]):
        raise UserError(f"{path} is not a checkpoint of train_gpt2.py (needs {', '.join(sorted(needs))})")
    if named and int(named[1]) != ckpt["step"]:  # renamed: --resume and --keep_checkpoints go by the name's step
        raise UserError(f"checkpoint {path} holds step {ckpt['step']}, not the step its name gives: name it "
                        f"model_{ckpt['step']:05d}.{named[2]}")
    if sharded:
        items = shard_items(path)
        agreed = SHARD_VERDICTS.get(os.path.realpath(path), "unchecked")  # the ranks' verdict, if they checked it
        if agreed == "unchecked":
            check_shard_crcs(path, items[part[0]::part[1]])
        elif agreed:
            raise DamagedShard(agreed)
    ckpt["sharded"] = sharded
    if not sharded:  # compiled and DDP-wrapped models prefix their parameter names
        ckpt["model"] = {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in ckpt["model"].items()}
        bad = nonfinite_weight(ckpt["model"])  # never written so (save_checkpoint): edited or damaged since
        if bad is not None:
            raise UserError(f"checkpoint {path}: its weight {bad} holds inf or NaN")
    return ckpt


class DamagedShard(UserError):
    """An FSDP checkpoint's item whose bytes fail their CRC-32 (or hold no archive)."""


def shard_items(path):
    """The items (file, offset, length) that the .metadata of an FSDP checkpoint points to, in file order. Every
    shard file must hold those bytes, so --resume auto passes over a checkpoint cut short."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise UserError(f"checkpoint {path} is incomplete (no .metadata)")
    from torch.distributed.checkpoint import FileSystemReader
    try:
        items = sorted(FileSystemReader(path).read_metadata().storage_data.values(),
                       key=lambda info: (info.relative_path, info.offset))
    except Exception as e:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__} in .metadata)")
    for info in items:
        file = os.path.join(path, info.relative_path)
        try:
            size = os.path.getsize(file) if os.path.isfile(file) else -1
        except OSError:  # removed since
            size = -1
        if size < info.offset + info.length:
            raise UserError(f"checkpoint {path} is incomplete ({info.relative_path} is missing or cut short)")
    return items


def check_shard_crcs(path, items):
    """Each item is a torch.save archive of its own, read back by torch.load, which checks no CRC: check them."""
    for info in items:
        try:
            with open(os.path.join(path, info.relative_path), "rb") as f:
                f.seek(info.offset)
                item = io.BytesIO(f.read(info.length))
        except OSError as e:
            raise UnreadableCheckpoint(f"cannot read checkpoint {path}: {e.strerror or e}")
        try:
            archive = zipfile.is_zipfile(item)
        except Exception:  # zipfile.BadZipFile, on some damaged end records
            archive = False
        if not archive:
            raise DamagedShard(f"checkpoint {path} is corrupt: {info.relative_path} holds no archive at byte "
                               f"{info.offset}, where .metadata puts one")
        damaged = failed_crc(item, path)
        if damaged:
            raise DamagedShard(f"checkpoint {path} is corrupt: in {info.relative_path} at byte {info.offset}, "
                               f"{damaged}")


# {real path: None (its shards are sound) or the error}: FSDP checkpoints the ranks of a launch checked together
SHARD_VERDICTS = {}


def check_shards_together(args):
    """FSDP on several ranks: the CRC check of the checkpoint --resume will take, split over the ranks: each reads
    1/world of its shards instead of all of them (6.7B's checkpoints are 107 GB), and load_checkpoint takes their
    verdict. --resume auto goes from the newest folder back, past damaged ones and ones broken on every rank, to
    the first that is sound. Where the ranks disagree otherwise, or one cannot read a folder, the check is left to
    load_checkpoint, whole on each rank. Every rank takes part whatever it finds: the collectives stay in step."""
    SHARD_VERDICTS.clear()
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.resume == "auto":
        paths = [path for _, path in reversed(list_checkpoints(args.log_dir)) if os.path.isdir(path)]
    else:
        paths = [args.resume] if args.resume != "none" and os.path.isdir(args.resume) else []
    shared = [paths]
    dist.broadcast_object_list(shared, src=0)  # rank 0's folders, so the ranks check the same ones in step
    for path in shared[0]:
        try:
            load_checkpoint(path, part=(rank, world))
            verdict = ("sound", None)
        except UnreadableCheckpoint:  # --resume auto stops at it, and says so
            verdict = ("unsure", None)
        except DamagedShard as e:
            verdict = ("damaged", str(e))
        except UserError:  # incomplete, not ours, absent: if on every rank, --resume auto passes over it
            verdict = ("broken", None)
        except Exception:  # anything else (an OSError in a race): load_checkpoint meets it again, and says it
            verdict = ("unsure", None)
        verdicts = [None] * world
        dist.all_gather_object(verdicts, verdict)
        kinds = {kind for kind, _ in verdicts}
        damaged = next((message for kind, message in verdicts if kind == "damaged"), None)
        if damaged or kinds == {"sound"}:
            SHARD_VERDICTS[os.path.realpath(path)] = damaged
        if not damaged and kinds != {"broken"}:
            return


def failed_crc(file, path, only=""):
    """What is wrong in a torch.save file: the first record whose bytes no longer match the CRC-32 written with it,
    or zip headers damaged past reading; None if nothing. torch.load checks neither: a flipped byte among the
    weights would load as a wrong number. A CRC of 0 is taken for none (torch.serialization.set_crc32_options(False)
    writes 0). only: the records whose names end so, alone."""
    try:
        with zipfile.ZipFile(file) as archive:
            for record in archive.infolist():
                if record.CRC == 0 or not record.filename.endswith(only):
                    continue
                try:
                    with archive.open(record) as f:  # zipfile compares the CRC at the end of the record
                        while f.read(1 << 24):
                            pass
                except zipfile.BadZipFile:
                    return f"its record {record.filename} does not match its CRC-32"
    except OSError as e:
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: {e.strerror or e}")
    except zipfile.BadZipFile:  # torch.load read it (or DCP will), so its own format: leave it to that
        return None
    except MemoryError:
        raise
    except Exception as e:  # zipfile's other errors on damaged headers: a name no longer UTF-8, a flag, a size
        return f"its zip headers are damaged ({type(e).__name__})"
    return None


def save_sharded_checkpoint(path, model, optimizer, meta):
    """FSDP: each rank writes its shards with torch.distributed.checkpoint into path + '.tmp', then rank 0
    adds meta.pt and renames the folder, so a complete folder is the only kind under the final name. A
    failure (a full disk) leaves no folder; write_checkpoint makes it every rank's UserError."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    tmp, master = path + ".tmp", dist.get_rank() == 0
    error = None
    bad = nonfinite_weight({k: v.to_local() if hasattr(v, "to_local") else v for k, v in model_state.items()})
    try:
        if bad is not None:  # in this rank's shards; every rank refuses (gather_outcomes)
            error = f"not writing {path}: its weight {bad} holds inf or NaN"
        elif master and os.path.exists(tmp):
            shutil.rmtree(tmp)
    except OSError as e:
        error = f"cannot write checkpoint {path}: {e}"
    gather_outcomes(error)  # no rank writes into tmp before it is empty
    try:
        try:
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
        except dcp.api.CheckpointException as e:  # raised on every rank, holding each failed rank's exception
            raise UserError(checkpoint_error(e, f"cannot write checkpoint {path}", tmp))
        if master:
            save_checkpoint(os.path.join(tmp, "meta.pt"), meta)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
    except (UserError, OSError) as e:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(str(e) if isinstance(e, UserError) else f"cannot write checkpoint {path}: {e.strerror or e}")


def write_checkpoint(path, model, optimizer, state, fsdp, keep, meta_only=False):
    """The checkpoint of a step: every rank's shards (FSDP; meta_only: their meta.pt alone, the shards being
    there already) or rank 0's file, then --keep_checkpoints. Every rank returns, or every rank raises the same
    UserError: after a failure on rank 0 alone (a full disk), the others must not wait for it in the next
    collective until --dist_timeout."""
    master = not dist.is_initialized() or dist.get_rank() == 0
    error = None
    try:
        if fsdp and meta_only:
            if master:
                save_checkpoint(os.path.join(path, "meta.pt"), state)
        elif fsdp:
            save_sharded_checkpoint(path, model, optimizer, state)
        elif master:
            save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state})
        if master and keep:
            prune_checkpoints(os.path.dirname(path), state["step"], keep)
    except UserError as e:
        error = str(e)
    except OSError as e:  # save_checkpoint and save_sharded_checkpoint raise UserErrors: this is prune_checkpoints
        error = f"cannot remove an old checkpoint (--keep_checkpoints {keep}): {e}"
    gather_outcomes(error)


def gather_outcomes(error, choice=None):
    """Every rank's choice, [choice] in a single process; a UserError on every rank if any rank failed (rank 0's
    error first), so no rank is left waiting in a collective for one that has left."""
    outcomes = [(error, choice)]
    if dist.is_initialized():
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, (error, choice))
        dist.barrier()  # gloo's sender may return before the receivers are done: nobody leaves before them
    failed = [(rank, e) for rank, (e, _) in enumerate(outcomes) if e is not None]
    if failed:
        rank, e = failed[0]
        raise UserError(e if rank == 0 else f"rank {rank}: {e}")
    return [c for _, c in outcomes]


def checkpoint_error(e, what, folder=None):
    """One line for a CheckpointException: what failed, and the first rank's OSError, or else its exception. A
    write to a full disk can fail in torch.save's stream writer as a RuntimeError of its own, which the ranks
    exchange without its cause: so a folder (being written) with under 1 MiB free is said to be full."""
    errors = [exc for exc, _ in e.failures.values()]
    cause = next(filter(None, map(os_error_in, errors)), errors[0] if errors else e)
    if isinstance(cause, OSError) and cause.strerror:
        return f"{what}: {cause.strerror}"
    if folder and os.path.isdir(folder) and shutil.disk_usage(folder).free < 2**20:
        return f"{what}: {os.strerror(errno.ENOSPC)}"
    return f"{what}: {type(cause).__name__} ({first_line(cause)})"


def load_sharded_state(path, model, optimizer=None):
    """Fill a sharded model and its optimizer from an FSDP checkpoint, at any world size (DCP reshards).
    Without an optimizer: the weights alone, into any model, also in a single process (hellaswag.py -c)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    optimizers = (optimizer,) if optimizer else ()
    model_state, optim_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        with warnings.catch_warnings():  # that one process reads all the shards is meant
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(state, checkpoint_id=path)
    except dcp.api.CheckpointException as e:
        raise UserError(checkpoint_error(e, f"checkpoint {path} is truncated or corrupt"))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


LOG_DIR_LOCK = {"fd": None}


def unlock_log_dir():
    if LOG_DIR_LOCK["fd"] is not None:
        os.close(LOG_DIR_LOCK["fd"])
        LOG_DIR_LOCK["fd"] = None


# a forked child (a compile worker) would share the lock and keep it after the trainer is killed
os.register_at_fork(after_in_child=unlock_log_dir)


def lock_log_dir(log_dir):
    """One run at a time in a --log_dir: a second one would delete the first's checkpoint being written and
    interleave their logs. Rank 0 holds the lock until main() ends, or the process (or its next main(), after
    one that raised). On a file system without locks (some network ones) there is no guard."""
    unlock_log_dir()
    fd = os.open(log_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another run is using --log_dir {log_dir}: wait for it to end, or choose another --log_dir")
    except OSError:  # a file system without locks (some network ones): go on unguarded
        pass
    LOG_DIR_LOCK["fd"] = fd


def list_checkpoints(log_dir):
    """[(step, path)] of the checkpoints in log_dir, .pt files and .dcp folders, oldest first."""
    return sorted((int(m.group(1)), p) for p in glob.glob(os.path.join(glob.escape(log_dir), "model_*"))
                  if (m := CHECKPOINT_NAME.search(os.path.basename(p))))


def find_resume_checkpoint(log_dir, warn, overwrite=False):
    """(checkpoint, path) of the newest checkpoint in log_dir that loads, skipping broken ones; (None, None) if
    there is none (or, with overwrite, none that loads).

    Both kinds count: an FSDP checkpoint found by a run without --fsdp is refused, not passed over."""
    found = list_checkpoints(log_dir)
    for _, path in reversed(found):
        try:
            return load_checkpoint(path), path
        except UnreadableCheckpoint as e:
            raise UserError(f"{e}: make it readable, or move it out of {log_dir}/")
        except UserError as e:
            warn(f"warning: {e}: skipping it")
    if found and not overwrite:  # starting over would trim the log of a run whose checkpoints are all lost
        raise UserError(f"no checkpoint in {log_dir}/ loads: start over with --overwrite, or pick one with --resume")
    return None, None


def resumed_config(args):
    """The GPTConfig of the checkpoint that --resume will continue, if its run started from this --init_from; else
    None. A peek, memory-mapped so no tensor is read; it passes over what load_checkpoint would refuse in what it
    reads (the CRC of the plain values, the step in the name, a config that builds), and gives nothing where a
    fresh start may follow (--resume auto --overwrite), which needs the HF weights."""
    if args.resume == "none" or (args.resume == "auto" and args.overwrite):
        return None
    paths = [args.resume] if args.resume != "auto" else [path for _, path in reversed(list_checkpoints(args.log_dir))]
    for path in paths:
        meta = os.path.join(path, "meta.pt") if os.path.isdir(path) else path
        named = CHECKPOINT_NAME.search(os.path.basename(os.path.normpath(path)))
        try:
            if not os.path.isfile(meta) or failed_crc(meta, path, only="data.pkl"):  # a FIFO would block the load
                continue
            ckpt = torch.load(meta, map_location="cpu", weights_only=True, mmap=True)
            config, init_from = GPTConfig(**ckpt["config"]), ckpt["args"]["init_from"]
            sizes = asdict(config).values()
            if (named and int(named[1]) != ckpt["step"]) or not all(is_count(v) and v > 0 for v in sizes) \
                    or config.n_embd % config.n_head:
                continue
        except Exception:  # damaged or foreign: --resume auto passes over it, and --resume PATH says what is wrong
            continue
        return config if init_from == args.init_from else None
    return None


def prune_checkpoints(log_dir, step, keep):
    """--keep_checkpoints: keep the one at `step` and the keep - 1 newest before it (later ones are left)."""
    older = [path for s, path in list_checkpoints(log_dir) if s < step]
    for path in older[:max(len(older) - (keep - 1), 0)]:
        remove_checkpoint(path)


def remove_checkpoint(path):
    """A checkpoint file, or an FSDP checkpoint's folder."""
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def trim_log(log_path, resume_step, evals_done=True):
    """Drop the records a stopped run wrote after its checkpoint at resume_step, so they are not doubled.

    The checkpoint at step s is written after step s's evaluations and before its training step, so
    records of earlier steps and the evaluations of step s stay; the rest is rewritten atomically.
    A checkpoint written on SIGTERM/SIGINT comes before its step's evaluations (evals_done False):
    those are redone, so their records go too.
    """
    if not os.path.exists(log_path):
        return
    log_path = os.path.realpath(log_path)  # a link to the log stays a link
    kept = [line + "\n" for line in read_log(log_path) if not written_after(log_record(line), resume_step, evals_done)]
    with open(log_path + ".tmp", "w", errors="surrogateescape") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())  # the new log is on disk before it replaces the old one
    os.replace(log_path + ".tmp", log_path)


def written_after(record, step, evals_done):
    """Is a log record (step, kind) written after the checkpoint at `step`? (None, a line that is no record: no)"""
    return record is not None and (record[0] > step or (record[0] == step and (record[1] == "train" or not evals_done)))


def log_digest(log_path, step, evals_done):
    """A hash of the records before the checkpoint at `step`, the ones trim_log keeps. A checkpoint carries the
    digest of its run's log, so a log of the same run is told from another's that spans the same steps."""
    records = [line for line in read_log(log_path)
               if (record := log_record(line)) and not written_after(record, step, evals_done)]
    return hashlib.sha256("\n".join(records).encode(errors="surrogateescape")).hexdigest()


NO_RECORDS = hashlib.sha256(b"").hexdigest()  # the log_digest of a log without records


def read_log(log_path):
    """The whole lines of a log.txt, [] if there is none; bytes that are not UTF-8 are kept as they are."""
    if not os.path.exists(log_path):
        return []
    if not os.path.isfile(log_path):  # a FIFO would block the read for ever
        raise UserError(f"{log_path} is not a regular file: move it out of the --log_dir")
    with open(log_path, errors="surrogateescape") as f:
        lines = f.read().split("\n")
    # the piece after the last newline is empty, or a record cut short by a crash (after the last checkpoint, so
    # trim_log would drop it): dropped. A whole record or a line of another kind that lost its newline: kept
    first = lines[-1].split()[:1]
    return lines if log_record(lines[-1]) or (first and not first[0].isdecimal()) else lines[:-1]


def log_record(line):
    """(step, kind) of a record line such as '250 val 3.2925'; None for any other line."""
    fields = line.split()
    return (int(fields[0]), fields[1]) if len(fields) == 3 and fields[0].isdecimal() else None


def log_span(log_path):
    """(first step, last step, last trained step or -1) of the records in a log.txt; None if it holds none."""
    records = [r for r in map(log_record, read_log(log_path)) if r]
    if not records:
        return None
    return records[0][0], max(s for s, _ in records), max((s for s, kind in records if kind == "train"), default=-1)


def resume_or_start(args, model, optimizer, scaler, train_loader, T, device_type, master, say):
    """Load the checkpoint to resume from (--resume), or make sure a fresh run overwrites nothing by accident.

    Each rank plans from what it sees in --log_dir, and the ranks compare before anything is loaded together
    or deleted: an error on any rank, or ranks that would start from different states (a --log_dir that is not
    shared), stop them all. Returns (start_step, the checkpoint's path or None, evaluated_under: the --max_steps
    of the run whose evaluations of start_step the log holds, None if it holds none). The log keeps the records
    before the start."""
    log_path = os.path.join(args.log_dir, "log.txt")

    def failure(e):  # a UserError says what is wrong; an OSError here is one of the --log_dir
        return str(e) if isinstance(e, UserError) else f"cannot write to --log_dir {args.log_dir}: {e.strerror or e}"

    error, plan = None, None
    try:
        if master:  # first: a second run in the folder is refused before it reads any checkpoint
            lock_log_dir(args.log_dir)
    except (UserError, OSError) as e:
        error = failure(e)
    gather_outcomes(error)
    if args.fsdp and dist.is_initialized() and dist.get_world_size() > 1:
        check_shards_together(args)
    try:
        plan = plan_start(args, model, optimizer, scaler, train_loader, T, device_type, say)
        if master:
            open(log_path, "a").close()  # an unwritable --log_dir fails now, not after compiling and evaluating
    except (UserError, OSError) as e:
        error = failure(e)
    origins = gather_outcomes(error, plan and plan["origin"])
    other = next((r for r, origin in enumerate(origins) if origin != origins[0]), None)
    if other is not None:
        s0, s1 = origins[0][0], origins[other][0]
        how = f"starts at step {s0} but rank {other} at step {s1}" if s0 != s1 else \
            f"and rank {other} start at step {s0} from different checkpoints"
        raise UserError(f"rank 0 {how}: they see different files in --log_dir {args.log_dir}; on several nodes it "
                        "must be one shared folder")
    start_step, evals_done, ckpt_path = plan["step"], plan["evals_done"], plan["path"]
    if ckpt_path and args.fsdp:
        load_sharded_state(ckpt_path, model, optimizer)
    error = None
    try:
        if master:
            for path in plan["remove"]:
                remove_checkpoint(path)
            if plan["log_aside"]:
                os.replace(log_path, plan["log_aside"])
            trim_log(log_path, plan["keep_log_to"], evals_done)
            for tmp in glob.glob(os.path.join(glob.escape(args.log_dir), "model_*.tmp*")):
                if CHECKPOINT_TMP.search(os.path.basename(tmp)):  # half a checkpoint, from a run killed writing it
                    remove_checkpoint(tmp)
            for tmp in glob.glob(os.path.join(glob.escape(args.log_dir), "model_*.dcp", "meta.pt.tmp*")):
                if re.fullmatch(r"meta\.pt\.tmp\d+", os.path.basename(tmp)):  # a meta.pt rewrite, killed
                    os.remove(tmp)
    except OSError as e:
        error = f"cannot tidy --log_dir {args.log_dir}: {e}"
    gather_outcomes(error)
    if ckpt_path:
        done = "the run is complete, nothing left to train" if plan["evaluated_under"] == args.max_steps else \
            "only its final evaluations are left"
        say(f"resuming from {ckpt_path} at step {start_step}" + (f": {done}" if start_step == args.max_steps else ""))
    return start_step, ckpt_path, plan["evaluated_under"]


def plan_start(args, model, optimizer, scaler, train_loader, T, device_type, say):
    """resume_or_start's decision, on one rank: {step, evals_done, path (of the checkpoint, or None), remove
    (checkpoints to delete), keep_log_to (the log's last step to keep), log_aside (where to move the log to, or
    None), origin (what the ranks compare), evaluated_under (see resume_or_start)}.
    A checkpoint's plain state is loaded here, its FSDP shards later."""
    log_path = os.path.join(args.log_dir, "log.txt")
    span = log_span(log_path)
    ckpt, ckpt_path, log_aside = None, None, None
    if args.resume == "auto":
        ckpt, ckpt_path = find_resume_checkpoint(args.log_dir, say, args.overwrite)
    elif args.resume != "none":
        ckpt, ckpt_path = load_checkpoint(args.resume), args.resume
    if ckpt is None:  # a fresh run
        earlier = [path for _, path in list_checkpoints(args.log_dir)]
        if (earlier or span) and not args.overwrite:
            if args.resume == "none":
                raise UserError(f"{args.log_dir}/ already holds a run: continue it with --resume auto, "
                                "start over with --overwrite, or choose another --log_dir")
            # --resume auto, and no checkpoint at all: fine for a run stopped before its first checkpoint, if
            # this is that run; a log that trained past this run's first checkpoint lost its checkpoints
            first, last, trained = span
            if first > 0 or trained >= min(args.checkpoint_every or args.max_steps, args.max_steps):
                raise UserError(f"{args.log_dir}/log.txt records a run from step {first} to {last}, but "
                                f"{args.log_dir}/ holds none of its checkpoints: go on with --resume PATH (the "
                                "checkpoint it started from, or one moved away), or start over with --overwrite")
            # the log's run may have been another (longer) one: its records are kept, beside the new log
            log_aside = next(f"{log_path}.{i}" for i in itertools.count(1) if not os.path.exists(f"{log_path}.{i}"))
            say(f"warning: {args.log_dir}/ holds no checkpoint yet: starting at step 0; the log so far is kept as "
                f"{log_aside}")
        # with --overwrite, its checkpoints go: they would pass for this run's
        return dict(step=0, evals_done=True, path=None, remove=earlier, keep_log_to=-1, origin=(0,),
                    log_aside=log_aside, evaluated_under=None)
    missing = ({"loader", "rng"} | ({"optimizer"} if not ckpt["sharded"] else set())) - set(ckpt)
    if missing:
        raise UserError(f"checkpoint {ckpt_path} has no {', '.join(sorted(missing))}: it can be evaluated "
                        "(hellaswag.py -c), not resumed")
    if ckpt["sharded"] != args.fsdp:
        raise UserError(f"checkpoint {ckpt_path} was written " + ("with" if ckpt["sharded"] else "without") +
                        " --fsdp: resume it the same way")
    run_args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}  # the flags of the checkpoint's run
    if ckpt["config"] != asdict(model.config):
        init_from = run_args.get("init_from", args.init_from)  # the architecture came with those weights
        fix = f"--init_from {init_from}" if init_from != args.init_from else "the same model flags"
        raise UserError(f"checkpoint {ckpt_path} is for model {ckpt['config']}, but this run builds "
                        f"{asdict(model.config)}: pass {fix}, or another --log_dir")
    if ckpt.get("seq_len", T) != T:
        raise UserError(f"checkpoint {ckpt_path} was trained with --seq_len {ckpt['seq_len']!r}, not {T}")
    start_step, evals_done = ckpt["step"], ckpt.get("evals_done", True)
    if start_step > args.max_steps:
        raise UserError(f"checkpoint {ckpt_path} is at step {start_step}, past --max_steps {args.max_steps}")
    # a checkpoint from another folder is of this folder's run, moved away, if the log holds the records it
    # followed (by their digest); or it starts a branch, if the log holds none of them and the folder no checkpoint
    # up to its step. Else this folder holds another run. (Checkpoints from before the digest: by the steps alone.)
    found = list_checkpoints(args.log_dir)
    outside = os.path.dirname(os.path.realpath(ckpt_path)) != os.path.realpath(args.log_dir)
    followed = log_digest(log_path, start_step, evals_done)
    own_earlier = any(s <= start_step for s, _ in found)
    if "log_digest" in ckpt:
        same_run = followed == ckpt["log_digest"] or (followed == NO_RECORDS and not own_earlier)
        if not outside and followed != ckpt["log_digest"]:  # its own folder's log: edited, or records lost
            say(f"warning: {log_path} is not the log the checkpoint's run wrote up to step {start_step} (records "
                "were edited or lost): the resumed log will differ from that run's")
    else:
        first, last, _ = span or (start_step, start_step, None)
        same_run = first <= start_step <= last and not own_earlier
    foreign = outside and not same_run
    if foreign and not args.overwrite:
        raise UserError(f"{args.log_dir}/ holds another run: to go on from {ckpt_path} there, replace it with "
                        "--overwrite, or choose another --log_dir")
    later = [path for s, path in found if (foreign or s > start_step) and not os.path.samefile(path, ckpt_path)] \
        if args.resume != "auto" else []
    if later and not args.overwrite:  # a later --resume auto would take them for this run's
        raise UserError(f"{args.log_dir}/ holds checkpoints after step {start_step} "
                        f"({', '.join(os.path.basename(p) for p in later)}): to go on from {ckpt_path} "
                        "instead, delete them with --overwrite, or choose another --log_dir")
    val_rows = args.val_steps * train_loader.B * train_loader.world_size
    if args.eval_every and ckpt.get("val_rows", val_rows) != val_rows:
        say(f"warning: the checkpoint's run evaluated {ckpt['val_rows']} val sequences, this one {val_rows} "
            "(--val_steps x --batch_size x processes): the val loss changes at the resume")
    changed = [f"--{name} {run_args[name]:g} -> {getattr(args, name):g}"
               for name in ("max_steps", "warmup_steps", "max_lr", "min_lr")
               if isinstance(run_args.get(name), (int, float)) and run_args[name] != getattr(args, name)]
    if changed and start_step < args.max_steps:  # meant, or defaults that changed (the presets' step counts)
        say(f"warning: the learning rate schedule changes at the resume ({', '.join(changed)})")
    try:
        train_loader.set_state(ckpt["loader"])
        if not args.fsdp:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):  # an fp16 run's loss scale; a bf16 or fp32 checkpoint has none, and fp16 starts one
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device_type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # edited by hand, broken
        raise UserError(f"checkpoint {ckpt_path} does not fit its own config: {first_line(e)}")
    origin = (start_step, ckpt.get("log_digest"), repr(ckpt["loader"]))  # the same checkpoint on every rank
    run_max_steps = run_args["max_steps"] if is_count(run_args.get("max_steps")) else args.max_steps
    return dict(step=start_step, evals_done=evals_done, path=ckpt_path, remove=later,
                keep_log_to=-1 if foreign else start_step, origin=origin, log_aside=None,
                evaluated_under=run_max_steps if evals_done else None)


# -----------------------------------------------------------------------------
# Command line and setup (devices, FSDP, FP8, autocast): the defaults are the lecture's recipe for GPT-2 (124M)

def usage_error(message):
    exit_with(f"error: {message} (see --help)")  # argparse's error, in one line rather than the usage text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where the help says it (a None default: where its value comes from)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or "(default" in action.help else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train GPT-2 (lecture recipe by default).", formatter_class=HelpFormatter)
    p.error = usage_error
    a = p.add_argument
    a("--data", default="edu_fineweb10B", help="folder of *_train_*/*_val_*.npy shards, or a text file (90/10 split)")
    a("--model", default="gpt2", help=f"preset: architecture, context, batch and LR; one of {', '.join(MODELS)}")
    a("--n_layer", type=int, help="override the --model's number of layers")
    a("--n_head", type=int, help="override the --model's number of heads")
    a("--n_embd", type=int, help="override the --model's embedding width")
    a("--block_size", type=int, help="context of the position embedding (default: the --model's)")
    a("--vocab_size", type=int, help="50257 padded to a multiple of 128 for fast kernels (default: 50304)")
    a("--init_from", default="scratch", help="'scratch', or an HF GPT-2 to start from its weights: a name "
                                          "(gpt2, ...), a hub id (owner/name) or a save_pretrained folder")
    a("--batch_size", type=int, help="micro-batch size B per process (default: 64 at T=1024, the lecture's 65,536 "
                                     "tokens, or the most rows under that which divide a step's rows per process)")
    a("--seq_len", type=int, help="sequence length T (default: the model's context)")
    a("--total_batch_size", type=int, help="tokens per optimizer step (default: the --model's, 2**19 for gpt2)")
    a("--max_steps", type=int, help="optimizer steps (default: 10B tokens at the --model preset's tokens per step, "
                                    "whatever --total_batch_size is: 19073 for gpt2)")
    a("--warmup_steps", type=int, help="linear LR warmup steps (default: GPT-3's 375M tokens at the preset's tokens "
                                       "per step: 715 for gpt2)")
    a("--max_lr", type=float, help="peak LR (default: the --model's, 6e-4 for gpt2)")
    a("--min_lr", type=float, help="LR at the end of the cosine (default: max_lr / 10)")
    a("--weight_decay", type=float, default=0.1, help="AdamW weight decay of the matmul weights and embeddings")
    a("--grad_clip", type=float, default=1.0, help="clip the global grad norm to this (0: no clipping)")
    a("--shuffle", action="store_true", help="permute shards and windows per epoch (default: the lecture's order)")
    a("--eval_every", type=int, default=250, help="val loss every N steps (0: never)")
    a("--val_steps", type=int, default=20, help="val micro-batches per process")
    a("--hellaswag_every", type=int, default=250, help="HellaSwag every N steps (0: never)")
    a("--hellaswag_data", help="local HellaSwag val file (jsonl or parquet); default: download once")
    a("--sample_every", type=int, default=250, help="print samples every N steps (0: never)")
    a("--sample_prompt", default="Hello, I'm a language model,", help="the samples start with this text")
    a("--num_samples", type=int, default=4, help="samples per process")
    a("--sample_length", type=int, default=32, help="sample length in tokens, prompt included")
    a("--checkpoint_every", type=int, default=5000, help="checkpoint every N steps and at the end (0: end only)")
    a("--log_dir", default="log", help="log.txt and model_<step>.pt go here")
    a("--resume", default="none", help="'none', 'auto' (newest valid checkpoint in --log_dir) or a checkpoint path")
    a("--keep_checkpoints", type=int, default=0,
      help="after writing a checkpoint, delete all but it and the K-1 before it (0: keep all)")
    a("--skip_nonfinite", action="store_true", help="skip an update whose loss or grad norm is inf/NaN (default: stop)")
    a("--dist_timeout", type=float, default=600, help="seconds a rank waits for the others before the job fails; "
                                                      "with DDP it must cover rank 0 writing a checkpoint")
    a("--overwrite", action="store_true",
      help="start fresh even if --log_dir holds an earlier run (with --resume auto: if no checkpoint loads); with "
      "--resume PATH, drop the checkpoints after it, or the other run --log_dir holds")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    a("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
      help="autocast dtype; auto: bf16 on CUDA (fp16 + GradScaler without bf16), fp32 elsewhere")
    a("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile; auto: on for CUDA")
    a("--compile_mode", default="default", choices=["default", "max-autotune-no-cudagraphs", "max-autotune"],
      help="torch.compile mode: autotune the matmul kernels (slow to compile), with CUDA graphs or without; at "
      "124M on an H200, cuBLAS beat every autotuned kernel")
    a("--fp8", action="store_true", help="run the blocks' training matmuls in FP8 (GPUs of compute capability "
      "8.9+: Ada, Hopper); not the lecture's bf16 numerics, and at 124M slower (5-7%% on an H200); the lm_head "
      "and evaluation stay in the --dtype")
    a("--loss_chunk_rows", type=int, default=8192,
      help="compute lm_head + cross-entropy this many rows at a time, never the full logits: B=64 in 26 GiB, "
      "not 41 (0: all at once, as the lecture; about 1.5%% faster where memory allows)")
    a("--seed", type=int, default=1337, help="of the weights' init and, with --shuffle, of the data order")
    a("--fsdp", action="store_true", help="shard weights, grads and optimizer over the GPUs (FSDP2) instead of DDP")
    a("--activation_checkpointing", action="store_true", help="recompute each block in the backward: less memory")
    a("--dry_run", action="store_true", help="print parameters, FLOPs, the batch plan and memory per GPU, then exit")
    a("--world_size", type=int, help="GPUs for --dry_run to plan for (default: this launch's)")
    args = p.parse_args(argv)
    for name, value in vars(args).items():  # past 2**62 PyTorch and NumPy overflow (a typo, not a plan)
        if isinstance(value, int) and abs(value) >= (2**64 if name == "seed" else 2**62):  # seeds are 64-bit
            p.error(f"--{name} {value} is too large")
    for name in ("batch_size", "seq_len", "total_batch_size", "max_steps", "val_steps", "num_samples", "world_size",
                 "n_layer", "n_head", "n_embd", "block_size", "sample_length"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    for name in ("eval_every", "hellaswag_every", "sample_every", "checkpoint_every", "warmup_steps",
                 "keep_checkpoints", "seed", "loss_chunk_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name} must be 0 or more")
    for name in ("max_lr", "min_lr", "weight_decay", "grad_clip"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < math.inf:  # NaN fails this too
            p.error(f"--{name} must be a finite number, 0 or more")
    if args.num_samples > 1024:  # printed every --sample_every steps, one batch: more is a typo
        p.error("--num_samples must be at most 1024")
    if not 1 <= args.dist_timeout <= 10**6:  # c10d counts milliseconds in a C int beyond that
        p.error("--dist_timeout must be 1 to 1e6 seconds")
    if args.vocab_size is not None and args.vocab_size < 50257:
        p.error("--vocab_size must hold the GPT-2 tokenizer's 50257 tokens")
    if args.world_size is not None and not args.dry_run:
        p.error("--world_size is for --dry_run: a run takes its number of processes from the launch")
    if args.sample_every and not args.sample_prompt:
        p.error("--sample_prompt is empty")
    return args


def apply_preset(args):
    """Fill the flags left unset from the --model preset; returns the config to train from scratch."""
    if args.model not in MODELS:
        raise UserError(f"unknown --model '{args.model}': choose one of {', '.join(MODELS)}")
    if args.init_from != "scratch":  # the weights come with their architecture
        given = [n for n in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if getattr(args, n) is not None]
        if given and is_hf_model(args.init_from):  # else: from_pretrained's error
            raise UserError(f"--init_from {args.init_from} brings its own architecture: drop --{given[0]}")
        if args.dry_run:
            raise UserError("--dry_run plans a model from scratch (--model and its overrides), not --init_from")
    preset = dict(zip(["n_layer", "n_head", "n_embd", "block_size", "total_batch_size", "max_lr"], MODELS[args.model]))
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    # the schedule in tokens, as the lecture took it from GPT-3: 10B tokens (FineWeb-Edu's sample), 375M of warmup
    tokens_per_step = MODELS[args.model][4]  # the preset's, so the lecture's small debug batches keep 19073 and 715
    if args.max_steps is None:
        args.max_steps = round(10e9 / tokens_per_step)
    if args.warmup_steps is None:
        args.warmup_steps = round(375e6 / tokens_per_step)
    args.vocab_size = args.vocab_size or 50304
    if args.init_from == "scratch":
        args.seq_len = args.seq_len or args.block_size
    args.min_lr = args.max_lr / 10 if args.min_lr is None else args.min_lr
    if args.min_lr > args.max_lr:  # the cosine would climb
        raise UserError(f"--min_lr {args.min_lr:g} is above the peak LR {args.max_lr:g}")
    config = GPTConfig(args.block_size, args.vocab_size, args.n_layer, args.n_head, args.n_embd)
    if config.n_embd % config.n_head:
        raise UserError(f"--n_embd {config.n_embd} is not divisible by --n_head {config.n_head}")
    return config


def memory_plan(config, B, T, world, amp_bytes, activation_checkpointing, loss_chunk_rows=0):
    """Estimated bytes per GPU of each part of training, {part: (DDP, FSDP)}.

    Weights, grads and AdamW's two moments are fp32: 16 bytes per parameter, all on every GPU with DDP
    (plus its gradient buckets, one more copy of the grads), 1/world of them with FSDP (plus the gathered
    weights and grads of the block at work and the next, in the autocast dtype, and of the root, embeddings
    and ln_f, in fp32). Activations follow Korthikanti et al. 2022 with flash attention: 34 B T d bytes per
    layer at 2 bytes per value; with activation checkpointing only each block's input (the fp32 residual
    stream) stays, and one block is recomputed at a time. The chunked loss holds one chunk's logits, and the
    fp32 grads of the lm_head's input and weight.
    """
    N, d, L = param_count(config), config.n_embd, config.n_layer
    block = block_params(d)
    root = N - L * block
    per_layer = 34 * B * T * d * amp_bytes // 2
    activations = (L * B * T * d * 4 + per_layer) if activation_checkpointing else L * per_layer
    rows = min(loss_chunk_rows, B * T) if loss_chunk_rows else B * T
    logits = rows * config.vocab_size * (amp_bytes + 4 + 4)  # the logits, their fp32 copy for the loss, its grad
    if loss_chunk_rows:
        logits += 4 * (B * T + config.vocab_size) * d
    return {"weights (fp32)": (4 * N, 4 * N / world), "gradients (fp32)": (4 * N, 4 * N / world),
            "optimizer (AdamW m, v)": (8 * N, 8 * N / world),
            "DDP buckets / FSDP gathered": (4 * N, 2 * 2 * block * amp_bytes + 2 * root * 4) if world > 1 else (0, 0),
            f"activations (B={B}, T={T})": (activations, activations), "logits and loss": (logits, logits)}


def dry_run(args, config):
    if os.environ.get("RANK", "0") != "0":  # launched by torchrun: one plan, from rank 0
        return
    world = args.world_size or os.environ.get("WORLD_SIZE", "1")
    if not str(world).isdecimal() or int(world) < 1:
        raise UserError(f"WORLD_SIZE={world}: it must be a positive integer; --world_size N plans for N GPUs")
    world = int(world)
    B, accum = batch_plan(args.total_batch_size, args.batch_size, args.seq_len, world, config.block_size)
    amp_bytes = 4 if args.dtype == "fp32" else 2
    print(f"model {args.model}: {config}\n{param_count(config):,} parameters, "
          f"{flops_per_token(config, args.seq_len) / 1e9:.2f} GFLOP per token at T={args.seq_len}, "
          f"max LR {args.max_lr:g}")
    print(f"batch: {args.total_batch_size:,} tokens per step = {world} GPU(s) x B {B} x "
          f"T {args.seq_len} x {accum} accumulation steps; {args.max_steps:,} steps "
          f"({args.max_steps * args.total_batch_size / 1e9:.1f}B tokens), {args.warmup_steps:,} of warmup")
    print(f"memory per GPU, estimated (GiB){'DDP':>12s}{'FSDP':>10s}")
    plan = memory_plan(config, B, args.seq_len, world, amp_bytes, args.activation_checkpointing,
                       args.loss_chunk_rows)
    for part, (ddp, fsdp) in [*plan.items(), ("total", tuple(map(sum, zip(*plan.values()))))]:
        print(f"  {part:32s}{ddp / 2**30:10.2f}{fsdp / 2**30:10.2f}")


def check_ram(config):
    """The model is built in fp32 in RAM first: refuse one that cannot fit before trying (a typo in a size)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not known here
        return
    if 4 * param_count(config) > ram:
        raise UserError(f"the model's {param_count(config):,} parameters need {4 * param_count(config) / 2**30:,.0f} "
                        f"GiB to build, more than this machine's {ram / 2**30:,.0f} GiB of RAM (--dry_run plans sizes)")


def batch_plan(total, B, T, world, block_size):
    """(B, gradient-accumulation steps) so that world * B * T * steps == total, or a UserError naming fixes. B None
    (--batch_size unset): the lecture's 64 x 1024 tokens as rows of T, lowered to a divisor of a step's rows per
    process (the GPT-3 presets' 2**19 tokens on 8 GPUs: 32 x 2048, no accumulation)."""
    if T > block_size:
        raise UserError(f"--seq_len {T} exceeds the model's block_size {block_size}")
    n, rest = divmod(total, T * world)  # a step's rows per process
    if B is None:
        if rest or not n:  # no B fits: name the totals that one would
            raise UserError(f"--total_batch_size {total} is not a multiple of {world} process(es) x T {T} = "
                            f"{T * world} tokens: try --total_batch_size {(n + 1) * T * world}"
                            + (f" or {n * T * world}" if n else ""))
        B = next(b for b in range(min(max(1, 2**16 // T), n), 0, -1) if n % b == 0)
    per_micro = B * T * world
    if total % per_micro == 0:
        return B, total // per_micro
    lower, upper = (total // per_micro) * per_micro, (total // per_micro + 1) * per_micro
    hint = f"try --total_batch_size {upper}" + (f" or {lower}" if lower else "")
    if not rest:  # the largest B <= --batch_size that divides the rows
        small = [d for d in range(1, min(B, math.isqrt(n), 10**6) + 1) if n % d == 0]  # capped: only a hint
        hint += f", or --batch_size {max(d2 for d in small for d2 in (d, n // d) if d2 <= B)}"
    raise UserError(f"--total_batch_size {total} is not divisible by {world} process(es) x B {B} x T {T} "
                    f"= {per_micro} tokens: {hint}")


def setup_device(device_arg, timeout=600):
    """(rank, local_rank, world_size, device); under torchrun also joins the process group.

    A collective that waits longer than `timeout` seconds (a rank died or hangs) fails the job."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    parsed = re.fullmatch(r"(cpu|cuda|mps)(?::(0|[1-9][0-9]*))?", device_arg)  # as torch.device takes it
    if not parsed:
        raise UserError(f"--device {device_arg}: use auto, cpu, cuda, cuda:N or mps")
    kind, index = parsed[1], parsed[2] or ""
    count = {"cpu": 1, "mps": int(torch.backends.mps.is_available()), "cuda": torch.cuda.device_count()}[kind]
    if int(index or 0) >= count:
        raise UserError(f"--device {device_arg}: no such device here (PyTorch sees {count} {kind} device(s))")
    if "RANK" not in os.environ:
        if kind == "cuda" and index:  # cuda:N becomes the current GPU, which memory stats and the card's name are of
            torch.cuda.set_device(device_arg)
        return 0, 0, 1, device_arg
    missing = [v for v in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise UserError(f"RANK is set but not {', '.join(missing)}: launch several processes with torchrun")
    ids = {v: os.environ[v] for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if not all(x.isdecimal() for x in ids.values()) or int(ids["RANK"]) >= int(ids["WORLD_SIZE"]):
        raise UserError(f"{', '.join(f'{k}={v}' for k, v in ids.items())}: these must be integers with "
                        "0 <= RANK < WORLD_SIZE; launch with torchrun")
    rank, local_rank, world = int(ids["RANK"]), int(ids["LOCAL_RANK"]), int(ids["WORLD_SIZE"])
    if kind == "cuda":
        if local_rank >= count:
            raise UserError(f"LOCAL_RANK={local_rank}, but this node has {count} GPU(s): one process per GPU")
        device_arg = f"cuda:{local_rank}"  # one GPU per process
        torch.cuda.set_device(device_arg)
    try:
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:  # DistError (no rank 0, a port in use, ...) is a RuntimeError
        raise UserError(f"rank {rank} of {world} cannot join the process group at {os.environ['MASTER_ADDR']}:"
                        f"{os.environ['MASTER_PORT']}: {first_line(e)}")
    return rank, local_rank, world, device_arg


def shard_model(model, amp_dtype):
    """FSDP2: every block's weights are split over the ranks and gathered only while that block runs.

    The numerics are those of DDP with autocast: the sharded master weights and AdamW state are fp32 and
    gradients are reduced in fp32; the blocks' matmul weights are gathered in the autocast dtype (autocast
    would cast them anyway), while the residual stream, the embeddings and the LayerNorms stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    low = MixedPrecisionPolicy(param_dtype=None if amp_dtype == torch.float32 else amp_dtype,
                               reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.transformer.h:
        for norm in (block.ln_1, block.ln_2):  # their own units, so their weights stay fp32; tiny, so kept gathered
            fully_shard(norm, mp_policy=fp32, reshard_after_forward=False)
        fully_shard(block, mp_policy=low)
    fully_shard(model, mp_policy=fp32)  # the root: embeddings (tied to lm_head) and ln_f


def enable_fp8(model, rows, device):
    """--fp8: the blocks' Linear layers train in FP8, if the device and the shapes allow it."""
    if device.startswith("cuda") and torch.cuda.get_device_capability(device) < (8, 9):
        raise UserError(f"--fp8 needs FP8 matmuls, which {torch.cuda.get_device_name(device)} lacks "
                        "(compute capability 8.9+: Ada, Hopper or newer)")
    if not device.startswith(("cuda", "cpu")):
        raise UserError(f"--fp8 runs on CUDA (or slowly on the CPU), not on {device}")
    if model.config.n_embd % 16 or rows % 16:  # FP8 matmul kernels work on tiles of 16
        raise UserError(f"--fp8 needs --n_embd ({model.config.n_embd}) and batch_size x seq_len ({rows}) "
                        "to be multiples of 16")
    for module in model.modules():
        if isinstance(module, Linear):
            module.fp8 = True


def autocast_dtype(dtype_arg, device_type):
    if dtype_arg == "auto":
        if device_type != "cuda":
            return torch.float32
        # without emulation: before compute capability 8 (V100, T4) bf16 runs, slowly, in software
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if dtype_arg == "fp16" and device_type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA GPU; use bf16 or fp32")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_arg]


def autocast(amp_dtype, device_type):
    """The context the forward runs in: autocast to amp_dtype, or nothing for fp32."""
    return contextlib.nullcontext() if amp_dtype == torch.float32 else torch.autocast(device_type, dtype=amp_dtype)


# -----------------------------------------------------------------------------
# main: set up, then the loop

# SIGTERM (what preemption sends) and SIGINT (Ctrl-C) during training ask the loop to finish its step, write
# a checkpoint and exit 0; before training starts there is nothing to save, so they stop at once
STOP = {"armed": False, "signal": None}


def request_stop(signum, frame):
    STOP["signal"] = signal.Signals(signum).name
    if not STOP["armed"]:
        raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    scratch_config = apply_preset(args)
    if args.dry_run:
        return dry_run(args, scratch_config)
    rank, local_rank, world, device = setup_device(args.device, args.dist_timeout)
    group_of_one = args.fsdp and not dist.is_initialized()
    if group_of_one:  # one process, without torchrun: FSDP and its checkpoints over a group of one
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, timeout=timedelta(seconds=args.dist_timeout))
    try:
        train(args, scratch_config, rank, local_rank, world, device)
    finally:  # however it ends: a caller (a test) may run main() again in this process
        if group_of_one and dist.is_initialized():
            dist.destroy_process_group()


def train(args, scratch_config, rank, local_rank, world, device):
    master = rank == 0
    device_type = device.split(":")[0]
    say = print if master else (lambda *a, **k: None)

    torch.manual_seed(args.seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(args.seed)
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls that remain

    # the model; a resumed --init_from run takes its architecture from the checkpoint, whose weights replace the HF
    # ones anyway: the HF model need not be there any more (another machine, the hub out of reach)
    built = scratch_config if args.init_from == "scratch" else resumed_config(args)
    if built:
        check_ram(built)
    model = GPT(built) if built else GPT.from_pretrained(args.init_from)
    config = model.config
    model.to(device)
    say(f"model: {config}, {model.num_params():,} parameters")

    # the batch
    T = args.seq_len or config.block_size  # --init_from: the context of its weights
    B, grad_accum_steps = batch_plan(args.total_batch_size, args.batch_size, T, world, config.block_size)
    say(f"total batch {args.total_batch_size:,} tokens = {world} process(es) x {B} x {T} x {grad_accum_steps} "
        "accumulation steps")

    # the data
    splits = load_splits(args.data, need_val=args.eval_every > 0)
    common = dict(rank=rank, world_size=world, pin_memory=device_type == "cuda", vocab_size=config.vocab_size)
    train_loader = DataLoader(splits["train"], B, T, shuffle=args.shuffle, seed=args.seed, **common)
    val_loader = DataLoader(splits["val"], B, T, split="val", **common) if args.eval_every else None
    if val_loader and args.val_steps * B * world > sum(val_loader.windows):  # the loader wraps around
        say(f"warning: --val_steps {args.val_steps} reads {args.val_steps * B * world:,} sequences of the val data, "
            f"which holds {sum(val_loader.windows):,}: some count twice in the val loss")
    if config.vocab_size < 50257 and (args.hellaswag_every or args.sample_every):  # an --init_from model
        raise UserError(f"the model's vocabulary of {config.vocab_size} tokens cannot take the GPT-2 tokens that "
                        "HellaSwag and sampling give it: pass --hellaswag_every 0 --sample_every 0")
    if args.hellaswag_every:
        import hellaswag  # loads (downloading once per node) now, so a missing source fails before training
        hella_examples = hellaswag.load_examples(args.hellaswag_data)
    enc = gpt2_tokenizer() if args.sample_every else None
    # <|endoftext|> in the prompt is the special token, as a document boundary (tiktoken refuses it by default)
    prompt = enc.encode(args.sample_prompt, allowed_special="all") if enc else None
    if prompt and len(prompt) >= args.sample_length:
        raise UserError(f"--sample_length {args.sample_length} counts the prompt's {len(prompt)} tokens: make it "
                        "longer, or nothing is sampled")

    # the precision
    amp_dtype = autocast_dtype(args.dtype, device_type)
    amp = autocast(amp_dtype, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
    if args.fsdp:
        if amp_dtype == torch.float16:
            raise UserError("--fsdp trains in bf16 or fp32, not fp16" + (" (--dtype auto's choice on a GPU without "
                            "bf16)" if args.dtype == "auto" else "") + ": pass --dtype fp32" +
                            ("" if args.dtype == "auto" else " or bf16"))
        shard_model(model, amp_dtype)  # before the optimizer, which must hold the sharded parameters
    model.activation_checkpointing = args.activation_checkpointing
    model.loss_chunk_rows = args.loss_chunk_rows
    if args.fp8:
        enable_fp8(model, B * T, device)
    optimizer = model.configure_optimizers(args.weight_decay, args.max_lr, device_type)

    # resume, or start a fresh run
    try:
        os.makedirs(args.log_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --log_dir {args.log_dir}: {e.strerror or e}")
    log_path = os.path.join(args.log_dir, "log.txt")
    start_step, resumed_from, evaluated_under = resume_or_start(args, model, optimizer, scaler, train_loader, T,
                                                                device_type, master, say)
    # a loaded optimizer brings back its run's weight decay: this run's flag holds, as its LR does
    optimizer.param_groups[0]["weight_decay"] = args.weight_decay

    # compile and wrap. Evaluation runs the compiled module directly (same shapes as training, compiled
    # once more for no_grad); sampling grows its input every token, so it runs the eager model.
    use_compile = args.compile == "on" or (args.compile == "auto" and device_type == "cuda")
    compiled = torch.compile(model, mode=args.compile_mode) if use_compile else model
    cuda_graphs = use_compile and device_type == "cuda" and args.compile_mode == "max-autotune"  # see train_step
    train_model = compiled
    if world > 1 and not args.fsdp:
        train_model = DDP(compiled, device_ids=[local_rank] if device_type == "cuda" else None)

    def log(line):
        if master:
            try:
                with open(log_path, "a") as f:
                    f.write(line + "\n")
            except OSError as e:  # a full disk: say which file
                raise UserError(f"cannot write {log_path}: {e.strerror or e}")

    def save(step, path, evals_done, meta_only=False):
        """The checkpoint of the weights after `step` updates; evals_done: the log holds step's evaluations."""
        if master:  # the records a checkpoint follows reach the disk before it
            with open(log_path, "a") as f:
                os.fsync(f.fileno())
        rng = {"cpu": torch.get_rng_state()}
        if device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {"scaler": scaler.state_dict(), "step": step, "config": asdict(config), "seq_len": T,
                 "loader": train_loader.state_dict(), "rng": rng, "args": vars(args), "evals_done": evals_done,
                 "val_rows": args.val_steps * B * world,
                 "log_digest": log_digest(log_path, step, evals_done) if master else None}
        write_checkpoint(path, model, optimizer, state, args.fsdp, args.keep_checkpoints, meta_only)

    flops_per_gpu_step = flops_per_token(config, T) * args.total_batch_size / world
    peak = peak_flops(device_type)
    eta_from = None  # (time, step) at the end of this launch's first step, which includes compilation
    STOP["armed"], STOP["signal"], stop = True, None, False
    # iteration `step`: evaluate the weights after `step` updates, save them as model_<step>, then make update `step`
    for step in range(start_step, args.max_steps + 1):
        last_step = step == args.max_steps
        due = lambda every, end=args.max_steps: every > 0 and (step % every == 0 or step == end)  # noqa: E731
        first = resumed_from is not None and step == start_step  # this step's checkpoint is the one we resumed from
        # the evaluations its run made are in the log already (none if it stopped on a signal, before them); if
        # that run was to go on, a --max_steps that ends here now asks for the final ones it did not make
        done = lambda every: first and evaluated_under is not None and due(every, evaluated_under)  # noqa: E731
        todo = lambda every: due(every) and not done(every)  # noqa: E731
        path = os.path.join(args.log_dir, f"model_{step:05d}." + ("dcp" if args.fsdp else "pt"))
        # the last step's checkpoint comes before its final val loss and HellaSwag (minutes), marked as without
        # them: a signal during them then loses no training, and interrupts them at once
        saved = False
        if last_step and step > 0 and not first and not stop and (todo(args.eval_every) or todo(args.hellaswag_every)):
            save(step, path, evals_done=False)
            saved = True
        if last_step and (saved or first):
            STOP["armed"] = False  # the training is saved: a signal now stops the final evaluations at once
        try:
            if STOP["signal"] and not STOP["armed"]:  # it came while that checkpoint was written
                raise KeyboardInterrupt
            if not stop:
                if todo(args.eval_every):
                    val_loss = evaluate_loss(compiled, val_loader, args.val_steps, amp, device)
                    say(f"validation loss: {val_loss:.4f}")
                    log(f"{step} val {val_loss:.6f}")
                if todo(args.hellaswag_every):
                    res = hellaswag.evaluate(compiled, hella_examples, device, amp=amp, rank=rank, world_size=world)
                    say(f"HellaSwag accuracy: {res['acc_norm']:.4f} (acc {res['acc']:.4f}, n={res['n']})")
                    log(f"{step} hella {res['acc_norm']:.4f}")
                if (step > 0 or last_step) and todo(args.sample_every):
                    generator = torch.Generator(device=device).manual_seed(42 + rank)
                    rows = generate(model, prompt, args.num_samples, args.sample_length, device, generator, amp,
                                    enc.n_vocab)
                    for i, row in enumerate(rows):
                        print(f"rank {rank} sample {i}: {enc.decode(row)}")
        except KeyboardInterrupt:
            if STOP["armed"] or not STOP["signal"]:  # not request_stop's (Ctrl-C in a caller without its handler)
                raise
            ckpt = resumed_from if first else path  # --resume auto finds it only in --log_dir
            again = "auto" if os.path.samefile(os.path.dirname(ckpt) or ".", args.log_dir) else ckpt
            say(f"stopped at step {step} by {STOP['signal']} during its final evaluations; checkpoint {ckpt}; "
                f"resume with --resume {again}")
            unlock_log_dir()  # no barrier: the other ranks may have been stopped inside a collective
            return
        STOP["armed"] = True  # a signal during the rewrite below has nothing left to stop
        # written again where the final evaluations were added, so the next resume knows they are in the log
        refresh = first and last_step and evaluated_under != step
        if step > 0 and (not first or refresh) and (stop or last_step or due(args.checkpoint_every)):
            # an FSDP folder is replaced by deleting it first: rewriting one with these weights (written above, or
            # resumed from), only its meta.pt changes, so that alone is replaced (atomically)
            in_place = saved or (refresh and os.path.realpath(path) == os.path.realpath(resumed_from))
            save(step, path, evals_done=not stop, meta_only=args.fsdp and in_place)
        if stop:
            say(f"stopped at step {step} by {STOP['signal'] or 'a signal to another rank'}; checkpoint {path}; "
                "resume with --resume auto")
        if last_step or stop:
            break

        # one optimizer step
        t0 = time.time()
        lr = get_lr(step, args.max_lr, args.min_lr, args.warmup_steps, args.max_steps)
        loss, norm = train_step(train_model, optimizer, train_loader, grad_accum_steps, lr, amp, scaler,
                                args.grad_clip, device, args.skip_nonfinite, cuda_graphs)
        # a stop signal to any rank stops all of them after the same step: one tiny all-reduce, read below
        stop = torch.full((), float(STOP["signal"] is not None), device=device)
        if dist.is_initialized():
            dist.all_reduce(stop)
        loss, norm, stop = torch.stack([loss, norm, stop]).tolist()  # the one host sync per step
        if nonfinite(loss, norm, scaler):
            if not args.skip_nonfinite:  # these weights are never saved: the last checkpoint is the way back
                raise UserError(f"step {step}: loss {loss}, grad norm {norm}: training diverged and stops here; "
                                "resume with --resume auto and a lower --max_lr, or add --skip_nonfinite")
            say(f"warning: step {step}: loss {loss}, grad norm {norm}: update skipped (--skip_nonfinite)")
        now = time.time()
        dt = now - t0
        mfu = f"{100 * flops_per_gpu_step / dt / peak:.1f}%" if peak else "n/a"  # n/a: a card missing from the table
        extra = f" | mfu {mfu}" if device_type == "cuda" else ""
        # the wall time per step so far, evaluations and checkpoints included; on this launch's first step, that
        # step's own time (with compilation: an estimate the next steps correct)
        per_step = (now - eta_from[0]) / (step - eta_from[1]) if eta_from else dt
        eta = (args.max_steps - step - 1) * per_step
        extra += f" | eta {int(eta // 3600)}h{int(eta % 3600 // 60):02d}m"
        eta_from = eta_from or (now, step)
        say(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | dt {dt * 1000:.2f}ms | "
            f"tok/sec {args.total_batch_size / dt:.2f}{extra}")
        log(f"{step} train {loss:.6f}")

    if dist.is_initialized():
        dist.barrier()  # all ranks done (rank 0's last checkpoint written) before any tears the group down
        dist.destroy_process_group()
    unlock_log_dir()


def run_cli(main, memory_hint="use a smaller --batch_size",
            lost_rank_hint="resume with --resume auto (a rank that was only slow, such as rank 0 writing a big "
                           "checkpoint, needs a longer --dist_timeout)",
            compile_hint="--compile off"):
    """Run a script's main(): a UserError, an OSError (a full disk, ...), running out of memory, a failed
    torch.compile or a lost rank becomes one line on stderr and exit status 1, no traceback; an interrupt
    before training starts exits with 130."""
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 prints escaped, not as an error
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        main()
        if "RANK" in os.environ:  # a rank of a launch: leave as exit_with does
            exit_with(None, 0)
    except (UserError, OSError) as e:
        exit_with(f"error: {e}")
    except KeyboardInterrupt:
        exit_with("interrupted", 130)
    except (torch.OutOfMemoryError, MemoryError) as e:
        exit_with(out_of_memory(e, memory_hint))
    except RuntimeError as e:
        if any(c.__name__ == "BackendCompilerFailed" for c in type(e).__mro__):  # no C++ compiler, no Triton, ...
            why = re.sub(r"^backend='\w+' raised:\s*", "", str(e).strip())
            exit_with(f"error: torch.compile failed ({first_line(why)}): run without it, {compile_hint}")
        if "can't allocate memory" in str(e):  # the CPU allocator's out of memory
            exit_with(out_of_memory(e, memory_hint))
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or "gloo" in str(e))):
            raise  # gloo reports a dead or hung peer as a plain RuntimeError; anything else is a bug: its traceback
        why = re.sub(r"^\[[^]]*\] *", "", str(e).strip()).split(". ")[0]
        exit_with(f"error: rank {dist.get_rank()} lost the other ranks ({why}): one of them died or hangs, see its "
                  f"output; {lost_rank_hint}")


def out_of_memory(e, hint):
    """One line for an allocation failure: its first sentences (CUDA's, or the CPU allocator's), and a hint."""
    what = re.sub(r"^.*DefaultCPUAllocator: ", "", ". ".join(str(e).strip().split(". ")[:2]))
    return f"error: out of memory ({what or type(e).__name__}): {hint}"


def exit_with(line, status=1):
    """Exit, after the line (if any) and its newline in one write, so the lines of ranks sharing a terminal never
    interleave. A rank of a launch (RANK set) leaves by os._exit, skipping the interpreter's teardown: a gloo
    thread that drops a tensor while the interpreter finalizes needs the GIL and aborts the process ("terminate
    called without an active exception", pytorch/pytorch#190489), which failed finished ranks in CI. Everything
    a run writes is flushed and fsynced by then; only stdout and stderr need a flush."""
    if line is not None and sys.stderr is not None:  # None: closed when the process started (2>&-)
        sys.stderr.write(line + "\n")
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    if "RANK" in os.environ:
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    # hellaswag.py imports train_gpt2: let it get this module, so its UserError is the one caught here
    sys.modules.setdefault("train_gpt2", sys.modules[__name__])
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    run_cli(main, memory_hint="--dry_run estimates what a run needs; a smaller --batch_size (the same "
            "--total_batch_size, more accumulation steps) or --activation_checkpointing need less")
