"""Scale-out: GPT-3 presets, the memory planner, FSDP2 equal to one process, sharded checkpoints that resume."""
import argparse
import errno
import json
import os
import shutil
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import train_gpt2
from helpers import FAST, TINY, ok, records, run_script, train
from train_gpt2 import GPT, MODELS, GPTConfig, checkpoint_error, memory_plan, param_count

# Brown et al. 2020, Table 2.1: nominal sizes, and the paper's batch (tokens) and learning rate
GPT3 = {"gpt3-125M": (125e6, 0.5e6, 6e-4), "gpt3-350M": (350e6, 0.5e6, 3e-4), "gpt3-760M": (760e6, 0.5e6, 2.5e-4),
        "gpt3-1.3B": (1.3e9, 1e6, 2e-4), "gpt3-2.7B": (2.7e9, 1e6, 1.6e-4), "gpt3-6.7B": (6.7e9, 2e6, 1.2e-4),
        "gpt3-13B": (13e9, 2e6, 1e-4), "gpt3-175B": (175e9, 3.2e6, 0.6e-4)}


@pytest.mark.parametrize("name", GPT3)
def test_gpt3_presets(name):
    nominal, batch, lr = GPT3[name]
    n_layer, n_head, n_embd, context, tokens, max_lr = MODELS[name]
    config = GPTConfig(context, 50257, n_layer, n_head, n_embd)
    assert abs(param_count(config) / nominal - 1) < 0.05, param_count(config)
    assert context == 2048 and n_embd % n_head == 0 and max_lr == lr
    assert abs(tokens / batch - 1) < 0.05 and tokens % 2048 == 0
    # the lecture's schedule in tokens (10B, 375M of them warmup: 19073 and 715 steps at 2**19) at its batch
    args = train_gpt2.parse_args(["--model", name])
    train_gpt2.apply_preset(args)
    assert abs(args.max_steps * tokens / 10e9 - 1) < 1e-3 and abs(args.warmup_steps * tokens / 375e6 - 1) < 5e-3


def test_param_count_formula_matches_a_built_model():
    for config in [GPTConfig(64, 50304, 2, 2, 32), GPTConfig(2048, 50257, 12, 12, 768)]:
        assert param_count(config) == GPT(config).num_params()


def dry_run(*args):
    r = ok(train(["--dry_run", *args]))
    assert "Traceback" not in r.stderr
    return r.stdout


def test_dry_run_uses_the_preset_and_its_overrides():
    out = dry_run("--model", "gpt3-350M", "--batch_size", "8", "--world_size", "8")
    assert "n_layer=24, n_head=16, n_embd=1024" in out and "block_size=2048" in out
    assert "524,288 tokens per step = 8 GPU(s) x B 8 x T 2048 x 4 accumulation steps" in out
    assert "max LR 0.0003" in out and "; 19,073 steps (10.0B tokens), 715 of warmup" in out
    out = dry_run("--model", "gpt3-1.3B", "--batch_size", "8", "--world_size", "8")
    assert "1,048,576 tokens per step" in out and "; 9,537 steps (10.0B tokens), 358 of warmup" in out
    out = dry_run("--model", "gpt3-1.3B", "--batch_size", "1", "--total_batch_size", "2048", "--max_steps", "5",
                  "--warmup_steps", "0")
    assert "; 5 steps (0.0B tokens), 0 of warmup" in out
    out = dry_run("--model", "gpt3-350M", "--batch_size", "8", "--seq_len", "1024", "--max_lr", "1e-3",
                  "--total_batch_size", "65536")
    assert "65,536 tokens per step = 1 GPU(s) x B 8 x T 1024 x 8 accumulation steps; 19,073 steps" in out
    assert "max LR 0.001" in out


@pytest.mark.parametrize("model, world, plan", [
    ("gpt2", 1, "1 GPU(s) x B 64 x T 1024 x 8"),  # the lecture's
    ("gpt2", 64, "64 GPU(s) x B 8 x T 1024 x 1"),
    ("gpt3-125M", 8, "8 GPU(s) x B 32 x T 2048 x 1"),  # 64 x 2048 x 8 would be twice the preset's 2**19 tokens
    ("gpt3-2.7B", 8, "8 GPU(s) x B 32 x T 2048 x 2"),
    ("gpt3-175B", 96, "96 GPU(s) x B 16 x T 2048 x 1"),
])
def test_the_default_batch_size_fits_the_preset_and_the_gpus(model, world, plan):
    assert plan + " accumulation steps" in dry_run("--model", model, "--world_size", str(world))


def test_without_batch_size_a_total_that_no_b_divides_names_totals_that_one_would():
    r = train(["--dry_run", "--world_size", "3"])
    assert r.returncode == 1 and r.stderr == "error: --total_batch_size 524288 is not a multiple of 3 process(es) x " \
        "T 1024 = 3072 tokens: try --total_batch_size 525312 or 522240\n"
    assert "x B 1 x T 131072 x 2 accumulation steps" in dry_run(  # rows past 65,536 tokens: one a micro-batch
        "--block_size", "131072", "--seq_len", "131072", "--total_batch_size", "262144")


def test_a_run_without_batch_size_takes_the_default(tmp_path):
    args = [a for a in FAST if a not in ("--batch_size", "4")]  # 256 tokens per step, T=32: 8 rows
    r = ok(train(args + ["--max_steps", "1", "--eval_every", "0", "--log_dir", str(tmp_path / "log")]))
    assert "total batch 256 tokens = 1 process(es) x 8 x 32 x 1 accumulation steps" in r.stdout


def test_dry_run_memory_matches_a_measured_allocation():
    """Weights + grads + AdamW state of the 124M, as the planner says and as allocated on the CPU."""
    out = dry_run("--world_size", "1")
    rows = {line[:34].strip(): [float(x) for x in line[34:].split()] for line in out.splitlines()[4:]}
    planned = sum(rows[k][0] for k in ("weights (fp32)", "gradients (fp32)", "optimizer (AdamW m, v)")) * 2**30
    model = GPT(GPTConfig(vocab_size=50304))
    optimizer = model.configure_optimizers(0.1, 6e-4, "cpu")
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    loss.backward()
    optimizer.step()
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    measured = sum(storages.values())
    assert abs(planned / measured - 1) < 0.10, (planned, measured)
    # FSDP keeps 1/world of them
    plan = memory_plan(model.config, 64, 1024, 8, 2, False)
    assert plan["optimizer (AdamW m, v)"][1] == plan["optimizer (AdamW m, v)"][0] / 8


def test_activation_checkpointing_does_not_change_the_numbers():
    torch.manual_seed(0)
    model = GPT(GPTConfig(32, 128, 2, 2, 32))
    idx = torch.randint(0, 128, (2, 16))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        _, loss = model(idx, idx)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-7)


def test_activation_checkpointing_recomputes_each_block(tmp_path, monkeypatch):
    """Equal numbers (above) would hold for a flag that does nothing: count the blocks' forwards instead."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(32, 128, 2, 2, 32))
    forwards, forward = [], train_gpt2.Block.forward
    monkeypatch.setattr(train_gpt2.Block, "forward", lambda self, x: forwards.append(1) or forward(self, x))
    idx = torch.randint(0, 128, (2, 16))
    for checkpointing, want in [(False, 2), (True, 4)]:  # 2 blocks; checkpointed, each runs again in the backward
        forwards.clear()
        model.activation_checkpointing = checkpointing
        model(idx, idx)[1].backward()
        assert len(forwards) == want
    # and the trainer's flag turns it on: every block of every micro-step, none in evaluation
    real, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for flag, want in [([], 0), (["--activation_checkpointing"], 2 * 2)]:  # 2 blocks x 2 micro-steps
        calls.clear()
        train_gpt2.main(FAST + ["--max_steps", "1", "--val_steps", "1", "--log_dir", str(tmp_path / str(want)), *flag])
        assert len(calls) == want


def torchrun(n, args, timeout=600):
    return ok(run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                          "train_gpt2.py", *args], timeout=timeout))


# B * world = 8 in every run, so each step and each val pass reads the same sequences
FSDP = ["--data", "input.txt", *TINY, "--seq_len", "32", "--total_batch_size", "512", "--max_steps", "6",
        "--eval_every", "3", "--val_steps", "2", "--sample_every", "0", "--checkpoint_every", "3",
        "--warmup_steps", "5", "--max_lr", "1e-2", "--hellaswag_every", "0"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    ok(train(FSDP + ["--batch_size", "8", "--loss_chunk_rows", "0", "--log_dir", str(d / "one")]))
    torchrun(2, FSDP + ["--batch_size", "4", "--fsdp", "--log_dir", str(d / "two")])
    return d


def test_fsdp_on_two_ranks_equals_one_process(fsdp_run):
    one, two = records(str(fsdp_run / "one")), records(str(fsdp_run / "two"))
    assert [r[:2] for r in one] == [r[:2] for r in two] and len(one) == 6 + 3
    assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(one, two)), (one, two)
    ckpt = fsdp_run / "two" / "model_00006.dcp"
    assert sorted(os.listdir(ckpt)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert not (fsdp_run / "two" / "model_00006.dcp.tmp").exists()
    meta = torch.load(str(ckpt / "meta.pt"), weights_only=True)
    assert meta["step"] == 6 and meta["loader"] == torch.load(str(fsdp_run / "one" / "model_00006.pt"),
                                                              weights_only=True)["loader"]


def test_hellaswag_scores_an_fsdp_checkpoint(fsdp_run, tmp_path):
    """hellaswag.py -c reads the sharded folder whole: the weights of the 1-process run's .pt, to float rounding
    (6 AdamW steps at LR 1e-2 from losses equal to 1e-5; a wrong load would be off by the weights' size, 0.02+)."""
    import hellaswag
    sharded, plain = (hellaswag.load_model(argparse.Namespace(model=None, checkpoint=str(fsdp_run / run)))
                      for run in ("two/model_00006.dcp", "one/model_00006.pt"))
    a, b = sharded.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    assert sharded.lm_head.weight is sharded.transformer.wte.weight  # still tied
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps({"ctx": f"The cat sat on mat {i}", "endings": ["a", "b c", "d e f", "g"],
                                        "label": i % 4}) + "\n" for i in range(6)))
    lines = [ok(run_script([sys.executable, "hellaswag.py", "-c", str(fsdp_run / run), "--data", str(data)]))
             .stdout.splitlines()[-1] for run in ("two/model_00006.dcp", "one/model_00006.pt")]
    assert lines[0] == lines[1] and lines[0].startswith("hellaswag: n=6 acc=")


def test_fsdp_with_the_chunked_loss_equals_one_process_with_the_plain_loss(fsdp_run, tmp_path):
    torchrun(2, FSDP + ["--batch_size", "4", "--fsdp", "--loss_chunk_rows", "20", "--log_dir", str(tmp_path)])
    one, two = records(str(fsdp_run / "one")), records(str(tmp_path))
    assert [r[:2] for r in one] == [r[:2] for r in two] and len(one) == 6 + 3
    assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(one, two)), (one, two)


def test_fsdp_in_bf16_has_the_numerics_of_one_process_with_autocast(tmp_path):
    """FSDP gathers the blocks' matmul weights in bf16 but keeps the residual stream, embeddings and LayerNorms
    in fp32, as autocast does: before any update the losses are those of one process; after 6 steps they differ
    by reduction order only. (With everything in bf16, step 0 was off by 2e-5 to 3e-5 and step 4 by 1e-3.)"""
    bf16 = FSDP + ["--dtype", "bf16", "--checkpoint_every", "0"]
    ok(train(bf16 + ["--batch_size", "8", "--log_dir", str(tmp_path / "one")]))
    torchrun(2, bf16 + ["--batch_size", "4", "--fsdp", "--log_dir", str(tmp_path / "two")])
    one, two = records(str(tmp_path / "one")), records(str(tmp_path / "two"))
    assert [r[:2] for r in one] == [r[:2] for r in two] and len(one) == 6 + 3
    assert all(abs(a[2] - b[2]) < 5e-6 for a, b in zip(one[:2], two[:2])), (one, two)
    assert all(abs(a[2] - b[2]) < 5e-4 for a, b in zip(one, two)), (one, two)
    # and bf16 it is: an fp32 run of the same model and batches rounds differently
    ok(train(FSDP + ["--dtype", "fp32", "--checkpoint_every", "0", "--batch_size", "8", "--log_dir",
                     str(tmp_path / "fp32")]))
    fp32 = records(str(tmp_path / "fp32"))
    for bf16_run in (one, two):  # they differ by up to 2e-4 here
        assert max(abs(a[2] - b[2]) for a, b in zip(bf16_run, fp32)) > 5e-5, (bf16_run, fp32)


# every process of the launch imports this (a sitecustomize.py on PYTHONPATH): fsync fails as on a full disk
# for the files whose path holds $FULL_DISK_AT
FULL_DISK = """
import errno, os
_fsync = os.fsync
def fsync(fd):
    if os.environ["FULL_DISK_AT"] in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _fsync(fd)
os.fsync = fsync
"""


@pytest.mark.parametrize("at", ["model_00006.dcp.tmp/__1_", "model_00006.dcp.tmp/meta.pt", "model_00006.pt.tmp"])
def test_full_disk_while_checkpointing_on_two_ranks(fsdp_run, tmp_path, at):
    """FSDP: rank 1's shard, or rank 0's meta.pt after the shards, cannot be written; DDP: rank 0's file. Every
    rank stops at once with the same one-line error (no rank waits for --dist_timeout), the previous checkpoint
    stays and no half one does; with space again, --resume auto finishes the same run."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FULL_DISK)
    log_dir, fsdp = tmp_path / "log", ".dcp" in at
    args = [*FSDP, "--batch_size", "4", "--log_dir", str(log_dir), "--dist_timeout", "60"] + (["--fsdp"] * fsdp)
    r = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "train_gpt2.py", *args], env={"PYTHONPATH": str(tmp_path / "inject"), "FULL_DISK_AT": at})
    assert r.returncode != 0
    failed = str(log_dir / at.split(".tmp")[0]) + (".tmp/meta.pt" if "meta" in at else "")
    assert [line for line in r.stderr.splitlines() if line.startswith("error:")] == \
        [f"error: cannot write checkpoint {failed}: No space left on device"] * 2, r.stderr
    assert "[rank" not in r.stderr  # no traceback from a rank
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00003" + (".dcp" if fsdp else ".pt")]
    torchrun(2, args + ["--resume", "auto"])
    if fsdp:
        assert open(log_dir / "log.txt").read() == open(fsdp_run / "two" / "log.txt").read()
    else:
        one, two = records(str(fsdp_run / "one")), records(str(log_dir))
        assert [r[:2] for r in one] == [r[:2] for r in two]
        assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(one, two)), (one, two)


def test_fsdp_never_writes_weights_that_are_not_finite(tmp_path):
    """A weight decay beyond fp32's range makes step 0's update inf while its loss and grad norm are still finite:
    every rank refuses the checkpoint after it, as a single process refuses a .pt one."""
    log_dir = tmp_path / "log"
    r = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "train_gpt2.py", *FSDP, "--batch_size", "4", "--fsdp", "--log_dir", str(log_dir), "--max_steps", "3",
                    "--warmup_steps", "0", "--max_lr", "1", "--weight_decay", "1e39", "--checkpoint_every", "1",
                    "--eval_every", "0"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and errors == [f"error: not writing {log_dir}/model_00001.dcp: its weight "
                                            "transformer.wte.weight holds inf or NaN"] * 2, r.stderr
    assert sorted(os.listdir(log_dir)) == ["log.txt"]


def test_a_failed_sharded_write_names_its_cause(tmp_path, monkeypatch):
    """torch.save's stream writer can fail on a full disk with a RuntimeError of its own, which reaches the
    CheckpointException without the OSError behind it: the free space of the folder being written tells."""
    from torch.distributed.checkpoint.api import CheckpointException
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    e = CheckpointException("save failed", {0: (short, None)})
    assert checkpoint_error(e, "cannot write x", str(tmp_path)) == \
        "cannot write x: RuntimeError ([enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598)"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 4096))
    assert checkpoint_error(e, "cannot write x", str(tmp_path)) == "cannot write x: No space left on device"
    wrapped = RuntimeError("file write failed")  # a cause that came with it is named whatever the free space
    wrapped.__context__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert checkpoint_error(CheckpointException("", {1: (wrapped, None)}), "cannot write x", str(tmp_path)) == \
        "cannot write x: Disk quota exceeded"


def test_fsdp_truncated_shard_is_one_line(fsdp_run, tmp_path):
    shutil.copytree(fsdp_run / "two" / "model_00003.dcp", tmp_path / "model_00003.dcp")
    shard = tmp_path / "model_00003.dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    r = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "train_gpt2.py", *FSDP, "--batch_size", "4", "--fsdp", "--log_dir", str(tmp_path), "--resume",
                    str(tmp_path / "model_00003.dcp")])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and "[rank" not in r.stderr, r.stderr
    assert errors == [f"error: checkpoint {tmp_path}/model_00003.dcp is incomplete (__1_0.distcp is missing or "
                      "cut short)"] * 2


@pytest.mark.parametrize("damage", ["flipped bytes", "zeroed header"])
def test_fsdp_damaged_shard_is_refused_and_passed_over(fsdp_run, tmp_path, damage):
    """DCP reads each item back with torch.load, which checks no CRC: bytes flipped in a shard's weights would load
    as wrong numbers, and a damaged item header failed only in the load. load_checkpoint finds both, so --resume
    auto goes back to the checkpoint before."""
    from torch.distributed.checkpoint import FileSystemReader
    for step in (3, 6):
        shutil.copytree(fsdp_run / "two" / f"model_0000{step}.dcp", tmp_path / f"model_0000{step}.dcp")
    ckpt = tmp_path / "model_00006.dcp"
    item = max(FileSystemReader(str(ckpt)).read_metadata().storage_data.values(), key=lambda info: info.length)
    shard = ckpt / item.relative_path
    data = bytearray(shard.read_bytes())
    at = item.offset + item.length // 2 if damage == "flipped bytes" else item.offset
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    shard.write_bytes(bytes(data))
    with pytest.raises(train_gpt2.UserError, match=f"checkpoint {ckpt} is corrupt: .*{item.relative_path}"):
        train_gpt2.load_checkpoint(str(ckpt))
    said = []
    _, path = train_gpt2.find_resume_checkpoint(str(tmp_path), said.append)
    assert path.endswith("model_00003.dcp") and len(said) == 1 and said[0].endswith(": skipping it"), said


# each rank logs the shard files (.distcp) it opens to read: the CRC check opens one for each item it checks
COUNT_READS = """
import os, sys
def count(event, args):
    if event == "open" and str(args[0]).endswith(".distcp") and "r" in str(args[1] or "r"):
        with open(os.environ["READS_LOG"] + "." + os.environ.get("RANK", "-"), "a") as f:
            f.write(str(args[0]) + "\\n")
sys.addaudithook(count)
"""


def test_two_ranks_split_the_crc_check_and_agree_on_it(fsdp_run, tmp_path):
    """Under a launch each rank checks the CRCs of its share of an FSDP checkpoint's items, not all of them. Damage
    in rank 1's share alone makes every rank refuse the checkpoint given by --resume PATH, and pass over it with
    --resume auto (the warning comes from rank 0, which never read the damaged item). Each rank reads about half
    of the sound checkpoint it resumes from (its share, then DCP's load of its own), not all of it."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    shutil.copy(fsdp_run / "two" / "log.txt", log_dir / "log.txt")
    for step in (3, 6):
        shutil.copytree(fsdp_run / "two" / f"model_0000{step}.dcp", log_dir / f"model_0000{step}.dcp")
    ckpt = log_dir / "model_00006.dcp"
    item = max(train_gpt2.shard_items(str(ckpt))[1::2], key=lambda info: info.length)
    shard = ckpt / item.relative_path
    data = bytearray(shard.read_bytes())
    at = item.offset + item.length // 2
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    shard.write_bytes(bytes(data))
    damaged = f"checkpoint {ckpt} is corrupt: in {item.relative_path} at byte {item.offset}, its record "
    train_gpt2.load_checkpoint(str(ckpt), part=(0, 2))  # rank 0's share is sound
    with pytest.raises(train_gpt2.DamagedShard, match=damaged):
        train_gpt2.load_checkpoint(str(ckpt), part=(1, 2))
    args = [*FSDP, "--batch_size", "4", "--fsdp", "--log_dir", str(log_dir)]
    r = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "train_gpt2.py", *args, "--resume", str(ckpt)])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 2 and all(e.startswith("error: " + damaged) for e in errors), r.stderr
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(COUNT_READS)
    r = ok(run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "train_gpt2.py", *args, "--resume", "auto"],
                      env={"PYTHONPATH": str(tmp_path / "inject"), "READS_LOG": str(tmp_path / "reads")}))
    assert f"warning: {damaged}" in r.stdout and f"resuming from {log_dir}/model_00003.dcp at step 3" in r.stdout
    assert open(log_dir / "log.txt").read() == open(fsdp_run / "two" / "log.txt").read()
    items = len(train_gpt2.shard_items(str(fsdp_run / "two" / "model_00003.dcp")))
    for rank in (0, 1):
        reads = open(tmp_path / f"reads.{rank}").read().split()
        assert 0 < sum("model_00003.dcp" in path for path in reads) < 0.75 * items, (rank, items, len(reads))


@pytest.mark.parametrize("world", [2, 1])
def test_fsdp_checkpoint_resumes(fsdp_run, tmp_path, world):
    """Back to step 3 from the sharded checkpoint: exactly the same run on 2 ranks, the same within
    float rounding on 1 rank (DCP reshards the weights and AdamW state)."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    shutil.copy(fsdp_run / "two" / "log.txt", log_dir / "log.txt")
    shutil.copytree(fsdp_run / "two" / "model_00003.dcp", log_dir / "model_00003.dcp")
    if world == 1:  # the newer checkpoint has a shard cut short (written in part): --resume auto passes over it
        shutil.copytree(fsdp_run / "two" / "model_00006.dcp", log_dir / "model_00006.dcp")
        os.truncate(log_dir / "model_00006.dcp" / "__1_0.distcp", 100)
    r = torchrun(world, FSDP + ["--batch_size", str(8 // world), "--fsdp", "--log_dir", str(log_dir), "--resume", "auto"])
    assert "resuming from" in r.stdout and "model_00003.dcp" in r.stdout
    if world == 1:
        assert ": skipping it" in r.stdout and "__1_0.distcp is missing or cut short" in r.stdout
    full, resumed = records(str(fsdp_run / "two")), records(str(log_dir))
    if world == 2:
        assert open(log_dir / "log.txt").read() == open(fsdp_run / "two" / "log.txt").read()
    assert [r[:2] for r in full] == [r[:2] for r in resumed]
    assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(full, resumed))


def test_fsdp_hellaswag_in_the_loop_equals_one_process(tmp_path):
    """13 examples over 2 ranks: rank 0's of many lengths, rank 1's short, so rank 0 needs more batches
    (padded lengths) than rank 1, while FSDP needs every rank in every forward."""
    data = tmp_path / "hs.jsonl"
    words = "the a cat sat on mat and then ran off to see king queen who said hello world".split()
    with open(data, "w") as f:
        for i in range(13):
            n = 10 + 14 * (i // 2) if i % 2 == 0 else 5
            ctx = " ".join(words[(i + k) % len(words)] for k in range(n))
            endings = [" ".join(words[(i * j + k) % len(words)] for k in range(2 + j)) for j in range(4)]
            f.write(json.dumps({"ctx": ctx, "endings": endings, "label": i % 4}) + "\n")
    args = FSDP + ["--max_steps", "1", "--eval_every", "0", "--checkpoint_every", "0", "--hellaswag_every", "1",
                   "--hellaswag_data", str(data), "--block_size", "128"]
    ok(train(args + ["--batch_size", "8", "--log_dir", str(tmp_path / "one")]))
    torchrun(2, args + ["--batch_size", "4", "--fsdp", "--log_dir", str(tmp_path / "two")], timeout=120)
    one, two = records(str(tmp_path / "one"), "hella"), records(str(tmp_path / "two"), "hella")
    assert len(one) == 2 and one == two


def test_an_fsdp_run_cut_short_at_a_checkpoint_rewrites_only_its_meta(tmp_path, fsdp_run):
    """--max_steps lowered to a checkpoint's step rewrites that checkpoint to say its evaluations are made. Its
    shards are those weights already: replacing the folder would first delete it, and a crash then would lose
    it, so only meta.pt is replaced."""
    log_dir = tmp_path / "log"
    shutil.copytree(fsdp_run / "two", log_dir)
    shutil.rmtree(log_dir / "model_00006.dcp")
    ckpt = log_dir / "model_00003.dcp"
    shards = {name: os.stat(ckpt / name) for name in (".metadata", "__0_0.distcp")}
    (ckpt / "meta.pt.tmp4242").write_bytes(b"half")  # an earlier such rewrite, killed: the resume removes it
    run = FSDP + ["--batch_size", "8", "--fsdp", "--log_dir", str(log_dir), "--resume", "auto", "--max_steps", "3"]
    r = ok(train(run))  # in one process, without torchrun
    assert "at step 3: only its final evaluations are left" in r.stdout and "validation loss" not in r.stdout
    assert {name: (s.st_ino, s.st_mtime_ns) for name, s in shards.items()} == \
        {name: (s.st_ino, s.st_mtime_ns) for name, s in ((n, os.stat(ckpt / n)) for n in shards)}
    assert torch.load(str(ckpt / "meta.pt"), weights_only=True)["args"]["max_steps"] == 3
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00003.dcp"]
    assert sorted(os.listdir(ckpt)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert "at step 3: the run is complete, nothing left to train" in torchrun(1, run).stdout


def test_fsdp_in_one_process_without_torchrun(tmp_path, fsdp_run):
    ok(train(FSDP + ["--batch_size", "8", "--fsdp", "--log_dir", str(tmp_path / "log")]))  # a process group of one
    one, alone = records(str(fsdp_run / "one")), records(str(tmp_path / "log"))
    assert [r[:2] for r in one] == [r[:2] for r in alone] and all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(one, alone))
    assert sorted(os.listdir(tmp_path / "log")) == ["log.txt", "model_00003.dcp", "model_00006.dcp"]
    # HellaSwag from its cache (what a launch's local rank 0 downloads) in the group of one, which reads no stray
    # LOCAL_RANK
    (tmp_path / "cache").mkdir()
    example = {"ctx": "A man walks", "endings": ["a dog.", "a cat ran.", "then it rained.", "she left."], "label": "1"}
    pq.write_table(pa.Table.from_pylist([example] * 3), tmp_path / "cache" / "hellaswag_val.parquet")
    ok(train(FSDP + ["--batch_size", "8", "--fsdp", "--max_steps", "1", "--hellaswag_every", "1", "--log_dir",
                     str(tmp_path / "hella")], env={"HELLASWAG_CACHE": str(tmp_path / "cache"), "LOCAL_RANK": "x"}))
    assert [k for _, k, _ in records(str(tmp_path / "hella"))] == ["val", "hella", "train", "val", "hella"]
    # main() in this process: the group it made is gone however main ends, here by an error after making it
    with pytest.raises(train_gpt2.UserError, match="no data at"):
        train_gpt2.main(FSDP + ["--batch_size", "8", "--fsdp", "--data", str(tmp_path / "none"), "--log_dir",
                                str(tmp_path / "x")])
    assert not torch.distributed.is_initialized()


def test_fsdp_refusals(tmp_path, fsdp_run):
    r = train(FSDP + ["--batch_size", "8", "--log_dir", str(tmp_path / "b"), "--resume",
                      str(fsdp_run / "two" / "model_00003.dcp")])
    assert r.returncode == 1 and "with --fsdp" in r.stderr
    # a checkpoint folder written with a trailing / is the same folder: the later checkpoints are found
    copy = tmp_path / "copy"
    shutil.copytree(fsdp_run / "two", copy)
    r = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train_gpt2.py",
                    *FSDP, "--batch_size", "8", "--fsdp", "--log_dir", str(copy), "--resume", f"{copy}/model_00003.dcp/"])
    assert r.returncode != 0 and f"error: {copy}/ holds checkpoints after step 3 (model_00006.dcp)" in r.stderr
    assert sorted(os.listdir(copy)) == sorted(os.listdir(fsdp_run / "two"))
    broken = tmp_path / "model_00003.dcp"
    shutil.copytree(fsdp_run / "two" / "model_00003.dcp", broken)
    os.remove(broken / ".metadata")
    r = train(FSDP + ["--batch_size", "8", "--log_dir", str(tmp_path / "c"), "--resume", str(broken)])
    assert r.returncode == 1 and "incomplete" in r.stderr
    # --resume auto without --fsdp meets the FSDP run's folders: refused, the run's log and checkpoints kept
    auto = tmp_path / "d"
    shutil.copytree(fsdp_run / "two", auto)
    log = (auto / "log.txt").read_text()
    r = train(FSDP + ["--batch_size", "8", "--log_dir", str(auto), "--resume", "auto"])
    assert r.returncode == 1 and "model_00006.dcp was written with --fsdp" in r.stderr, r.stderr
    assert (auto / "log.txt").read_text() == log and not list(auto.glob("*.pt"))
