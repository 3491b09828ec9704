"""The training loop end to end, as subprocesses: learning, DDP parity, exact resume, compile.

Bad input: test_bad_input.py; kills, signals and other faults: test_faults.py."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_gpt2
from helpers import FAST, ROOT, ok, records, run_script, save_tiny_hf_gpt2, train, write_shards


def test_tiny_model_learns_and_samples(tmp_path):
    log_dir = str(tmp_path / "log")
    r = ok(train(FAST + ["--max_steps", "120", "--eval_every", "60", "--val_steps", "4", "--sample_every", "60",
                         "--checkpoint_every", "0", "--log_dir", log_dir]))
    val = records(log_dir, "val")
    assert [s for s, _, _ in val] == [0, 60, 120]
    assert val[0][2] > 10.5  # ln(50257) = 10.8: a random model
    assert val[-1][2] < 8.0, val  # 3 nats better than chance: it learned the statistics of the text
    assert [s for s, _, _ in records(log_dir, "train")] == list(range(120))
    # 4 samples at step 60 and 4 at the end, each starting with the prompt
    samples = [line for line in r.stdout.splitlines() if line.startswith("rank 0 sample ")]
    assert len(samples) == 8 and all("Hello, I'm a language model," in s for s in samples)
    # the final checkpoint holds plain values only
    ckpt = torch.load(os.path.join(log_dir, "model_00120.pt"), weights_only=True)
    assert ckpt["step"] == 120 and ckpt["config"] == {"block_size": 64, "vocab_size": 50304, "n_layer": 2,
                                                        "n_head": 2, "n_embd": 32}
    assert set(ckpt) >= {"model", "optimizer", "loader", "rng", "config", "step"}
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    lines = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 120 and lines[-1].startswith("step   119 | loss") and lines[-1].endswith(" | eta 0h00m")
    assert all(" | tok/sec " in line and " | eta " in line for line in lines)  # the first step's too


def test_two_ddp_ranks_equal_one_process(tmp_path):
    # the same 512-token steps: 1 x 8 rows x 2 micro-steps, or 2 ranks x 4 rows x 2 micro-steps; val reads
    # --val_steps micro-batches on every rank, so B * world must match too for the val records to
    args = FAST + ["--total_batch_size", "512", "--max_steps", "6", "--eval_every", "3", "--val_steps", "2",
                   "--checkpoint_every", "0"]
    ok(train(args + ["--batch_size", "8", "--log_dir", str(tmp_path / "one")]))
    ok(run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "train_gpt2.py", *args, "--batch_size", "4", "--log_dir", str(tmp_path / "two")]))
    one, two = records(str(tmp_path / "one")), records(str(tmp_path / "two"))
    assert [r[:2] for r in one] == [r[:2] for r in two] and len(one) == 6 + 3
    for a, b in zip(one, two):
        assert abs(a[2] - b[2]) < 1e-5, (a, b)
    w1 = torch.load(str(tmp_path / "one" / "model_00006.pt"), weights_only=True)["model"]
    w2 = torch.load(str(tmp_path / "two" / "model_00006.pt"), weights_only=True)["model"]
    # at max_lr 1e-2, AdamW turns rounding in the tiny gradients of the embedding rows of tokens never seen
    # into differences of ~1e-5 (plain or chunked loss alike); ranks training apart would differ by ~max_lr
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 5e-5


def test_ddp_all_reduces_once_per_step_not_per_micro_step(tmp_path):
    """The lecture toggled require_backward_grad_sync by hand; train_step uses no_sync() for all but the last
    micro-step. Syncing every micro-step gives the same numbers, only slower: so count the reductions."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    class MSE(torch.nn.Module):  # train_step calls model(x, y) -> (logits, loss)
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, y):
            return None, torch.nn.functional.mse_loss(self.linear(x), y)

    class Loader:
        def next_batch(self):
            return torch.randn(2, 4), torch.randn(2, 1)

    def count(state, bucket):
        reductions.append(bucket.index())
        done = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model, reductions = DDP(MSE()), []
        model.register_comm_hook(None, count)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        for _ in range(2):
            train_gpt2.train_step(model, optimizer, Loader(), 4, 0.1, contextlib.nullcontext(),
                                  torch.amp.GradScaler("cpu", enabled=False), 1.0, "cpu")
        assert reductions == [0, 0]  # its one bucket, once in each step of 4 micro-steps
    finally:
        dist.destroy_process_group()


def test_gradients_for_cuda_graphs_stay_in_buffers_of_their_own_and_change_nothing():
    """Compiled with CUDA graphs (--compile_mode max-autotune), a .grad made inside the graph is overwritten by
    the next micro-step's replay; train_step(cuda_graphs=True) keeps the gradients in buffers made once, outside,
    and zeroes them in place. The steps are the same: same losses, same weights."""
    from train_gpt2 import GPT, DataLoader, GPTConfig
    shards = [np.arange(5000, dtype=np.uint16) % 500]
    runs = []
    for cuda_graphs in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=512, n_layer=1, n_head=2, n_embd=16))
        optimizer = model.configure_optimizers(0.1, 1e-2, "cpu")
        loader = DataLoader(shards, 4, 16, vocab_size=512)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        losses, buffers = [], []
        for _ in range(3):
            loss, _ = train_gpt2.train_step(model, optimizer, loader, 4, 1e-2, contextlib.nullcontext(), scaler,
                                            1.0, "cpu", cuda_graphs=cuda_graphs)
            losses.append(loss.item())
            buffers.append([p.grad for p in model.parameters()])
        runs.append((losses, model.state_dict()))
        if cuda_graphs:  # the same tensors in every step
            assert all(a is b for step in buffers[1:] for a, b in zip(buffers[0], step))
        else:  # freed and made again
            assert not any(a is b for a, b in zip(buffers[0], buffers[1]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


RESUME = FAST + ["--max_steps", "24", "--eval_every", "4", "--val_steps", "2", "--checkpoint_every", "6",
                 "--sample_every", "8"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("full") / "log")
    ok(train(RESUME + ["--log_dir", log_dir]))
    return log_dir


def assert_same_run(a, b):
    with open(os.path.join(a, "log.txt")) as fa, open(os.path.join(b, "log.txt")) as fb:
        assert fa.read() == fb.read()  # every record, to the last digit
    wa = torch.load(os.path.join(a, "model_00024.pt"), weights_only=True)
    wb = torch.load(os.path.join(b, "model_00024.pt"), weights_only=True)
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert wa["loader"] == wb["loader"]


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    log_dir = str(tmp_path / "log")
    proc = subprocess.Popen([sys.executable, "train_gpt2.py", *RESUME, "--log_dir", log_dir], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(log_dir, "model_00012.pt")) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(log_dir, "model_00024.pt"))
    r = ok(train(RESUME + ["--log_dir", log_dir, "--resume", "auto"]))
    assert "resuming from" in r.stdout
    assert_same_run(uninterrupted, log_dir)


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def test_resume_auto_before_the_first_checkpoint_starts_over_and_says_so(tmp_path, uninterrupted):
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    with open(os.path.join(uninterrupted, "log.txt")) as f:  # a run killed before its first checkpoint (step 6)
        (log_dir / "log.txt").write_text("".join(line for line in f if int(line.split()[0]) < 6))
    killed_log = (log_dir / "log.txt").read_bytes()
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto"]))
    assert (f"warning: {log_dir}/ holds no checkpoint yet: starting at step 0; the log so far is kept as "
            f"{log_dir}/log.txt.1") in r.stdout
    assert_same_run(uninterrupted, str(log_dir))
    assert (log_dir / "log.txt.1").read_bytes() == killed_log
    # a log past the first checkpoint, with none left (moved away, say), is not started over without --overwrite
    for name in os.listdir(log_dir):
        os.remove(log_dir / name)
    shutil.copy(os.path.join(uninterrupted, "log.txt"), log_dir)
    r = train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto"])
    assert r.returncode == 1 and r.stderr == (
        f"error: {log_dir}/log.txt records a run from step 0 to 24, but {log_dir}/ holds none of its checkpoints: go on "
        "with --resume PATH (the checkpoint it started from, or one moved away), or start over with --overwrite\n")
    assert folder_bytes(log_dir) == {"log.txt": open(os.path.join(uninterrupted, "log.txt"), "rb").read()}
    # as it says: a checkpoint of the run, moved away (here: the same run's, in another folder), keeps the log to it
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", os.path.join(uninterrupted, "model_00012.pt")]))
    assert "resuming from" in r.stdout
    assert_same_run(uninterrupted, str(log_dir))
    # no checkpoint loads: refused, as starting over would drop the log; --overwrite starts over
    for path in log_dir.glob("model_*.pt"):
        path.write_bytes(b"broken")
    r = train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto"])
    assert r.returncode == 1 and f"no checkpoint in {log_dir}/ loads: start over with --overwrite" in r.stderr
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto", "--overwrite"]))
    assert ": skipping it" in r.stdout
    assert_same_run(uninterrupted, str(log_dir))


def test_resume_auto_never_drops_the_log_of_a_finished_run_that_lost_its_checkpoint(tmp_path):
    log_dir = str(tmp_path / "log")
    run = FAST + ["--max_steps", "3", "--eval_every", "3", "--val_steps", "1", "--log_dir", log_dir, "--resume", "auto"]
    ok(train(run))  # the default --checkpoint_every (5000) is far away: its one checkpoint is the final one
    finished = open(os.path.join(log_dir, "log.txt"), "rb").read()
    os.remove(os.path.join(log_dir, "model_00003.pt"))  # freeing disk, say
    # it trained no further than a run stopped before its first checkpoint: it starts over, the old log stays beside
    r = ok(train(run))
    assert f"the log so far is kept as {log_dir}/log.txt.1" in r.stdout
    assert open(os.path.join(log_dir, "log.txt.1"), "rb").read() == finished
    assert open(os.path.join(log_dir, "log.txt"), "rb").read() == finished  # the same run again
    # one that trained past its first checkpoint (2) and lost them all is refused, touching nothing
    longer = run + ["--max_steps", "6", "--checkpoint_every", "2", "--log_dir", str(tmp_path / "longer")]
    ok(train(longer))
    for name in ("model_00002.pt", "model_00004.pt", "model_00006.pt"):
        os.remove(tmp_path / "longer" / name)
    r = train(longer)
    assert r.returncode == 1 and "log.txt records a run from step 0 to 6, but" in r.stderr
    assert os.listdir(tmp_path / "longer") == ["log.txt"]


def test_lines_of_a_log_that_are_no_records_are_kept(tmp_path, uninterrupted):
    log_dir = tmp_path / "log"
    shutil.copytree(uninterrupted, log_dir)
    odd = b"\xff\xfe not UTF-8\n\xc2\xb2 train 1.0\na note\n"
    with open(log_dir / "log.txt", "ab") as f:
        f.write(odd)
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto"]))
    assert "the run is complete" in r.stdout
    assert (log_dir / "log.txt").read_bytes() == open(os.path.join(uninterrupted, "log.txt"), "rb").read() + odd



def test_a_log_whose_last_record_lost_its_newline_keeps_it(tmp_path, uninterrupted):
    """A record after the newest checkpoint may be cut short by a crash and is dropped; one before it was whole
    when the checkpoint was written, so a missing newline (an edit) costs no record."""
    log_dir = tmp_path / "log"
    shutil.copytree(uninterrupted, log_dir)
    with open(log_dir / "log.txt", "r+b") as f:
        f.truncate(os.path.getsize(log_dir / "log.txt") - 1)
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto"]))
    assert "the run is complete" in r.stdout and "warning" not in r.stdout
    assert_same_run(uninterrupted, str(log_dir))


def test_a_log_that_lost_records_before_the_checkpoint_is_said(tmp_path, uninterrupted):
    log_dir = tmp_path / "log"
    shutil.copytree(uninterrupted, log_dir)
    lines = (log_dir / "log.txt").read_text().splitlines(keepends=True)
    (log_dir / "log.txt").write_text("".join(line for line in lines if not line.startswith("10 train ")))
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto"]))
    assert (f"warning: {log_dir}/log.txt is not the log the checkpoint's run wrote up to step 24 (records were "
            "edited or lost): the resumed log will differ from that run's") in r.stdout


def test_a_stop_checkpoint_at_the_last_step_redoes_only_the_evaluations(tmp_path, uninterrupted):
    """A checkpoint written on SIGTERM in the last iteration comes before that step's evaluations."""
    log_dir = tmp_path / "log"
    shutil.copytree(uninterrupted, log_dir)
    final = str(log_dir / "model_00024.pt")
    ckpt = torch.load(final, weights_only=True)
    train_gpt2.save_checkpoint(final, {**ckpt, "evals_done": False})
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto"]))
    assert f"resuming from {final} at step 24: only its final evaluations are left" in r.stdout
    assert_same_run(uninterrupted, str(log_dir))
    # its checkpoint now says they are made: a second resume does nothing
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto"]))
    assert f"resuming from {final} at step 24: the run is complete, nothing left to train" in r.stdout
    assert_same_run(uninterrupted, str(log_dir))


def test_a_run_cut_short_at_a_checkpoint_makes_its_final_evaluations_once(tmp_path, uninterrupted):
    """--max_steps lowered to a checkpoint's step: that step is now the last, which evaluates and samples;
    what its run already evaluated there is not done again, and a second resume does nothing."""
    log_dir = tmp_path / "log"
    shutil.copytree(uninterrupted, log_dir)
    os.remove(log_dir / "model_00024.pt")
    # step 18: not a multiple of --eval_every 4 or --sample_every 8, so its run neither evaluated nor sampled
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto", "--max_steps", "18"]))
    assert "at step 18: only its final evaluations are left" in r.stdout
    assert sum(line.startswith("rank 0 sample ") for line in r.stdout.splitlines()) == 4
    full = [line for line in open(os.path.join(uninterrupted, "log.txt")) if int(line.split()[0]) < 18]
    log = (log_dir / "log.txt").read_text().splitlines(keepends=True)
    assert log[:-1] == full and log[-1].startswith("18 val ")
    # its checkpoint now says so: nothing is left
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto", "--max_steps", "18"]))
    assert "at step 18: the run is complete, nothing left to train" in r.stdout and "sample" not in r.stdout
    assert (log_dir / "log.txt").read_text().splitlines(keepends=True) == log
    # step 12 was evaluated (12 % 4) but not sampled (12 % 8) by its run: it samples, and its val record stays
    shutil.rmtree(log_dir)
    shutil.copytree(uninterrupted, log_dir)
    for step in (18, 24):
        os.remove(log_dir / f"model_{step:05d}.pt")
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto", "--max_steps", "12"]))
    assert sum(line.startswith("rank 0 sample ") for line in r.stdout.splitlines()) == 4
    assert "validation loss" not in r.stdout
    with open(os.path.join(uninterrupted, "log.txt")) as f:
        assert (log_dir / "log.txt").read_text() == "".join(line for line in f if int(line.split()[0]) < 12 or
                                                            line.startswith("12 val "))


def test_a_resume_that_changes_the_schedule_says_so(tmp_path, uninterrupted):
    """Allowed (a longer run, a lower LR), but the LR jumps at the resume: as when the presets' default step counts
    changed under a run begun before."""
    log_dir = tmp_path / "log"
    shutil.copytree(uninterrupted, log_dir)
    for step in (18, 24):
        os.remove(log_dir / f"model_{step:05d}.pt")
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto", "--max_steps", "13", "--max_lr", "5e-3"]))
    assert "warning: the learning rate schedule changes at the resume (--max_steps 24 -> 13, --max_lr 0.01 -> " \
           "0.005, --min_lr 0.001 -> 0.0005)" in r.stdout
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto", "--max_steps", "13", "--max_lr", "5e-3"]))
    assert "at step 13: the run is complete" in r.stdout and "schedule" not in r.stdout


def test_a_renamed_checkpoint_is_refused_and_never_deleted(tmp_path, uninterrupted):
    """--resume and --keep_checkpoints go by the step in a checkpoint's name: one whose name gives another step
    than it holds is refused (--resume auto passes over it), so --overwrite cannot delete the one it goes on from."""
    log_dir = tmp_path / "log"
    shutil.copytree(uninterrupted, log_dir)
    for step in (18, 24):
        os.remove(log_dir / f"model_{step:05d}.pt")
    os.rename(log_dir / "model_00012.pt", log_dir / "model_00018.pt")
    renamed = str(log_dir / "model_00018.pt")
    before = folder_bytes(log_dir)
    r = train(RESUME + ["--log_dir", str(log_dir), "--resume", renamed, "--overwrite"])
    assert r.returncode == 1 and r.stderr == (
        f"error: checkpoint {renamed} holds step 12, not the step its name gives: name it model_00012.pt\n")
    assert folder_bytes(log_dir) == before
    r = ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", "auto", "--max_steps", "6"]))
    assert f"warning: checkpoint {renamed} holds step 12" in r.stdout
    assert f"resuming from {log_dir}/model_00006.pt at step 6" in r.stdout
    # a link from another folder to this folder's checkpoint is this folder's checkpoint: --overwrite removes the
    # ones after it, never it
    os.rename(renamed, log_dir / "model_00012.pt")
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(log_dir / "model_00012.pt", links / "model_00012.pt")
    ok(train(RESUME + ["--log_dir", str(log_dir), "--resume", str(links / "model_00012.pt"), "--overwrite",
                       "--max_steps", "14", "--checkpoint_every", "0"]))
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00006.pt", "model_00012.pt", "model_00014.pt"]


def test_a_path_through_a_link_and_dotdot_is_the_folder_it_reaches(tmp_path, uninterrupted):
    """sym/../log is where the link leads, then up: not ./log, which a path's text would say."""
    other = tmp_path / "x" / "deep" / "log"  # another run, reached as tmp/sym/../log with sym -> x/deep/sub
    ok(train(RESUME + ["--log_dir", str(other), "--max_steps", "6", "--seed", "7"]))
    (tmp_path / "x" / "deep" / "sub").mkdir()
    os.symlink(tmp_path / "x" / "deep" / "sub", tmp_path / "sym")
    log_dir = tmp_path / "log"
    shutil.copytree(uninterrupted, log_dir)
    before = folder_bytes(log_dir)
    r = train(RESUME + ["--log_dir", str(log_dir), "--resume", f"{tmp_path}/sym/../log/model_00006.pt"])
    assert r.returncode == 1 and r.stderr.startswith(f"error: {log_dir}/ holds another run: "), r.stderr
    assert folder_bytes(log_dir) == before

def test_a_run_branched_from_another_folders_checkpoint(tmp_path, uninterrupted):
    """--resume PATH from another folder starts a branch there; the branch resumes with the same PATH until it has
    a checkpoint of its own, and a folder holding another run is not mixed with it."""
    branch = str(tmp_path / "branch")
    start = ["--resume", os.path.join(uninterrupted, "model_00012.pt"), "--log_dir", branch]
    ok(train(RESUME + start + ["--max_steps", "16"]))  # stands for a run killed before its first checkpoint, 18
    os.remove(os.path.join(branch, "model_00016.pt"))
    r = train(RESUME + ["--log_dir", branch, "--resume", "auto"])  # the log starts at 12: not started over
    assert r.returncode == 1 and "log.txt records a run from step 12 to 16, but" in r.stderr
    ok(train(RESUME + start))
    # the branch's log is the uninterrupted run's from step 12's training on (step 12's evaluations are in the other)
    with open(os.path.join(uninterrupted, "log.txt")) as f:
        expected = [line for line in f if int(line.split()[0]) > 12 or line.startswith("12 train")]
    with open(os.path.join(branch, "log.txt")) as f:
        assert f.readlines() == expected
    assert sorted(os.listdir(branch)) == ["log.txt", "model_00018.pt", "model_00024.pt"]
    # a folder that holds another run: refused, untouched; --overwrite replaces that run
    other = str(tmp_path / "other")
    ok(train(RESUME + ["--log_dir", other, "--max_steps", "6", "--seed", "7"]))
    before = folder_bytes(other)
    r = train(RESUME + start[:2] + ["--log_dir", other])
    assert r.returncode == 1 and r.stderr == (
        f"error: {other}/ holds another run: to go on from {start[1]} there, replace it with --overwrite, "
        "or choose another --log_dir\n")
    assert folder_bytes(other) == before
    ok(train(RESUME + start[:2] + ["--log_dir", other, "--overwrite"]))
    assert sorted(os.listdir(other)) == sorted(os.listdir(branch))
    assert_same_run(branch, other)


def test_a_folder_of_another_run_over_the_same_steps_is_not_taken_for_this_one(tmp_path, uninterrupted):
    """Another run's folder whose log spans the checkpoint's step, with only later checkpoints: its records differ
    from the ones the checkpoint followed (their digest), so it is another run, not this one's moved away.
    --overwrite replaces it whole; its log is never continued with this run's records."""
    other = str(tmp_path / "other")
    ok(train(RESUME + ["--log_dir", other, "--max_lr", "5e-3", "--max_steps", "12", "--checkpoint_every", "12"]))
    before = folder_bytes(other)
    start = ["--resume", os.path.join(uninterrupted, "model_00006.pt"), "--log_dir", other]
    r = train(RESUME + start)
    assert r.returncode == 1 and r.stderr.startswith(f"error: {other}/ holds another run: "), r.stderr
    assert folder_bytes(other) == before
    ok(train(RESUME + start + ["--overwrite"]))
    with open(os.path.join(uninterrupted, "log.txt")) as f:  # the branch's log: from step 6's training on
        expected = [line for line in f if int(line.split()[0]) > 6 or line.startswith("6 train")]
    with open(os.path.join(other, "log.txt")) as f:
        assert f.readlines() == expected
    # this run's folder, with its last checkpoints moved away and earlier ones left: the log holds the records the
    # checkpoint followed, so the run goes on there
    log_dir, away = str(tmp_path / "log"), str(tmp_path / "away")
    shutil.copytree(uninterrupted, log_dir)
    os.makedirs(away)
    for step in (18, 24):
        shutil.move(os.path.join(log_dir, f"model_{step:05d}.pt"), away)
    r = ok(train(RESUME + ["--log_dir", log_dir, "--resume", os.path.join(away, "model_00018.pt")]))
    assert f"resuming from {away}/model_00018.pt at step 18" in r.stdout
    assert_same_run(uninterrupted, log_dir)


def test_resume_from_a_path_and_past_a_corrupt_checkpoint(tmp_path, uninterrupted):
    log_dir = str(tmp_path / "log")
    shutil.copytree(uninterrupted, log_dir)
    # explicit path back to step 12: refused while the later checkpoints are there, as nothing may mix them
    # up with the new run's; --overwrite deletes them, and the later records are redone, not doubled
    back = RESUME + ["--log_dir", log_dir, "--resume", os.path.join(log_dir, "model_00012.pt")]
    before = folder_bytes(log_dir)
    r = train(back)
    assert r.returncode == 1 and r.stderr == (
        f"error: {log_dir}/ holds checkpoints after step 12 (model_00018.pt, model_00024.pt): to go on from "
        f"{log_dir}/model_00012.pt instead, delete them with --overwrite, or choose another --log_dir\n")
    assert folder_bytes(log_dir) == before
    ok(train(back + ["--overwrite", "--checkpoint_every", "0"]))  # only the final checkpoint: 18 must be gone
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00006.pt", "model_00012.pt", "model_00024.pt"]
    assert_same_run(uninterrupted, log_dir)
    # auto skips a truncated newest checkpoint with a warning and takes the one before
    final = os.path.join(log_dir, "model_00024.pt")
    with open(final, "r+b") as f:
        f.truncate(os.path.getsize(final) // 2)
    r = ok(train(RESUME + ["--log_dir", log_dir, "--resume", "auto"]))
    assert ": skipping it" in r.stdout and "resuming from" in r.stdout and "model_00012.pt" in r.stdout
    assert_same_run(uninterrupted, log_dir)
    # and one whose bytes changed inside the weights, which torch.load reads without a word: its CRC-32 tells
    with open(final, "r+b") as f:
        f.seek(os.path.getsize(final) // 2)
        chunk = f.read(64)
        f.seek(-64, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))
    r = ok(train(RESUME + ["--log_dir", log_dir, "--resume", "auto"]))
    assert f"warning: checkpoint {final} is corrupt: its record " in r.stdout and ": skipping it" in r.stdout
    assert f"resuming from {log_dir}/model_00018.pt at step 18" in r.stdout
    assert_same_run(uninterrupted, log_dir)


def test_resume_at_or_past_max_steps(tmp_path, uninterrupted):
    log_dir = str(tmp_path / "log")
    shutil.copytree(uninterrupted, log_dir)
    r = ok(train(RESUME + ["--log_dir", log_dir, "--resume", "auto"]))  # again, after it finished: nothing to do
    assert f"resuming from {log_dir}/model_00024.pt at step 24: the run is complete, nothing left to train" in r.stdout
    assert_same_run(uninterrupted, log_dir)
    r = train(RESUME + ["--log_dir", log_dir, "--resume", "auto", "--max_steps", "12"])
    assert r.returncode == 1
    assert r.stderr == f"error: checkpoint {log_dir}/model_00024.pt is at step 24, past --max_steps 12\n"


def test_resume_with_another_micro_batch_says_the_val_set_changes(tmp_path, uninterrupted):
    """The same --total_batch_size in micro-batches of 2 instead of 4: training reads the same sequences, but
    each evaluation reads --val_steps x B x processes of them, so its loss moves: the resume says so."""
    log_dir = str(tmp_path / "log")
    shutil.copytree(uninterrupted, log_dir)
    r = ok(train(RESUME + ["--log_dir", log_dir, "--resume", str(tmp_path / "log" / "model_00018.pt"),
                           "--batch_size", "2", "--overwrite"]))
    assert ("warning: the checkpoint's run evaluated 8 val sequences, this one 4 (--val_steps x --batch_size x "
            "processes): the val loss changes at the resume") in r.stdout
    full, resumed = records(uninterrupted, "train"), records(log_dir, "train")
    assert [s for s, _, _ in full] == [s for s, _, _ in resumed]
    assert all(abs(a[2] - b[2]) < 1e-5 for a, b in zip(full, resumed))


def test_an_unwritable_log_dir_stops_before_training(tmp_path):
    (tmp_path / "log.txt").mkdir()  # (a read-only folder is writable to root, who runs CI)
    r = train(FAST + ["--log_dir", str(tmp_path), "--max_steps", "2"])
    assert r.returncode == 1 and r.stderr == (f"error: {tmp_path}/log.txt is not a regular file: move it out of the "
                                              "--log_dir\n")
    assert "validation loss" not in r.stdout and "step    0" not in r.stdout


def test_a_fresh_run_keeps_a_logs_lines_and_its_link(tmp_path):
    """A log.txt without records (notes, say) is kept, its last line too when it lacks a newline; a log.txt
    that is a link stays one, and the log is written where it leads."""
    log_dir, elsewhere = tmp_path / "log", tmp_path / "notes.txt"
    log_dir.mkdir()
    elsewhere.write_text("my notes\nimportant last line")
    os.symlink(elsewhere, log_dir / "log.txt")
    ok(train(FAST + ["--log_dir", str(log_dir), "--max_steps", "2", "--eval_every", "0"]))
    assert os.path.islink(log_dir / "log.txt")
    assert elsewhere.read_text().startswith("my notes\nimportant last line\n0 train ")


def test_glob_characters_in_paths_and_a_special_token_in_the_prompt(tmp_path):
    """Folders are taken literally (a [1] in a name is no pattern); <|endoftext|> in a prompt is the token."""
    data = write_shards(str(tmp_path / "data[1]"), {"val": [3000], "train": [3000, 3000]})
    args = [a if a != "input.txt" else data for a in FAST] + ["--checkpoint_every", "1", "--eval_every", "0",
                                                               "--log_dir", str(tmp_path / "run[1]")]
    ok(train(args + ["--max_steps", "2"]))
    r = ok(train(args + ["--max_steps", "3", "--resume", "auto", "--keep_checkpoints", "1", "--sample_every", "3",
                         "--sample_prompt", "<|endoftext|>Hello"]))
    assert f"resuming from {tmp_path}/run[1]/model_00002.pt at step 2" in r.stdout
    assert sorted(os.listdir(tmp_path / "run[1]")) == ["log.txt", "model_00003.pt"]
    samples = [line for line in r.stdout.splitlines() if line.startswith("rank 0 sample ")]
    assert len(samples) == 4 and all(s.split(": ", 1)[1].startswith("<|endoftext|>Hello") for s in samples)


def test_a_rank_without_torchrun_is_one_line(tmp_path):
    r = train(FAST + ["--log_dir", str(tmp_path)], env={"RANK": "0"})
    assert r.returncode == 1 and r.stderr == ("error: RANK is set but not LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, "
                                              "MASTER_PORT: launch several processes with torchrun\n")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29499", "LOCAL_RANK": "0", "RANK": "0"}
    for ids in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}, {"WORLD_SIZE": "0"}):
        r = train(FAST + ["--log_dir", str(tmp_path)], env=dict(env, **ids))
        ids = dict(env, **ids)
        assert r.returncode == 1 and r.stderr == (f"error: RANK={ids['RANK']}, LOCAL_RANK=0, WORLD_SIZE="
                                                  f"{ids['WORLD_SIZE']}: these must be integers with 0 <= RANK < "
                                                  "WORLD_SIZE; launch with torchrun\n")
    # rank 0 of 2, and rank 1 never comes: one line after --dist_timeout, not a traceback
    r = train(FAST + ["--log_dir", str(tmp_path), "--dist_timeout", "2"], env=dict(env, WORLD_SIZE="2"))
    assert r.returncode == 1 and r.stderr.startswith("error: rank 0 of 2 cannot join the process group at "
                                                     "127.0.0.1:29499: ") and r.stderr.count("\n") == 1, r.stderr


def test_compiled_model_trains_evaluates_and_samples(tmp_path):
    log_dir = str(tmp_path / "log")
    r = ok(train(FAST + ["--compile", "on", "--max_steps", "4", "--eval_every", "2", "--val_steps", "2",
                         "--sample_every", "2", "--checkpoint_every", "2", "--log_dir", log_dir]))
    assert [(s, k) for s, k, _ in records(log_dir)] == [
        (0, "val"), (0, "train"), (1, "train"), (2, "val"), (2, "train"), (3, "train"), (4, "val")]
    assert r.stdout.count("rank 0 sample") == 8
    ckpt = torch.load(os.path.join(log_dir, "model_00004.pt"), weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["model"])


def test_a_log_dir_with_a_run_is_not_overwritten_by_accident(tmp_path, uninterrupted):
    log_dir = str(tmp_path / "log")
    shutil.copytree(uninterrupted, log_dir)
    before = open(os.path.join(log_dir, "log.txt")).read()
    r = train(RESUME + ["--log_dir", log_dir])
    assert r.returncode == 1 and "--resume auto" in r.stderr and "--overwrite" in r.stderr
    assert open(os.path.join(log_dir, "log.txt")).read() == before
    assert len(os.listdir(log_dir)) == len(os.listdir(uninterrupted))
    ok(train(FAST + ["--max_steps", "2", "--eval_every", "0", "--checkpoint_every", "0", "--log_dir", log_dir,
                     "--overwrite"]))
    assert [(s, k) for s, k, _ in records(log_dir)] == [(0, "train"), (1, "train")]
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00002.pt"]


def test_one_run_at_a_time_in_a_log_dir(tmp_path):
    """A second run in a --log_dir in use would delete the first's checkpoint being written: it is refused. A run
    killed leaves no lock behind."""
    import fcntl
    log_dir = str(tmp_path / "log")
    run = FAST + ["--max_steps", "100000", "--eval_every", "0", "--log_dir", log_dir, "--resume", "auto"]
    first = subprocess.Popen([sys.executable, "train_gpt2.py", *run], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (os.path.exists(os.path.join(log_dir, "log.txt")) and records(log_dir)):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        r = train(run)
        assert r.returncode == 1 and r.stderr == (f"error: another run is using --log_dir {log_dir}: wait for it to "
                                                  "end, or choose another --log_dir\n")
        fd = os.open(log_dir, os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        first.kill()
        first.wait()
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


def test_a_forked_child_does_not_keep_the_log_dir_locked(tmp_path):
    """A compile worker forked by the trainer shares its open files: without closing the lock's in the child, a
    killed trainer's workers would keep --log_dir locked."""
    import fcntl
    import train_gpt2
    train_gpt2.lock_log_dir(str(tmp_path))
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(ready_w, b"x")  # running: the fork's hooks are done
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        train_gpt2.unlock_log_dir()  # the trainer is gone; its child lives on
        fd = os.open(tmp_path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_resume_removes_half_written_checkpoints_and_nothing_else(tmp_path):
    log_dir = tmp_path / "log"
    run = FAST + ["--max_steps", "2", "--eval_every", "0", "--log_dir", str(log_dir), "--resume", "auto"]
    ok(train(run))
    (log_dir / "model_00003.pt.tmp4242").write_bytes(b"half")  # a run killed while writing, 1 process and FSDP
    (log_dir / "model_00003.dcp.tmp").mkdir()
    (log_dir / "model_00003.dcp.tmp" / "__0_0.distcp").write_bytes(b"half")
    (log_dir / "model_card.tmpl").write_text("the user's")  # names alike, not ours
    (log_dir / "model_old.tmp_backup").mkdir()
    (log_dir / "model_old.tmp_backup" / "notes").write_text("the user's")
    ok(train(run + ["--max_steps", "3"]))
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00002.pt", "model_00003.pt", "model_card.tmpl",
                                           "model_old.tmp_backup"]
    assert (log_dir / "model_old.tmp_backup" / "notes").read_text() == "the user's"


def test_resume_auto_stops_at_a_checkpoint_it_cannot_read(tmp_path, monkeypatch):
    """A checkpoint that cannot be read (permissions, a disk error) may be whole: passing over it would resume from
    an older one and overwrite it later. A broken one is passed over."""
    import train_gpt2
    for step in (2, 4):
        torch.save({"model": {}, "config": {}, "step": step}, tmp_path / f"model_{step:05d}.pt")
    real_load = torch.load

    def load(path, *args, **kwargs):
        if str(path).endswith("model_00004.pt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(train_gpt2.UserError) as e:
        train_gpt2.find_resume_checkpoint(str(tmp_path), print)
    assert str(e.value) == (f"cannot read checkpoint {tmp_path}/model_00004.pt: Permission denied: make it readable, "
                            f"or move it out of {tmp_path}/")
    (tmp_path / "model_00004.pt").write_bytes(b"broken")
    monkeypatch.setattr(torch, "load", real_load)
    ckpt, path = train_gpt2.find_resume_checkpoint(str(tmp_path), print)
    assert path == str(tmp_path / "model_00002.pt") and ckpt["step"] == 2
    # an FSDP checkpoint's folder that cannot be read is not an incomplete one
    (tmp_path / "model_00006.dcp").mkdir()
    real_listdir = os.listdir

    def listdir(path="."):
        if str(path).endswith(".dcp"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(train_gpt2.UserError, match="cannot read checkpoint .*model_00006.dcp: Permission denied"):
        train_gpt2.find_resume_checkpoint(str(tmp_path), print)


def test_running_out_of_cpu_memory_is_one_line(capsys):
    """What an allocation too large for the machine raises, caught by run_cli as one line."""
    import train_gpt2
    with pytest.raises(SystemExit) as e:
        # 1 EiB: past the address space, so refused even where the kernel overcommits memory (vm.overcommit_memory=1)
        train_gpt2.run_cli(lambda: torch.empty(2**60, dtype=torch.uint8))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (") and err.endswith(": use a smaller --batch_size\n")
    assert err.count("\n") == 1


def test_a_log_dir_whose_name_is_not_utf8(tmp_path):
    """Its name in the messages, escaped, under a strict UTF-8 stdout (a UTF-8 locale's), not an encoding error."""
    log_dir = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xe9")
    run = FAST + ["--max_steps", "1", "--eval_every", "0", "--log_dir", log_dir, "--resume", "auto"]
    ok(train(run, env={"PYTHONIOENCODING": "utf-8"}))
    r = ok(train(run, env={"PYTHONIOENCODING": "utf-8"}))
    assert "resuming from " + str(tmp_path) + "/run\\udce9/model_00001.pt" in r.stdout


def test_this_runs_weight_decay_holds_after_a_resume(tmp_path):
    """The optimizer's state carries its run's weight decay: a resumed run with another --weight_decay uses its own,
    as it does its own LR flags."""
    run = FAST + ["--eval_every", "0", "--log_dir", str(tmp_path)]
    train_gpt2.main(run + ["--max_steps", "2"])
    train_gpt2.main(run + ["--max_steps", "4", "--weight_decay", "0.5", "--resume", "auto"])
    groups = torch.load(tmp_path / "model_00004.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]


def test_a_model_with_a_smaller_vocabulary_is_not_given_gpt2_tokens(tmp_path):
    """HellaSwag and sampling feed the model GPT-2 tokens: an --init_from model with fewer (trained on its own
    data) is refused them before training, not failed at its first evaluation."""
    save_tiny_hf_gpt2(str(tmp_path / "hf"), vocab_size=1000)
    write_shards(str(tmp_path / "data"), {"val": [500], "train": [400]})  # tokens 0-899
    run = ["--init_from", str(tmp_path / "hf"), "--data", str(tmp_path / "data"), "--batch_size", "4", "--seq_len",
           "32", "--total_batch_size", "128", "--max_steps", "1", "--eval_every", "0", "--hellaswag_every", "0"]
    for flag in (["--sample_every", "1"], ["--sample_every", "0", "--hellaswag_every", "1"]):
        with pytest.raises(train_gpt2.UserError, match="the model's vocabulary of 1000 tokens cannot take the GPT-2"):
            train_gpt2.main(run + flag + ["--log_dir", str(tmp_path / "refused")])
    train_gpt2.main(run + ["--sample_every", "0", "--log_dir", str(tmp_path / "trains")])  # without them, it trains


def test_more_val_steps_than_the_val_data_holds_is_said(tmp_path, capsys):
    val_windows = (len(train_gpt2.load_splits("input.txt", need_val=True)["val"][0]) - 1) // 32  # at T=32
    train_gpt2.main(FAST + ["--max_steps", "1", "--eval_every", "1", "--val_steps", str(val_windows // 4 + 1),
                            "--log_dir", str(tmp_path)])
    assert f"which holds {val_windows:,}: some count twice in the val loss" in capsys.readouterr().out
