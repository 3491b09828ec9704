"""fineweb.py, offline: local corpora in the FineWeb-Edu schema stand in for the hub.

The reference for every run is the lecture's definition: the concatenation of all shards (val first,
then train in order) equals the concatenation of [50256] + encode_ordinary(text) per document.
"""
import errno
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import fineweb
from helpers import FullDisk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "fineweb.py")
SHARD = 10_000  # small shards: a run crosses many boundaries, and the long document spans several


# ----------------------------------------------------------------------------- fixtures

def make_documents():
    """Varied documents: empty, missing, whitespace, unicode, emoji, a literal <|endoftext|>, very long."""
    rng = random.Random(1234)
    words = ["the", "education", "of", "a", "model", "naïve", "café", "Ελληνικά", "日本語", "עברית",
             "🙂", "🚀", "👩‍👩‍👧‍👦", "🇩🇪", "tokens", "1024", "  ", "\n", "\t",
             "GPT-2", "don't", "ﬁ", "x̧"]
    docs = ["", None, "   \n\t  ", "before <|endoftext|> after", "Hello world", "🙂" * 50,
            " ".join(rng.choice(words) for _ in range(30_000))]  # ~40k tokens: spans several shards
    docs += [" ".join(rng.choice(words) for _ in range(rng.randint(0, 300))) for _ in range(1200)]
    docs.insert(600, "")  # an empty document in the middle, too
    return docs


def write_parquet(path, docs, first_id=0):
    n = len(docs)
    pq.write_table(pa.table({
        "text": pa.array(docs, pa.string()), "id": [f"<urn:uuid:{first_id + i}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.org/{first_id + i}" for i in range(n)],
        "token_count": pa.array([len(d or "") // 4 for d in docs], pa.int64()),
        "score": pa.array([2.5 + (i % 7) / 3 for i in range(n)], pa.float64())}),
        path, row_group_size=50)  # 25 row groups in the corpus: 7 tasks of up to 4


def reference_tokens(docs):
    enc = tiktoken.get_encoding("gpt2")
    out = []
    for text in docs:
        out.append(50256)
        out.extend(enc.encode_ordinary(text or ""))  # a missing text counts as an empty document
    return np.array(out, np.uint16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two parquet files (their order matters) and the reference tokens."""
    folder = tmp_path_factory.mktemp("corpus")
    docs = make_documents()
    write_parquet(folder / "part_0.parquet", docs[:700])
    write_parquet(folder / "part_1.parquet", docs[700:], first_id=700)
    return {"files": [str(folder / "part_*.parquet")], "docs": docs, "tokens": reference_tokens(docs)}


def run(corpus, out_dir, *extra):
    """fineweb.main in this process on the corpus; returns its exit code."""
    return fineweb.main(["--local_files", *corpus["files"], "--out_dir", str(out_dir),
                         "--shard_size", str(SHARD), *extra])


def run_script(args, timeout=120):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def reference_run(corpus, tmp_path_factory):
    """An uninterrupted run with the default settings: what every resumed run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert run(corpus, out, "--workers", "2") == 0
    return out


def shard_files(out_dir):
    """Shards in training order: val first, then train."""
    return [f for split in ("val", "train") for f in sorted(glob.glob(os.path.join(out_dir, f"*_{split}_*.npy")))]


def all_tokens(out_dir):
    return np.concatenate([np.load(f) for f in shard_files(out_dir)])


def folder_bytes(out_dir):
    """Every file of a folder by name, the manifest parsed."""
    files = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*"))):
        with open(path, "rb") as f:
            files[os.path.basename(path)] = f.read()
    return files, json.loads(files.pop("manifest.json"))


def one_error_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), text
    assert "Traceback" not in text, text
    return lines[-1]


# ----------------------------------------------------------------------------- output

def test_shards_equal_reference(corpus, reference_run):
    got = all_tokens(reference_run)
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, corpus["tokens"])
    files = [os.path.basename(f) for f in shard_files(reference_run)]
    n = len(files)
    assert n == -(-len(corpus["tokens"]) // SHARD) and n > 10
    assert files == ["edufineweb_val_000000.npy"] + [f"edufineweb_train_{i:06d}.npy" for i in range(1, n)]
    sizes = [len(np.load(f)) for f in shard_files(reference_run)]
    assert sizes[:-1] == [SHARD] * (n - 1)
    assert sizes[-1] == len(corpus["tokens"]) - SHARD * (n - 1)  # the last shard holds the remainder
    manifest = json.load(open(reference_run / "manifest.json"))
    assert manifest["complete"] and [e["tokens"] for e in manifest["shards"]] == sizes
    assert manifest["shards"][-1]["end"][0] == len(corpus["docs"]) - 1
    assert not glob.glob(os.path.join(reference_run, "*.tmp"))


@pytest.mark.parametrize("workers", [1, 3])
def test_workers_do_not_change_the_output(corpus, reference_run, tmp_path, workers):
    assert run(corpus, tmp_path, "--workers", str(workers)) == 0
    assert folder_bytes(tmp_path) == folder_bytes(reference_run)


def test_jsonl_files(corpus, tmp_path):
    docs = corpus["docs"][:300]
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=bool(i % 2)) + "\n")
    assert fineweb.main(["--local_files", str(tmp_path / "*.jsonl"), "--out_dir", str(tmp_path / "out"),
                         "--shard_size", "5000", "--workers", "2", "--dataset", "fineweb"]) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "out"), reference_tokens(docs))
    assert os.path.basename(shard_files(tmp_path / "out")[1]) == "fineweb_train_000001.npy"  # plain FineWeb's prefix


def test_names_taken_literally_empty_files_and_missing_texts(corpus, tmp_path, capsys):
    """A file named with glob characters is that file alone; an empty jsonl is skipped like an empty parquet; a
    text column that is null throughout is empty documents, as a missing text is anywhere."""
    docs = corpus["docs"][:40]
    for name, rows in [("part*.jsonl", docs), ("part_2.jsonl", docs[:5]), ("nulls.jsonl", [None] * 3)]:
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("")
    assert fineweb.main(["--local_files", str(tmp_path / "part*.jsonl"), str(tmp_path / "empty.jsonl"),
                         str(tmp_path / "nulls.jsonl"), "--out_dir", str(tmp_path / "out"), "--shard_size", "500"]) == 0
    assert "empty.jsonl holds no rows; skipped" in capsys.readouterr().err
    np.testing.assert_array_equal(all_tokens(tmp_path / "out"), reference_tokens(docs + [None] * 3))
    assert json.load(open(tmp_path / "out" / "manifest.json"))["source"]["files"] == [
        str(tmp_path / "part*.jsonl"), str(tmp_path / "nulls.jsonl")]
    # all of it in the val shard: said, as train_gpt2.py needs train shards
    assert fineweb.main(["--local_files", str(tmp_path / "part_2.jsonl"), "--out_dir", str(tmp_path / "small")]) == 0
    assert f"note: all {len(reference_tokens(docs[:5]))} tokens went into the val shard" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_first_file_of_missing_texts_is_followed_by_files_with_texts(corpus, tmp_path, kind):
    """datasets types the columns from the first file: texts all null made them null, and the next file's strings
    failed to cast to it ("Couldn't cast array of type string to null")."""
    docs = corpus["docs"][:30]
    if kind == "jsonl":
        (tmp_path / "a.jsonl").write_text('{"text": null}\n{"text": null}\n')
        (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": pa.array([None, None], pa.null()), "id": [0, 1]}), tmp_path / "a.parquet")
        pq.write_table(pa.table({"text": docs, "id": list(range(2, 32))}), tmp_path / "b.parquet")
    assert fineweb.main(["--local_files", str(tmp_path / f"a.{kind}"), str(tmp_path / f"b.{kind}"),
                         "--out_dir", str(tmp_path / "out"), "--shard_size", "500", "--workers", "1"]) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "out"), reference_tokens([None, None] + docs))


def test_a_file_that_starts_with_a_lot_of_blank_lines_is_read(corpus, tmp_path, capsys):
    """The empty-file check looked at the first 64 KiB only: such a file was skipped as empty, its documents lost."""
    docs = corpus["docs"][:20]
    (tmp_path / "padded.jsonl").write_text("\n" * 70_000 + "".join(json.dumps({"text": t}) + "\n" for t in docs))
    (tmp_path / "blank.jsonl").write_text(" \n" * 70_000)
    assert fineweb.main(["--local_files", str(tmp_path / "padded.jsonl"), str(tmp_path / "blank.jsonl"),
                         "--out_dir", str(tmp_path / "out"), "--shard_size", "500", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "blank.jsonl holds no rows; skipped" in err and "padded.jsonl holds no rows" not in err
    np.testing.assert_array_equal(all_tokens(tmp_path / "out"), reference_tokens(docs))


def test_an_unreadable_file_is_named(corpus, tmp_path):
    parts = sorted(glob.glob(corpus["files"][0]))
    (tmp_path / "cut.parquet").write_bytes(open(parts[1], "rb").read()[:300])
    with pytest.raises(SystemExit, match=f"error: cannot read {tmp_path}/cut.parquet: "):
        fineweb.main(["--local_files", parts[0], str(tmp_path / "cut.parquet"), "--out_dir", str(tmp_path / "out")])


def test_a_tokenizer_that_cannot_load_points_to_offline_use(corpus, tmp_path, monkeypatch):
    def unreachable(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): ...")

    monkeypatch.setattr(tiktoken, "get_encoding", unreachable)
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--local_files", corpus["files"][0], "--out_dir", str(tmp_path / "out")])
    assert str(e.value) == ("error: cannot load the GPT-2 tokenizer (ConnectionError); offline, seed tiktoken's cache "
                            "with tools/offline_tokenizer.py (README, 'Offline use')")
    assert not (tmp_path / "out").exists()


def test_an_empty_file_and_a_first_run_that_failed(corpus, reference_run, tmp_path, capsys):
    # a parquet file of no rows adds no documents (datasets cannot read one): skipped, with a note
    write_parquet(tmp_path / "empty.parquet", [])
    parts = sorted(glob.glob(corpus["files"][0]))
    out = tmp_path / "out"
    assert fineweb.main(["--local_files", parts[0], str(tmp_path / "empty.parquet"), parts[1], "--out_dir", str(out),
                         "--shard_size", str(SHARD)]) == 0
    assert "empty.parquet holds no rows; skipped" in capsys.readouterr().err
    assert folder_bytes(out)[0] == folder_bytes(reference_run)[0]
    # a first run that fails on bad input leaves nothing (a manifest only comes with the first shard): once
    # fixed, the input runs there
    source = tmp_path / "doc.jsonl"
    source.write_bytes(b'{"text": "caf\xe9"}\n')
    args = ["--local_files", str(source), "--out_dir", str(tmp_path / "fixed")]
    with pytest.raises(SystemExit, match=f"cannot read or tokenize {source}: UnicodeDecodeError"):
        fineweb.main(args)
    assert os.listdir(tmp_path / "fixed") == []
    source.write_text('{"text": "café au lait"}\n', encoding="utf-8")
    assert fineweb.main(args) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "fixed"), reference_tokens(["café au lait"]))


def test_max_tokens_then_extend(corpus, reference_run, tmp_path, capsys):
    assert run(corpus, tmp_path, "--max_tokens", "25e3") == 0
    np.testing.assert_array_equal(all_tokens(tmp_path), corpus["tokens"][:25_000])
    out = capsys.readouterr().out  # the documents this run wrote, which the folder holds: not all it tokenized
    assert re.search(r"from ([\d,]+) documents", out).group(1) == re.search(r"tokens, ([\d,]+) documents in", out).group(1)
    assert [len(np.load(f)) for f in shard_files(tmp_path)] == [SHARD, SHARD, 5_000]
    # the same command again: nothing to do, nothing rewritten
    stamps = {f: os.stat(f).st_mtime_ns for f in shard_files(tmp_path)}
    capsys.readouterr()
    assert run(corpus, tmp_path, "--max_tokens", "25000") == 0
    assert "already complete" in capsys.readouterr().out
    assert {f: os.stat(f).st_mtime_ns for f in shard_files(tmp_path)} == stamps
    # asking for fewer tokens than the folder holds is refused, and touches nothing (also where the remainder
    # shard alone would shrink)
    for fewer in ("15000", "24000"):
        with pytest.raises(SystemExit) as e:
            run(corpus, tmp_path, "--max_tokens", fewer)
        assert f"already holds 25,000 tokens, more than --max_tokens {fewer}" in str(e.value.code)
        assert {f: os.stat(f).st_mtime_ns for f in shard_files(tmp_path)} == stamps
    # and where a shard is damaged too: its rewrite would have ended at --max_tokens, and removed the good
    # shards after it
    damaged = shard_files(tmp_path)[1]
    arr = np.load(damaged)
    arr[7] = (int(arr[7]) + 1) % 50000
    np.save(damaged, arr)
    before = folder_bytes(tmp_path)
    with pytest.raises(SystemExit, match="already holds 25,000 tokens, more than --max_tokens 12000"):
        run(corpus, tmp_path, "--max_tokens", "12000")
    assert folder_bytes(tmp_path) == before
    # no limit: the remainder shard grows into the full run
    assert run(corpus, tmp_path) == 0
    assert folder_bytes(tmp_path) == folder_bytes(reference_run)


def test_verify(corpus, reference_run, tmp_path, capsys):
    assert fineweb.main(["--verify", "--out_dir", str(reference_run)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert run(corpus, tmp_path) == 0
    victim = shard_files(tmp_path)[3]
    arr = np.load(victim)
    arr[123] = (int(arr[123]) + 1) % 50000
    np.save(victim, arr)
    stray = tmp_path / "edufineweb_train_000999.npy"
    np.save(stray, arr)
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--verify", "--out_dir", str(tmp_path)])
    assert e.value.code == "error: 2 problem(s) in " + str(tmp_path)
    err = capsys.readouterr().err
    assert os.path.basename(victim) + ": checksum differs" in err
    assert "edufineweb_train_000999.npy: not in the manifest" in err
    # a rerun refuses a shard that is not its own, touching nothing (it used to delete it, with the later shards)
    before = folder_bytes(tmp_path)
    with pytest.raises(SystemExit, match="edufineweb_train_000999.npy is not in manifest.json"):
        run(corpus, tmp_path)
    assert folder_bytes(tmp_path) == before
    # moved out, a rerun rewrites from the damaged shard on, to the same bytes as before
    os.remove(stray)
    assert run(corpus, tmp_path) == 0
    assert "rewriting from this shard on" in capsys.readouterr().err
    assert folder_bytes(tmp_path) == folder_bytes(reference_run)


def test_verify_counts_documents(corpus, reference_run, tmp_path):
    """A shard whose contents disagree with the document range in the manifest fails --verify."""
    assert run(corpus, tmp_path, "--max_tokens", "20000") == 0
    manifest = json.load(open(tmp_path / "manifest.json"))
    manifest["shards"][1]["end"][0] += 1  # one document more than the shard holds
    json.dump(manifest, open(tmp_path / "manifest.json", "w"))
    with pytest.raises(SystemExit):
        fineweb.main(["--verify", "--out_dir", str(tmp_path)])


@pytest.mark.parametrize("source", ["x", [1], "sizes", "mtimes", "files"])
def test_a_manifest_whose_source_was_edited_is_one_line(corpus, tmp_path, source):
    assert run(corpus, tmp_path, "--max_tokens", "20000") == 0
    manifest = json.load(open(tmp_path / "manifest.json"))
    manifest["source"] = {**manifest["source"], source: 5} if source in ("sizes", "mtimes", "files") else source
    json.dump(manifest, open(tmp_path / "manifest.json", "w"))
    for argv in ([], ["--verify"]):
        with pytest.raises(SystemExit, match="manifest.json: source is not what this script writes"):
            fineweb.main(["--local_files", *corpus["files"], "--out_dir", str(tmp_path), "--shard_size", str(SHARD),
                          *argv] if not argv else [*argv, "--out_dir", str(tmp_path)])


def test_a_file_named_twice_is_refused(corpus, tmp_path):
    """Overlapping globs, or one file by two names: its documents would go into the shards twice."""
    pattern = corpus["files"][0]
    first = sorted(glob.glob(pattern))[0]
    os.symlink(first, tmp_path / "again.parquet")
    for twice in ([first, first], [pattern, first], [first, str(tmp_path / "again.parquet")]):
        with pytest.raises(SystemExit, match=r"is named twice in --local_files"):
            fineweb.main(["--local_files", *twice, "--out_dir", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out")


# ----------------------------------------------------------------------------- interruption

KILLER = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import fineweb

mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def die():
    os.killpg(0, signal.SIGKILL)  # the whole process group: main process and workers

add, save_manifest, finish = fineweb.ShardWriter.add, fineweb.save_manifest, fineweb.ShardWriter.finish

def partial_add(self, *args):  # killed with part of a shard (shard n or the next one begun) written
    add(self, *args)
    if self.index >= n - 1 and self.file is not None:
        self.file.flush()
        self.wait()  # the writer thread's last rename and manifest are done: the kill lands in the open shard alone
        die()

def late_manifest(out_dir, manifest):  # killed after shard n got its final name, before the manifest
    calls[0] += 1
    if calls[0] == n + 1:  # one save when the run starts, then one per finished shard
        die()
    save_manifest(out_dir, manifest)

def stall(self, file, entry):  # shard n on disk, then stop so the test can kill from outside
    finish(self, file, entry)
    calls[0] += 1
    if calls[0] == n:
        open(os.environ["READY_FILE"], "w").close()
        time.sleep(60)

def wait_in_main(self, *args):  # shard n begun, then wait for the test's Ctrl-C
    add(self, *args)
    if self.index >= n:
        self.wait()  # as in partial_add: the writer thread idle, so the signal or kill lands in the main process
        open(os.environ["READY_FILE"], "w").close()
        time.sleep(60)

if mode == "mid_write":
    fineweb.ShardWriter.add = partial_add
elif mode in ("sigint", "sigint_twice", "sigterm", "main_killed"):
    fineweb.ShardWriter.add = wait_in_main
elif mode == "before_manifest":
    fineweb.save_manifest = late_manifest
else:
    fineweb.ShardWriter.finish = stall
sys.exit(fineweb.cli(sys.argv[3:]))  # as python fineweb.py ...
"""


def live_in_session(sid):
    """Processes of session sid that have not exited (zombies have), from /proc."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _, _, session = f.read().rsplit(")", 1)[1].split()[:4]
        except OSError:
            continue
        if int(session) == sid and state != "Z":
            alive.append(int(pid))
    return alive


@pytest.mark.parametrize("mode,n", [("mid_write", 3), ("before_manifest", 40), ("external", 25), ("sigint", 30),
                                    ("sigint_twice", 30), ("sigterm", 20), ("main_killed", 20)])
def test_kill_and_resume(corpus, reference_run, tmp_path, mode, n):
    """SIGKILL mid-run (inside the write of shard n, between shard n and its manifest entry, from outside while
    workers run, or to the main process alone), Ctrl-C (once or twice) or SIGTERM to the main process, then rerun:
    the same folder as an uninterrupted run.
    Shard 3 lies inside the long document; the others end in later row groups, which the rerun
    starts at instead of reading from the start."""
    driver = tmp_path / "driver.py"
    driver.write_text(KILLER.format(root=ROOT))
    out = tmp_path / "out"
    args = ["--local_files", *corpus["files"], "--out_dir", str(out), "--shard_size", str(SHARD), "--workers", "2"]
    env = dict(os.environ, READY_FILE=str(tmp_path / "ready"))
    proc = subprocess.Popen([sys.executable, str(driver), mode, str(n), *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if mode not in ("mid_write", "before_manifest"):
        deadline = time.time() + 60
        while not os.path.exists(env["READY_FILE"]) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert os.path.exists(env["READY_FILE"]), proc.stderr.read().decode()
        if mode in ("sigterm", "main_killed"):  # SIGTERM as `kill PID` or a stopping container sends it
            os.kill(proc.pid, signal.SIGTERM if mode == "sigterm" else signal.SIGKILL)
        elif mode == "sigint_twice":  # an impatient Ctrl-C during the clean stop: ignored, the stop finishes
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.02)
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT if mode == "sigint" else signal.SIGKILL)
    proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    if mode in ("sigint", "sigint_twice", "sigterm"):  # a clean stop: a message, exit 130, the unfinished shard removed
        assert proc.returncode == 130 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("interrupted: "), err
        assert not glob.glob(os.path.join(out, "*.tmp"))
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # no worker outlived the main process
    else:
        assert proc.returncode == -signal.SIGKILL, err
    if mode == "main_killed":  # its workers go with it, not blocked for ever on a pipe nobody reads
        deadline = time.time() + 10
        while time.time() < deadline and live_in_session(proc.pid):
            time.sleep(0.1)
        assert not live_in_session(proc.pid)
    # what the kill left: whole shards under final names, never a partial one
    finished = shard_files(out)
    assert n - 1 <= len(finished) < len(shard_files(reference_run))
    for f in finished:
        assert np.load(f).shape == (SHARD,)
    kept = json.load(open(out / "manifest.json"))["shards"]
    if mode == "mid_write":  # the shards after the finished ones exist only under temporary names
        tmps = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "*.tmp")))
        assert tmps and tmps == [fineweb.shard_name("edufineweb", len(finished) + i) + ".tmp" for i in range(len(tmps))]
        assert len(kept) == len(finished)
        r = run_script(["--verify", "--out_dir", str(out)])  # what a killed run leaves is incomplete, not broken
        assert r.returncode == 0 and "incomplete (rerun the same command to resume)" in r.stdout, r.stderr
    else:
        assert kept[-1]["resume"]["task"] > 0
    if mode == "before_manifest":
        assert len(kept) == len(finished) - 1 == n - 1

    result = run_script(args)
    assert result.returncode == 0, result.stderr
    assert folder_bytes(out) == folder_bytes(reference_run)
    # the rerun wrote the documents from where the kept shards end on (that one too, unless they hold it whole)
    resumed = int(result.stdout.split(" documents")[0].split()[-1].replace(",", ""))
    end_doc, carry = kept[-1]["end"]
    whole = carry == 1 + len(tiktoken.get_encoding("gpt2").encode_ordinary(corpus["docs"][end_doc] or ""))
    assert resumed == len(corpus["docs"]) - end_doc - whole


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_full_disk(corpus, reference_run, tmp_path, monkeypatch, where):
    """ENOSPC in the middle of shard 2 (on write, or on fsync as delayed allocation reports it):
    a one-line error, shards 0-1 intact, no partial file left; a rerun finishes the job."""
    real_fsync = os.fsync
    if where == "write":
        monkeypatch.setattr(fineweb, "open", lambda path, mode="r", *a, **k: FullDisk(path, 5000)
                            if path.endswith("train_000002.npy.tmp") else open(path, mode, *a, **k), raising=False)
    else:
        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith("train_000002.npy.tmp"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(SystemExit) as e:
        run(corpus, tmp_path)
    monkeypatch.undo()
    assert e.value.code == f"error: cannot write {tmp_path / 'edufineweb_train_000002.npy'}: No space left on device"
    assert sorted(os.listdir(tmp_path)) == ["edufineweb_train_000001.npy", "edufineweb_val_000000.npy", "manifest.json"]
    assert fineweb.main(["--verify", "--out_dir", str(tmp_path)]) == 0
    assert run(corpus, tmp_path) == 0
    assert folder_bytes(tmp_path) == folder_bytes(reference_run)


# ----------------------------------------------------------------------------- reruns keep what is written

def start_driver(tmp_path, mode, n, args):
    """The KILLER driver in a session of its own, waiting (modes sigint...) until it is ready for the signal."""
    driver = tmp_path / "driver.py"
    driver.write_text(KILLER.format(root=ROOT))
    env = dict(os.environ, READY_FILE=str(tmp_path / "ready"))
    proc = subprocess.Popen([sys.executable, str(driver), mode, str(n), *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not os.path.exists(env["READY_FILE"]) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert os.path.exists(env["READY_FILE"]), proc.stderr.read().decode()
    return proc


def test_an_interrupted_rewrite_keeps_the_later_shards(corpus, reference_run, tmp_path, capsys):
    """A rerun that finds a shard missing rewrites from it on, each new shard renamed over the old one of its
    name: stopped part way (Ctrl-C), the folder still holds every shard (the later ones were deleted up front,
    and a Ctrl-C left 2 of them), listed as stale; the next rerun goes on from where the stopped one got to."""
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    os.remove(out / "edufineweb_train_000002.npy")
    args = ["--local_files", *corpus["files"], "--out_dir", str(out), "--shard_size", str(SHARD), "--workers", "2"]
    proc = start_driver(tmp_path, "sigint", 8, args)  # Ctrl-C once shard 8 is begun
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert proc.returncode == 130 and "edufineweb_train_000002.npy: missing; rewriting from this shard on" in err, err
    files, manifest = folder_bytes(out)
    reference, _ = folder_bytes(reference_run)
    assert files == reference  # every shard there, the rewritten ones byte for byte what they were
    names = [os.path.basename(f) for f in shard_files(reference_run)]
    kept = len(manifest["shards"])
    assert kept >= 8 and [e["file"] for e in manifest["shards"]] == names[:kept]
    assert manifest["stale"] == names[kept:] and not manifest["complete"]
    assert fineweb.main(["--verify", "--out_dir", str(out)]) == 0
    assert "incomplete (rerun the same command to resume)" in capsys.readouterr().out
    assert fineweb.main(args) == 0
    assert folder_bytes(out) == folder_bytes(reference_run)
    written = int(capsys.readouterr().out.split("this run: ")[1].split(" tokens")[0].replace(",", ""))
    assert written <= len(corpus["tokens"]) - (kept - 1) * SHARD  # from the last kept shard on, not from shard 2


class Crash(BaseException):
    """A kill, at one step of a run."""


def test_a_crash_at_any_step_of_a_rewrite(corpus, reference_run, tmp_path, monkeypatch):
    """A rerun that finds a damaged shard near the end writes the manifest and renames each new shard over the old
    one. Crashed before each of those steps in turn, it leaves a folder that a rerun completes to what an
    uninterrupted rerun writes; and no shard goes before its new one is there."""
    n = len(shard_files(reference_run))
    damaged = tmp_path / "damaged"
    shutil.copytree(reference_run, damaged)
    victim = damaged / fineweb.shard_name("edufineweb", n - 4)
    arr = np.load(victim)
    arr[5] = (int(arr[5]) + 1) % 50000
    np.save(victim, arr)
    extra = ["--workers", "1"]
    names = [fineweb.shard_name("edufineweb", i) for i in range(n)]
    steps, crash_at = [], [None]
    replace, remove, save_manifest = os.replace, os.remove, fineweb.save_manifest

    def step(kind, path):
        steps.append((kind, os.path.basename(path)))
        if len(steps) - 1 == crash_at[0]:
            raise Crash

    def shard_step(kind, real):
        def op(*paths):
            if paths[-1].endswith(".npy"):  # a shard renamed or removed (not a temporary, not the manifest)
                step(kind, paths[-1])
            return real(*paths)
        return op

    def manifest_step(out_dir, manifest):
        step("save", "manifest.json")
        save_manifest(out_dir, manifest)

    monkeypatch.setattr(os, "replace", shard_step("replace", replace))
    monkeypatch.setattr(os, "remove", shard_step("remove", remove))
    monkeypatch.setattr(fineweb, "save_manifest", manifest_step)

    clean = tmp_path / "clean"
    shutil.copytree(damaged, clean)
    assert run(corpus, clean, *extra) == 0
    want, plan = folder_bytes(clean), list(steps)
    rewrite = [entry for i in range(n - 4, n) for entry in (("save", "manifest.json"), ("replace", names[i]))]
    assert plan == rewrite + [("save", "manifest.json")] * 2  # the remainder shard's entry, then complete
    np.testing.assert_array_equal(all_tokens(clean), corpus["tokens"])
    for k in range(len(plan)):
        out = tmp_path / f"crash_{k}"
        shutil.copytree(damaged, out)
        steps.clear()
        crash_at[0] = k
        with pytest.raises(Crash):
            run(corpus, out, *extra)
        crash_at[0] = None
        if k > 0:  # from the first manifest on, --verify sees a run to resume, not a damaged folder
            assert fineweb.main(["--verify", "--out_dir", str(out)]) == 0, k
        assert all(os.path.exists(out / name) for name in names)  # a shard goes only when its new one is whole
        assert run(corpus, out, *extra) == 0, k
        assert folder_bytes(out) == want, k


def test_a_refused_extension_keeps_the_finished_folder(tmp_path, monkeypatch, capsys):
    """Extending a finished --max_tokens run grows its remainder shard: the old one stays until the new one is
    whole. A source that changed since, or a full disk, stops the run with the folder complete as it was (the
    remainder shard was deleted first, and the manifest said incomplete)."""
    docs = [f"document {i}: " + "word " * (i % 40 + 10) for i in range(300)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out"
    args = ["--local_files", str(source), "--out_dir", str(out), "--shard_size", "2000", "--workers", "1"]
    assert fineweb.main([*args, "--max_tokens", "5000"]) == 0
    before = folder_bytes(out)
    assert [e["tokens"] for e in before[1]["shards"]] == [2000, 2000, 1000]
    end_doc, carry = before[1]["shards"][1]["end"]
    assert carry > 1  # the extension resumes inside a document whose first tokens are in shard 1: a change shows
    # the same size, other text: its modification time tells
    stamp = os.stat(source)
    source.write_text(source.read_text().replace("document", "Document"))
    with pytest.raises(SystemExit, match=f"{source} changed since the shards in {out} were made from it"):
        fineweb.main(args)
    assert folder_bytes(out) == before
    # and with the time put back, the tokens where the extension goes on tell
    os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    with pytest.raises(SystemExit, match=f"document {end_doc} no longer matches the end of edufineweb_train_000001"):
        fineweb.main(args)
    assert folder_bytes(out) == before
    # the source as it was, and a disk that fills up in the first new shard
    source.write_text(source.read_text().replace("Document", "document"))
    os.utime(source, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    monkeypatch.setattr(fineweb, "open", lambda path, mode="r", *a, **k: FullDisk(path, 1000)
                        if path.endswith("train_000002.npy.tmp") else open(path, mode, *a, **k), raising=False)
    with pytest.raises(SystemExit, match="edufineweb_train_000002.npy: No space left on device"):
        fineweb.main(args)
    monkeypatch.undo()
    assert folder_bytes(out) == before
    capsys.readouterr()
    assert fineweb.main(["--verify", "--out_dir", str(out)]) == 0
    assert capsys.readouterr().out.endswith(", complete\n")
    assert fineweb.main(args) == 0  # extended, at last
    np.testing.assert_array_equal(all_tokens(out), reference_tokens(docs))


# ----------------------------------------------------------------------------- the worker processes

def run_with_fineweb(tmp_path, code):
    """code as a script of its own, with fineweb imported: a hang or an exit it causes stays out of pytest."""
    script = tmp_path / "script.py"
    script.write_text(f"import sys\nsys.path.insert(0, {ROOT!r})\nimport fineweb\n{code}")
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)


def test_workers_results_errors_and_a_dead_worker():
    """Results come back whatever order they are asked for in; a worker's exception is one line; a worker
    that dies (as by the OOM killer) is an error, not a wait for ever."""
    pool = fineweb.Workers(2, "fork", None)
    try:
        jobs = {n: pool.submit(sum, range(n)) for n in range(0, 5000, 500)}
        bad = pool.submit(int, "x")
        for n in reversed(list(jobs)):
            assert pool.result(jobs[n]) == n * (n - 1) // 2
        with pytest.raises(RuntimeError, match=r"^ValueError: invalid literal for int\(\) with base 10: 'x'$"):
            pool.result(bad)
        with pytest.raises(RuntimeError, match="a worker process died"):
            pool.result(pool.submit(os._exit, 3))
    finally:
        pool.close()
    assert not any(p.is_alive() for p in pool.procs)
    pool = fineweb.Workers(1, "fork", None)
    try:  # more jobs than its pipes hold both ways (a footer per file of thousands): submit waits, no deadlock
        jobs = [pool.submit(abs, -i) for i in range(20_000)]
        assert [pool.result(job) for job in jobs] == list(range(20_000))
        with pytest.raises(RuntimeError, match="a worker process died"):
            pool.result(pool.submit(os._exit, 3))
        with pytest.raises(RuntimeError, match="a worker process died"):  # a job sent to a worker that is gone
            pool.result(pool.submit(sum, [1]))
    finally:
        pool.close()


def test_workers_stop_while_sending(tmp_path):
    """Workers stopped in the middle of sending results (Ctrl-C or --max_tokens while tasks run) leave
    nothing waiting: the process exits at once. (ProcessPoolExecutor's result thread hung the exit here.)"""
    result = run_with_fineweb(tmp_path, """import time
import numpy as np
pool = fineweb.Workers(2, "fork", None)
jobs = [pool.submit(np.ones, 50_000_000, np.uint16) for _ in range(4)]  # 100 MB each, far more than a pipe holds
time.sleep(1)  # both workers are blocked part way through sending: nobody reads their pipes
pool.close()
print("closed")
""")
    assert result.returncode == 0 and result.stdout == "closed\n", result.stderr


def test_workers_stopped_as_they_start(tmp_path):
    """A pool stopped right after it starts (a bad first file, an early Ctrl-C), while the main process has
    its Ctrl-C/SIGTERM handler, which a new worker holds until it sets its own: no worker runs that handler
    (a traceback each) or outlives the stop (join() waited for ever)."""
    result = run_with_fineweb(tmp_path, """import signal
for sig in fineweb.STOP_SIGNALS:
    signal.signal(sig, fineweb.interrupt)
for _ in range(100):
    fineweb.Workers(2, "fork", None).close()
print("closed")
""")
    assert result.returncode == 0 and result.stdout == "closed\n" and result.stderr == "", result.stderr


def test_workers_that_cannot_start(corpus, tmp_path):
    """More workers than the open-file limit allows: one line saying so, the started ones stopped (a worker that
    failed to start was killed too: AttributeError)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc = subprocess.Popen([sys.executable, SCRIPT, "--local_files", *corpus["files"], "--out_dir", str(tmp_path),
                             "--workers", "200"], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard)))
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, err
    assert re.fullmatch(r"error: cannot start worker \d+: Too many open files; use fewer --workers",
                        one_error_line(err)), err
    assert not live_in_session(proc.pid)
    assert os.listdir(tmp_path) == []


def test_the_callers_signal_handlers_come_back(corpus, tmp_path):
    """fineweb.main in a caller's process (a notebook, a bench) hands back its Ctrl-C and SIGTERM handlers:
    left installed, they ignored every later Ctrl-C, and a forked pool's workers survived SIGTERM."""
    def handlers():
        return [signal.getsignal(s) for s in fineweb.STOP_SIGNALS]
    before = handlers()
    assert run(corpus, tmp_path, "--max_tokens", "25000") == 0  # stops while tasks run
    assert handlers() == before


# ----------------------------------------------------------------------------- spawn, options

def test_spawn_start_method(corpus, reference_run, tmp_path):
    result = run_script(["--local_files", *corpus["files"], "--out_dir", str(tmp_path), "--shard_size", str(SHARD),
                         "--workers", "2", "--start_method", "spawn"])
    assert result.returncode == 0, result.stderr
    assert "done: " in result.stdout
    assert folder_bytes(tmp_path) == folder_bytes(reference_run)


def test_help_lists_the_options():
    result = run_script(["--help"])
    assert result.returncode == 0
    for option in ["--remote_name", "--dataset", "--out_dir", "--shard_size", "--workers", "--local_files",
                   "--max_tokens", "--verify"]:
        assert option in result.stdout


@pytest.mark.parametrize("argv,out_dir", [
    ([], "edu_fineweb10B"),
    (["--remote_name", "sample-100BT"], "edu_fineweb100B"),
    (["--dataset", "fineweb", "--remote_name", "sample-350BT"], "fineweb350B"),
    (["--remote_name", "CC-MAIN-2024-10"], "edu_fineweb_CC-MAIN-2024-10"),
    (["--local_files", "x.parquet"], "fineweb_local"),
    (["--out_dir", "mine"], "mine"),
])
def test_default_out_dir(argv, out_dir):
    assert fineweb.parse_args(argv).out_dir == out_dir


# ----------------------------------------------------------------------------- bad input (the rest: test_bad_input.py)

@pytest.fixture
def local_hub(monkeypatch):
    """The hub's address, pointed at a server here that answers every request with 503 and records its path
    (or, with refuse(), at a port where nothing listens): the real download path runs up to the network."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import datasets.config
    import huggingface_hub.constants as hub
    import huggingface_hub.utils._http as http
    paths = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self):
            paths.append(self.path)
            self.send_response(503)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def point_at(url):
        monkeypatch.setattr(hub, "ENDPOINT", url)
        monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(datasets.config, "HF_ENDPOINT", url)

    def refuse():
        with socket.socket() as s:  # a port that was free a moment ago: connections to it are refused
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        point_at(f"http://127.0.0.1:{port}")

    monkeypatch.setattr(http.time, "sleep", lambda s: None)  # skip the retry back-off
    point_at(f"http://127.0.0.1:{server.server_port}")
    yield paths, refuse
    server.shutdown()


@pytest.mark.parametrize("dataset,name", [("fineweb-edu", "HuggingFaceFW/fineweb-edu"),
                                          ("fineweb", "HuggingFaceFW/fineweb")])
@pytest.mark.parametrize("hub", ["unavailable", "unreachable"])
def test_a_hub_that_fails(tmp_path, local_hub, monkeypatch, dataset, name, hub):
    """The real download path, up to the network call: it asks the hub for the dataset (streamed: 10B tokens of
    text need not sit on disk beside their shards), fails in one line and writes nothing."""
    import datasets
    paths, refuse = local_hub
    if hub == "unreachable":
        refuse()
    asked, load_dataset = [], datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append((a, k)) or load_dataset(*a, **k))
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--dataset", dataset, "--out_dir", str(tmp_path / "out")])
    msg = str(e.value.code)
    assert msg.startswith(f"error: cannot open {name} (sample-10BT): ") and "\n" not in msg, msg
    if hub == "unreachable":
        assert "Couldn't reach" in msg, msg
    else:
        assert f"/datasets/{name}/resolve/main/README.md" in paths, paths
    assert asked == [((name,), {"name": "sample-10BT", "split": "train", "streaming": True})]
    assert not os.path.exists(tmp_path / "out")


def test_a_json_array_file_is_checked_as_a_jsonl_file_is(tmp_path):
    """datasets reads a file that is one JSON array whole, and wrote texts of mixed types each as its JSON text
    (quotes and all), and changed a lone surrogate, exit 0; the rows are checked as a jsonl file's lines are."""
    for name, rows, message in [("mixed", [{"text": "a"}, {"text": 5}, {"text": "b"}], "object 2: 'text' holds int"),
                                ("nested", [{"text": {"a": 1}}, {"text": "b"}], "object 1: 'text' holds dict"),
                                ("surrogate", [{"text": "a \ud800 b"}], "object 1: 'text' is not valid Unicode")]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows))
        with pytest.raises(SystemExit, match=re.escape(message)):
            fineweb.main(["--local_files", str(path), "--out_dir", str(tmp_path / name), "--workers", "1"])
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"text": "a"}, {"text": None}, {"text": "b ünï"}]))
    assert fineweb.main(["--local_files", str(good), "--out_dir", str(tmp_path / "good"), "--workers", "1"]) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "good"), reference_tokens(["a", None, "b ünï"]))


def test_parquet_row_groups_of_no_rows_and_string_view_texts(tmp_path):
    docs = [f"document {i}" for i in range(30)]
    with pq.ParquetWriter(tmp_path / "gaps.parquet", pa.schema([("text", pa.string())])) as writer:
        for piece in (docs[:10], [], docs[10:]):  # what writing an empty table makes
            writer.write_table(pa.table({"text": pa.array(piece, pa.string())}))
    with pytest.raises(SystemExit, match="gaps.parquet has a row group of 0 rows, which datasets cannot stream"):
        fineweb.main(["--local_files", str(tmp_path / "gaps.parquet"), "--out_dir", str(tmp_path / "a")])
    assert not os.path.exists(tmp_path / "a")  # refused before anything is written
    pq.write_table(pa.table({"text": pa.array(docs, pa.string_view())}), tmp_path / "view.parquet")
    assert fineweb.main(["--local_files", str(tmp_path / "view.parquet"), "--out_dir", str(tmp_path / "b"),
                         "--shard_size", "50", "--workers", "1"]) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "b"), reference_tokens(docs))


def test_the_output_folder_in_the_sources_glob_and_other_shards_in_it(tmp_path, capsys):
    (tmp_path / "docs.json").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)))
    args = ["--local_files", str(tmp_path / "*.json"), "--out_dir", str(tmp_path), "--shard_size", "50",
            "--workers", "1"]
    assert fineweb.main(args) == 0
    assert fineweb.main(args) == 0  # its manifest.json is no source of the rerun
    assert "already complete" in capsys.readouterr().out
    np.save(tmp_path / "mine_train_000001.npy", np.arange(10, dtype=np.uint16))  # train_gpt2.py would read it too
    with pytest.raises(SystemExit, match="mine_train_000001.npy is a shard of another prefix, which train_gpt2.py"):
        fineweb.main(args)


def test_one_run_at_a_time_and_no_verify_while_it_writes(corpus, reference_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference_run, out)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out)!r}, os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"  # a run writing to the folder holds this lock
        with pytest.raises(SystemExit, match=f"another run is writing to {out}: verify it when that run has ended"):
            fineweb.main(["--verify", "--out_dir", str(out)])
        with pytest.raises(SystemExit, match=f"another run is writing to {out}: wait for it to end"):
            run(corpus, out)
    finally:
        holder.kill()
        holder.wait()
    assert folder_bytes(out) == folder_bytes(reference_run)
    assert fineweb.main(["--verify", "--out_dir", str(out)]) == 0


def test_a_json_text_that_turns_into_a_number(tmp_path):
    """datasets types a json file's columns by its first 10 MB and casts the rest to them: a number after that
    was tokenized as its JSON text (quoted strings around it), exit 0. Each line is checked."""
    source = tmp_path / "late.jsonl"
    with open(source, "w") as f:
        for i in range(11):  # 11 MB of strings
            f.write(json.dumps({"text": f"document {i}" + " word" * 200_000}) + "\n")
        f.write('{"text": 12345}\n{"text": "tail"}\n')
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--local_files", str(source), "--out_dir", str(tmp_path / "out"), "--workers", "1"])
    assert e.value.code == f"error: cannot read or tokenize {source}: ValueError: line 12: 'text' holds int, not a string"
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("table,problem", [
    (pa.table({"text": pa.array([1, 2], pa.int64())}), ": column 'text' holds int64, not strings"),
    (pa.table({"body": ["a", "b"]}), " has no 'text' column (columns: body)")])
def test_a_later_parquet_file_without_string_texts(corpus, tmp_path, table, problem):
    """datasets casts each parquet file to the first one's columns: a later file's int64 texts became digits
    (exit 0), and one without texts failed after shards were written. Every file's footer is checked first."""
    parts = sorted(glob.glob(corpus["files"][0]))
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(SystemExit) as e:
        fineweb.main(["--local_files", parts[0], str(tmp_path / "bad.parquet"), "--out_dir", str(tmp_path / "out")])
    assert e.value.code == f"error: {tmp_path / 'bad.parquet'}{problem}"
    assert not os.path.exists(tmp_path / "out")


def test_dictionary_encoded_texts_read_as_plain_ones(tmp_path):
    """pandas and polars write a categorical column dictionary-encoded: its values are strings all the same."""
    docs = ["the same text", "another one", "the same text"]
    pq.write_table(pa.table({"text": pa.array(docs).dictionary_encode()}), tmp_path / "dict.parquet")
    assert fineweb.main(["--local_files", str(tmp_path / "dict.parquet"), "--out_dir", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(all_tokens(tmp_path / "out"), reference_tokens(docs))


def test_a_folder_that_cannot_be_written_fails_before_any_work(tmp_path):
    out = tmp_path / "out"
    (out / f".write_test{os.getpid()}").mkdir(parents=True)  # where the probe goes: writing it fails
    source = tmp_path / "doc.jsonl"
    source.write_text('{"text": "a document"}\n')
    with pytest.raises(SystemExit, match=f"error: cannot write to {out}: Is a directory"):
        fineweb.main(["--local_files", str(source), "--out_dir", str(out)])
    assert os.listdir(out) == [f".write_test{os.getpid()}"]
