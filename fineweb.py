"""FineWeb-Edu (or FineWeb) -> GPT-2 token shards for train_gpt2.py.

    python fineweb.py                       # sample-10BT -> edu_fineweb10B/, ~10B tokens, 100 shards
    python fineweb.py --max_tokens 1e9      # a quick subset
    python fineweb.py --local_files 'corpus/*.parquet' --out_dir my_shards
    python fineweb.py --verify              # check a folder against its manifest

Shards are edufineweb_{val|train}_{index:06d}.npy (fineweb_... for --dataset fineweb): uint16,
--shard_size tokens each, the last one holding the remainder; shard 0 is val. Every document is
<|endoftext|> (50256) followed by its encode_ordinary tokens, and documents run on across shard
boundaries in dataset order.

The dataset is streamed (datasets streaming), so disk holds only the shards. The work is split
into tasks of a few parquet row groups each, in dataset order; each worker process streams its
task's documents itself and returns one uint16 array, which the main process writes straight into
the shard file (temporary name; fsync and rename on a thread). manifest.json records per shard its
token count, checksum and where it starts and ends as [document index, token offset into that
document], so a rerun after an interruption verifies the finished shards and continues exactly
where they end: the same bytes as an uninterrupted run. A rerun removes no shard before its replacement is
whole: it renames each new shard over the one of that name, and removes those beyond its end when it finishes.
"""
import argparse
import ctypes
import fcntl
import glob
import gzip
import io
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash  # a dependency of datasets

EOT = 50256  # <|endoftext|>, opens every document
EOT_ARRAY = np.array([EOT], np.uint32)
# --dataset -> (hub id, shard file prefix, default folder prefix)
DATASETS = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "edufineweb", "edu_fineweb"),
    "fineweb": ("HuggingFaceFW/fineweb", "fineweb", "fineweb"),
}
CONFIG_RE = re.compile(r"sample-(\d+)BT|default|CC-MAIN-\d{4}-\d{2}")
LOCAL_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".json.gz": "json", ".jsonl.gz": "json"}
MANIFEST = "manifest.json"
GROUPS_PER_TASK = 4  # ~4M tokens of FineWeb per task: few tasks for the main process, bounded memory


def fail(msg):
    raise SystemExit(f"error: {msg}")


def one_line(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- arguments

def count(text):
    """An integer count that may be written as 1e8."""
    try:
        value = int(text) if text.isdigit() else int(float(text))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a number: {text}")
    if value < 1 or (not text.isdigit() and float(text) != value):
        raise argparse.ArgumentTypeError(f"need a positive whole number, got {text}")
    return value


def usage_error(msg):
    print(f"error: {msg} (see --help)", file=sys.stderr)
    sys.exit(2)


def parse_args(argv):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = usage_error  # one line on stderr, not usage + message
    p.add_argument("--dataset", default="fineweb-edu", help="fineweb-edu (default) or fineweb")
    p.add_argument("--remote_name", default="sample-10BT",
                   help="hub config: sample-10BT (default), sample-100BT, sample-350BT, default, or a dump "
                        "such as CC-MAIN-2024-10")
    p.add_argument("--out_dir", help="output folder; default edu_fineweb{N}B for fineweb-edu sample-{N}BT "
                   "(fineweb{N}B for fineweb), {edu_fineweb|fineweb}_{config} for other configs, "
                   "fineweb_local with --local_files")
    p.add_argument("--shard_size", type=count, default=10**8, help="tokens per shard (default 1e8)")
    p.add_argument("--workers", type=count, default=cores,
                   help=f"tokenizer processes (default: the {cores} usable cores)")
    p.add_argument("--local_files", nargs="+", metavar="FILE",
                   help="read local parquet/json/jsonl files (json also gzipped) or globs with a 'text' column instead "
                   "of the hub (parquet is read a few row groups at a time by each worker; a json file is read whole "
                   "by one)")
    p.add_argument("--max_tokens", type=count, help="stop after this many tokens (a quick subset)")
    p.add_argument("--verify", action="store_true", help="check the shards in --out_dir against the manifest")
    p.add_argument("--start_method", choices=["fork", "spawn", "forkserver"],
                   help="multiprocessing start method (default: the platform's)")
    args = p.parse_args(argv)
    if args.shard_size > 10**12:  # 2 TB per shard: a typo, not a plan
        usage_error("argument --shard_size: at most 1e12 tokens")
    if args.dataset not in DATASETS:
        usage_error(f"unknown --dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    config = CONFIG_RE.fullmatch(args.remote_name)
    if not args.local_files and not config:
        usage_error(f"unknown --remote_name {args.remote_name!r} for {args.dataset}; use sample-10BT, "
                    "sample-100BT, sample-350BT, default or a dump such as CC-MAIN-2024-10")
    if args.out_dir is None:
        folder = DATASETS[args.dataset][2]
        if args.local_files:
            args.out_dir = "fineweb_local"
        elif config.group(1):
            args.out_dir = f"{folder}{config.group(1)}B"
        else:
            args.out_dir = f"{folder}_{args.remote_name}"
    return args


# ----------------------------------------------------------------------------- source

def describe_source(args):
    """What the shards are made from, as the manifest records it (a resume must read the same)."""
    if not args.local_files:
        return {"dataset": DATASETS[args.dataset][0], "config": args.remote_name}
    files = []
    manifest = os.path.realpath(os.path.join(args.out_dir, MANIFEST))  # a glob over the folder would take it in
    for pattern in args.local_files:
        matches = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern))  # a file named a[1].json
        matches = [f for f in matches if os.path.realpath(f) != manifest]
        if not matches:
            fail(f"no file matches {pattern}")
        files += matches
    twice = next((f for i, f in enumerate(files) if os.path.realpath(f) in map(os.path.realpath, files[:i])), None)
    if twice:  # overlapping globs: its documents would be in the shards twice
        fail(f"{twice} is named twice in --local_files")
    formats = set()
    for f in files:
        if not os.path.isfile(f):
            fail(f"{f} is not a file")
        kind = next((k for ext, k in LOCAL_FORMATS.items() if f.endswith(ext)), None)
        if kind is None:
            fail(f"{f}: unsupported file type; use .parquet, .json, .jsonl, .json.gz or .jsonl.gz")
        if f.endswith(".gz") and any(c in os.path.basename(f) for c in "[]"):  # fsspec's URL of the unzipped file
            fail(f"{f}: datasets cannot stream a compressed file with [ or ] in its name; rename it, or gunzip it")
        formats.add(kind)
    if len(formats) > 1:
        fail("--local_files mixes parquet and json files; convert them to one format")
    kind = formats.pop()
    empty = [f for f in files if holds_no_rows(f, kind)]
    for f in empty:
        print(f"note: {f} holds no rows; skipped", file=sys.stderr)
    files = [f for f in files if f not in empty]
    if not files:
        fail("the source holds no documents")
    # size and modification time tell a file changed since its shards were made (a rerun would mix the two)
    return {"format": kind, "files": [os.path.abspath(f) for f in files], "sizes": [os.path.getsize(f) for f in files],
            "mtimes": [os.stat(f).st_mtime_ns for f in files]}


def holds_no_rows(path, kind):
    """Whether a local file is empty: datasets cannot read one (and it adds no documents anyway). An unreadable
    file counts as not empty: reading it fails later, with its own error.
    A parquet file's footer also gives its columns, checked here for every file: datasets casts each file to
    the first one's columns, which made a later file's int64 texts digits, and one without texts empty documents."""
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq
            footer = pq.ParquetFile(path)
        else:
            with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                while chunk := f.read(1 << 16):  # nothing but whitespace, however much of it
                    if chunk.strip():
                        return False
                return True
    except Exception:
        return False
    schema, rows = footer.schema_arrow, footer.metadata.num_rows
    if rows and any(footer.metadata.row_group(i).num_rows == 0 for i in range(footer.num_row_groups)):
        fail(f"{path} has a row group of 0 rows, which datasets cannot stream: rewrite it without "
             "(pyarrow: pq.write_table(pq.read_table(f), f))")
    if rows:
        text = schema.field("text").type if "text" in schema.names else None
        text = getattr(text, "value_type", text)  # dictionary-encoded (pandas or polars categories): its values
        check_text_column(path, schema.names, str(text))
    return rows == 0


def check_text_column(where, columns, dtype):
    """Fail unless the columns hold 'text' of a string type (dtype, its type's name). null: a column of missing
    texts only, empty documents like any missing text."""
    if "text" not in columns:
        fail(f"{where} has no 'text' column (columns: {', '.join(columns)})")
    if dtype not in ("string", "large_string", "string_view", "null"):
        fail(f"{where}: column 'text' holds {dtype}, not strings")


def open_source(source):
    """The documents as a datasets streaming dataset with one column, text; nothing is read yet."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error lines would double the one-line errors below
    hub_logging.set_verbosity_error()  # (the hub's: a line per retry of a failed request)
    where = " ".join(source["files"][:1]) if "files" in source else f"{source['dataset']} ({source['config']})"
    try:
        if "files" in source:
            files = [glob.escape(f) for f in source["files"]]  # datasets expands patterns: these are file names
            ds = datasets.load_dataset(source["format"], data_files=files, split="train", streaming=True)
        else:  # the network call: streaming, so only metadata is fetched here
            ds = datasets.load_dataset(source["dataset"], name=source["config"], split="train", streaming=True)
    except Exception as e:
        fail(f"cannot open {where}: {one_line(e)}")
    if ds.features is not None:  # None: not known before reading
        text = ds.features.get("text")  # Json: of mixed types, which datasets quotes
        dtype = text.dtype if isinstance(text, datasets.Value) else f"{type(text).__name__} values"
        check_text_column(where, list(ds.features), dtype)
        if dtype == "null" and "files" in source:  # a first file of missing texts: datasets would cast the later
            features = ds.features.copy()          # files' texts to its null type, and fail
            features["text"] = datasets.Value("string")
            try:
                ds = datasets.load_dataset(source["format"], data_files=files, split="train", streaming=True,
                                           features=features)
            except Exception as e:
                fail(f"cannot open {where}: {one_line(e)}")
    return ds.select_columns(["text"])


# ----------------------------------------------------------------------------- workers
# The work is split into tasks of up to GROUPS_PER_TASK consecutive parquet row groups of one file
# (FineWeb's files hold 1,000 documents per row group; a json file is one task), in dataset order.
# Each worker streams its task's rows itself, so the main process never touches text: it only
# collects one token array per task.

_worker = {}


def init_worker(ds):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler (fork copies it)
    if sys.platform == "linux":  # die with the main process, even by kill -9: else a worker blocks for ever on a
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # full result pipe (1 = PR_SET_PDEATHSIG)
    _worker["ds"] = ds


def serve(conn, ds):
    """Worker: run each (function, args) that comes down the pipe, send back (True, result) or (False, error)."""
    init_worker(ds)
    while True:
        try:
            fn, args = conn.recv()
        except EOFError:  # the main process is gone
            return
        try:
            reply = True, fn(*args)
        except Exception as e:  # as one line: an exception may not pickle
            reply = False, one_line(e)
        conn.send(reply)


WORKER_DIED = "a worker process died (killed, or out of memory?)"
MAX_QUEUED = 64  # jobs sent to one worker and not yet answered


class Workers:
    """Worker processes, each fed through a pipe of its own that only the main thread reads.
    Not ProcessPoolExecutor or multiprocessing.Pool: a helper thread of theirs reads the results, and a
    worker stopped while it sends one (Ctrl-C, --max_tokens) leaves that thread waiting for ever for the
    rest, which hangs the exit. Here stopping is only: kill the workers, close the pipes."""

    def __init__(self, n, start_method, ds):
        ctx = mp.get_context(start_method)
        self.sent, self.replies, self.jobs, self.procs = {}, {}, 0, []  # sent: pipe -> its jobs, oldest first
        try:
            for _ in range(n):
                ours, theirs = ctx.Pipe()
                self.sent[ours] = deque()
                try:
                    proc = ctx.Process(target=serve, args=(theirs, ds), daemon=True)
                    proc.start()
                finally:
                    theirs.close()
                self.procs.append(proc)  # started: close() kills and joins only these
        except OSError as e:  # out of file descriptors or processes
            self.close()
            fail(f"cannot start worker {len(self.procs) + 1}: {e.strerror or e}; use fewer --workers")
        except BaseException:
            self.close()
            raise

    def submit(self, fn, *args):
        """Queue a call on the least busy worker; returns the job number to pass to result()."""
        # every worker has MAX_QUEUED jobs unanswered: take replies first, or with thousands of jobs (a footer per
        # file) a worker's two pipes could fill, each side waiting on the other
        while min(map(len, self.sent.values())) >= MAX_QUEUED:
            self.take_replies()
        conn = min(self.sent, key=lambda c: len(self.sent[c]))
        job, self.jobs = self.jobs, self.jobs + 1
        try:
            conn.send((fn, args))
            self.sent[conn].append(job)
        except OSError:  # that worker is gone
            self.replies[job] = False, WORKER_DIED
        return job

    def result(self, job):
        """The job's result, or RuntimeError with the worker's one-line error."""
        while job not in self.replies:
            self.take_replies()
        ok, value = self.replies.pop(job)
        if not ok:
            raise RuntimeError(value)
        return value

    def take_replies(self):
        """Wait for replies, and take in every one that is ready, so no worker waits on its pipe for long."""
        for conn in mp.connection.wait([c for c, jobs in self.sent.items() if jobs]):
            try:
                reply = conn.recv()
            except (EOFError, OSError):
                reply = False, WORKER_DIED
            self.replies[self.sent[conn].popleft()] = reply

    def close(self):
        """Stop at once, whatever the workers are doing (a worker stalled on the network must not hold up
        a stop). SIGKILL, not SIGTERM: a SIGTERM that lands while a new worker still has the main process's
        handler can be lost, and then join() waited for ever."""
        for proc in self.procs:
            proc.kill()
        for conn in self.sent:
            conn.close()
        for proc in self.procs:
            proc.join()


def file_part(f):
    """File f of the dataset, split into one shard per row group (cached: tasks come file by file)."""
    if _worker.get("file", (None,))[0] != f:
        ds = _worker["ds"]
        part = ds.shard(num_shards=ds.num_shards, index=f)
        _worker["file"] = (f, part.reshard())  # datasets 5.0+: a parquet file by row group (4.x kept it whole)
    return _worker["file"][1]


def file_label(source, f):
    """File f of the source, as error messages name it."""
    return source["files"][f] if "files" in source else f"file {f} of {source['dataset']} ({source['config']})"


def count_groups(f):
    return file_part(f).num_shards


def check_json_texts(path):
    """Worker: refuse a json file that holds a 'text' other than a string or null. datasets takes a json file's
    column types from its first 10 MB and casts the rest to them: a later number became its digits, and a
    later mix of types each text's JSON, quotes and all."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text")
            except (ValueError, AttributeError):  # not one object per line: one JSON document, which datasets
                return check_json_document(path)  # reads whole
            if text is not None and not isinstance(text, str):
                raise ValueError(f"line {number}: 'text' holds {type(text).__name__}, not a string")


def check_json_document(path):
    """Worker: the same for a json file that is one array of objects (datasets takes it that way); a text that is
    not valid Unicode (a lone surrogate) too, which datasets would change silently."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        try:
            rows = json.load(f)
        except ValueError:
            return  # not JSON: datasets' own error says so
    for number, row in enumerate(rows if isinstance(rows, list) else [], 1):
        text = row.get("text") if isinstance(row, dict) else None
        if text is not None and not isinstance(text, str):
            raise ValueError(f"object {number}: 'text' holds {type(text).__name__}, not a string")
        if text is not None and not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"object {number}: 'text' is not valid Unicode (a lone surrogate)")


def encode_task(f, runs, index, json_path=None):
    """Worker: run `index` of file f split into `runs` runs of row groups -> (uint16 tokens with
    <|endoftext|> before each document, cumulative token count at the end of each document).
    json_path: the file, when it is json, to check first."""
    if json_path and index == 0:
        check_json_texts(json_path)
    if "encoder" not in _worker:
        import tiktoken
        _worker["encoder"] = tiktoken.get_encoding("gpt2")
    encode, part = _worker["encoder"].encode_to_numpy, file_part(f)
    parts = []
    for table in part.shard(num_shards=runs, index=index).with_format("arrow").iter(batch_size=1024):
        for text in table.column("text").to_pylist():
            parts.append(EOT_ARRAY)
            # no special tokens allowed == encode_ordinary, minus a list of Python ints
            parts.append(encode(text or "", disallowed_special=()))  # a missing text is an empty document
    lengths = np.fromiter((len(p) + 1 for p in parts[1::2]), np.int64, len(parts) // 2)
    tokens = np.concatenate(parts).astype(np.uint16) if parts else np.empty(0, np.uint16)
    return tokens, np.cumsum(lengths)


# ----------------------------------------------------------------------------- shards and manifest

def shard_name(prefix, index):
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def save_manifest(out_dir, manifest):
    """Write the manifest under a temporary name, fsync, rename: it is always whole."""
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        fail(f"cannot write {path}: {e.strerror or e}")


def load_manifest(out_dir):
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read {path}: {one_line(e)}")
    problem = manifest_problem(manifest)
    if problem:
        fail(f"cannot read {path}: {problem}")
    return manifest


def manifest_problem(m):
    """What the code below could not work with in a manifest: a field missing or of another type; or None."""
    def counts(*values):
        return all(type(v) is int and v >= 0 for v in values)

    def pair(v):
        return isinstance(v, list) and len(v) == 2 and counts(*v)

    if not isinstance(m, dict) or not {"source", "prefix", "shard_size", "shards"} <= m.keys():
        return "fields are missing"
    sizes, stale, source = (m["shard_size"], m.get("groups_per_task", 1)), m.get("stale", []), m["source"]
    if not isinstance(source, dict) or not all(isinstance(source.get(k, []), list) for k in ("files", "sizes", "mtimes")):
        return "source is not what this script writes"
    if not (isinstance(m["prefix"], str) and counts(*sizes) and 0 not in sizes and isinstance(m["shards"], list)
            and isinstance(stale, list) and all(isinstance(n, str) for n in stale)):
        return "prefix, shard_size, groups_per_task, shards or stale is not what this script writes"
    for i, e in enumerate(m["shards"]):
        resume = e.get("resume") if isinstance(e, dict) else None
        if not (isinstance(resume, dict) and isinstance(e.get("file"), str) and isinstance(e.get("xxh3_64"), str)
                and counts(e.get("tokens"), resume.get("task"), resume.get("doc")) and pair(e.get("first"))
                and pair(e.get("end"))):
            return f"shard entry {i} is not what this script writes"
    return None


def locate(ends, p, first_doc):
    """[document, offset] of token p of a batch whose documents end at the cumulative counts ends."""
    j = int(np.searchsorted(ends, p, side="right"))
    return [first_doc + j, int(p - (ends[j - 1] if j else 0))]


def check_shard(out_dir, entry, index, prefix, shard_size):
    """What is wrong with one shard compared with its manifest entry, or None."""
    if entry["file"] != shard_name(prefix, index):
        return f"expected the name {shard_name(prefix, index)}"
    try:
        arr = np.load(os.path.join(out_dir, entry["file"]), mmap_mode="r")
    except FileNotFoundError:
        return "missing"
    except Exception as e:
        return f"unreadable ({one_line(e)})"
    if arr.dtype != np.uint16 or arr.ndim != 1 or len(arr) == 0:
        return f"holds {arr.dtype} of shape {arr.shape}, not 1-D uint16 tokens"
    if len(arr) != entry["tokens"] or len(arr) > shard_size:
        return f"holds {len(arr)} tokens, the manifest says {entry['tokens']} (shard size {shard_size})"
    if xxhash.xxh3_64_hexdigest(arr) != entry["xxh3_64"]:
        return "checksum differs from the manifest"
    if arr.max() > EOT:
        return f"token id {arr.max()} is beyond the GPT-2 vocabulary"
    (first_doc, first_off), (end_doc, _) = entry["first"], entry["end"]
    starts = end_doc - first_doc + (first_off == 0)  # documents whose <|endoftext|> lies in this shard
    if np.count_nonzero(arr == EOT) != starts:
        return f"holds {np.count_nonzero(arr == EOT)} <|endoftext|> tokens, the manifest says {starts} documents"
    return None


OUT_DIR_LOCK = {"fd": None}


def unlock_out_dir():
    if OUT_DIR_LOCK["fd"] is not None:
        os.close(OUT_DIR_LOCK["fd"])
        OUT_DIR_LOCK["fd"] = None


os.register_at_fork(after_in_child=unlock_out_dir)  # a forked worker must not keep the run's lock after it


def lock_out_dir(out_dir, exclusive):
    """One run at a time writes to a folder (a second would delete the first's temporaries), and --verify waits
    for none: it refuses while a run writes. Held until main() returns. No locks on the file system: no guard."""
    unlock_out_dir()
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        fail(f"another run is writing to {out_dir}: " + ("wait for it to end, or use another --out_dir" if exclusive
                                                          else "verify it when that run has ended"))
    except OSError:
        pass
    OUT_DIR_LOCK["fd"] = fd


def our_files(out_dir, prefix):
    """Shard files (and leftover temporaries) in out_dir with this prefix, as {name: index}."""
    pattern = re.compile(rf"{re.escape(prefix)}_(?:val|train)_(\d{{6}})\.npy(?:\.tmp)?")
    return {n: int(m.group(1)) for n in os.listdir(out_dir) if (m := pattern.fullmatch(n))}


def prepare(out_dir, prefix, source, args):
    """Start or resume the manifest: keep the finished shards that verify; the run writes on from where they end.
    Returns (manifest, done) where done means the folder already holds what was asked for.

    Nothing already written is removed here (only the temporaries of a killed run), and the manifest on disk is
    left as it is: a run that a later check refuses (the source changed, a full disk) leaves the folder as it
    found it. The shards from the first one that fails to verify on (and a remainder shard that grows) stay on
    disk as "stale" ones: the run renames each new shard over the stale one of the same name, and removes those
    beyond its end when it finishes (ShardWriter.finish, tokenize)."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {out_dir}: {e.strerror or e}")
    done, ours = False, our_files(out_dir, prefix)
    for name in ours:  # before anything is read or removed
        if os.path.isdir(os.path.join(out_dir, name)):
            fail(f"{os.path.join(out_dir, name)} is a folder, not a shard: move it out of {out_dir}")
    lock_out_dir(out_dir, exclusive=True)
    foreign = sorted(n for n in os.listdir(out_dir) if n not in ours and re.fullmatch(r".*_(train|val)_.*\.npy", n))
    if foreign:  # train_gpt2.py reads every *_train_*/*_val_* shard of a folder
        fail(f"{os.path.join(out_dir, foreign[0])} is a shard of another prefix, which train_gpt2.py would read with "
             f"these: move it out of {out_dir}, or use another --out_dir")
    old = load_manifest(out_dir) if os.path.exists(os.path.join(out_dir, MANIFEST)) else None
    if old is None and any(not n.endswith(".tmp") for n in ours):
        fail(f"{out_dir} holds shards but no {MANIFEST} (written by another tool?); use a fresh --out_dir")
    # ours: what the manifest lists, and the shard after those an unfinished run may have renamed but not yet
    # listed (ShardWriter.finish); any other shard is not ours, and a run writes nothing it does not list
    listed = ({e["file"] for e in old["shards"]} | set(old.get("stale", []))) if old else set()
    if old and not old.get("complete"):
        listed.add(shard_name(prefix, len(old["shards"])))
    for name in ours:
        if not name.endswith(".tmp") and name not in listed:
            fail(f"{os.path.join(out_dir, name)} is not in {MANIFEST}, but train_gpt2.py would read it: "
                 f"move it out of {out_dir}")
    if old is None or not (old["shards"] or old.get("stale")):  # nothing kept, nothing to keep
        manifest = {"source": source, "prefix": prefix, "shard_size": args.shard_size,
                    "tokenizer": "gpt2", "eot": EOT, "shards": []}
    else:
        was = old.get("source") or {}
        if "files" in source and was.get("files") == source["files"] and was != source:
            stamps = [list(zip(s.get("sizes", []), s.get("mtimes", []))) for s in (was, source)]
            changed = [f for f, a, b in zip(source["files"], *stamps) if a != b] or source["files"]
            fail(f"{changed[0]} changed since the shards in {out_dir} were made from it (its size or modification "
                 "time): use a fresh --out_dir")
        if [old.get(k) for k in ("source", "prefix", "shard_size")] != [source, prefix, args.shard_size]:
            fail(f"{out_dir} holds shards of another source, prefix or shard size; use a fresh --out_dir")
        kept = []
        for i, entry in enumerate(old["shards"]):
            problem = check_shard(out_dir, entry, i, prefix, args.shard_size)
            if problem:
                print(f"note: {entry['file']}: {problem}; rewriting from this shard on", file=sys.stderr)
                break
            kept.append(entry)
        total = sum(e["tokens"] for e in kept)
        done = len(kept) == len(old["shards"]) and old.get("complete") and (
            args.max_tokens == old.get("max_tokens") or
            (old.get("stopped") == "end of data" and (args.max_tokens or total) >= total))
        if not done:
            # shards are never cut shorter: counted from the manifest, so a damaged shard does not make the good
            # ones after it go (its rewrite goes back to where the folder ended)
            listed = max(total, sum(e["tokens"] for e in old["shards"]))
            if args.max_tokens and listed > args.max_tokens:
                fail(f"{out_dir} already holds {listed:,} tokens, more than --max_tokens {args.max_tokens}; "
                     "use a fresh --out_dir")
            if kept and kept[-1]["tokens"] < args.shard_size:
                kept.pop()  # the remainder shard of a shorter run: it grows now
        manifest = dict(old, shards=kept)
    for name in ours:
        if name.endswith(".tmp"):  # the shard a killed run was writing: never data
            try:
                os.remove(os.path.join(out_dir, name))
            except OSError as e:
                fail(f"cannot remove {os.path.join(out_dir, name)}: {e.strerror or e}")
    if not done:  # in memory only: ShardWriter.finish saves it before it renames the first new shard
        stale = sorted((n for n, i in ours.items() if not n.endswith(".tmp") and i >= len(manifest["shards"])),
                       key=ours.get)
        manifest.update(complete=False, stopped=None, max_tokens=args.max_tokens, stale=stale)
        probe = os.path.join(out_dir, f".write_test{os.getpid()}")
        try:  # a folder that cannot be written fails now, not after the first shard's worth of work
            open(probe, "wb").close()
            os.remove(probe)
        except OSError as e:
            fail(f"cannot write to {out_dir}: {e.strerror or e}")
    return manifest, done


def npy_header(n):
    """The .npy header of a 1-D uint16 array of n tokens: 128 bytes for any n, so the remainder
    shard can rewrite it in place."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<u2", "fortran_order": False, "shape": (n,)})
    return out.getvalue()


class ShardWriter:
    """Writes the workers' token arrays straight into shard files, in order (no copy into a buffer).
    A shard is written under a temporary name; a thread then fsyncs and renames it and records it in
    the manifest, while the main process goes on with the next shard."""

    def __init__(self, out_dir, manifest, thread):
        self.out_dir, self.manifest, self.thread = out_dir, manifest, thread
        self.size, self.index = manifest["shard_size"], len(manifest["shards"])
        self.file, self.fill, self.hash, self.first, self.last, self.pending = None, 0, None, None, None, None
        self.saved = False  # whether the manifest on disk is this run's yet

    def add(self, tokens, ends, first_doc, resume, lo, hi):
        """Write tokens[lo:hi] of a task whose documents start at index first_doc."""
        while lo < hi:
            if self.file is None:
                self.first = locate(ends, lo, first_doc)
                self.file, self.hash = self.guard(open, self.tmp_path(), "wb"), xxhash.xxh3_64()
                self.guard(self.file.write, npy_header(self.size))
            take = min(hi - lo, self.size - self.fill)
            self.guard(self.file.write, tokens[lo:lo + take].data)
            self.hash.update(tokens[lo:lo + take])
            self.fill, lo = self.fill + take, lo + take
            self.last = (ends, lo, first_doc, resume)
            if self.fill == self.size:
                self.close()

    def close(self):
        """Finish the shard being written: header, then fsync, rename and manifest on the thread."""
        if self.file is None:
            return
        ends, lo, first_doc, resume = self.last
        doc, off = locate(ends, lo - 1, first_doc)
        entry = {"file": shard_name(self.manifest["prefix"], self.index), "tokens": self.fill,
                 "xxh3_64": self.hash.hexdigest(),
                 "first": self.first, "end": [doc, off + 1], "resume": resume}
        if self.fill < self.size:  # the remainder shard
            self.guard(self.file.seek, 0)
            self.guard(self.file.write, npy_header(self.fill))
        self.wait()
        self.pending = self.thread.submit(self.finish, self.file, entry)
        self.file, self.fill, self.index = None, 0, self.index + 1

    def finish(self, file, entry):
        path = os.path.join(self.out_dir, entry["file"])
        try:
            with file:
                file.flush()
                os.fsync(file.fileno())
            if not self.saved:  # the first shard of this run is whole: now the manifest on disk (an earlier
                save_manifest(self.out_dir, self.manifest)  # run's, which may list this file) becomes this run's
                self.saved = True
            os.replace(file.name, path)  # over the stale shard of this name, if there is one
        except OSError as e:
            discard(file)
            fail(f"cannot write {path}: {e.strerror or e}")
        except SystemExit:  # the manifest could not be written: that error stands, the shard goes
            discard(file)
            raise
        # a kill before the save below leaves this shard on disk, one past the listed ones: prepare() counts it ours
        self.manifest["shards"].append(entry)
        if entry["file"] in self.manifest["stale"]:
            self.manifest["stale"].remove(entry["file"])
        save_manifest(self.out_dir, self.manifest)

    def tmp_path(self):
        return os.path.join(self.out_dir, shard_name(self.manifest["prefix"], self.index) + ".tmp")

    def guard(self, op, *args):
        """A file operation on the shard being written; on failure the partial shard goes."""
        try:
            return op(*args)
        except OSError as e:
            self.discard()
            fail(f"cannot write {self.tmp_path()[:-4]}: {e.strerror or e}")

    def discard(self):
        """Drop the unfinished shard (on error or interrupt); finished ones stay."""
        discard(self.file)
        self.file = None

    def wait(self):
        if self.pending is not None:
            self.pending.result()  # re-raises a write error here, in the main thread
            self.pending = None


def discard(file):
    if file is not None:
        try:
            file.close()
        except OSError:
            pass
        if os.path.exists(file.name):
            os.remove(file.name)


# ----------------------------------------------------------------------------- main loop

def tokenize(args, ds, manifest):
    """Run the row-group tasks through the worker pool into shards, from where the kept shards end."""
    from tqdm import tqdm
    kept = manifest["shards"]
    # a resume restarts at the task that holds the last kept token, [end_doc, carry - 1]
    task, doc = (kept[-1]["resume"]["task"], kept[-1]["resume"]["doc"]) if kept else (0, 0)
    end_doc, carry = kept[-1]["end"] if kept else (0, 0)
    # ... and that document's first `carry` tokens must equal the end of the last kept shard
    tail = np.array(np.load(os.path.join(args.out_dir, kept[-1]["file"]), mmap_mode="r")[-carry:]) if kept else None
    written = sum(e["tokens"] for e in kept)
    left = args.max_tokens - written if args.max_tokens else float("inf")
    docs, t0 = 0, time.time()
    pool = Workers(args.workers, args.start_method, ds)
    try:
        # reads each parquet footer, in parallel (the workers were forked before any thread started)
        groups = [pool.submit(count_groups, f) for f in range(ds.num_shards)]
        for f, job in enumerate(groups):
            try:
                groups[f] = pool.result(job)
            except RuntimeError as e:
                fail(f"cannot read {file_label(manifest['source'], f)}: {e}")
        if manifest.setdefault("row_groups", groups) != groups:
            fail("the source's files or row groups changed since the kept shards were written; use a fresh --out_dir")
        per_task = manifest.setdefault("groups_per_task", GROUPS_PER_TASK)  # the plan a resume continues
        tasks = [(f, -(-n // per_task), i) for f, n in enumerate(groups) for i in range(-(-n // per_task))]
        json_files = manifest["source"]["files"] if manifest["source"].get("format") == "json" else None
        with ThreadPoolExecutor(1) as thread, tqdm(total=args.max_tokens, initial=written, unit="tok",
                                                   unit_scale=True, dynamic_ncols=True) as bar:
            writer = ShardWriter(args.out_dir, manifest, thread)

            def take(t, job):
                nonlocal tail, left, docs, doc
                try:
                    tokens, ends = pool.result(job)
                except RuntimeError as e:
                    f, runs, i = tasks[t]
                    part = f" (part {i + 1} of {runs})" if runs > 1 else ""
                    fail(f"cannot read or tokenize {file_label(manifest['source'], f)}{part}: {e}")
                first_doc, doc, lo = doc, doc + len(ends), 0
                if tail is not None:  # the resumed task: skip what the kept shards hold
                    j = end_doc - first_doc
                    lo = (int(ends[j - 1]) if 0 < j <= len(ends) else 0) + carry
                    if not 0 <= j < len(ends) or lo > ends[j] or not np.array_equal(tokens[lo - len(tail):lo], tail):
                        fail(f"document {end_doc} no longer matches the end of {kept[-1]['file']} "
                             "(did the source change?); use a fresh --out_dir")
                    tail = None
                hi = int(min(len(tokens), lo + left))
                writer.add(tokens, ends, first_doc, {"task": t, "doc": first_doc}, lo, hi)
                left -= hi - lo
                if hi > lo:  # the documents with tokens in [lo, hi): --max_tokens or a resume writes part of a task
                    docs += min(int(np.count_nonzero(ends < hi)) + 1, len(ends)) - int(np.count_nonzero(ends <= lo))
                bar.update(hi - lo)
                bar.set_postfix_str(f"{docs / max(time.time() - t0, 1e-9):,.0f} docs/s", refresh=False)
                return left <= 0

            inflight, stopped = deque(), False
            try:
                for t in range(task, len(tasks)):
                    json_path = json_files[tasks[t][0]] if json_files else None  # checked by its first task
                    inflight.append((t, pool.submit(encode_task, *tasks[t], json_path)))
                    if len(inflight) > 2 * args.workers:  # bounded read-ahead: memory stays flat
                        stopped = take(*inflight.popleft())
                        if stopped:
                            break
                while inflight and not stopped:
                    stopped = take(*inflight.popleft())
                if tail is not None:
                    fail(f"the source ends before document {end_doc}, where the kept shards end; use a fresh --out_dir")
                writer.close()  # the remainder shard
                writer.wait()
            finally:
                writer.discard()  # a shard left unfinished by an error or an interrupt
    finally:
        pool.close()  # queued and running tasks are dropped
    if not manifest["shards"]:
        fail("the source holds no documents")
    for name in manifest.pop("stale"):  # stale shards beyond the end of this run; then the manifest says complete
        try:
            os.remove(os.path.join(args.out_dir, name))
        except FileNotFoundError:  # removed by a run killed before its manifest said so
            pass
        except OSError as e:
            fail(f"cannot remove {os.path.join(args.out_dir, name)}: {e.strerror or e}")
    manifest.update(complete=True, stopped="max_tokens" if stopped else "end of data")
    save_manifest(args.out_dir, manifest)
    return sum(e["tokens"] for e in manifest["shards"]) - written, docs, time.time() - t0


def verify(out_dir):
    """--verify: check every shard against the manifest and the manifest against itself."""
    if os.path.isdir(out_dir):
        lock_out_dir(out_dir, exclusive=False)
    manifest = load_manifest(out_dir)
    shards, size, prefix = manifest["shards"], manifest["shard_size"], manifest["prefix"]
    problems, end = [], None
    for i, entry in enumerate(shards):
        problem = check_shard(out_dir, entry, i, prefix, size)
        if problem is None and entry["first"] not in ([[0, 0]] if end is None else [end, [end[0] + 1, 0]]):
            problem = f"starts at [document, offset] {entry['first']}, but the previous shard ends at {end}"
        # the last shard may be short: the remainder of the data, or of --max_tokens (and of a run killed just after
        # writing it: the manifest is incomplete, and a rerun keeps it and goes on from its end)
        if problem is None and entry["tokens"] != size and i + 1 < len(shards):
            problem = f"holds {entry['tokens']} tokens; only the last shard may hold fewer than {size}"
        if problem:
            problems.append(f"{entry['file']}: {problem}")
        end = entry["end"]
    names = {e["file"] for e in shards} | set(manifest.get("stale", []))
    if not manifest.get("complete"):  # renamed by a killed run that had not yet listed it
        names.add(shard_name(prefix, len(shards)))
    # a .tmp is the shard a killed run was writing, a stale shard one that a rerun rewrites or removes
    problems += [f"{n}: not in the manifest" for n in sorted(our_files(out_dir, prefix))
                 if n not in names and not n.endswith(".tmp")]
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        fail(f"{len(problems)} problem(s) in {out_dir}")
    state = "complete" if manifest.get("complete") else "incomplete (rerun the same command to resume)"
    print(f"ok: {len(shards)} shards, {sum(e['tokens'] for e in shards):,} tokens in {out_dir}, {state}")
    return 0


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; kill, a stopped container or a preempted box


def interrupt(signum, frame):
    """SIGTERM (a stopped or preempted box) ends as cleanly as Ctrl-C; a second one waits for that cleanup."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None):
    try:
        return run(argv)
    finally:
        unlock_out_dir()


def run(argv=None):
    args = parse_args(argv)
    if args.verify:
        return verify(args.out_dir)
    prefix = DATASETS[args.dataset][1]
    source = describe_source(args)
    try:
        import tiktoken
        tiktoken.get_encoding("gpt2")  # fail here, not in every worker
    except Exception as e:
        fail(f"cannot load the GPT-2 tokenizer ({type(e).__name__}); offline, seed tiktoken's cache with "
             "tools/offline_tokenizer.py (README, 'Offline use')")
    ds = open_source(source)
    manifest, done = prepare(args.out_dir, prefix, source, args)
    if not done:
        handlers = {}
        try:
            if threading.current_thread() is threading.main_thread():
                handlers = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS}
            tokens, docs, seconds = tokenize(args, ds, manifest)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(manifest['shards'])} finished shards kept in {args.out_dir}; "
                  "rerun the same command to resume", file=sys.stderr)
            return 130
        finally:  # a caller in this process (a notebook, the bench) gets its own handlers back; cli() keeps
            for sig, handler in handlers.items():  # ignoring a second Ctrl-C until the process has exited
                if handler not in (None, interrupt):  # None: set outside Python, cannot be put back
                    signal.signal(sig, handler)
        print(f"this run: {tokens:,} tokens from {docs:,} documents in {seconds:.1f}s "
              f"({tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s, {args.workers} workers)")
    shards = manifest["shards"]
    if len(shards) == 1:
        print(f"note: all {shards[0]['tokens']:,} tokens went into the val shard; train_gpt2.py needs train shards "
              "too: use a smaller --shard_size", file=sys.stderr)
    print(f"{'done' if not done else 'already complete'}: {len(shards)} shards (1 val, {len(shards) - 1} train), "
          f"{sum(e['tokens'] for e in shards):,} tokens, {shards[-1]['end'][0] + 1:,} documents in {args.out_dir}")
    return 0


def cli(argv=None):
    """The command line: Ctrl-C or SIGTERM stops cleanly from the first moment, with exit code 130."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupt)
    try:
        return main(argv)
    except KeyboardInterrupt:  # before any shard was started
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
