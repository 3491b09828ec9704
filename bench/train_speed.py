"""Time the training step of train_gpt2.py against the lecture's, one speed lever at a time, in one run.

    python bench/train_speed.py                                  # train_step: GPT-2 124M, B=64, T=1024
    python bench/train_speed.py --baseline                       # the lecture's step first, then ours, and the ratio
    python bench/train_speed.py --baseline --variants ours plain ours+fp8 baseline
    python bench/train_speed.py --data edu_fineweb10B            # real shards instead of random tokens

Every variant builds the same model from the same seed and reads the same batches through
train_gpt2.DataLoader, so their losses must agree to bf16 rounding: each line prints the largest loss
difference from the first variant. "baseline" is the lecture's step: the model compiled, plain
cross-entropy, batches copied from pageable memory, the loss read every step. The others call
train_gpt2.train_step itself (not a copy), with the trainer's defaults ("ours") and the levers joined to
it by "+" (see LEVERS). A name may come twice: the second run of the first variant shows the spread
from run to run. Each line gives ms/step, tok/s, model
TFLOP/s (6N + 12 L d T per token), MFU against the card's bf16 peak, and peak memory allocated
(reserved); the last column is the speed against the first variant.

--profile K runs one more step of each variant under torch.profiler and says where the time goes: how
much of the timed step the kernels fill (the rest is the GPU waiting for the host), their time by kind
(matmuls, attention, kernels fused by torch.compile, the optimizer, the rest) and the K longest, with the
GB/s of each fused kernel by the bytes inductor counts for it. On the CPU the same accounting is of aten
ops (the profiler slows them, so their share can pass 100% there).
"""
import argparse
import contextlib
import gc
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2 as tg  # noqa: E402

# A variant is "baseline" (the lecture's step), or "ours" (train_step with the trainer's defaults) with
# levers added by "+": "plain+fp8" is ours with the full logits and FP8 matmuls
LEVERS = {
    "ours": dict(),
    "plain": dict(chunk=0),                               # --loss_chunk_rows 0: the full logits, as the lecture
    "chunked": dict(chunk=8192),                          # --loss_chunk_rows 8192 ("chunked16384": 16384 rows)
    "fp8": dict(fp8=True),                                # --fp8: the blocks' matmuls in FP8
    "unpinned": dict(pin=False),                          # batches from pageable memory: what pinning gives
    "cudnn": dict(sdpa="CUDNN_ATTENTION"),                # attention by cuDNN only (torch 2.11's pick on an H200)
    "flash": dict(sdpa="FLASH_ATTENTION"),                # attention by the flash kernels only
    "autotune": dict(mode="max-autotune-no-cudagraphs"),  # --compile_mode
    "cudagraphs": dict(mode="reduce-overhead"),           # CUDA graphs without autotuning (bench only, until measured)
    "coordtune": dict(inductor={"coordinate_descent_tuning": True}),  # inductor tunes its Triton kernels' tiles
}

# kinds of kernel for --profile, by name: CUDA kernels (cuBLAS, flash or cuDNN attention, fused AdamW), or aten ops
# on the CPU; the first kind that matches wins. Inductor's Triton kernels are told apart first (kernel_kind)
KERNEL_KINDS = {
    "attention": ("flash", "fmha", "attention", "sdpa"),
    "matmul": ("gemm", "xmma", "nvjet", "cutlass", "scaled_mm", "aten::mm", "aten::addmm", "aten::bmm"),
    "optimizer": ("adam", "multi_tensor"),
}
KINDS = [*KERNEL_KINDS, "fused by compile", "other"]


def variant(name):
    """The lever settings of a variant name; anything not set is the trainer's default."""
    if name == "baseline":  # the full logits whatever the trainer's default loss is
        return dict(lecture=True, pin=False, chunk=0)
    settings = {}
    for lever in name.split("+"):
        rows = lever[len("chunked"):]  # "chunked16384": the chunked loss at 16384 rows
        if lever in LEVERS:
            settings.update(LEVERS[lever])
        elif lever.startswith("chunked") and rows.isdecimal() and int(rows) > 0:
            settings["chunk"] = int(rows)
        else:
            raise ValueError(f"unknown lever {lever!r} in {name!r}: use 'baseline', or levers of "
                             f"{', '.join(LEVERS)}, chunkedN (N rows) joined by '+'")
    return settings


def model_config(args):
    """The --model preset, with --n_layer, --n_head, --n_embd where given (small models for a smoke test)."""
    n_layer, n_head, n_embd, block_size = tg.MODELS[args.model][:4]
    return tg.GPTConfig(block_size, 50304, args.n_layer or n_layer, args.n_head or n_head, args.n_embd or n_embd)


def lecture_step(model, optimizer, loader, grad_accum_steps, lr, amp, scaler, device):
    """The lecture's optimizer step, kept as the reference point. The scaler is fp16's (--dtype fp16), as in ours;
    in bf16 or fp32 it is off, and each of its calls passes straight through."""
    optimizer.zero_grad()
    loss_accum = 0.0
    for _ in range(grad_accum_steps):
        x, y = loader.next_batch()
        x, y = x.to(device), y.to(device)
        with amp:
            logits, loss = model(x, y)
        loss = loss / grad_accum_steps
        loss_accum += loss.detach()
        scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    for group in optimizer.param_groups:
        group["lr"] = lr
    scaler.step(optimizer)
    scaler.update()
    return loss_accum, norm


def profile_step(step, device_type):
    """[(name, microseconds, calls, GB)] of the kernels (on the CPU: aten ops) of one call of step(), longest
    first. GB: what inductor's Triton kernels read and write in all, by inductor's own count (it passes it to
    the profiler when compiled with benchmark_kernel; see measure), else None."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:  # record_shapes: the launches' kwargs too
        step()
    moved = {}
    for e in prof.events():
        num_gb = (getattr(e, "kwinputs", None) or {}).get("kernel_num_gb")
        if num_gb is not None:
            moved[e.name] = moved.get(e.name, 0.0) + float(num_gb)
    events = prof.key_averages()
    if device_type == "cuda":  # the kernels themselves, not the CPU ops that launched them (counted twice)
        rows = [(e.key, e.self_device_time_total, e.count) for e in events if e.device_type != DeviceType.CPU]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    return sorted([(*r, moved.get(r[0])) for r in rows if r[1] > 0], key=lambda r: -r[1])


def kernel_kind(name):
    lower = name.lower()
    if lower.startswith("triton_"):  # max-autotune's matmul templates, or ops fused (named after the ops they hold)
        return "matmul" if lower.startswith("triton_tem") else "fused by compile"
    return next((kind for kind, parts in KERNEL_KINDS.items() if any(p in lower for p in parts)), "other")


def profile_report(name, kernels, dt, top):
    """Lines saying where a step's time went: the kernels' share of the timed step, by kind, and the longest,
    with the memory speed of those whose bytes are known. Inductor counts each buffer a kernel touches once
    and whole: an estimate, low for a reduction that loops over its rows more than once."""
    total = sum(us for _, us, _, _ in kernels)
    if not total:
        return [f"{name} profile: the profiler recorded no kernels"]
    by_kind = dict.fromkeys(KINDS, 0)
    for key, us, _, _ in kernels:
        by_kind[kernel_kind(key)] += us
    lines = [f"{name} profile: kernels {total / 1e3:.1f} ms of the {dt * 1e3:.1f} ms step ({total / 1e4 / dt:.0f}%): "
             + " | ".join(f"{kind} {100 * us / total:.1f}%" for kind, us in by_kind.items())]
    for key, us, calls, gb in kernels[:top]:
        speed = f"  ({gb / calls:.3f} GB a call, {gb / us * 1e6:,.0f} GB/s)" if gb else ""
        lines.append(f"    {100 * us / total:5.1f}% {us / 1e3:8.1f} ms {calls:6d}x  {key[:100]}{speed}")
    return lines


def replays(lever):
    """Does the variant compile with CUDA graphs?"""
    return lever.get("mode", tg.parse_args([]).compile_mode) in ("reduce-overhead", "max-autotune")


def inductor_settings(lever, profile, device_type):
    """The inductor config a variant compiles with: its lever's, and for --profile on a GPU benchmark_kernel,
    with which each Triton launch tells the profiler the bytes it moves (a CUDA graph's replay launches
    nothing to tell it). Inductor then also prints each compiled module's path to stderr."""
    settings = dict(lever.get("inductor", {}))
    if profile and device_type == "cuda" and not replays(lever):
        settings["benchmark_kernel"] = True
    return settings


def measure(name, args, shards, device):
    """Seconds per step, peak memory (allocated, reserved), the loss of every step and the FLOPs per token of
    one variant, and with --profile the lines of profile_report on one more step."""
    lever, defaults = variant(name), tg.parse_args([])
    device_type = device.split(":")[0]
    torch._dynamo.reset()  # each variant compiles afresh, with its own settings
    torch.manual_seed(1337)
    model = tg.GPT(model_config(args)).to(device)
    model.loss_chunk_rows = lever.get("chunk", defaults.loss_chunk_rows)
    optimizer = model.configure_optimizers(0.1, 6e-4, device_type)
    B, T = args.batch_size, args.seq_len
    if lever.get("fp8", defaults.fp8):
        tg.enable_fp8(model, B * T, device)
    _, accum = tg.batch_plan(args.total_batch_size, B, T, 1, model.config.block_size)
    loader = tg.DataLoader(shards, B, T, pin_memory=lever.get("pin", device_type == "cuda"),
                           vocab_size=model.config.vocab_size)
    amp_dtype = tg.autocast_dtype(args.dtype, device_type)
    amp = tg.autocast(amp_dtype, device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=amp_dtype == torch.float16)
    compiled = torch.compile(model, mode=lever.get("mode", defaults.compile_mode)) if args.compile else model
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sdpa = contextlib.nullcontext()
    if "sdpa" in lever:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        sdpa = sdpa_kernel(getattr(SDPBackend, lever["sdpa"]))

    def step():
        if lever.get("lecture"):
            loss, _ = lecture_step(compiled, optimizer, loader, accum, 6e-4, amp, scaler, device)
        else:
            loss, _ = tg.train_step(compiled, optimizer, loader, accum, 6e-4, amp, scaler, 1.0, device,
                                    cuda_graphs=args.compile and device_type == "cuda" and replays(lever))
        return loss.item()  # one host sync per step, as both loops do

    settings = inductor_settings(lever, args.profile, device_type)
    with sdpa, torch._inductor.config.patch(settings):
        losses = [step() for _ in range(args.warmup)]  # compilation (in the first step) and allocator warm-up
        sync()
        t0 = time.perf_counter()
        losses += [step() for _ in range(args.steps)]
        sync()
        dt = (time.perf_counter() - t0) / args.steps
        report = []
        if args.profile:
            try:
                kernels = profile_step(step, device_type)
                report = profile_report(name, kernels, dt, args.profile)
                if settings.get("benchmark_kernel") and args.compile and not any(gb for *_, gb in kernels):
                    report.append(f"    (no kernel told the profiler its bytes in torch {torch.__version__}: no GB/s)")
            except Exception as e:  # the profiler's failure must not cost the timing above
                report = [f"{name} profile failed: {type(e).__name__}: {tg.first_line(e)[:200]}"]
    mem = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()) if device_type == "cuda" else None
    return dt, mem, losses, tg.flops_per_token(model.config, T), report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.error = tg.usage_error  # one line, not the usage text
    p.add_argument("--variants", nargs="+", default=["ours"],
                   help="what to time, in this order (a name may come twice, to see the spread); ratios and "
                   "loss differences are against the first. 'baseline', or levers joined by '+': "
                   + ", ".join(LEVERS))
    p.add_argument("--baseline", action="store_true", help="time the lecture's step first: ratios are against it")
    p.add_argument("--model", default="gpt2", choices=list(tg.MODELS))
    p.add_argument("--n_layer", type=int, help="override the --model's")
    p.add_argument("--n_head", type=int, help="override the --model's")
    p.add_argument("--n_embd", type=int, help="override the --model's")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=1024)
    p.add_argument("--total_batch_size", type=int, default=524288)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--data", help="a shard folder; default: random tokens")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--no_compile", dest="compile", action="store_false")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="profile one more step of each variant: time by kind of kernel, and the K longest kernels")
    args = p.parse_args()
    for name in args.variants:
        try:
            variant(name)
        except ValueError as e:
            p.error(str(e))
    for name in ("batch_size", "seq_len", "total_batch_size", "steps", "warmup", "profile", "n_layer", "n_head",
                 "n_embd"):
        at_least = 0 if name in ("warmup", "profile") else 1
        if getattr(args, name) is not None and getattr(args, name) < at_least:
            p.error(f"--{name} must be " + ("0 or more" if at_least == 0 else "positive"))
        if getattr(args, name) is not None and getattr(args, name) >= 2**62:  # as the trainer: a typo, not a plan
            p.error(f"--{name} {getattr(args, name)} is too large")
    try:  # what every variant shares, checked once: one line here rather than a failure per variant
        args.device = tg.setup_device(args.device)[3]
        config = model_config(args)
        if config.n_embd % config.n_head:
            raise tg.UserError(f"--n_embd {config.n_embd} is not divisible by --n_head {config.n_head}")
        tg.check_ram(config)
        tg.batch_plan(args.total_batch_size, args.batch_size, args.seq_len, 1, config.block_size)
        tg.autocast_dtype(args.dtype, args.device.split(":")[0])
    except tg.UserError as e:
        p.error(str(e))
    if args.baseline and args.variants[0] != "baseline":
        args.variants = ["baseline"] + args.variants
    if args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    flops_per_token = tg.flops_per_token(config, args.seq_len)  # 855 MFLOP for 124M at T=1024
    print(f"model {args.model}: {config}, {flops_per_token / 1e6:.2f} MFLOP/token\n"
          f"B={args.batch_size}, T={args.seq_len}, "
          f"{args.total_batch_size:,} tokens/step, compile={args.compile}, "
          f"{'shards ' + args.data if args.data else 'random tokens'}, "
          f"{args.warmup}+{args.steps} steps", flush=True)
    try:
        if args.data:
            shards = tg.load_splits(args.data, need_val=False)["train"]
        else:  # random tokens, enough for a few steps; the loader goes round them again after that
            micro_batches = 8 * args.batch_size * args.seq_len
            shards = [np.random.default_rng(0).integers(0, 50257, micro_batches + 1, dtype=np.uint16)]
        # too little data, or ids past the vocabulary: one line now, not a failure per variant
        tg.DataLoader(shards, args.batch_size, args.seq_len, vocab_size=config.vocab_size)
    except (tg.UserError, MemoryError, ValueError) as e:  # ValueError: numpy's, for sizes past any memory
        sys.exit(f"error: {tg.first_line(e)}")
    peak = tg.peak_flops(args.device.split(":")[0])
    first, width = None, max(map(len, args.variants))
    for name in args.variants:
        try:
            dt, mem, losses, flops, report = measure(name, args, shards, args.device)
        except Exception as e:  # one failing lever must not cost the others' figures
            print(f"{name:{width}s} failed: {type(e).__name__}: {tg.first_line(e)[:200]}",
                  flush=True)
            continue
        finally:
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        tok_s = args.total_batch_size / dt
        if first is None and name != args.variants[0]:  # the reference failed: say what the ratios are against
            print(f"(the ratios and |dloss| below are against {name}, as {args.variants[0]} failed)", flush=True)
        first = first or (tok_s, losses)
        mfu = f"{100 * flops * tok_s / peak:5.1f}%" if peak else "  n/a"
        memory = f"{mem[0] / 2**30:6.2f} GiB ({mem[1] / 2**30:6.2f} reserved)" if mem else "n/a"
        diffs = [abs(a - b) for a, b in zip(losses, first[1])]
        diff = next((d for d in diffs if not math.isfinite(d)), max(diffs))  # max() would pass over a NaN
        print(f"{name:{width}s} {dt * 1000:8.1f} ms/step {tok_s:9.0f} tok/s {flops * tok_s / 1e12:7.4g} TFLOP/s "
              f"MFU {mfu}  peak mem {memory}  |dloss| {diff:.4f}  {tok_s / first[0]:.3f}x", flush=True)
        print(f"{'':{width}s} losses {' '.join(f'{x:.4f}' for x in losses)}", flush=True)
        for line in report:
            print(line, flush=True)
    if first is None:
        sys.exit("error: every variant failed (see above)")


if __name__ == "__main__":
    # the trainer's: Ctrl-C is "interrupted" (130), errors one line, as hellaswag_speed.py
    tg.run_cli(main, lost_rank_hint="run it again")
