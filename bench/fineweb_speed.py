"""Tokenization speed: fineweb.py against the straightforward process pool, same corpus, same cores.

Both read one local parquet corpus in the FineWeb-Edu schema (short documents made of the docstrings
of Python's standard library) through datasets streaming and write the same shards:

  baseline  pool.imap(encode one row, rows, chunksize=16): every row (all columns) is pickled to a
            worker, one uint16 array per document comes back, and the main process copies it into
            the shard buffer and updates the progress bar once per document.
  fineweb   fineweb.main(...): a task names up to 4 parquet row groups (FineWeb's files hold 1,000
            documents per row group; so does this corpus); the worker streams and tokenizes them
            and returns one uint16 array, which the main process writes straight into the shard.

Per run it reports wall-clock tokens/s, the main process's CPU time per document (all its threads,
less the fixed start-up cost measured on a one-row-group corpus; this is what caps a many-core
box) and the workers' tokens per CPU-second r. The main process keeps W workers busy while
W * r <= tokens per main-process CPU-second (M), so W workers project to min(W * r, M) tokens/s;
the target is >= 0.8 * W * r at W = 64. Counting every main-process thread against M is
conservative: the shard writes, checksums and pipe reads run outside the GIL, on other cores.

    python bench/fineweb_speed.py --tokens 2.4e7         # workers 1 and 2 (bench/RESULTS.md)
    python bench/fineweb_speed.py --workers 1 2 4 8 15 --tokens 4e7 --repeats 1 --json out.json
"""
import argparse
import ast
import contextlib
import glob
import json
import math
import multiprocessing as mp
import os
import platform
import random
import sys
import sysconfig
import tempfile
import time

import numpy as np
import xxhash

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fineweb  # noqa: E402

EOT = 50256


# ----------------------------------------------------------------------------- corpus

def docstring_paragraphs():
    """English prose that ships with every Python: the paragraphs of the stdlib's docstrings."""
    paragraphs = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paragraphs += [p.strip() for p in doc.split("\n\n") if p.strip()]
    return paragraphs


def make_corpus(path, tokens):
    """A parquet file of short documents (1-8 paragraphs each), repeated to about `tokens` tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import tiktoken
    paragraphs, rng, docs, i = docstring_paragraphs(), random.Random(0), [], 0
    while i < len(paragraphs):
        k = rng.randint(1, 8)
        docs.append("\n\n".join(paragraphs[i:i + k]))
        i += k
    enc = tiktoken.get_encoding("gpt2")
    per_pass = sum(len(t) + 1 for t in enc.encode_ordinary_batch(docs))
    docs = docs * max(1, -(-tokens // per_pass))
    n = len(docs)
    pq.write_table(pa.table({
        "text": docs, "id": [f"<urn:uuid:{i:08x}>" for i in range(n)], "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://docs.python.org/3/library/{i}.html" for i in range(n)],
        "token_count": [0] * n, "score": [3.0] * n}), path, row_group_size=1000)  # as FineWeb's files
    return n


# ----------------------------------------------------------------------------- baseline

_enc = None


def encode_row(row):
    """Baseline worker: one row in, one array of [EOT] + tokens out."""
    global _enc
    if _enc is None:
        import tiktoken
        _enc = tiktoken.get_encoding("gpt2")
    tokens = np.array([EOT] + _enc.encode_ordinary(row["text"]))
    return tokens.astype(np.uint16)


def baseline(corpus, out_dir, workers, shard_size):
    import datasets
    from tqdm import tqdm
    rows = datasets.load_dataset("parquet", data_files=[corpus], split="train", streaming=True)
    buf, fill, index, docs = np.empty(shard_size, np.uint16), 0, 0, 0

    def save(tokens):
        np.save(os.path.join(out_dir, fineweb.shard_name("edufineweb", index)), tokens)

    with mp.Pool(workers) as pool, tqdm(unit="tok", unit_scale=True) as bar:
        for tokens in pool.imap(encode_row, rows, chunksize=16):
            pos = 0
            while pos < len(tokens):
                take = min(len(tokens) - pos, shard_size - fill)
                buf[fill:fill + take] = tokens[pos:pos + take]
                fill, pos = fill + take, pos + take
                if fill == shard_size:
                    save(buf)
                    fill, index = 0, index + 1
            docs += 1
            bar.update(len(tokens))
        if fill:
            save(buf[:fill])
    return docs


def fineweb_main(corpus, out_dir, workers, shard_size):
    status = fineweb.main(["--local_files", corpus, "--out_dir", out_dir, "--shard_size", str(shard_size),
                           "--workers", str(workers)])
    if status == 130:  # it caught the Ctrl-C itself
        raise KeyboardInterrupt
    if status != 0:
        sys.exit(f"error: fineweb.py exited with {status} (see above)")
    with open(os.path.join(out_dir, "manifest.json")) as f:
        return json.load(f)["shards"][-1]["end"][0] + 1


# ----------------------------------------------------------------------------- measurement

def measure(method, corpus, workers, shard_size):
    """One run in a fresh folder: wall time, main-process CPU (all its threads), workers' CPU,
    and a checksum of the tokens in shard order."""
    with tempfile.TemporaryDirectory() as out_dir:
        before, wall, cpu = os.times(), time.perf_counter(), time.process_time()
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            docs = method(corpus, out_dir, workers, shard_size)
        wall, cpu, after = time.perf_counter() - wall, time.process_time() - cpu, os.times()
        files = sorted(glob.glob(os.path.join(out_dir, "*.npy")))  # val_000000 sorts after train_*
        tokens = np.concatenate([np.load(f) for f in files[-1:] + files[:-1]])
    workers_cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"method": method.__name__.replace("_main", ""), "workers": workers, "tokens": int(len(tokens)),
            "docs": docs, "wall_s": wall, "main_cpu_s": cpu, "workers_cpu_s": workers_cpu,
            "checksum": xxhash.xxh3_64_hexdigest(tokens)}


def best_of(repeats, method, corpus, startup_corpus, workers, shard_size):
    """The fastest of `repeats` runs, with the main process's marginal CPU: less a start-up run's."""
    run = min((measure(method, corpus, workers, shard_size) for _ in range(repeats)), key=lambda r: r["wall_s"])
    startup = min((measure(method, startup_corpus, workers, shard_size) for _ in range(repeats)),
                  key=lambda r: r["main_cpu_s"])
    run["main_cpu_marginal_s"] = run["main_cpu_s"] - startup["main_cpu_s"]
    run["main_us_per_doc"] = run["main_cpu_marginal_s"] / (run["docs"] - startup["docs"]) * 1e6
    run["worker_rate"] = run["tokens"] / run["workers_cpu_s"]  # r: tokens per worker CPU-second
    run["main_limit"] = run["tokens"] / run["docs"] / run["main_us_per_doc"] * 1e6  # M: tokens/s
    return run


def project(run, workers):
    """W workers' tokens/s as a fraction of W * r: the workers' rate unless the main process cannot keep up."""
    return min(workers * run["worker_rate"], run["main_limit"]) / (workers * run["worker_rate"])


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    import datasets
    import tiktoken
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} usable cores, Python {platform.python_version()}, tiktoken {tiktoken.__version__}, "
            f"datasets {datasets.__version__}, start method {mp.get_start_method()}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")  # one line, not the usage text
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    p.add_argument("--tokens", type=float, default=8e6, help="corpus size in tokens")
    p.add_argument("--shard_size", type=int, default=2 * 10**6)
    p.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest counts")
    p.add_argument("--corpus", help="reuse or keep this parquet file (made if missing)")
    p.add_argument("--json", help="also write the runs here")
    args = p.parse_args()
    if not math.isfinite(args.tokens):  # inf, nan (which passes any comparison below)
        sys.exit(f"error: --tokens {args.tokens}: need a finite number")
    if min(args.workers) < 1 or args.tokens < 1 or args.repeats < 1 or args.shard_size < 1:
        sys.exit("error: --workers, --tokens, --repeats and --shard_size must be positive")
    if args.tokens > 1e11 or args.shard_size > 10**9:  # the corpus and the baseline's shard buffer live in memory
        sys.exit("error: --tokens must be at most 1e11 and --shard_size at most 1e9")
    for flag, path in (("--json", args.json), ("--corpus", args.corpus)):  # now, not after the whole benchmark
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            sys.exit(f"error: {flag} {path}: no such folder")
        if path and os.path.exists(path) and not os.path.isfile(path):  # a FIFO would be read for ever
            sys.exit(f"error: {flag} {path} is not a regular file: name a file")
    if args.json:  # writable now, not after the whole benchmark
        try:
            existed = os.path.exists(args.json)
            open(args.json, "a").close()
            if not existed:
                os.remove(args.json)
        except OSError as e:
            sys.exit(f"error: cannot write --json {args.json}: {e.strerror or e}")
    with tempfile.TemporaryDirectory() as scratch:  # the made corpus goes with it, unless --corpus keeps it
        corpus = args.corpus or os.path.join(scratch, "corpus.parquet")
        if not os.path.exists(corpus):
            make_corpus(corpus, int(args.tokens))
        import pyarrow as pa
        import pyarrow.parquet as pq
        startup_corpus = os.path.join(scratch, "startup.parquet")  # the first row group: what every run pays once
        try:
            footer = pq.ParquetFile(corpus)
            text = footer.schema_arrow.field("text").type
            if footer.num_row_groups < 2:  # the first is the start-up corpus, measured apart from the rest
                sys.exit(f"error: --corpus {corpus} has {footer.num_row_groups} row group(s); the bench needs 2 or "
                         "more (pq.write_table(..., row_group_size=1000), as FineWeb's files)")
            pq.write_table(footer.read_row_group(0), startup_corpus)
            nulls = footer.read(columns=["text"]).column("text").null_count
        except KeyError:
            sys.exit(f"error: --corpus {corpus} has no 'text' column")
        except Exception as e:
            sys.exit(f"error: --corpus {corpus} is not a readable parquet file ({type(e).__name__})")
        text = text.value_type if pa.types.is_dictionary(text) else text  # dictionary-encoded: its values
        if not pa.types.is_string(text) and not pa.types.is_large_string(text):
            sys.exit(f"error: --corpus {corpus}: column 'text' holds {text}, not strings")
        if nulls:  # the baseline encodes each text as it is
            sys.exit(f"error: --corpus {corpus}: {nulls} of its texts are missing (null)")
        run_all(args, corpus, startup_corpus)


def run_all(args, corpus, startup_corpus):
    """Both methods at each worker count, then the table."""
    print(f"machine: {machine()}")
    runs = []
    for workers in args.workers:
        for method in (baseline, fineweb_main):  # interleaved, so drifting machine speed hits both alike
            best = best_of(args.repeats, method, corpus, startup_corpus, workers, args.shard_size)
            runs.append(best)
            print(f"  {best['method']:8s} workers {workers:2d}: {best['tokens'] / best['wall_s'] / 1e6:6.2f}M tok/s",
                  flush=True)
    if len({r["checksum"] for r in runs}) != 1:
        sys.exit("error: the runs wrote different tokens")
    first = runs[0]
    print(f"corpus: {first['docs']:,} documents, {first['tokens']:,} tokens "
          f"({first['tokens'] / first['docs']:.0f} tokens/document); both methods wrote identical tokens\n")
    print("| method | workers | tokens/s (wall) | main CPU per document | worker tokens per CPU-s (r) "
          "| main-process limit (M) | 64-worker projection |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['method']} | {r['workers']} | {r['tokens'] / r['wall_s'] / 1e6:.2f}M "
              f"| {r['main_us_per_doc']:.2f} us | {r['worker_rate'] / 1e6:.2f}M | {r['main_limit'] / 1e6:.0f}M tok/s "
              f"| {project(r, 64) * 64 * r['worker_rate'] / 1e6:.0f}M tok/s = {project(r, 64):.2f} x 64 r |")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "runs": runs}, f, indent=1)
        except OSError as e:  # a full disk
            sys.exit(f"error: cannot write --json {args.json}: {e.strerror or e}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
