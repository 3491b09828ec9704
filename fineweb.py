"""FineWeb-Edu (or FineWeb) -> GPT-2 token shards for train_gpt2.py.

    python fineweb.py                       # sample-10BT -> edu_fineweb10B/, ~10B tokens, 100 shards
    python fineweb.py --max_tokens 1e9      # a quick subset
    python fineweb.py --local_files 'corpus/*.parquet' --out_dir my_shards
    python fineweb.py --verify              # check a folder against its manifest

Shards are edufineweb_{val|train}_{index:06d}.npy (fineweb_... for --dataset fineweb): uint16,
--shard_size tokens each, the last one holding the remainder; shard 0 is val. Every document is
<|endoftext|> (50256) followed by its encode_ordinary tokens, and documents run on across shard
boundaries in dataset order.

The dataset is streamed, so disk holds only the shards. The main process reads batches of documents
and sends their raw utf-8 bytes to worker processes, which tokenize a whole batch and return one
uint16 array; the main process copies whole arrays into the shard buffer, and a thread writes each
full shard (temporary name, fsync, rename). manifest.json records per shard its token count, crc32
and where it starts and ends as [document index, token offset into that document], so a rerun after
an interruption verifies the finished shards and continues exactly where they end: the same bytes
as an uninterrupted run.
"""
import argparse
import glob
import json
import multiprocessing as mp
import os
import re
import sys
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

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
                   help="read local parquet/json/jsonl files or globs with a 'text' column instead of the hub")
    p.add_argument("--max_tokens", type=count, help="stop after this many tokens (a quick subset)")
    p.add_argument("--verify", action="store_true", help="check the shards in --out_dir against the manifest")
    p.add_argument("--batch_docs", type=count, default=512, help="documents per task sent to a worker")
    p.add_argument("--start_method", choices=["fork", "spawn", "forkserver"],
                   help="multiprocessing start method (default: the platform's)")
    args = p.parse_args(argv)
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
    for pattern in args.local_files:
        matches = sorted(glob.glob(pattern))
        if not matches:
            fail(f"no file matches {pattern}")
        files += matches
    formats = set()
    for f in files:
        if not os.path.isfile(f):
            fail(f"{f} is not a file")
        kind = next((k for ext, k in LOCAL_FORMATS.items() if f.endswith(ext)), None)
        if kind is None:
            fail(f"{f}: unsupported file type; use .parquet, .json or .jsonl")
        formats.add(kind)
    if len(formats) > 1:
        fail("--local_files mixes parquet and json files; convert them to one format")
    return {"format": formats.pop(), "files": [os.path.abspath(f) for f in files],
            "sizes": [os.path.getsize(f) for f in files]}


def open_source(source):
    """The documents as a datasets streaming dataset of arrow tables with one column, text."""
    import datasets
    datasets.disable_progress_bars()
    where = " ".join(source["files"][:1]) if "files" in source else f"{source['dataset']} ({source['config']})"
    try:
        if "files" in source:
            ds = datasets.load_dataset(source["format"], data_files=source["files"], split="train", streaming=True)
        else:  # the network call: streaming, so nothing but metadata is fetched here
            ds = datasets.load_dataset(source["dataset"], name=source["config"], split="train", streaming=True)
    except Exception as e:
        fail(f"cannot open {where}: {one_line(e)}")
    features = ds.features or {}
    if ds.features is not None and "text" not in features:
        fail(f"{where} has no 'text' column (columns: {', '.join(features)})")
    dtype = getattr(features.get("text"), "dtype", "string")
    if dtype not in ("string", "large_string"):
        fail(f"{where}: column 'text' holds {dtype}, not strings")
    return ds.select_columns(["text"]).with_format("arrow")


def read_batches(ds, batch_docs, start_doc, resume):
    """Yield (index of the first document, resume point before this batch, arrow text column)
    for the documents from start_doc on; resume = {"doc", "state"} is where reading may restart."""
    doc, state = 0, None
    if resume and resume["state"] is not None:
        try:
            ds.load_state_dict(resume["state"])
            doc, state = resume["doc"], resume["state"]
        except Exception as e:
            print(f"note: cannot restore the dataset position ({one_line(e)}); reading from the start", file=sys.stderr)
    try:
        for table in ds.iter(batch_size=batch_docs):
            skip = max(0, start_doc - doc)  # documents before start_doc are already in the shards
            if skip < len(table):
                yield doc + skip, {"doc": doc, "state": state}, table.column("text").slice(skip)
            doc += len(table)
            state = ds.state_dict()
    except Exception as e:
        fail(f"reading the source failed after document {doc}: {one_line(e)}")


def pack_texts(column):
    """An arrow string column -> (utf-8 bytes, int64 offsets) as numpy arrays. A pickled arrow
    slice would carry its whole parent buffer; this carries only its own bytes."""
    import pyarrow as pa
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.large_string())
    if arr.null_count:
        arr = arr.fill_null("")  # a missing text is an empty document
    _, offsets, data = arr.buffers()
    offsets = np.frombuffer(offsets, np.int32 if pa.types.is_string(arr.type) else np.int64)
    offsets = offsets[arr.offset:arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.empty(0, np.uint8)
    return data, offsets - offsets[0]


# ----------------------------------------------------------------------------- workers

_encoder = None


def encode_batch(data, offsets):
    """Worker: a batch of documents as utf-8 bytes + offsets -> (uint16 tokens with <|endoftext|>
    before each document, cumulative token count at the end of each document)."""
    global _encoder
    if _encoder is None:
        import tiktoken
        _encoder = tiktoken.get_encoding("gpt2")
    raw, bounds = memoryview(data.tobytes()), offsets.tolist()
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        parts.append(EOT_ARRAY)
        # no special tokens allowed == encode_ordinary, but without building a list of Python ints
        parts.append(_encoder.encode_to_numpy(str(raw[a:b], "utf-8", "replace"), disallowed_special=()))
    lengths = np.fromiter((len(p) + 1 for p in parts[1::2]), np.int64, len(parts) // 2)
    tokens = np.concatenate(parts).astype(np.uint16) if parts else np.empty(0, np.uint16)
    return tokens, np.cumsum(lengths)


# ----------------------------------------------------------------------------- shards and manifest

def shard_name(prefix, index):
    return f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.npy"


def write_atomic(path, write):
    """Write under a temporary name, fsync, rename: a final name never holds a partial file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"cannot write {path}: {e.strerror or e}")


def save_manifest(out_dir, manifest):
    write_atomic(os.path.join(out_dir, MANIFEST), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def load_manifest(out_dir):
    try:
        with open(os.path.join(out_dir, MANIFEST)) as f:
            manifest = json.load(f)
        fields = {"file", "tokens", "crc32", "first", "end", "resume"}  # what the code below relies on
        if not {"source", "prefix", "shard_size", "shards"} <= manifest.keys() or \
                any(not fields <= e.keys() for e in manifest["shards"]):
            raise ValueError("fields are missing")
        return manifest
    except (OSError, ValueError, AttributeError) as e:
        fail(f"cannot read {os.path.join(out_dir, MANIFEST)}: {one_line(e)}")


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
    if zlib.crc32(arr) != entry["crc32"]:
        return "checksum differs from the manifest"
    if arr.max() > EOT:
        return f"token id {arr.max()} is beyond the GPT-2 vocabulary"
    (first_doc, first_off), (end_doc, _) = entry["first"], entry["end"]
    starts = end_doc - first_doc + (first_off == 0)  # documents whose <|endoftext|> lies in this shard
    if np.count_nonzero(arr == EOT) != starts:
        return f"holds {np.count_nonzero(arr == EOT)} <|endoftext|> tokens, the manifest says {starts} documents"
    return None


def our_files(out_dir, prefix):
    """Shard files (and leftover temporaries) in out_dir with this prefix, as {name: index}."""
    pattern = re.compile(rf"{re.escape(prefix)}_(?:val|train)_(\d{{6}})\.npy(?:\.tmp)?")
    return {n: int(m.group(1)) for n in os.listdir(out_dir) if (m := pattern.fullmatch(n))}


def prepare(out_dir, prefix, source, args):
    """Start or resume the manifest: keep the finished shards that verify, drop what a rerun rewrites.
    Returns (manifest, done) where done means the folder already holds what was asked for."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the output folder {out_dir}: {e.strerror or e}")
    done = False
    if not os.path.exists(os.path.join(out_dir, MANIFEST)):
        if any(not n.endswith(".tmp") for n in our_files(out_dir, prefix)):
            fail(f"{out_dir} holds shards but no {MANIFEST} (written by another tool?); use a fresh --out_dir")
        manifest = {"source": source, "prefix": prefix, "shard_size": args.shard_size,
                    "tokenizer": "gpt2", "eot": EOT, "shards": []}
    else:
        manifest = load_manifest(out_dir)
        if (manifest.get("source"), manifest.get("prefix"), manifest.get("shard_size")) != (source, prefix, args.shard_size):
            fail(f"{out_dir} holds shards of another source, prefix or shard size; use a fresh --out_dir")
        kept = []
        for i, entry in enumerate(manifest["shards"]):
            problem = check_shard(out_dir, entry, i, prefix, args.shard_size)
            if problem:
                print(f"note: {entry['file']}: {problem}; rewriting from this shard on", file=sys.stderr)
                break
            kept.append(entry)
        total = sum(e["tokens"] for e in kept)
        done = len(kept) == len(manifest["shards"]) and manifest.get("complete") and (
            args.max_tokens == manifest.get("max_tokens") or
            (manifest.get("stopped") == "end of data" and (args.max_tokens or total) >= total))
        if not done:
            if kept and kept[-1]["tokens"] < args.shard_size:
                kept.pop()  # the remainder shard of a shorter run: it grows now
            if args.max_tokens and sum(e["tokens"] for e in kept) > args.max_tokens:
                fail(f"{out_dir} already holds more than --max_tokens {args.max_tokens} tokens; use a fresh --out_dir")
            manifest.update(shards=kept, complete=False, stopped=None)
    if not done:
        # shards beyond the kept ones and temporaries of a killed run are rewritten, byte for byte
        for name, index in our_files(out_dir, prefix).items():
            if index >= len(manifest["shards"]) or name.endswith(".tmp"):
                os.remove(os.path.join(out_dir, name))
        manifest["max_tokens"] = args.max_tokens
        save_manifest(out_dir, manifest)  # also proves the folder is writable before any work
    return manifest, done


class ShardWriter:
    """Copies token arrays into a shard buffer; a thread writes each full shard and then the manifest."""

    def __init__(self, out_dir, manifest, thread):
        self.out_dir, self.manifest, self.thread = out_dir, manifest, thread
        self.size, self.index = manifest["shard_size"], len(manifest["shards"])
        self.buf, self.fill, self.first, self.last, self.pending = None, 0, None, None, None

    def add(self, tokens, ends, first_doc, resume, lo, hi):
        """Copy tokens[lo:hi] of a batch whose documents start at index first_doc."""
        while lo < hi:
            if self.fill == 0:
                self.buf = np.empty(self.size, np.uint16) if self.buf is None else self.buf
                self.first = locate(ends, lo, first_doc)
            take = min(hi - lo, self.size - self.fill)
            self.buf[self.fill:self.fill + take] = tokens[lo:lo + take]
            self.fill, lo = self.fill + take, lo + take
            self.last = (ends, lo, first_doc, resume)
            if self.fill == self.size:
                self.close()

    def close(self):
        """Hand the filled buffer to the writer thread (after the previous shard is on disk)."""
        if self.fill == 0:
            return
        ends, lo, first_doc, resume = self.last
        doc, off = locate(ends, lo - 1, first_doc)
        entry = {"file": shard_name(self.manifest["prefix"], self.index), "tokens": self.fill,
                 "first": self.first, "end": [doc, off + 1], "resume": resume}
        self.wait()
        self.pending = self.thread.submit(self.write, self.buf[:self.fill], entry)
        self.buf, self.fill, self.index = None, 0, self.index + 1

    def write(self, tokens, entry):
        entry["crc32"] = zlib.crc32(tokens)
        write_atomic(os.path.join(self.out_dir, entry["file"]), lambda f: np.save(f, tokens))
        self.manifest["shards"].append(entry)
        save_manifest(self.out_dir, self.manifest)

    def wait(self):
        if self.pending is not None:
            self.pending.result()  # re-raises a write error here, in the main thread
            self.pending = None


# ----------------------------------------------------------------------------- main loop

def tokenize(args, ds, manifest):
    """Stream documents through the worker pool into shards, from where the kept shards end."""
    from tqdm import tqdm
    kept = manifest["shards"]
    start_doc, carry = kept[-1]["end"] if kept else (0, 0)
    resume = kept[-1]["resume"] if kept else None
    # the carried-over document's first tokens must equal the end of the last kept shard
    tail = np.load(os.path.join(args.out_dir, kept[-1]["file"]))[-carry:] if carry else None
    written = sum(e["tokens"] for e in kept)
    left = args.max_tokens - written if args.max_tokens else float("inf")
    docs, t0 = 0, time.time()
    ctx = mp.get_context(args.start_method)
    with ctx.Pool(args.workers) as pool, ThreadPoolExecutor(1) as thread, \
            tqdm(total=args.max_tokens, initial=written, unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        writer = ShardWriter(args.out_dir, manifest, thread)

        def take(first_doc, resume, job):
            nonlocal tail, left, docs
            try:
                tokens, ends = job.get()
            except Exception as e:
                fail(f"a tokenizer worker failed: {one_line(e)}")
            lo = 0
            if tail is not None:
                lo = min(carry, int(ends[0]))
                if lo != carry or not np.array_equal(tokens[carry - len(tail):carry], tail):
                    fail(f"document {first_doc} no longer matches the end of {kept[-1]['file']} "
                         "(did the source change?); use a fresh --out_dir")
                tail = None
            hi = int(min(len(tokens), lo + left))
            writer.add(tokens, ends, first_doc, resume, lo, hi)
            left -= hi - lo
            docs += len(ends)
            bar.update(hi - lo)
            bar.set_postfix_str(f"{docs / max(time.time() - t0, 1e-9):,.0f} docs/s", refresh=False)
            return left <= 0

        inflight, stopped = deque(), False
        for first_doc, resume, column in read_batches(ds, args.batch_docs, start_doc, resume):
            inflight.append((first_doc, resume, pool.apply_async(encode_batch, pack_texts(column))))
            if len(inflight) > 2 * args.workers:  # bounded read-ahead: memory stays flat
                stopped = take(*inflight.popleft())
                if stopped:
                    break
        while inflight and not stopped:
            stopped = take(*inflight.popleft())
        if tail is not None:
            fail(f"the source ends before document {start_doc}, where the kept shards end; use a fresh --out_dir")
        writer.close()  # the remainder shard
        writer.wait()
    if not manifest["shards"]:
        fail("the source holds no documents")
    manifest.update(complete=True, stopped="max_tokens" if stopped else "end of data")
    save_manifest(args.out_dir, manifest)
    return sum(e["tokens"] for e in manifest["shards"]) - written, docs, time.time() - t0


def verify(out_dir):
    """--verify: check every shard against the manifest and the manifest against itself."""
    manifest = load_manifest(out_dir)
    shards, size, prefix = manifest["shards"], manifest["shard_size"], manifest["prefix"]
    problems, end = [], None
    for i, entry in enumerate(shards):
        problem = check_shard(out_dir, entry, i, prefix, size)
        if problem is None and entry["first"] not in ([[0, 0]] if end is None else [end, [end[0] + 1, 0]]):
            problem = f"starts at [document, offset] {entry['first']}, but the previous shard ends at {end}"
        if problem is None and entry["tokens"] != size and (i + 1 < len(shards) or not manifest.get("complete")):
            problem = f"holds {entry['tokens']} tokens, but only the last shard of a finished run may hold fewer than {size}"
        if problem:
            problems.append(f"{entry['file']}: {problem}")
        end = entry["end"]
    names = {e["file"] for e in shards}
    problems += [f"{n}: not in the manifest" for n in sorted(our_files(out_dir, prefix)) if n not in names]
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        fail(f"{len(problems)} problem(s) in {out_dir}")
    state = "complete" if manifest.get("complete") else "incomplete (rerun the same command to resume)"
    print(f"ok: {len(shards)} shards, {sum(e['tokens'] for e in shards):,} tokens in {out_dir}, {state}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.verify:
        return verify(args.out_dir)
    prefix = DATASETS[args.dataset][1]
    source = describe_source(args)
    try:
        import tiktoken
        tiktoken.get_encoding("gpt2")  # fail here, not in every worker
    except Exception as e:
        fail(f"cannot load the GPT-2 tokenizer: {one_line(e)}")
    ds = open_source(source)
    manifest, done = prepare(args.out_dir, prefix, source, args)
    if not done:
        try:
            tokens, docs, seconds = tokenize(args, ds, manifest)
        except KeyboardInterrupt:
            print(f"\ninterrupted: {len(manifest['shards'])} finished shards kept in {args.out_dir}; "
                  "rerun the same command to resume", file=sys.stderr)
            return 130
        print(f"this run: {tokens:,} tokens from {docs:,} documents in {seconds:.1f}s "
              f"({tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s, {args.workers} workers)")
    shards = manifest["shards"]
    print(f"{'done' if not done else 'already complete'}: {len(shards)} shards (1 val, {len(shards) - 1} train), "
          f"{sum(e['tokens'] for e in shards):,} tokens, {shards[-1]['end'][0] + 1:,} documents in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
