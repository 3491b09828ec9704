"""bench/train_speed.py runs on the CPU at toy sizes, and its variants train the same numbers."""
import contextlib
import os
import re
import sys

from helpers import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "bench"))  # the bench scripts import as modules too

# bench/train_speed.py at a toy size on the CPU, in fp32: one warm-up and one timed step
TOY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--batch_size", "2", "--seq_len", "32",
       "--total_batch_size", "128", "--steps", "1", "--warmup", "1", "--no_compile", "--device", "cpu", "--dtype", "fp32"]


def train_speed(*args, timeout=600):
    return run_script([sys.executable, "bench/train_speed.py", *TOY, *args], timeout=timeout)


def test_train_speed_bench_compares_variants_on_the_same_batches():
    r = train_speed("--baseline", "--variants", "ours", "plain+unpinned", "chunked50")
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^([\w+]+) +\d.* tok/s .*\|dloss\| (\S+)\s+(\S+)x$", r.stdout, re.M)
    assert [name for name, _, _ in rows] == ["baseline", "ours", "plain+unpinned", "chunked50"], r.stdout
    assert rows[0][2] == "1.000"
    # same seed, same batches, fp32: the lecture's step, ours (the chunked loss), the full logits and 50-row
    # chunks agree to rounding
    assert all(float(diff) < 1e-4 for _, diff, _ in rows), r.stdout
    losses = re.findall(r"^ +losses (.*)$", r.stdout, re.M)
    assert len(losses) == 4 and all(len(line.split()) == 2 for line in losses)


def test_when_the_first_variant_fails_the_bench_says_what_the_ratios_are_against():
    r = train_speed("--variants", "cudnn", "plain")  # no cuDNN attention on a CPU
    assert r.returncode == 0, r.stderr
    assert "cudnn failed: " in r.stdout and "(the ratios and |dloss| below are against plain, as cudnn failed)" in r.stdout


def test_train_speed_bench_profile_says_where_the_step_time_goes():
    r = train_speed("--variants", "ours", "plain", "--profile", "3")
    assert r.returncode == 0, r.stderr
    reports = re.findall(r"^(\S+) profile: kernels (\S+) ms of the (\S+) ms step \(\d+%\): (.*)\n"
                         r"((?: +\S+% +\S+ ms +\d+x  .*\n){3})", r.stdout, re.M)
    assert [name for name, *_ in reports] == ["ours", "plain"], r.stdout
    for _, total, _, kinds, longest in reports:
        shares = dict((kind, float(share)) for kind, share in re.findall(r"(\w[a-z ]*) (\S+)%", kinds))
        assert list(shares) == ["attention", "matmul", "optimizer", "fused by compile", "other"]
        assert abs(sum(shares.values()) - 100) < 0.5 and shares["matmul"] > 0 and shares["attention"] > 0
        assert shares["fused by compile"] == 0  # nothing is compiled
        top = [float(x) for x in re.findall(r"^ +(\S+)%", longest, re.M)]
        assert top == sorted(top, reverse=True) and float(total) > 0


def test_the_lecture_step_takes_the_loss_of_the_full_logits():
    # the lecture's step must not pick up the trainer's default loss (chunked): its profile holds the plain
    # cross-entropy's ops (log_softmax, nll_loss) and none of the chunked loss's (logsumexp, scatter_add_)
    r = train_speed("--baseline", "--variants", "ours", "--profile", "500")
    assert r.returncode == 0, r.stderr
    reports = dict(re.findall(r"^(\S+) profile: .*\n((?: +\S+% +\S+ ms +\d+x  .*\n)+)", r.stdout, re.M))
    ops = {name: set(re.findall(r"x  (aten::\w+)", lines)) for name, lines in reports.items()}
    assert {"aten::nll_loss_forward", "aten::_log_softmax"} <= ops["baseline"], r.stdout
    assert not {"aten::logsumexp", "aten::scatter_add_"} & ops["baseline"], r.stdout
    assert {"aten::logsumexp", "aten::scatter_add_"} <= ops["ours"], r.stdout


def test_kernel_kinds_of_cuda_kernel_names():
    from train_speed import kernel_kind
    names = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off":
        "matmul", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN": "matmul",
        "triton_tem_fused_mm_3": "matmul",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
        "triton_per_fused__to_copy_add_native_layer_norm_0": "fused by compile",
        "triton_poi_fused__scaled_dot_product_flash_attention_transpose_view_3": "fused by compile",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "Memcpy HtoD (Pinned -> Device)": "other",
    }
    assert {name: kernel_kind(name) for name in names} == names


def test_a_failing_profiler_costs_the_variant_its_report_only(monkeypatch):
    import argparse

    import numpy as np
    import train_speed

    def broken(step, device_type):
        raise RuntimeError("CUPTI_ERROR_NOT_INITIALIZED\nmore")
    monkeypatch.setattr(train_speed, "profile_step", broken)
    args = argparse.Namespace(model="gpt2", n_layer=1, n_head=2, n_embd=32, batch_size=2, seq_len=16,
                              total_batch_size=32, dtype="fp32", compile=False, warmup=0, steps=1, profile=3)
    shards = [np.random.default_rng(0).integers(0, 50257, 1000, dtype=np.uint16)]
    dt, _, losses, _, report = train_speed.measure("ours", args, shards, "cpu")
    assert dt > 0 and len(losses) == 1
    assert report == ["ours profile failed: RuntimeError: CUPTI_ERROR_NOT_INITIALIZED"]


def test_fineweb_speed_bench_bad_input_is_one_line(tmp_path):
    """Each was a traceback (nan passed the check on --tokens, then failed making the corpus)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "body.parquet")
    texts = [f"document {i}" for i in range(2500)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "one_group.parquet")  # pyarrow's default: one row group
    pq.write_table(pa.table({"text": [[t] for t in texts]}), tmp_path / "lists.parquet", row_group_size=1000)
    pq.write_table(pa.table({"text": texts[:-1] + [None]}), tmp_path / "null.parquet", row_group_size=1000)
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")  # pyarrow would wait on it for ever
    for args, message in [
            (["--corpus", str(tmp_path / "one_group.parquet")], "has 1 row group(s); the bench needs 2 or more"),
            (["--corpus", str(tmp_path / "lists.parquet")], "column 'text' holds list<element: string>, not strings"),
            (["--corpus", str(tmp_path / "null.parquet")], "1 of its texts are missing (null)"),
            (["--json", str(tmp_path / "folder")], f"--json {tmp_path / 'folder'} is not a regular file: name a file"),
            (["--tokens", "1e30"], "--tokens must be at most 1e11"),
            (["--shard_size", str(10**12)], "--shard_size at most 1e9"),
            (["--corpus", str(tmp_path / "missing" / "corpus.parquet")], "no such folder"),
            (["--corpus", str(tmp_path / "body.parquet")], f"--corpus {tmp_path / 'body.parquet'} has no 'text' column"),
            (["--tokens", "inf"], "--tokens inf: need a finite number"),
            (["--tokens", "nan"], "--tokens nan: need a finite number"),
            (["--workers", "x"], "error: argument --workers: invalid int value: 'x' (see --help)"),
            (["--json", "/dev/full"], "--json /dev/full is not a regular file"),
            (["--corpus", str(tmp_path / "fifo")], f"--corpus {tmp_path / 'fifo'} is not a regular file")]:
        r = run_script([sys.executable, "bench/fineweb_speed.py", *args], timeout=120)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr


def test_train_and_hellaswag_speed_bench_bad_input_is_one_line(tmp_path):
    """argparse's own errors were its usage text; a bench whose every variant failed exited 0."""
    for script, args, message in [
            ("train_speed.py", ["--variants", "bogus"], "unknown lever"),
            ("train_speed.py", ["--variants", "chunked²"], "unknown lever 'chunked²'"),
            ("train_speed.py", ["--steps", "0"], "--steps must be positive"),
            ("train_speed.py", ["--dtype", "fp8"], "argument --dtype: invalid choice"),
            ("train_speed.py", ["--batch_size", str(2**40), "--total_batch_size", str(2**50)],
             "error: Unable to allocate 16.0 PiB"),  # numpy's MemoryError for the random tokens, in one line
            ("train_speed.py", [*TOY, "--variants", "cudnn", "ours+cudnn"], "every variant failed"),
            ("train_speed.py", ["--total_batch_size", str(10**23)], "--total_batch_size 100000000000000000000000 is "
                                                                    "too large"),
            ("train_speed.py", ["--n_embd", str(12 * 10**10)], "GiB to build, more than this machine's"),
            ("hellaswag_speed.py", ["--limit", "0"], "must be positive"),
            ("hellaswag_speed.py", ["--dtype", "fp16"], "argument --dtype: invalid choice")]:
        r = run_script([sys.executable, f"bench/{script}", *args], timeout=300)
        assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, r.stderr)


def test_train_speed_bench_checks_the_data_once_before_any_variant(tmp_path):
    """Ids the model cannot embed were an IndexError in every variant (on a GPU, a device assert)."""
    import numpy as np
    for tokens, message in [(np.full(3000, 60000), "token id 60000, beyond the model's vocab_size 50304"),
                            (np.full(40, 7), "too few for one micro-batch")]:
        data = tmp_path / str(len(tokens))
        data.mkdir()
        np.save(data / "x_train_000001.npy", tokens.astype(np.uint16))
        r = train_speed("--data", str(data), "--baseline", "--variants", "ours", "plain")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr
        assert "ms/step" not in r.stdout and "failed" not in r.stdout, r.stdout


def test_a_loss_that_turns_nan_is_no_match(monkeypatch, capsys):
    """max() passes over a NaN that is not first: a lever diverging after its first step printed |dloss| 0.0000."""
    import train_speed
    losses = {"ours": [10.86, 10.81, 10.80], "plain": [10.86, float("nan"), float("nan")]}
    monkeypatch.setattr(train_speed, "measure", lambda name, *a: (0.1, None, losses[name], 1e6, []))
    monkeypatch.setattr(sys, "argv", ["train_speed.py", *TOY, "--variants", "ours", "plain"])
    train_speed.main()
    rows = dict(re.findall(r"^(\w+) .*\|dloss\| (\S+)", capsys.readouterr().out, re.M))
    assert rows == {"ours": "0.0000", "plain": "nan"}


def test_the_lecture_step_uses_the_fp16_scaler_as_ours_does():
    import numpy as np
    import torch

    import train_gpt2 as tg
    from train_speed import lecture_step

    class Scaler:  # passes everything through, counting the calls
        def __init__(self):
            self.calls = []

        def scale(self, loss):
            self.calls.append("scale")
            return loss

        def unscale_(self, optimizer):
            self.calls.append("unscale_")

        def step(self, optimizer):
            self.calls.append("step")
            optimizer.step()

        def update(self):
            self.calls.append("update")

    torch.manual_seed(0)
    model = tg.GPT(tg.GPTConfig(16, 64, 1, 2, 16))
    optimizer = model.configure_optimizers(0.1, 1e-3, "cpu")
    loader = tg.DataLoader([np.arange(200, dtype=np.uint16) % 64], 2, 16)
    before = model.lm_head.weight.detach().clone()
    scaler = Scaler()
    lecture_step(model, optimizer, loader, 2, 1e-3, contextlib.nullcontext(), scaler, "cpu")
    assert scaler.calls == ["scale", "scale", "unscale_", "step", "update"]
    assert not torch.equal(before, model.lm_head.weight)  # the step went through the scaler to the optimizer


def test_cuda_n_becomes_the_current_gpu_and_mfu_knows_the_card(monkeypatch):
    """Memory stats, the card's name and its peak are of the current GPU: --device cuda:1 has to make it so."""
    import torch

    import train_gpt2 as tg
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert tg.setup_device("cuda:1") == (0, 0, 1, "cuda:1") and chosen == ["cuda:1"]
    assert tg.setup_device("cuda") == (0, 0, 1, "cuda") and chosen == ["cuda:1"]  # the current one already
    for name, peak in [("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-40GB", 312e12),
                       ("NVIDIA L4", 121e12), ("NVIDIA RTX A1000", None),
                       ("Some New GPU", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, name=name: name)
        assert tg.peak_flops("cuda") == peak, name


def test_the_profile_gives_the_memory_speed_of_kernels_that_say_their_bytes():
    # inductor's Triton kernels, compiled with benchmark_kernel, pass their bytes to the profiler as the
    # kwarg kernel_num_gb of the record around each launch; a stand-in launch here does the same on the CPU
    import torch
    from train_speed import profile_report, profile_step
    x = torch.randn(256, 256)

    def step():
        for _ in range(3):
            with torch._C._profiler._RecordFunctionFast("triton_red_fused_stand_in_0", (x,), {"kernel_num_gb": 0.25}):
                x.exp().sum()
        x.sin()

    rows = {name: (us, calls, gb) for name, us, calls, gb in profile_step(step, "cpu")}
    us, calls, gb = rows["triton_red_fused_stand_in_0"]
    assert calls == 3 and gb == 0.75 and us > 0
    assert rows["aten::sin"][2] is None  # an op that said nothing has no bytes
    lines = profile_report("ours", [("triton_red_fused_stand_in_0", 1000.0, 3, 0.75), ("aten::sin", 10.0, 1, None)],
                           0.002, 2)
    assert lines[1].endswith("x  triton_red_fused_stand_in_0  (0.250 GB a call, 750 GB/s)"), lines
    assert lines[2].endswith("x  aten::sin"), lines


def test_only_a_gpu_profile_without_cuda_graphs_compiles_with_the_bytes_counted():
    from train_speed import inductor_settings, variant
    assert inductor_settings(variant("ours"), 25, "cuda") == {"benchmark_kernel": True}
    assert inductor_settings(variant("ours+coordtune"), 25, "cuda") == {"coordinate_descent_tuning": True,
                                                                        "benchmark_kernel": True}
    assert inductor_settings(variant("ours"), 0, "cuda") == {}  # the timing alone compiles as the trainer does
    assert inductor_settings(variant("ours"), 25, "cpu") == {}
    assert inductor_settings(variant("ours+cudagraphs"), 25, "cuda") == {}
    assert inductor_settings(variant("ours+autotune"), 25, "cuda") == {"benchmark_kernel": True}  # no graphs


def test_ctrl_c_stops_a_bench_in_one_line(tmp_path):
    """Ctrl-C during the timed work: 'interrupted' and exit status 130, as the scripts do, not a traceback."""
    import signal
    import subprocess
    import time
    for script, args, started in [
            ("bench/train_speed.py", [*TOY, "--steps", "100000"], "random tokens"),
            ("bench/fineweb_speed.py", ["--tokens", "3e6", "--workers", "1", "--repeats", "8"], "machine:")]:  # 16 runs
        # as from a terminal: a test run started in the background (cmd &) ignores SIGINT, and its children with it
        proc = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            for line in proc.stdout:  # the work has begun
                if started in line:
                    break
            time.sleep(2)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
        finally:  # a bench that took no notice must not run on after the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", (script, err[-3000:])
        assert "Traceback" not in err, (script, err[-3000:])
