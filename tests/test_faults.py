"""Faults: SIGKILL at chosen and random points, SIGTERM/SIGINT, a dead or hung rank, a full disk, divergence.

The reference for an interrupted run is the same run uninterrupted: after resuming with --resume auto, its
log must be the same file, every record to the last digit. Kill points are found from outside, by watching
the log and the checkpoint folder, so the trainer carries no test hooks.
"""
import contextlib
import errno
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import pytest
import torch

import train_gpt2
from helpers import FAST, ROOT, FullDisk, ok, records, train
from train_gpt2 import UserError

# evaluations (8 val micro-batches, the slowest phase) and checkpoints every 2 steps, so every kind of kill
# point comes round often
FAULT = FAST + ["--max_steps", "20", "--eval_every", "2", "--val_steps", "8", "--checkpoint_every", "2"]
DDP_FAULT = FAST + ["--max_steps", "12", "--eval_every", "2", "--val_steps", "4", "--checkpoint_every", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def log_text(log_dir):
    path = os.path.join(log_dir, "log.txt")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def checkpoints(log_dir):
    return [step for step, _ in train_gpt2.list_checkpoints(log_dir)]


def free_port():
    """A free port below the kernel's ephemeral range (32768 up, on Linux), from which the other xdist worker's
    connections take theirs: one of them taking it before rank 0 binds it would fail the test."""
    while True:
        port = random.randrange(20000, 29000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def checkpoint(log_dir, step):
    """A checkpoint's state, without the flags of the run that wrote it (its --log_dir differs)."""
    ckpt = torch.load(os.path.join(log_dir, f"model_{step:05d}.pt"), weights_only=True)
    del ckpt["args"]
    return ckpt


def same_state(a, b):
    """Equal to the last bit: tensors, and the dicts, lists and plain values around them."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


def temporaries(log_dir):
    return [name for name in os.listdir(log_dir) if ".pt.tmp" in name]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("reference") / "log")
    ok(train(FAULT + ["--log_dir", log_dir]))
    return log_dir


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    log_dir = str(tmp_path_factory.mktemp("ddp_reference") / "log")
    ok(subprocess.run(TORCHRUN + ["train_gpt2.py", *DDP_FAULT, "--log_dir", log_dir], cwd=ROOT,
                      capture_output=True, text=True, timeout=600))
    return log_dir


class Run:
    """A training run in the background (its own process group), with its output in files."""

    def __init__(self, cmd, out_dir, env=None):
        self.out_dir = out_dir
        self.stdout, self.stderr = open(os.path.join(out_dir, "stdout"), "w+"), open(os.path.join(out_dir, "stderr"), "w+")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.stdout, stderr=self.stderr, start_new_session=True,
                                     env=dict(os.environ, **(env or {})))

    def output(self):
        self.stdout.seek(0)
        self.stderr.seek(0)
        return self.stdout.read(), self.stderr.read()

    def wait_until(self, condition, timeout=300):
        """Poll every 2 ms; fail if the run ends first (a kill after the end would prove nothing)."""
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before the kill point: {self.output()}"
            assert time.time() < deadline, "the kill point never came"
            time.sleep(0.002)

    def kill(self, sig=signal.SIGKILL, pid=None, group=False):
        (os.killpg if group else os.kill)(pid or self.proc.pid, sig)

    def wait(self, timeout=120):
        self.proc.wait(timeout=timeout)
        return self.proc.returncode


def lines_reached(log_dir, n):
    return lambda: log_text(log_dir).count("\n") >= n


def record_index(reference_log, step, kind):
    """Position of a record in the reference log: how many lines the log holds once it is written."""
    lines = reference_log.splitlines()
    return next(i for i, line in enumerate(lines) if line.split()[:2] == [str(step), kind]) + 1


# -----------------------------------------------------------------------------
# SIGKILL at chosen and random points, resumed each time: the run of an uninterrupted process

def test_killed_again_and_again_resumes_to_the_uninterrupted_run(tmp_path, reference):
    """One run killed five times (in an evaluation, while a checkpoint is written, in a training step, and at
    two random points), each time resumed with --resume auto, keeping 2 checkpoints: its log and final
    checkpoint are the uninterrupted run's."""
    log_dir = str(tmp_path / "log")
    ref_log = log_text(reference)
    rng = random.Random(7)
    random_points = sorted(rng.sample(range(record_index(ref_log, 12, "train"), record_index(ref_log, 16, "train")), 2))
    kills = [("eval", record_index(ref_log, 3, "train")),  # then step 4's val loss is being computed
             ("checkpoint", 8),                            # the temporary file of model_00008.pt exists
             ("step", record_index(ref_log, 10, "train")),  # then step 11 (no eval, no checkpoint) is running
             *[("random", n) for n in random_points]]
    args = FAULT + ["--log_dir", log_dir, "--keep_checkpoints", "2"]
    for i, (where, at) in enumerate(kills):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        run = Run([sys.executable, "train_gpt2.py", *args, "--resume", "auto"], str(run_dir))
        if where == "checkpoint":
            tmp_name = f"model_{at:05d}.pt.tmp{run.proc.pid}"
            run.wait_until(lambda: os.path.exists(os.path.join(log_dir, tmp_name)))
        else:
            run.wait_until(lines_reached(log_dir, at))
            if where == "random":
                time.sleep(rng.uniform(0, 0.3))
        run.kill()
        assert run.wait() == -signal.SIGKILL  # it was alive when the kill came
        assert 20 not in checkpoints(log_dir)
        if where in ("eval", "step"):  # nothing was logged between the record watched for and the kill
            assert log_text(log_dir).count("\n") == at
        if where == "checkpoint":  # killed mid-write: half a file, under its temporary name only
            assert temporaries(log_dir) == [tmp_name] and at not in checkpoints(log_dir)
    ok(train(args + ["--resume", "auto"]))
    assert log_text(log_dir) == ref_log
    assert same_state(*(checkpoint(d, 20) for d in (reference, log_dir)))
    assert checkpoints(log_dir) == [18, 20] and temporaries(log_dir) == []


def worker_pids(torchrun_pid):
    """[rank 0's pid, rank 1's pid] under torchrun, found by the RANK in their environments. (torchrun starts
    each worker in a session of its own, so killing torchrun's process group does not reach them.)"""
    pids = {}
    for task in os.listdir(f"/proc/{torchrun_pid}/task"):
        with open(f"/proc/{torchrun_pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/environ", "rb") as env:
                    rank = next(v[5:] for v in env.read().split(b"\0") if v.startswith(b"RANK="))
                pids[int(rank)] = int(child)
    return [pids[0], pids[1]]


def dead(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def wait_dead(pids, timeout=60):
    deadline = time.time() + timeout
    while not all(dead(pid) for pid in pids):
        assert time.time() < deadline, "a worker outlived its job"
        time.sleep(0.05)


def test_two_ranks_killed_and_stopped_resume_to_the_uninterrupted_run(tmp_path, ddp_reference):
    """Under torchrun with 2 ranks: rank 1 killed in a step (torchrun ends the job, non-zero), Ctrl-C to the
    whole process group (both ranks stop after the same step and save), everything killed while the master
    writes a checkpoint; resumed each time, the log is the uninterrupted 2-rank run's."""
    log_dir = str(tmp_path / "log")
    ref_log = log_text(ddp_reference)
    cmd = TORCHRUN + ["train_gpt2.py", *DDP_FAULT, "--log_dir", log_dir, "--resume", "auto"]

    run = Run(cmd, str(tmp_path))
    run.wait_until(lines_reached(log_dir, record_index(ref_log, 4, "train")))  # rank 1 is in step 5
    workers = worker_pids(run.proc.pid)
    run.kill(pid=workers[1])
    assert run.wait(timeout=90) != 0  # torchrun ended the job
    wait_dead(workers)
    assert 12 not in checkpoints(log_dir)

    run = Run(cmd, str(tmp_path))
    run.wait_until(lines_reached(log_dir, record_index(ref_log, 6, "train")))  # in step 7: stops at 8
    workers = worker_pids(run.proc.pid)
    run.kill(signal.SIGINT, group=True)  # as Ctrl-C in a terminal: torchrun forwards it to the workers
    run.wait()
    wait_dead(workers)
    out, err = run.output()
    assert f"stopped at step 8 by SIGINT; checkpoint {log_dir}/model_00008.pt; resume with --resume auto" in out, err
    assert log_text(log_dir) == ref_log[:ref_log.index("\n8 val")] + "\n"
    assert torch.load(os.path.join(log_dir, "model_00008.pt"), weights_only=True)["evals_done"] is False

    run = Run(cmd, str(tmp_path))
    run.wait_until(lines_reached(log_dir, record_index(ref_log, 8, "train")))  # resumed at 8, now in step 9
    workers = worker_pids(run.proc.pid)
    run.wait_until(lambda: any(name.startswith("model_00010.pt.tmp") for name in os.listdir(log_dir)))
    for pid in workers + [run.proc.pid]:  # the machine is lost: every process at once
        os.kill(pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    wait_dead(workers)
    assert 10 not in checkpoints(log_dir) and len(temporaries(log_dir)) == 1

    r = ok(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600))
    assert f"resuming from {log_dir}/model_00008.pt at step 8" in r.stdout  # the SIGINT one, a second time
    assert log_text(log_dir) == ref_log


def test_fsdp_stopped_and_killed_mid_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, tmp_path_factory):
    """The same with --fsdp, whose checkpoints are folders written by every rank: SIGTERM to torchrun (as a
    container stop sends it), then every process killed while the sharded checkpoint is written, keeping 1."""
    args = DDP_FAULT + ["--fsdp"]
    reference = str(tmp_path_factory.mktemp("fsdp_reference") / "log")
    ok(subprocess.run(TORCHRUN + ["train_gpt2.py", *args, "--log_dir", reference], cwd=ROOT, capture_output=True,
                      text=True, timeout=600))
    ref_log = log_text(reference)
    log_dir = str(tmp_path / "log")
    cmd = TORCHRUN + ["train_gpt2.py", *args, "--log_dir", log_dir, "--resume", "auto", "--keep_checkpoints", "1"]

    run = Run(cmd, str(tmp_path))
    run.wait_until(lines_reached(log_dir, record_index(ref_log, 4, "train")))  # in step 5: stops at 6
    workers = worker_pids(run.proc.pid)
    run.kill(signal.SIGTERM)
    run.wait()
    wait_dead(workers)
    assert f"stopped at step 6 by SIGTERM; checkpoint {log_dir}/model_00006.dcp;" in run.output()[0]
    assert torch.load(os.path.join(log_dir, "model_00006.dcp", "meta.pt"), weights_only=True)["evals_done"] is False

    run = Run(cmd, str(tmp_path))
    run.wait_until(lines_reached(log_dir, record_index(ref_log, 6, "train")))  # resumed at 6, now in step 7
    workers = worker_pids(run.proc.pid)
    run.wait_until(lambda: os.path.exists(os.path.join(log_dir, "model_00008.dcp.tmp")))
    for pid in workers + [run.proc.pid]:
        os.kill(pid, signal.SIGKILL)
    run.wait()
    wait_dead(workers)
    assert checkpoints(log_dir) == [6]

    r = ok(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600))
    assert f"resuming from {log_dir}/model_00006.dcp at step 6" in r.stdout
    assert log_text(log_dir) == ref_log
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00012.dcp"]  # the half folder went, 1 kept


# -----------------------------------------------------------------------------
# SIGTERM: finish the step, save, exit 0; the checkpoint is the one a scheduled checkpoint would be

def test_a_checkpoint_that_does_not_fit_its_config_is_one_line(tmp_path, reference):
    ckpt = torch.load(os.path.join(reference, "model_00002.pt"), weights_only=True)
    ckpt["model"]["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(3, 3)  # edited by hand, say
    (tmp_path / "away").mkdir()
    torch.save(ckpt, tmp_path / "away" / "model_00002.pt")
    r = train(FAULT + ["--log_dir", str(tmp_path / "log"), "--resume", str(tmp_path / "away" / "model_00002.pt")])
    assert r.returncode == 1 and r.stderr.startswith(f"error: checkpoint {tmp_path}/away/model_00002.pt does not fit "
                                                     "its own config: ") and r.stderr.count("\n") == 1, r.stderr


def test_a_signal_during_the_final_evaluations_stops_them_with_the_training_saved(tmp_path):
    """The last step's checkpoint is written before its final evaluations (HellaSwag takes minutes, longer than
    torchrun's grace before SIGKILL), marked as without them; a signal then stops them at once (exit 0, saying
    how to resume), and a resume makes only them."""
    log_dir = str(tmp_path / "log")
    run = FAST + ["--checkpoint_every", "0", "--log_dir", log_dir]
    ok(train(run + ["--max_steps", "2", "--eval_every", "0"]))
    # from step 2 to 4, evaluated at 4 alone (the last step), over many val batches
    final = run + ["--max_steps", "4", "--eval_every", "5", "--resume", "auto"]
    slow = Run([sys.executable, "train_gpt2.py", *final, "--val_steps", "100000"], str(tmp_path))
    slow.wait_until(lambda: os.path.exists(os.path.join(log_dir, "model_00004.pt")))
    slow.kill(signal.SIGTERM)
    assert slow.wait(timeout=60) == 0
    out, err = slow.output()
    assert out.splitlines()[-1] == f"stopped at step 4 by SIGTERM during its final evaluations; checkpoint " \
        f"{log_dir}/model_00004.pt; resume with --resume auto" and "validation loss" not in out and not err
    assert checkpoint(log_dir, 4)["evals_done"] is False
    assert [(s, k) for s, k, _ in records(log_dir)] == [(0, "train"), (1, "train"), (2, "train"), (3, "train")]
    # resumed from outside its --log_dir, where --resume auto would not find it: the line names it
    away = tmp_path / "away" / "model_00004.pt"
    away.parent.mkdir()
    shutil.copy(os.path.join(log_dir, "model_00004.pt"), away)
    (tmp_path / "branch").mkdir()
    branch = Run([sys.executable, "train_gpt2.py", *FAST, "--checkpoint_every", "0", "--max_steps", "4", "--eval_every",
                  "5", "--val_steps", "100000", "--log_dir", str(tmp_path / "branch" / "log"), "--resume", str(away)],
                 str(tmp_path / "branch"))
    branch.wait_until(lambda: "only its final evaluations are left" in branch.output()[0])
    branch.kill(signal.SIGTERM)
    assert branch.wait(timeout=60) == 0
    assert branch.output()[0].splitlines()[-1] == "stopped at step 4 by SIGTERM during its final evaluations; " \
        f"checkpoint {away}; resume with --resume {away}"
    r = ok(train(final + ["--val_steps", "2"]))
    assert "at step 4: only its final evaluations are left" in r.stdout
    assert [(s, k) for s, k, _ in records(log_dir)][-2:] == [(3, "train"), (4, "val")]
    assert checkpoint(log_dir, 4)["evals_done"] is True


def test_a_signal_while_the_last_checkpoint_is_written_stops_the_final_evaluations(tmp_path, monkeypatch, capsys):
    """Held until the end of the next step, a signal come while the last step's checkpoint was written, before
    its evaluations, was never acted on: no step follows."""
    sent, log_dir, write = [], tmp_path / "log", train_gpt2.write_checkpoint

    def sigterm_then_write(*args, **kwargs):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))  # handled before the next line runs
        return write(*args, **kwargs)
    monkeypatch.setattr(train_gpt2, "write_checkpoint", sigterm_then_write)
    handler = signal.signal(signal.SIGTERM, train_gpt2.request_stop)
    try:
        train_gpt2.main(FAST + ["--max_steps", "2", "--eval_every", "2", "--checkpoint_every", "0", "--log_dir",
                                str(log_dir)])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert capsys.readouterr().out.splitlines()[-1] == "stopped at step 2 by SIGTERM during its final evaluations; " \
        f"checkpoint {log_dir}/model_00002.pt; resume with --resume auto"
    assert sent and [(s, k) for s, k, _ in records(str(log_dir))] == [(0, "val"), (0, "train"), (1, "train")]
    assert checkpoint(str(log_dir), 2)["evals_done"] is False


def test_sigterm_saves_after_the_step_and_resumes_exactly(tmp_path, reference):
    log_dir = str(tmp_path / "log")
    ref_log = log_text(reference)
    run = Run([sys.executable, "train_gpt2.py", *FAULT, "--log_dir", log_dir], str(tmp_path))
    run.wait_until(lines_reached(log_dir, record_index(ref_log, 6, "train")))  # in step 7
    run.kill(signal.SIGTERM)
    assert run.wait() == 0
    out, err = run.output()
    assert out.splitlines()[-1] == f"stopped at step 8 by SIGTERM; checkpoint {log_dir}/model_00008.pt; " \
                                   "resume with --resume auto" and err == ""
    # step 8's evaluations were not run: the checkpoint says so, and the log stops at step 7's record
    assert log_text(log_dir) == ref_log[:ref_log.index("\n8 val")] + "\n"
    ours, regular = checkpoint(log_dir, 8), checkpoint(reference, 8)
    assert ours.pop("evals_done") is False and regular.pop("evals_done") is True
    # the records it follows: the log up to step 7 (the regular one's also holds step 8's evaluations)
    assert ours.pop("log_digest") == train_gpt2.log_digest(os.path.join(log_dir, "log.txt"), 8, False)
    assert regular.pop("log_digest") == train_gpt2.log_digest(os.path.join(reference, "log.txt"), 8, True)
    assert same_state(ours, regular)  # model, optimizer, loader, RNG: the state a scheduled checkpoint holds
    # moved away, it continues its run from the folder's log, which ends before its step
    moved, away = tmp_path / "moved", tmp_path / "away"
    shutil.copytree(log_dir, moved)
    away.mkdir()
    shutil.move(str(moved / "model_00008.pt"), away)
    ok(train(FAULT + ["--log_dir", str(moved), "--resume", str(away / "model_00008.pt")]))
    assert log_text(str(moved)) == ref_log
    r = ok(train(FAULT + ["--log_dir", log_dir, "--resume", "auto"]))
    assert "resuming from" in r.stdout and "validation loss" in r.stdout.split("step     8 |")[0]  # step 8's evals
    assert log_text(log_dir) == ref_log


# -----------------------------------------------------------------------------
# A rank that dies or hangs ends the job within the collective timeout, with a message

@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_ends_the_job(tmp_path, fault):
    """Two ranks started by hand (as a cluster scheduler would, without torchrun to clean up): when rank 1 is
    killed, or stopped so it hangs, rank 0 exits 1 with a one-line message, within --dist_timeout."""
    log_dir = str(tmp_path / "log")
    cmd = [sys.executable, "train_gpt2.py", *FAULT, "--log_dir", log_dir, "--dist_timeout", "5"]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = []
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
        ranks.append(Run(cmd, str(tmp_path / f"rank{rank}"), dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
    try:
        ranks[0].wait_until(lines_reached(log_dir, 4))
        ranks[1].kill(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t0 = time.time()
        assert ranks[0].wait(timeout=120) == 1
        waited = time.time() - t0
    finally:
        ranks[1].kill(signal.SIGKILL)
        ranks[1].wait()
    out, err = ranks[0].output()
    assert err.strip().splitlines()[-1].startswith("error: rank 0 lost the other ranks (") and "Traceback" not in err
    assert waited < 60  # bounded by --dist_timeout (5 s), plus start-up slack; never a hang
    assert 20 not in checkpoints(log_dir)


def test_ranks_that_see_different_log_dirs_stop_before_anything_changes(tmp_path, reference):
    """Two nodes without a shared --log_dir: rank 0 finds a checkpoint, rank 1 none, or one of another run. Both
    stop with the same line before loading or deleting anything, rather than train on from two different states."""
    seen = {0: tmp_path / "node0", 1: tmp_path / "node1"}
    seen[0].mkdir(), seen[1].mkdir()
    shutil.copy(os.path.join(reference, "model_00004.pt"), seen[0])
    records_to_4 = "".join(line + "\n" for line in log_text(reference).splitlines() if int(line.split()[0]) < 4)
    (seen[0] / "log.txt").write_text(records_to_4)

    def launch():
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
        ranks = []
        for rank in (0, 1):
            (tmp_path / f"rank{rank}").mkdir(exist_ok=True)
            cmd = [sys.executable, "train_gpt2.py", *FAULT, "--log_dir", str(seen[rank]), "--resume", "auto",
                   "--dist_timeout", "30"]
            ranks.append(Run(cmd, str(tmp_path / f"rank{rank}"), dict(env, RANK=str(rank), LOCAL_RANK=str(rank))))
        assert [run.wait(timeout=120) for run in ranks] == [1, 1]
        return [run.output()[1] for run in ranks]

    for rank, err in enumerate(launch()):
        assert err == (f"error: rank 0 starts at step 4 but rank 1 at step 0: they see different files in --log_dir "
                       f"{seen[rank]}; on several nodes it must be one shared folder\n")
    assert sorted(os.listdir(seen[0])) == ["log.txt", "model_00004.pt"] and log_text(seen[0]) == records_to_4
    assert os.listdir(seen[1]) == []
    # both see a checkpoint at step 4, but of two runs (the records they followed differ)
    (seen[1] / "log.txt").write_text(records_to_4)
    ckpt = torch.load(seen[0] / "model_00004.pt", weights_only=True)
    torch.save({**ckpt, "log_digest": "another run's"}, seen[1] / "model_00004.pt")
    assert launch()[0] == (f"error: rank 0 and rank 1 start at step 4 from different checkpoints: they see different "
                           f"files in --log_dir {seen[0]}; on several nodes it must be one shared folder\n")


# -----------------------------------------------------------------------------
# A full disk while a checkpoint is written: an error, the previous checkpoint intact, no half file

@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk_while_checkpointing(tmp_path, reference, monkeypatch, capsys, where):
    log_dir = str(tmp_path / "log")
    target = os.path.join(log_dir, "model_00004.pt.tmp")
    before = {}
    real_open, real_fsync = open, os.fsync

    def snapshot():
        with real_open(os.path.join(log_dir, "model_00002.pt"), "rb") as f:
            before["model_00002.pt"] = f.read()

    def full_open(path, mode="r", *a, **k):
        if str(path).startswith(target) and where == "write":
            snapshot()
            return FullDisk(path, 100_000)
        return real_open(path, mode, *a, **k)

    def full_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(target):
            snapshot()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(train_gpt2, "open", full_open, raising=False)
    monkeypatch.setattr(os, "fsync", full_fsync)
    args = FAULT + ["--log_dir", log_dir, "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        train_gpt2.run_cli(lambda: train_gpt2.main(args))
    monkeypatch.undo()
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error: cannot write checkpoint {log_dir}/model_00004.pt: No space left on device\n"
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00002.pt"]  # no half file, under any name
    with open(os.path.join(log_dir, "model_00002.pt"), "rb") as f:
        assert f.read() == before["model_00002.pt"]
    train_gpt2.main(args + ["--resume", "auto"])  # space again: the run goes on from step 2
    assert log_text(log_dir) == log_text(reference)


# -----------------------------------------------------------------------------
# Divergence: stop naming the step, or skip the update; never a checkpoint of non-finite weights

DIVERGE = FAST + ["--max_lr", "1", "--weight_decay", "1e30", "--max_steps", "4", "--checkpoint_every", "1",
                  "--eval_every", "0"]


def test_nonfinite_loss_stops_the_run_without_saving_it(tmp_path):
    # a weight decay of 1e30 scales the weights by about -1e29 in step 0, giving inf/NaN activations in step 1
    log_dir = str(tmp_path / "log")
    r = train(DIVERGE + ["--log_dir", log_dir])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: step 1: loss nan, grad norm nan: training diverged") and r.stderr.count("\n") == 1
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00001.pt"]
    assert [(s, k) for s, k, _ in records(log_dir)] == [(0, "train")]
    weights = torch.load(os.path.join(log_dir, "model_00001.pt"), weights_only=True)["model"]
    assert all(v.isfinite().all() for v in weights.values())
    # the plain way to make a run diverge: a huge learning rate (not refused as a typo)
    r = train(FAST + ["--max_lr", "1e6", "--warmup_steps", "0", "--max_steps", "5", "--eval_every", "0",
                      "--log_dir", str(tmp_path / "lr")])
    assert r.returncode == 1 and r.stderr.startswith("error: step 1: loss nan, grad norm nan: training diverged")


def test_skip_nonfinite_leaves_weights_and_optimizer_untouched(tmp_path):
    log_dir = str(tmp_path / "log")
    r = ok(train(DIVERGE + ["--log_dir", log_dir, "--skip_nonfinite"]))
    assert [line for line in r.stdout.splitlines() if line.startswith("warning")] == [
        f"warning: step {s}: loss nan, grad norm nan: update skipped (--skip_nonfinite)" for s in (1, 2, 3)]
    assert [(s, k) for s, k, _ in records(log_dir)] == [(s, "train") for s in range(4)]
    # steps 1-3 were skipped: the state after step 0, except that the loader moved on
    one, four = checkpoint(log_dir, 1), checkpoint(log_dir, 4)
    assert same_state(one["model"], four["model"]) and same_state(one["optimizer"]["state"], four["optimizer"]["state"])
    assert one["loader"] != four["loader"]


def test_a_checkpoint_whose_bytes_changed_is_corrupt_unless_written_without_crcs(tmp_path):
    """torch.load reads a flipped byte in a tensor as a wrong number: the records' CRC-32s tell. A file written with
    torch's CRCs turned off (each 0) still loads."""
    state = {"model": {"w": torch.arange(100_000, dtype=torch.float32)}, "config": {}, "step": 5}
    path = str(tmp_path / "model_00005.pt")
    train_gpt2.save_checkpoint(path, state)
    data = bytearray(open(path, "rb").read())
    middle = data.index(torch.arange(100_000, dtype=torch.float32).numpy().tobytes()[:64]) + 200_000
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    flipped = str(tmp_path / "model_00006.pt")
    open(flipped, "wb").write(bytes(data))
    assert torch.load(flipped, weights_only=True)["model"]["w"][50_000] != 50_000  # read without a word
    with pytest.raises(UserError, match=r"model_00006.pt is corrupt: its record .*/data/0 does not match its CRC-32"):
        train_gpt2.load_checkpoint(flipped)
    assert torch.equal(train_gpt2.load_checkpoint(path)["model"]["w"], state["model"]["w"])
    torch.serialization.set_crc32_options(False)
    try:
        train_gpt2.save_checkpoint(path, state)
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(train_gpt2.load_checkpoint(path)["model"]["w"], state["model"]["w"])


def test_no_flipped_byte_in_an_archive_escapes_the_crc_check_as_a_traceback(tmp_path):
    """zipfile meets damaged headers with errors of many kinds (a name no longer UTF-8, an unknown compression, an
    'encrypted' flag): each is a damaged archive, said as such, never an exception that reaches the user (under a
    launch, one rank's traceback would leave the others waiting in the ranks' verdict on the shards)."""
    buf = io.BytesIO()
    torch.save({"config": {"n_layer": 2}, "w": torch.arange(8.0)}, buf)
    data = buf.getvalue()
    said = set()
    for at in range(len(data)):
        flipped = bytearray(data)
        flipped[at] ^= 0xFF
        said.add(train_gpt2.failed_crc(io.BytesIO(bytes(flipped)), "x") or "")
        (tmp_path / "item").write_bytes(bytes(flipped))
        try:
            train_gpt2.check_shard_crcs(str(tmp_path), [types.SimpleNamespace(relative_path="item", offset=0,
                                                                                length=len(data))])
        except train_gpt2.DamagedShard:
            pass
    assert any("does not match its CRC-32" in s for s in said) and any("zip headers are damaged" in s for s in said)


def test_a_checkpoint_of_nonfinite_weights_is_never_written(tmp_path):
    path = tmp_path / "model_00005.pt"
    path.write_bytes(b"an earlier checkpoint")
    weights = {"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")]), "steps": torch.tensor([1])}
    with pytest.raises(UserError, match=r"not writing .*model_00005.pt: its weight b holds inf or NaN"):
        train_gpt2.save_checkpoint(str(path), {"model": weights, "step": 5})
    assert os.listdir(tmp_path) == ["model_00005.pt"] and path.read_bytes() == b"an earlier checkpoint"


def test_a_checkpoint_of_nonfinite_weights_is_refused_and_passed_over(tmp_path):
    """One edited or damaged since (save_checkpoint never writes one): resuming from it would diverge at once."""
    good = {"model": {"a": torch.ones(3)}, "config": {}, "step": 3}
    torch.save(good, tmp_path / "model_00003.pt")
    torch.save({**good, "model": {"a": torch.tensor([1.0, float("inf"), 0.0])}, "step": 6}, tmp_path / "model_00006.pt")
    with pytest.raises(UserError, match=r"checkpoint .*model_00006.pt: its weight a holds inf or NaN"):
        train_gpt2.load_checkpoint(str(tmp_path / "model_00006.pt"))
    said = []
    ckpt, path = train_gpt2.find_resume_checkpoint(str(tmp_path), said.append)
    assert path.endswith("model_00003.pt") and ckpt["step"] == 3 and said[0].endswith("inf or NaN: skipping it")


def test_fp16_overflow_is_the_scalers_business():
    """With a GradScaler an inf grad norm is routine overflow: the scaler skips the update and halves its scale;
    the run neither stops nor counts it. A non-finite loss counts with or without the scaler."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # the scaled loss overflows float32
    before = [p.detach().clone() for p in model.parameters()]

    class Loader:
        def next_batch(self):
            return torch.ones(2, 4), torch.full((2, 1), 1000.0)  # gradients of ~1000 x 2**127: inf

    class MSE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = model

        def forward(self, x, y):
            return None, torch.nn.functional.mse_loss(self.linear(x), y)

    loss, norm = train_gpt2.train_step(MSE(), optimizer, Loader(), 1, 0.1, contextlib.nullcontext(), scaler, 1.0, "cpu",
                                       skip_nonfinite=True)
    assert torch.isfinite(loss) and not torch.isfinite(norm)
    assert not train_gpt2.nonfinite(loss.item(), norm.item(), scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the scaler skipped it
    assert scaler.get_scale() == 2.0 ** 126
    assert train_gpt2.nonfinite(float("nan"), 1.0, scaler)
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert train_gpt2.nonfinite(1.0, float("inf"), disabled) and not train_gpt2.nonfinite(1.0, 2.0, disabled)


@pytest.mark.parametrize("major, emulates, expected", [(9, False, torch.bfloat16), (8, False, torch.bfloat16),
                                                       (7, True, torch.float16), (7, False, torch.float16)])
def test_dtype_auto_takes_fp16_on_cards_that_only_emulate_bf16(monkeypatch, major, emulates, expected):
    """A V100 or T4 (compute capability 7) makes bf16 tensors, in software, so torch.cuda.is_bf16_supported()
    says yes: --dtype auto must still give those cards fp16 and the GradScaler, at tensor-core speed."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("Props", (), {"major": major}))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: emulates)
    assert train_gpt2.autocast_dtype("auto", "cuda") == expected
    assert train_gpt2.autocast_dtype("auto", "cpu") == torch.float32


def test_resume_with_another_dtype_starts_or_drops_the_loss_scale(tmp_path, monkeypatch):
    """A bf16/fp32 checkpoint holds no loss scale: resumed in fp16 (a GPU without bf16), the GradScaler starts
    afresh; an fp16 checkpoint's scale is dropped when resumed in fp32. (fp16 is a CUDA option: here CPU
    autocast stands in for it.)"""
    run = FAST + ["--log_dir", str(tmp_path), "--checkpoint_every", "2", "--eval_every", "0", "--compile", "off"]
    train_gpt2.main(run + ["--max_steps", "2"])
    monkeypatch.setattr(train_gpt2, "autocast_dtype", lambda *a: torch.float16)
    train_gpt2.main(run + ["--max_steps", "4", "--resume", "auto"])
    assert torch.load(tmp_path / "model_00004.pt", weights_only=True)["scaler"]["scale"] > 0
    monkeypatch.undo()
    train_gpt2.main(run + ["--max_steps", "6", "--resume", "auto"])
    assert torch.load(tmp_path / "model_00006.pt", weights_only=True)["scaler"] == {}
    assert [s for s, kind, _ in records(str(tmp_path)) if kind == "train"] == list(range(6))


# -----------------------------------------------------------------------------
# --keep_checkpoints

def test_keep_checkpoints_deletes_only_older_ones(tmp_path):
    for step in range(1, 7):
        (tmp_path / f"model_{step:05d}.pt").write_bytes(b"x")
    (tmp_path / "model_00007.pt.tmp123").write_bytes(b"x")
    (tmp_path / "log.txt").write_text("")
    train_gpt2.prune_checkpoints(str(tmp_path), 4, 2)
    # the one just written (4) and the newest before it stay; 5 and 6, from a run resumed at an older
    # checkpoint, are later and left alone; other files are not touched
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "model_00003.pt", "model_00004.pt", "model_00005.pt",
                                            "model_00006.pt", "model_00007.pt.tmp123"]
    train_gpt2.prune_checkpoints(str(tmp_path), 6, 1)
    assert checkpoints(str(tmp_path)) == [6]
