"""Time the training step of train_gpt2.py, and the lecture's step beside it, in one run.

    python bench/train_speed.py                       # GPT-2 124M, B=64, T=1024, 2**19-token steps, random tokens
    python bench/train_speed.py --baseline            # also the lecture's step; prints both and the ratio
    python bench/train_speed.py --data edu_fineweb10B # real shards instead of random tokens

"ours" calls train_gpt2.train_step itself (not a copy). "baseline" is the lecture's loop: the same model
compiled, plain cross-entropy, batches built on the host and copied unpinned, .backward() per micro-step.
Prints tok/s, model TFLOP/s (6N + 12 L d T per token), MFU against the card's bf16 peak, peak memory.
"""
import argparse
import contextlib
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402


class RandomTokens:
    """Stands in for the DataLoader: a few fixed random batches, served round-robin."""

    def __init__(self, B, T, vocab=50257, n=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.batches = [torch.randint(0, vocab, (B, T + 1), generator=g) for _ in range(n)]
        self.i = 0

    def next_batch(self):
        buf = self.batches[self.i % len(self.batches)]
        self.i += 1
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


def lecture_step(model, optimizer, loader, grad_accum_steps, lr, amp, device):
    """The lecture's optimizer step, kept as the reference point."""
    optimizer.zero_grad()
    loss_accum = 0.0
    for _ in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        with amp:
            logits, loss = model(x, y)
        loss = loss / grad_accum_steps
        loss_accum += loss.detach()
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss_accum, norm


def measure(name, args, device):
    device_type = device.split(":")[0]
    torch.manual_seed(1337)
    n_layer, n_head, n_embd, block_size = tg.MODELS[args.model][:4]
    model = tg.GPT(tg.GPTConfig(block_size, 50304, n_layer, n_head, n_embd)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, device_type)
    B, T = args.batch_size, args.seq_len
    accum = tg.batch_plan(args.total_batch_size, B, T, 1)
    if args.data:
        loader = tg.DataLoader(tg.load_splits(args.data, need_val=False)["train"], B, T)
    else:
        loader = RandomTokens(B, T)
    amp_dtype = tg.autocast_dtype(args.dtype, device_type)
    amp = contextlib.nullcontext() if amp_dtype == torch.float32 else torch.autocast(device_type, dtype=amp_dtype)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
    compiled = torch.compile(model) if args.compile else model
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        if name == "ours":
            loss, _ = tg.train_step(compiled, optimizer, loader, accum, 6e-4, amp, scaler, 1.0, device)
        else:
            loss, _ = lecture_step(compiled, optimizer, loader, accum, 6e-4, amp, device)
        return loss.item()

    losses = [step() for _ in range(args.warmup)]  # compilation and allocator warm-up
    sync()
    t0 = time.time()
    losses += [step() for _ in range(args.steps)]
    sync()
    dt = (time.time() - t0) / args.steps
    tok_s = args.total_batch_size / dt
    tflops = tg.flops_per_token(model.config, T) * tok_s / 1e12
    peak = tg.peak_flops(device_type)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device_type == "cuda" else float("nan")
    mfu = f"{100 * tflops * 1e12 / peak:.1f}%" if peak else "n/a"
    print(f"{name:8s} {dt * 1000:9.1f} ms/step {tok_s:12,.0f} tok/s {tflops:7.1f} TFLOP/s  MFU {mfu:>6s}  "
          f"peak mem {mem:6.2f} GiB  losses {' '.join(f'{x:.4f}' for x in losses[:4])}")
    return tok_s  # the model and optimizer go with this frame; main() frees their memory


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--model", default="gpt2", choices=list(tg.MODELS))
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--total_batch_size", type=int, default=524288)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--data", help="a shard folder; default: random tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--no_compile", dest="compile", action="store_false")
    p.add_argument("--baseline", action="store_true", help="also time the lecture's step and print the ratio")
    args = p.parse_args()
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"model {args.model}, B={args.batch_size}, T={args.seq_len}, {args.total_batch_size:,} tokens/step, "
          f"compile={args.compile}, {'shards ' + args.data if args.data else 'random tokens'}")
    try:
        base = measure("baseline", args, args.device) if args.baseline else None
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        ours = measure("ours", args, args.device)
    except tg.UserError as e:
        sys.exit(f"error: {e}")
    if base:
        print(f"ours / baseline: {ours / base:.3f}x")


if __name__ == "__main__":
    main()
