"""
HellaSwag: the lecture's quality metric, scored in batches.

    python hellaswag.py -m gpt2                      # OpenAI's 124M through transformers: acc_norm ~0.2955
    python hellaswag.py -c log/model_19073.pt        # a checkpoint of train_gpt2.py
    python hellaswag.py -m gpt2 --data hellaswag_val.jsonl --limit 500 --device cuda --dtype bf16 --compile
    torchrun --standalone --nproc_per_node=8 hellaswag.py -c log/model_19073.pt   # examples split over GPUs

Each example is a context and 4 endings; the model scores each ending as a completion of the context
(context tokens + " " + ending tokens, cross-entropy over the ending tokens only) and predicts the ending
with the lowest loss. acc uses the summed loss; acc_norm the mean over the ending's tokens (the lecture's
token normalisation; the EleutherAI harness normalises by characters instead, so its numbers differ a little).

The validation split (10,042 examples) comes from the HF hub's parquet copy of "Rowan/hellaswag" and is
cached in ./hellaswag/ ($HELLASWAG_CACHE overrides), or from a local --data file: the original jsonl or
that parquet. Set $HF_ENDPOINT to use a hub mirror.
"""
import argparse
import contextlib
import http.client
import json
import math
import os
import signal
import urllib.request

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from train_gpt2 import (GPT, GPTConfig, HelpFormatter, UserError, autocast, autocast_dtype, first_line,
                        gpt2_tokenizer, load_checkpoint, load_sharded_state, nonfinite_weight, request_stop, run_cli,
                        setup_device, usage_error)

# where the hub keeps the auto-converted parquet of the dataset (the repo itself is a loading script)
HUB_FILE = "datasets/Rowan/hellaswag/resolve/refs%2Fconvert%2Fparquet/default/validation/0000.parquet"
CACHE_NAME = "hellaswag_val.parquet"
VOCAB = 50257  # real GPT-2 tokens; a model padded to 50304 has junk logits past these


# -----------------------------------------------------------------------------
# The data: read and check a jsonl or parquet file, download the hub copy once per node

def check_example(ex, where):
    """The fields scoring needs, checked, with the label as an int (the hub copy stores it as a string)."""
    if not isinstance(ex, dict):
        raise UserError(f"{where}: expected an object with ctx, endings and label")
    ctx, endings, label = ex.get("ctx"), ex.get("endings"), ex.get("label")
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{where}: 'endings' must be a list of 4 strings")
    # a number as a string: isdecimal, not isdigit (int() refuses "²"), and short (int() refuses 4300+ digits)
    if isinstance(label, str) and label.strip().isdecimal() and len(label) < 100:
        label = int(label)
    if isinstance(label, bool) or label not in (0, 1, 2, 3):
        raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3 (got {label!r})")
    return {"ctx": ctx, "endings": endings, "label": int(label)}  # 1.0 or a parquet Decimal('1'): an int


def read_examples(path):
    """Every example of a HellaSwag file: the original jsonl, or the hub's parquet (told apart by content)."""
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        raise UserError(f"HellaSwag file {path} is not a regular file")  # a pipe would be waited on for ever
    try:
        with open(path, "rb") as f:
            is_parquet = f.read(4) == b"PAR1"
        if is_parquet:
            import pyarrow.parquet as pq
            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as e:  # pyarrow's errors for a truncated or broken file
                raise UserError(f"{path}: not a readable parquet file ({first_line(e)})")
            return [check_example(row, f"{path}: row {i}") for i, row in enumerate(rows)]
        examples = []
        with open(path, "rb") as f:  # decoded line by line, so a byte that is not UTF-8 is named by its line
            for n, raw in enumerate(f, 1):
                try:  # -sig: a byte-order mark some editors write is no JSON
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}: not UTF-8 text, nor parquet (line {n}, byte {e.start + 1})")
                if not line.strip():
                    continue
                try:
                    ex = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
                    raise UserError(f"{path}: line {n} is not valid JSON")
                examples.append(check_example(ex, f"{path}: line {n}"))
        return examples
    except OSError as e:  # missing, a folder, unreadable; pyarrow's errors for broken parquet are OSErrors too
        raise UserError(f"cannot read HellaSwag file {path}: {e.strerror or first_line(e)}")


def download(path):
    """Fetch the hub's parquet to `path` atomically: a temporary file beside it, checked, then renamed."""
    url = f"{os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')}/{HUB_FILE}"
    folder = os.path.dirname(path) or "."
    made, parent = [], folder  # the folders this makes, innermost first: a failed download leaves none of them
    while parent and not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a UserError: under torchrun the other ranks are waiting for this one's outcome
        raise UserError(f"cannot create the HellaSwag cache folder {folder}: {e.strerror or e}: "
                        "set $HELLASWAG_CACHE to a folder that can be written, or pass --data (train_gpt2.py: "
                        "--hellaswag_data)")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        # URLError, HTTPError, timeouts, a full disk; a connection cut mid-file (HTTPException); a bad URL (ValueError)
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise UserError(f"cannot download HellaSwag from {url} ({getattr(e, 'reason', e)}): "
                            "pass a local copy (jsonl or parquet) with --data (train_gpt2.py: --hellaswag_data)")
        try:
            read_examples(tmp)  # a truncated or wrong file fails here, before it reaches the cache
        except UserError as e:
            raise UserError(f"the download from {url} is not a usable HellaSwag file ({e})")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        for new_folder in made:  # a failed download leaves nothing behind, not even the cache folder
            if not os.path.isdir(new_folder) or os.listdir(new_folder):
                break
            os.rmdir(new_folder)


def default_cache_dir():
    return os.environ.get("HELLASWAG_CACHE") or "hellaswag"  # set but empty: the default, not the current folder


def load_examples(data=None, cache_dir=None, limit=None):
    """The validation examples from `data` (a local file), or else from the hub copy cached in cache_dir.

    Under torchrun, local rank 0 of each node downloads while the other ranks wait at a barrier.
    """
    cached = data is None
    if cached:
        cache_dir = cache_dir or default_cache_dir()
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise UserError(f"the HellaSwag cache {cache_dir} is a file, not a folder: "
                            "set $HELLASWAG_CACHE to a folder")
        data = os.path.join(cache_dir, CACHE_NAME)
        error = None
        # one process per node downloads: the only one, or local rank 0 of a launch (setup_device checked it)
        downloads = not dist.is_initialized() or dist.get_world_size() == 1 or int(os.environ["LOCAL_RANK"]) == 0
        if downloads and not os.path.exists(data):
            try:
                download(data)
            except UserError as e:
                error = e  # raised after the barrier, so the waiting ranks are not left hanging
        if dist.is_initialized():
            dist.barrier()
        if error:
            raise error
        if not os.path.exists(data):
            raise UserError(f"local rank 0 did not download HellaSwag to {data}: see its error, or pass --data "
                            "(train_gpt2.py: --hellaswag_data)")
    try:
        examples = read_examples(data)[:limit]
        if not examples:
            raise UserError(f"{data} holds no HellaSwag examples")
    except UserError as e:
        if not cached:
            raise
        raise UserError(f"{e} (the cached hub copy: delete it to download it again)")
    return examples


# -----------------------------------------------------------------------------
# Scoring: each ending is a row of context + ending tokens; the loss counts the ending tokens only

def render_example(example, enc=None):
    """(tokens, mask, label): 4 rows of token ids of different lengths, mask 1 on the ending's tokens."""
    enc = enc or gpt2_tokenizer()
    ctx = enc.encode_ordinary(example["ctx"])
    tokens, mask = [], []
    for ending in example["endings"]:
        end = enc.encode_ordinary(" " + ending)  # the space belongs to the ending: GPT-2's tokens start with it
        tokens.append(ctx + end)
        mask.append([0] * len(ctx) + [1] * len(end))
    return tokens, mask, int(example["label"])  # the hub parquet holds it as a string


# Rows are right-padded to a multiple of 32 tokens (attention is causal, so padding after a row cannot
# change its scored positions), and every batch has the same number of rows. Specialised to each shape,
# a compiled model would compile once per padded length (HellaSwag needs about 8) and dynamo would give up
# at its recompile limit of 8, 2 of which the trainer uses for training and val. So the length is marked
# dynamic: one compilation serves every length (tests/test_hellaswag.py counts them).
PAD_TO = 32


def padded_length(n):
    return -(-n // PAD_TO) * PAD_TO


def make_batches(rows, batch_rows):
    """Lists of rows that share one padded length; batch_rows=0: the 4 rows of one example per batch."""
    if not batch_rows:
        return [rows[i:i + 4] for i in range(0, len(rows), 4)]
    by_length = {}
    for row in rows:
        by_length.setdefault(padded_length(len(row[2])), []).append(row)
    return [group[i:i + batch_rows] for _, group in sorted(by_length.items())
            for i in range(0, len(group), batch_rows)]


def forward_logits(model, idx, amp):
    with amp:
        out = model(idx)
    if isinstance(out, (tuple, list)):
        return out[0]  # our GPT returns (logits, loss)
    return getattr(out, "logits", out)  # transformers returns an output object


@torch.no_grad()
def score_endings(model, examples, device, amp=contextlib.nullcontext(), batch_size=None, progress=False,
                  sync_ranks=False, first=0, stride=1):
    """Summed loss and scored-token count of every ending: two (len(examples), 4) float64 CPU tensors.

    batch_size examples' worth of rows (4 each) go through one forward, padded to a fixed length and row
    count (each length's last batch gets empty rows), so a compiled model sees only a few shapes. batch_size=0
    is the lecture's way: one example per forward, its 4 rows padded to the longest of them. sync_ranks:
    every rank makes as many forwards as the busiest one (an FSDP model gathers its weights in each), and
    stops with the others. Example i is number first + stride * i of the whole set, as errors name it.
    """
    enc = gpt2_tokenizer()
    config = getattr(model, "config", None)  # ours has block_size, transformers' n_positions
    limit = next((n for n in (getattr(config, "block_size", None), getattr(config, "n_positions", None))
                  if n is not None), 1 << 30)  # a context of 0 is one, and scores nothing
    rows = []  # (example, ending, tokens, mask)
    for i, ex in enumerate(examples):
        tokens, mask, _ = render_example(ex, enc)
        rows += [(i, j, t, m) for j, (t, m) in enumerate(zip(tokens, mask))]
    too_long = [(i, sum(m)) for i, _, _, m in rows if sum(m) >= limit]  # an ending needs a token before it
    # a row longer than the model's context loses its first context tokens (never for GPT-2's 1024)
    rows = [(i, j, t[-limit:], m[-limit:]) for i, j, t, m in rows]
    if sync_ranks:  # all ranks stop, not only the one holding the example
        anywhere = torch.tensor(len(too_long), device=device)
        dist.all_reduce(anywhere)
        if anywhere and not too_long:
            raise UserError("a HellaSwag example on another rank is longer than the model's context: see its error")
    if too_long:
        i, n = too_long[0]
        raise UserError(f"HellaSwag example {first + stride * i} (counting from 0) has an ending of {n} tokens, "
                        f"more than the model's context of {limit} can score")
    on_cuda = str(device).startswith("cuda")
    if batch_size is None:
        # a GPU wants big batches (32: 3.9 s per full pass on an H200, 16: 4.6 s); on a CPU they only
        # add memory traffic, as the logits of a batch take rows x length x 50,304 floats
        batch_size = 32 if on_cuda else 4
    batch_rows = 4 * min(batch_size, max(len(examples), 1))  # no more rows than there are examples
    sums = torch.zeros(len(examples) * 4, device=device)  # float32: MPS has no float64
    counts = torch.zeros(len(examples) * 4, dtype=torch.float64)
    batches = make_batches(rows, batch_rows)
    if sync_ranks:
        most = torch.tensor(len(batches), device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        batches += [[]] * (int(most) - len(batches))
    # the finished bar stays, with its newline: with stderr and stdout in one file, the result is its own last line
    for batch in tqdm(batches, desc="hellaswag", disable=not progress):
        if not batch:  # a forward only to keep in step with the other ranks
            forward_logits(model, torch.zeros(batch_rows or 4, min(PAD_TO, limit), dtype=torch.long, device=device),
                           amp)
            continue
        longest = max(len(t) for _, _, t, _ in batch)
        T = min(padded_length(longest), limit) if batch_rows else longest
        idx = torch.zeros(batch_rows or len(batch), T, dtype=torch.long)
        mask = torch.zeros(batch_rows or len(batch), T, dtype=torch.bool)
        for r, (_, _, t, m) in enumerate(batch):
            idx[r, :len(t)] = torch.tensor(t)
            mask[r, :len(m)] = torch.tensor(m, dtype=torch.bool)
        # logits at position p predict token p + 1: pick the positions whose next token is an ending token.
        # Their indices are found on the CPU, so the device never waits on a data-dependent shape.
        r, p = mask[:, 1:].nonzero(as_tuple=True)
        where = torch.tensor([4 * i + j for i, j, _, _ in batch])
        counts.index_add_(0, where, mask[:len(batch), 1:].sum(1).double())
        # one pinned copy per batch (the host prepares the next batch while the device works on this one) of five
        # pieces: the tokens; row and position of each prediction of an ending token; that token; its ending's slot
        packed = torch.cat([idx.flatten(), r, p, idx[r, p + 1], where[r]])
        packed = (packed.pin_memory() if on_cuda else packed).to(device, non_blocking=True)
        idx, r, p, targets, dest = packed.split([idx.numel()] + [len(r)] * 4)
        idx = idx.view(-1, T)
        torch._dynamo.maybe_mark_dynamic(idx, 1)  # see PAD_TO; no effect on a model that is not compiled
        logits = forward_logits(model, idx, amp)
        picked = logits[r, p, :VOCAB].float()  # fp32 for the loss, whatever the autocast
        sums.index_add_(0, dest, F.cross_entropy(picked, targets, reduction="none"))
    return sums.cpu().double().view(-1, 4), counts.view(-1, 4)


def evaluate(model, examples, device, amp=contextlib.nullcontext(), rank=0, world_size=1, batch_size=None,
             progress=False):
    """{'n', 'acc', 'acc_norm', 'correct', 'correct_norm', 'nonfinite'} over all ranks; rank r scores examples r,
    r + world, ... nonfinite counts the examples whose losses are inf or NaN; with any, both accuracies are NaN."""
    mine = examples[rank::world_size]
    was_training = model.training
    model.eval()
    sums, counts = score_endings(model, mine, device, amp, batch_size, progress, sync_ranks=dist.is_initialized(),
                                 first=rank, stride=world_size)
    model.train(was_training)
    labels = torch.tensor([ex["label"] for ex in mine], dtype=torch.long)
    correct = (sums.argmin(1) == labels).sum()
    correct_norm = ((sums / counts).argmin(1) == labels).sum()  # the lecture's acc_norm: mean loss per token
    nonfinite = (~sums.isfinite()).any(1).sum()  # NaN or inf weights, or an fp16 overflow: argmin would guess
    totals = torch.tensor([len(mine), correct, correct_norm, nonfinite], dtype=torch.long, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)  # SUM: counts add up across ranks
    n, correct, correct_norm, nonfinite = totals.tolist()
    # with any example's losses not finite there is no accuracy to give: NaN (the trainer logs it as such)
    acc, acc_norm = (correct / max(n, 1), correct_norm / max(n, 1)) if not nonfinite else (math.nan, math.nan)
    return {"n": n, "acc": acc, "acc_norm": acc_norm, "correct": correct, "correct_norm": correct_norm,
            "nonfinite": nonfinite}


# -----------------------------------------------------------------------------
# Standalone: score an HF model or a checkpoint of ours

def load_model(args):
    if args.model is not None:  # -m '' too: an unknown name, not a checkpoint
        model = GPT.from_pretrained(args.model)  # UserError for unknown names and unloadable folders
    else:
        ckpt = load_checkpoint(args.checkpoint)  # UserError for missing, truncated or foreign files
        try:
            model = GPT(GPTConfig(**ckpt["config"]))
            if ckpt["sharded"]:  # an FSDP checkpoint, a folder of shards: DCP reads them all into the whole model
                load_sharded_state(args.checkpoint, model)
            else:
                model.load_state_dict(ckpt["model"])
        except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as e:
            raise UserError(f"checkpoint {args.checkpoint} does not fit its own config: {first_line(e)}")
    bad = nonfinite_weight(model.state_dict())
    if bad is not None:
        raise UserError(f"{args.model or args.checkpoint}: its weight {bad} holds inf or NaN, so scores nothing")
    if model.config.vocab_size < VOCAB:  # the examples are GPT-2 tokens
        raise UserError(f"{args.model or args.checkpoint} has a vocabulary of {model.config.vocab_size} tokens: "
                        f"scoring GPT-2 tokens needs {VOCAB} or more")
    return model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="HellaSwag accuracy of a GPT-2 model (batched, completion scoring).",
                                formatter_class=HelpFormatter)
    p.error = usage_error
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("-m", "--model", help="HF GPT-2: a name (gpt2, gpt2-medium, ...), a hub id (owner/name) or "
                       "a folder saved by save_pretrained")
    which.add_argument("-c", "--checkpoint", help="a checkpoint of train_gpt2.py, e.g. log/model_19073.pt")
    p.add_argument("--data", help="local HellaSwag val file, jsonl or parquet (default: the hub copy, cached in "
                   "$HELLASWAG_CACHE or ./hellaswag/)")
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--batch_size", type=int, help="examples per forward, 4 rows each (default: 32 on CUDA, else 4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = p.parse_args(argv)
    for name in ("limit", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name} must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, _, world, device = setup_device(args.device)
    device_type = device.split(":")[0]
    examples = load_examples(args.data, limit=args.limit)
    model = load_model(args).to(device)
    amp = autocast(autocast_dtype(args.dtype, device_type), device_type)
    if args.compile:
        model = torch.compile(model)
    res = evaluate(model, examples, device, amp, rank, world, args.batch_size, progress=rank == 0)
    if res["nonfinite"]:  # the weights are finite (load_model): the logits overflowed
        raise UserError(f"the model's losses are not finite (inf or NaN) on {res['nonfinite']} of {res['n']} "
                        f"examples: its logits overflow {args.dtype}" + (" (try --dtype fp32)" if args.dtype == "fp16"
                                                                          else ""))
    if rank == 0:
        print(f"hellaswag: n={res['n']} acc={res['acc']:.4f} acc_norm={res['acc_norm']:.4f}")
    if dist.is_initialized():
        dist.barrier()  # no rank tears down gloo while another still talks to it (seen to abort a rank)
        dist.destroy_process_group()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, request_stop)  # as Ctrl-C: a download in progress removes its partial file
    run_cli(main, lost_rank_hint="run it again", compile_hint="without --compile")
