"""
HellaSwag eval speed: batched (hellaswag.score_endings) vs one example per forward (the lecture's way), same
device, model and examples, in one run.

    python bench/hellaswag_speed.py --device cpu --model tiny --limit 200        # a laptop
    python bench/hellaswag_speed.py --device cuda --limit 10042 --single_limit 1000 --compile

The model has random weights (speed does not depend on them): --model gpt2 is the 124M with the padded
training vocabulary. Without --data the examples are random words of HellaSwag-like lengths (contexts
40-80 tokens, endings 10-30), so nothing is downloaded. The lecture's loop is timed on the first
--single_limit examples and reported per example; the full-pass figures scale that to 10,042 examples.
"""
import argparse
import os
import random
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hellaswag  # noqa: E402
from train_gpt2 import (GPT, GPT2_SIZES, GPTConfig, UserError, autocast, autocast_dtype, gpt2_tokenizer,  # noqa: E402
                        run_cli, setup_device, usage_error)

FULL = 10042  # examples in HellaSwag's validation split


def synthetic_examples(n, seed=0):
    """Random words whose lengths match HellaSwag's: one GPT-2 token per word (a space + letters)."""
    enc = gpt2_tokenizer()
    words = [w for w in (enc.decode([i]) for i in range(5000)) if w[:1] == " " and w[1:].isalpha()]
    rng = random.Random(seed)
    text = lambda lo, hi: "".join(rng.choice(words) for _ in range(rng.randint(lo, hi))).strip()  # noqa: E731
    return [{"ctx": text(40, 80), "endings": [text(10, 30) for _ in range(4)], "label": rng.randrange(4)}
            for _ in range(n)]


@torch.no_grad()
def lecture_loop(model, examples, device, amp):
    """The lecture's eval as it ran: per example a forward of its 4 rows, the loss at every position, then
    the ending's tokens masked in, and the prediction read back to the host (a sync per example)."""
    enc = gpt2_tokenizer()
    preds = []
    for ex in examples:
        tokens, mask, _ = hellaswag.render_example(ex, enc)
        L = max(len(t) for t in tokens)
        idx = torch.tensor([t + [0] * (L - len(t)) for t in tokens], device=device)
        m = torch.tensor([x + [0] * (L - len(x)) for x in mask], device=device)[:, 1:]
        with amp:
            logits = model(idx)[0]
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), idx[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1)
        preds.append(((losses * m).sum(1) / m.sum(1)).argmin().item())
    return preds


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = usage_error  # one line, not the usage text
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--model", default="gpt2", help=f"{', '.join(GPT2_SIZES)} or tiny (2 layers, 128 wide)")
    p.add_argument("--data", help="HellaSwag file (jsonl or parquet); default: synthetic examples")
    p.add_argument("--limit", type=int, default=1000, help="examples for the batched pass")
    p.add_argument("--single_limit", type=int, default=100, help="examples for the one-per-forward pass")
    p.add_argument("--batch_size", type=int, nargs="+", default=[32], help="examples per forward (several: each)")
    p.add_argument("--pad_to", type=int, default=hellaswag.PAD_TO, help="pad rows to a multiple of this")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    p.add_argument("--compile", action="store_true", help="also time the batched pass with torch.compile")
    args = p.parse_args()
    if min(args.limit, args.single_limit, args.pad_to, *args.batch_size) <= 0:
        p.error("--limit, --single_limit, --batch_size and --pad_to must be positive")
    hellaswag.PAD_TO = args.pad_to
    device = setup_device(args.device)[3]  # one line for a device this machine lacks
    device_type = device.split(":")[0]

    # the model and the examples
    if args.model == "tiny":
        config = GPTConfig(vocab_size=50304, n_layer=2, n_head=2, n_embd=128)
    elif args.model in GPT2_SIZES:
        n_layer, n_head, n_embd = GPT2_SIZES[args.model]
        config = GPTConfig(vocab_size=50304, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    else:
        raise UserError(f"unknown --model '{args.model}': tiny or one of {', '.join(GPT2_SIZES)}")
    torch.manual_seed(0)
    model = GPT(config).to(device).eval()
    examples = (hellaswag.load_examples(args.data, limit=args.limit) if args.data
                else synthetic_examples(args.limit))
    single = examples[:args.single_limit]
    dtype = autocast_dtype(args.dtype, device_type)
    amp = autocast(dtype, device_type)
    name = torch.cuda.get_device_name(device) if device_type == "cuda" else f"{device} ({os.cpu_count()} cores)"
    source = "from " + args.data if args.data else "synthetic"
    print(f"{name}, torch {torch.__version__}, model {args.model} ({model.num_params() / 1e6:.0f}M, random "
          f"weights), {str(dtype).split('.')[-1]}, {len(examples)} examples ({source}), rows padded to "
          f"multiples of {args.pad_to}")

    def report(label, seconds, n, note):
        print(f"{label:26s} {1000 * seconds / n:8.2f} ms/example, full pass ~{seconds / n * FULL:6.1f} s  {note}")
        return seconds / n

    def same(a, b):  # the fraction of examples where two score tables pick the same ending
        return (a.argmin(1) == b.argmin(1)).double().mean().item()

    # one example (4 rows padded to the longest) per forward, eager: this file's code, and the lecture's.
    # Both timed on a second pass, as the batched runs are: the first meets each row length for the first time.
    score_single = lambda: hellaswag.score_endings(model, single, device, amp, batch_size=0)  # noqa: E731
    timed(score_single, device)
    (s_sums, s_counts), t = timed(score_single, device)
    per_single = report("one example per forward", t, len(single), "")
    timed(lambda: lecture_loop(model, single, device, amp), device)
    lecture_preds, t = timed(lambda: lecture_loop(model, single, device, amp), device)
    agree = (torch.tensor(lecture_preds) == (s_sums / s_counts).argmin(1)).double().mean().item()
    per_lecture = report("  the same, lecture code", t, len(single),
                         f"(loss at every position, a sync per example; same acc_norm predictions {agree:.3f})")

    # batched, eager and (optionally) compiled; the first pass (compilation included) is not timed
    runs = [("batched, eager", model)]
    if args.compile:
        runs.append(("batched, torch.compile", torch.compile(model)))
    for (label, m), batch_size in [(run, b) for run in runs for b in args.batch_size]:
        score = lambda: hellaswag.score_endings(m, examples, device, amp, batch_size)  # noqa: E731
        _, t_first = timed(score, device)
        (sums, counts), t = timed(score, device)
        n, per = len(single), t / len(examples)
        report(f"{label} x{batch_size}", t, len(examples),
                     f"{per_single / per:5.1f}x the speed of one per forward, {per_lecture / per:5.1f}x the lecture code's "
                     f"(first pass {t_first:.1f} s; same predictions as one per forward: acc "
                     f"{same(sums[:n], s_sums):.3f}, acc_norm {same((sums / counts)[:n], s_sums / s_counts):.3f})")


if __name__ == "__main__":
    run_cli(main, lost_rank_hint="run it again")
