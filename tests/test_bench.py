"""bench/train_speed.py runs on the CPU at toy sizes, and its variants train the same numbers."""
import re
import sys

from helpers import run_script


def test_train_speed_bench_compares_variants_on_the_same_batches():
    r = run_script([sys.executable, "bench/train_speed.py", "--baseline", "--variants", "ours", "plain+unpinned",
                    "chunked50", "--batch_size", "2", "--seq_len", "32", "--total_batch_size", "128", "--steps", "1",
                    "--warmup", "1", "--no_compile", "--device", "cpu", "--dtype", "fp32"])
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^([\w+]+) +\d.* tok/s .*\|dloss\| (\S+)\s+(\S+)x$", r.stdout, re.M)
    assert [name for name, _, _ in rows] == ["baseline", "ours", "plain+unpinned", "chunked50"], r.stdout
    assert rows[0][2] == "1.000"
    # same seed, same batches, fp32: the lecture's step, ours (the chunked loss), the full logits and 50-row
    # chunks agree to rounding
    assert all(float(diff) < 1e-4 for _, diff, _ in rows), r.stdout
    losses = re.findall(r"^ +losses (.*)$", r.stdout, re.M)
    assert len(losses) == 4 and all(len(line.split()) == 2 for line in losses)
