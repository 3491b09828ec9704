"""hellaswag.py: data formats and errors, the download path, scoring parity with transformers, batching,
torch.compile, DDP, the command line and the trainer's use of it. Offline, CPU, small random models."""
import http.client
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import urllib.error
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch
from torch.nn import functional as F

import hellaswag
import train_gpt2
from hellaswag import UserError
from train_gpt2 import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the man woman dog ball kitchen slowly then she he runs jumps into water over a bowl of rice "
         "café naïve jalapeño 日本語 Ελληνικά emoji 🙂 — “quoted” it's don't 1,234 $5.00").split()


# -----------------------------------------------------------------------------
# Synthetic examples: contexts and endings of different token lengths, unicode, both file formats

def make_examples(n, seed=0, long_every=3):
    """n examples; every long_every-th has a long context, so rows fall into two padded lengths (64, 128)."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        ctx_words = rng.randint(22, 30) if i % long_every == 0 else rng.randint(3, 12)
        ctx = " ".join(rng.choice(WORDS) for _ in range(ctx_words)) + "."
        endings = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(4)]
        examples.append({"ctx": ctx, "endings": endings, "label": rng.randrange(4)})
    return examples


def write_jsonl(path, examples):
    """The original format: label an int, plus the fields scoring ignores."""
    with open(path, "w", encoding="utf-8") as f:
        for i, ex in enumerate(examples):
            f.write(json.dumps({"ind": i, "activity_label": "Test", "ctx_a": ex["ctx"], "ctx_b": "",
                                "ctx": ex["ctx"], "split": "val", "split_type": "indomain",
                                "label": ex["label"], "endings": ex["endings"], "source_id": f"s{i}"},
                               ensure_ascii=False) + "\n")
    return str(path)


def parquet_table(examples):
    """The hub's parquet layout: the same fields, label as a string."""
    return pa.table({
        "ind": [i for i in range(len(examples))], "activity_label": ["Test"] * len(examples),
        "ctx_a": [ex["ctx"] for ex in examples], "ctx_b": [""] * len(examples),
        "ctx": [ex["ctx"] for ex in examples], "endings": [ex["endings"] for ex in examples],
        "source_id": [f"s{i}" for i in range(len(examples))], "split": ["val"] * len(examples),
        "split_type": ["indomain"] * len(examples), "label": [str(ex["label"]) for ex in examples]})


def write_parquet(path, examples):
    pq.write_table(parquet_table(examples), path)
    return str(path)


def random_gpt(seed=0, n_layer=2, vocab_size=50304, block_size=128):
    """Our GPT with random weights, padded vocabulary as in training; biases/LayerNorms randomised too."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=2, n_embd=32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers GPT-2 saved locally: the independent reference."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(folder)
    return str(folder)


EXAMPLES = make_examples(13)


# -----------------------------------------------------------------------------
# Rendering and reading

def test_render_example_tokens_and_mask():
    tokens, mask, label = hellaswag.render_example({"ctx": "Hello", "endings": ["world", "a", "b", "c"], "label": 2})
    assert tokens[0] == [15496, 995]  # "Hello world" in GPT-2 tokens: the space starts the ending's token
    assert mask[0] == [0, 1] and label == 2
    enc = tiktoken.get_encoding("gpt2")
    ex = EXAMPLES[0]
    tokens, mask, label = hellaswag.render_example(ex)
    for j, ending in enumerate(ex["endings"]):
        assert enc.decode(tokens[j]) == ex["ctx"] + " " + ending
        assert enc.decode([t for t, m in zip(tokens[j], mask[j]) if m]) == " " + ending
        assert len(tokens[j]) == len(mask[j])
    assert len({len(t) for t in tokens}) > 1, "endings of different token lengths"


def test_jsonl_and_parquet_read_the_same(tmp_path):
    from_jsonl = hellaswag.load_examples(write_jsonl(tmp_path / "val.jsonl", EXAMPLES))
    from_parquet = hellaswag.load_examples(write_parquet(tmp_path / "val.parquet", EXAMPLES))
    assert from_jsonl == from_parquet == EXAMPLES  # labels come back as ints from both
    assert any("日本語" in ex["ctx"] or any("🙂" in e for e in ex["endings"]) for ex in from_jsonl)
    # the format is told by content, not by the file name; --limit keeps the first N
    os.rename(tmp_path / "val.parquet", tmp_path / "val.data")
    assert hellaswag.load_examples(str(tmp_path / "val.data"), limit=4) == EXAMPLES[:4]


@pytest.mark.parametrize("line, message", [
    ('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 0', r"line 2 is not valid JSON"),
    ('{"ctx": "a", "endings": ["1", "2", "3"], "label": 0}', r"line 2: 'endings' must be a list of 4"),
    ('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": 4}', r"line 2: 'label' must be 0, 1, 2 or 3"),
    ('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": "x"}', r"line 2: 'label'"),
    ('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": "²"}', r"line 2: 'label' must be 0, 1, 2 or 3"),
    ('{"ctx": "a", "endings": ["1", "2", "3", "4"], "label": "' + "1" * 5000 + '"}', r"line 2: 'label' must be 0, 1"),
    ("[" * 100_000, r"line 2 is not valid JSON"),  # nested too deep for the json module
    ('{"endings": ["1", "2", "3", "4"], "label": 1}', r"line 2: 'ctx' must be a non-empty string"),
    ('[1, 2]', r"line 2: expected an object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(EXAMPLES[0])
    path.write_text(f"{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(str(path)) + ": " + message):
        hellaswag.load_examples(str(path))


def test_malformed_parquet_and_other_bad_files(tmp_path):
    rows = [dict(ex) for ex in EXAMPLES[:3]]
    rows[2]["endings"] = rows[2]["endings"][:2]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(UserError, match=re.escape(path) + r": row 2: 'endings' must be a list of 4"):
        hellaswag.load_examples(path)
    good = write_parquet(tmp_path / "good.parquet", EXAMPLES)
    with open(good, "rb") as f:
        (tmp_path / "cut.parquet").write_bytes(f.read()[:300])
    with pytest.raises(UserError, match="cut.parquet: not a readable parquet file"):
        hellaswag.load_examples(str(tmp_path / "cut.parquet"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no HellaSwag examples"):
        hellaswag.load_examples(str(tmp_path / "empty.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"not UTF-8 text, nor parquet \(line 1, byte 4\)"):
        hellaswag.load_examples(str(tmp_path / "latin1.jsonl"))
    # far into a file: the line is the file's, not a count within the chunk being decoded
    good = json.dumps(EXAMPLES[0]) + "\n"
    (tmp_path / "late.jsonl").write_bytes((good * 2000 + "caf\xe9\n").encode("latin-1"))
    with pytest.raises(UserError, match=r"not UTF-8 text, nor parquet \(line 2001, byte 4\)"):
        hellaswag.load_examples(str(tmp_path / "late.jsonl"))
    with pytest.raises(UserError, match="cannot read HellaSwag file .*missing.jsonl"):
        hellaswag.load_examples(str(tmp_path / "missing.jsonl"))


# -----------------------------------------------------------------------------
# The download path: the real request up to the network, then an atomic, once-only cache

def parquet_bytes(examples):
    sink = io.BytesIO()
    pq.write_table(parquet_table(examples), sink)
    return sink.getvalue()


def test_unreachable_hub_gives_one_clear_error(tmp_path, monkeypatch):
    # the real request, to an endpoint that refuses at once (the hub itself is unreachable here too)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError) as e:
        hellaswag.load_examples(cache_dir=str(tmp_path / "cache"))
    msg = str(e.value)
    assert "\n" not in msg and "--data" in msg and "--hellaswag_data" in msg
    assert "http://127.0.0.1:9/datasets/Rowan/hellaswag/resolve/refs%2Fconvert%2Fparquet/" in msg
    assert not os.path.exists(tmp_path / "cache")  # nothing half-written is left behind, not even the folder


def test_an_endpoint_without_a_scheme_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "hf-mirror.example")
    with pytest.raises(UserError, match="cannot download HellaSwag from hf-mirror.example/datasets/.*unknown url type"):
        hellaswag.load_examples(cache_dir=str(tmp_path / "cache"))


def test_a_cache_that_is_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "cache").write_text("")
    with pytest.raises(UserError, match="the HellaSwag cache .*cache is a file, not a folder"):
        hellaswag.load_examples(cache_dir=str(tmp_path / "cache"))


def test_a_cache_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot create the HellaSwag cache folder .*a_file/cache: Not a directory: "
                                        "set \\$HELLASWAG_CACHE"):
        hellaswag.load_examples(cache_dir=str(tmp_path / "a_file" / "cache"))


def test_a_broken_cached_copy_says_how_to_get_a_new_one(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / hellaswag.CACHE_NAME).write_bytes(b"PAR1 cut short")
    with pytest.raises(UserError, match="the cached hub copy: delete it to download it again"):
        hellaswag.load_examples(cache_dir=str(tmp_path / "cache"))


def test_a_stray_local_rank_without_a_launch_is_not_read(tmp_path, monkeypatch):
    """LOCAL_RANK matters only in a launch (whose setup checks it): alone, this process is the one to download."""
    (tmp_path / "cache").mkdir()
    write_parquet(tmp_path / "cache" / hellaswag.CACHE_NAME, EXAMPLES)
    monkeypatch.setenv("HELLASWAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOCAL_RANK", "abc")
    assert hellaswag.load_examples(None) == EXAMPLES


def test_a_model_without_context_scores_nothing_in_one_line():
    with pytest.raises(UserError, match="more than the model's context of 0 can score"):
        hellaswag.evaluate(random_gpt(block_size=0), EXAMPLES[:2], "cpu")


def test_an_empty_cached_copy_says_how_to_get_a_new_one(tmp_path):
    (tmp_path / "cache").mkdir()
    pq.write_table(parquet_table([]), tmp_path / "cache" / hellaswag.CACHE_NAME)
    with pytest.raises(UserError, match="holds no HellaSwag examples \\(the cached hub copy: delete it"):
        hellaswag.load_examples(cache_dir=str(tmp_path / "cache"))


def test_the_cache_folder_by_default_and_when_a_failed_download_made_several(tmp_path, monkeypatch):
    monkeypatch.setenv("HELLASWAG_CACHE", "")  # set but empty: not the current folder
    assert hellaswag.default_cache_dir() == "hellaswag"
    (tmp_path / "there").mkdir()

    def refused(url, timeout=None):
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", refused)
    with pytest.raises(UserError, match="connection refused"):
        hellaswag.load_examples(cache_dir=str(tmp_path / "there" / "a" / "b"))
    assert os.listdir(tmp_path / "there") == []  # a and b both go; the folder that was there stays


def test_a_jsonl_file_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(ex) + "\n" for ex in EXAMPLES[:3]).encode())
    assert hellaswag.read_examples(str(path)) == EXAMPLES[:3]


def test_download_is_cached_atomically_and_once(tmp_path, monkeypatch):
    data = parquet_bytes(EXAMPLES)
    calls, seen_during_download = [], []
    final = tmp_path / "cache" / "hellaswag_val.parquet"

    class Stream(io.BytesIO):
        def read(self, n=-1):  # while bytes arrive, the cache name must not exist (a crash would leave half)
            seen_during_download.append(final.exists())
            return super().read(min(n, 1000))

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return Stream(data)

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", fake_urlopen)
    monkeypatch.setenv("HELLASWAG_CACHE", str(tmp_path / "cache"))
    assert hellaswag.load_examples(limit=5) == EXAMPLES[:5]
    assert calls == ["https://huggingface.co/datasets/Rowan/hellaswag/resolve/refs%2Fconvert%2Fparquet/"
                     "default/validation/0000.parquet"]
    assert os.listdir(tmp_path / "cache") == ["hellaswag_val.parquet"]
    assert final.read_bytes() == data
    assert len(seen_during_download) > 3 and not any(seen_during_download)
    assert hellaswag.load_examples() == EXAMPLES and len(calls) == 1  # the second load reads the cache


@pytest.mark.parametrize("failure", ["truncated", "dropped", "cut"])
def test_failed_download_leaves_no_cache_file(tmp_path, monkeypatch, failure):
    data = parquet_bytes(EXAMPLES)

    class Dropping(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > 100 and failure == "cut":  # the server closed before the promised length
                raise http.client.IncompleteRead(b"", 1000)
            if self.tell() > 100:
                raise urllib.error.URLError("connection reset")
            return super().read(min(n, 64))

    served = io.BytesIO(data[:len(data) // 2]) if failure == "truncated" else Dropping(data)
    monkeypatch.setattr(hellaswag.urllib.request, "urlopen", lambda url, timeout=None: served)
    cache = tmp_path / "cache"
    match = {"truncated": "not a usable HellaSwag file", "dropped": "connection reset.*--data",
             "cut": r"IncompleteRead\(0 bytes read, 1000 more expected\).*--data"}[failure]
    cache.mkdir()  # a cache folder that was there before stays
    with pytest.raises(UserError, match=match):
        hellaswag.load_examples(cache_dir=str(cache))
    assert os.listdir(cache) == []


# -----------------------------------------------------------------------------
# Scoring: parity with an independent computation on transformers' GPT2LMHeadModel

def reference_scores(hf_model, examples):
    """Per ending (summed loss, mean loss) from transformers' own loss: context positions get label -100."""
    enc = tiktoken.get_encoding("gpt2")
    sums, means = [], []
    with torch.no_grad():
        for ex in examples:
            ctx = enc.encode(ex["ctx"])
            row_sums, row_means = [], []
            for ending in ex["endings"]:
                end = enc.encode(" " + ending)
                ids = torch.tensor([ctx + end])
                labels = torch.tensor([[-100] * len(ctx) + end])
                mean = hf_model(ids, labels=labels).loss.item()
                row_sums.append(mean * len(end))
                row_means.append(mean)
            sums.append(row_sums)
            means.append(row_means)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(means, dtype=torch.float64)


def test_scores_match_transformers(hf_dir):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ref_sum, ref_mean = reference_scores(hf, EXAMPLES)
    labels = torch.tensor([ex["label"] for ex in EXAMPLES])
    assert (ref_sum.argmin(1) != ref_mean.argmin(1)).any(), "the examples must tell acc from acc_norm"
    # the HF model itself (its output object) and our GPT loaded from the same folder
    for model in (hf, GPT.from_pretrained(hf_dir).eval()):
        sums, counts = hellaswag.score_endings(model, EXAMPLES, "cpu", batch_size=4)
        torch.testing.assert_close(sums, ref_sum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sums / counts, ref_mean, rtol=1e-5, atol=1e-5)
        res = hellaswag.evaluate(model, EXAMPLES, "cpu", batch_size=4)
        assert res["n"] == len(EXAMPLES)
        assert res["correct"] == (ref_sum.argmin(1) == labels).sum().item()
        assert res["correct_norm"] == (ref_mean.argmin(1) == labels).sum().item()
        assert res["acc"] == res["correct"] / len(EXAMPLES) and res["acc_norm"] == res["correct_norm"] / len(EXAMPLES)
        assert res["nonfinite"] == 0


def test_losses_that_are_not_finite_give_no_accuracy():
    """argmin over NaN losses picks ending 0: NaN weights scored the share of examples labelled 0."""
    model = random_gpt()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    res = hellaswag.evaluate(model, EXAMPLES, "cpu", batch_size=4)
    assert res["nonfinite"] == len(EXAMPLES) and math.isnan(res["acc"]) and math.isnan(res["acc_norm"])


class ShapeRecorder(torch.nn.Module):
    """Passes the forward through and notes the input shape of each."""

    def __init__(self, model):
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, idx):
        self.shapes.append(tuple(idx.shape))
        return self.model(idx)


def test_batched_equals_one_example_per_forward():
    model = random_gpt()
    single_sum, single_count = hellaswag.score_endings(model, EXAMPLES, "cpu", batch_size=0)
    for batch_size in (1, 3, 16):
        recorder = ShapeRecorder(model)
        sums, counts = hellaswag.score_endings(recorder, EXAMPLES, "cpu", batch_size=batch_size)
        assert torch.equal(counts, single_count)
        torch.testing.assert_close(sums, single_sum, rtol=1e-5, atol=1e-5)
        assert torch.equal(sums.argmin(1), single_sum.argmin(1))
        assert torch.equal((sums / counts).argmin(1), (single_sum / single_count).argmin(1))
        # fixed shapes: always 4 * batch_size rows (but no more than the examples' 52), lengths a multiple of 32
        assert {rows for rows, _ in recorder.shapes} == {4 * min(batch_size, len(EXAMPLES))}
        assert all(length % 32 == 0 for _, length in recorder.shapes)
        assert len({length for _, length in recorder.shapes}) >= 3


def test_padded_vocabulary_is_not_scored():
    # logits past the 50,257 real tokens are junk in a model padded to 50,304: making them huge changes nothing
    model = random_gpt()
    before, _ = hellaswag.score_endings(model, EXAMPLES[:4], "cpu")
    with torch.no_grad():
        model.lm_head.weight[50257:] = 5.0
    after, _ = hellaswag.score_endings(model, EXAMPLES[:4], "cpu")
    torch.testing.assert_close(after, before)


def test_amp_and_training_mode():
    model = random_gpt().train()
    res32 = hellaswag.evaluate(model, EXAMPLES, "cpu", batch_size=4)
    assert model.training  # evaluate puts the mode back
    res16 = hellaswag.evaluate(model, EXAMPLES, "cpu", amp=torch.autocast("cpu", dtype=torch.bfloat16), batch_size=4)
    assert res16["n"] == res32["n"] and abs(res16["acc_norm"] - res32["acc_norm"]) <= 3 / len(EXAMPLES)
    # the forwards run under the autocast given: bf16 losses round differently from fp32's, and only by that
    sums32, counts32 = hellaswag.score_endings(model, EXAMPLES, "cpu", batch_size=4)
    sums16, counts16 = hellaswag.score_endings(model, EXAMPLES, "cpu", amp=torch.autocast("cpu", dtype=torch.bfloat16),
                                               batch_size=4)
    assert torch.equal(counts16, counts32) and not torch.equal(sums16, sums32)
    assert torch.allclose(sums16, sums32, rtol=2e-2)


# -----------------------------------------------------------------------------
# torch.compile: a few fixed shapes, not one compilation per batch

@pytest.mark.parametrize("dynamic", [False, None])
def test_compiled_model_does_not_recompile_per_batch(dynamic):
    import torch._dynamo
    graphs = []

    def counting_backend(gm, example_inputs):  # dynamo's graphs, run eagerly: counts compilations, fast
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model = random_gpt()
    compiled = torch.compile(model, backend=counting_backend, dynamic=dynamic)
    recorder = ShapeRecorder(compiled)
    eager = hellaswag.evaluate(model, EXAMPLES, "cpu", batch_size=2)
    res = hellaswag.evaluate(recorder, EXAMPLES, "cpu", batch_size=2)
    assert len(recorder.shapes) >= 6 and len(set(recorder.shapes)) >= 3
    assert len(graphs) == 1, "the padded length is dynamic: one compilation for all of them"
    hellaswag.evaluate(compiled, EXAMPLES, "cpu", batch_size=2)
    assert len(graphs) == 1, "a second evaluation compiles nothing"
    assert res == eager
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# DDP: 2 gloo ranks, examples sharded, counts summed; local rank 0 downloads while rank 1 waits

# 9 examples that fit a context of 16 tokens: 5 for rank 0, 4 for rank 1
SHORT = [{"ctx": "the man runs into the water", "endings": ["and swims", "then", "a dog", "she jumps"], "label": i % 4}
         for i in range(9)]

WORKER = """
import io, json, os, sys, time, urllib.request
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import hellaswag
from test_hellaswag import random_gpt
out, parquet, cache = sys.argv[1:4]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")

def fake_urlopen(url, timeout=None):
    open(os.path.join(out, f"download_rank{{rank}}"), "w").write(url)
    time.sleep(1.0)  # a rank that did not wait at the barrier would find no file now
    return io.BytesIO(open(parquet, "rb").read())

urllib.request.urlopen = fake_urlopen
examples = hellaswag.load_examples(cache_dir=cache)
res = hellaswag.evaluate(random_gpt(), examples, "cpu", rank=rank, world_size=dist.get_world_size(), batch_size=2)
# a context shorter than the padding: rank 1 has fewer batches, and keeps in step with forwards that must fit it
res_short = hellaswag.evaluate(random_gpt(block_size=16), {short!r}, "cpu", rank=rank, world_size=dist.get_world_size(),
                               batch_size=2)
with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:  # closed before os._exit below
    json.dump([res, res_short], f)
dist.barrier()
dist.destroy_process_group()
# leave as the scripts do (os._exit, skipping the teardown where a gloo thread can abort the process; it failed
# this test in CI): see train_gpt2.exit_with
from train_gpt2 import exit_with
exit_with(None, 0)
"""


def test_ddp_two_ranks_match_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT, short=SHORT))
    parquet = write_parquet(tmp_path / "source.parquet", EXAMPLES)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path), parquet, str(cache)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.exists(tmp_path / "download_rank0") and not os.path.exists(tmp_path / "download_rank1")
    assert os.listdir(cache) == ["hellaswag_val.parquet"]
    one = [hellaswag.evaluate(random_gpt(), EXAMPLES, "cpu", batch_size=2),
           hellaswag.evaluate(random_gpt(block_size=16), SHORT, "cpu", batch_size=2)]
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            assert json.load(f) == one  # n, acc, acc_norm and the counts: totals over both ranks


# -----------------------------------------------------------------------------
# The command line and the trainer

def run_cli(*args):
    return subprocess.run([sys.executable, "hellaswag.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_refuses_an_accuracy_when_the_logits_overflow(tmp_path):
    """Finite weights so large the logits are inf: NaN losses, which argmin read as ending 0 every time."""
    data = write_jsonl(tmp_path / "val.jsonl", EXAMPLES)
    model = random_gpt()
    with torch.no_grad():
        model.transformer.ln_f.weight.fill_(1e30)
        model.lm_head.weight.mul_(1e30)
    ckpt = str(tmp_path / "model_00010.pt")
    train_gpt2.save_checkpoint(ckpt, {"model": model.state_dict(), "config": asdict(model.config), "step": 10})
    proc = run_cli("-c", ckpt, "--data", data, "--limit", "5", "--device", "cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "hellaswag: n=" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: the model's losses are not finite (inf or NaN) on 5 of 5 examples: its logits overflow fp32")


def test_cli_scores_checkpoint_and_hf_folder(tmp_path, hf_dir, capsys):
    data = write_jsonl(tmp_path / "val.jsonl", EXAMPLES)
    model = random_gpt()
    ckpt = str(tmp_path / "model_00010.pt")
    train_gpt2.save_checkpoint(ckpt, {"model": model.state_dict(), "config": asdict(model.config), "step": 10})
    proc = run_cli("-c", ckpt, "--data", data, "--limit", "10", "--batch_size", "3", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    res = hellaswag.evaluate(model, EXAMPLES[:10], "cpu")
    assert proc.stdout.strip().splitlines()[-1] == \
        f"hellaswag: n=10 acc={res['acc']:.4f} acc_norm={res['acc_norm']:.4f}"
    # -m with a local HF folder, in-process; the reference counts come from transformers' own loss
    from transformers import GPT2LMHeadModel
    ref_sum, ref_mean = reference_scores(GPT2LMHeadModel.from_pretrained(hf_dir).eval(), EXAMPLES)
    labels = torch.tensor([ex["label"] for ex in EXAMPLES])
    acc, acc_norm = ((ref.argmin(1) == labels).double().mean().item() for ref in (ref_sum, ref_mean))
    hellaswag.main(["-m", hf_dir, "--data", data, "--device", "cpu"])
    assert capsys.readouterr().out.splitlines()[-1] == f"hellaswag: n=13 acc={acc:.4f} acc_norm={acc_norm:.4f}"


def test_cli_takes_a_hub_id(tmp_path, hf_dir):
    """-m owner/name goes to transformers as a hub id: here served offline from a hub cache holding hf_dir."""
    import shutil
    repo = tmp_path / "hub" / "models--someone--tiny-gpt2"
    shutil.copytree(hf_dir, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    data = write_jsonl(tmp_path / "val.jsonl", EXAMPLES)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    run = lambda name: subprocess.run(  # noqa: E731
        [sys.executable, "hellaswag.py", "-m", name, "--data", data, "--limit", "4", "--device", "cpu"], cwd=ROOT,
        capture_output=True, text=True, timeout=300, env=env)
    proc = run("someone/tiny-gpt2")
    res = hellaswag.evaluate(GPT.from_pretrained(hf_dir).eval(), EXAMPLES[:4], "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"hellaswag: n=4 acc={res['acc']:.4f} acc_norm={res['acc_norm']:.4f}"
    proc = run("someone/absent")  # not in the cache, and offline: transformers' error, in one line
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        proc.stderr.strip().splitlines()[-1]] and "cannot load 'someone/absent' with transformers" in proc.stderr


def test_a_context_longer_than_the_model_is_cut_from_the_left(hf_dir):
    model = GPT.from_pretrained(hf_dir).eval()
    long = dict(EXAMPLES[1], ctx="word " * 200)
    sums, counts = hellaswag.score_endings(model, [long], "cpu")
    tokens, mask, _ = hellaswag.render_example(long)
    assert len(tokens[0]) > 200 and model.config.block_size == 128
    with torch.no_grad():
        for j in range(4):
            t, m = torch.tensor(tokens[j][-128:]), torch.tensor(mask[j][-128:], dtype=torch.bool)
            logits, _ = model(t[None])
            losses = F.cross_entropy(logits[0, :-1, :50257], t[1:], reduction="none")[m[1:]]
            assert counts[0, j] == m[1:].sum() and abs(sums[0, j] - losses.sum()) < 1e-3


def test_an_ending_too_long_for_the_model_stops_every_rank(tmp_path, hf_dir):
    """Under torchrun the example sits on rank 1: both ranks end with one line, rank 1's naming the example."""
    examples = EXAMPLES[:1] + [dict(EXAMPLES[1], endings=["word " * 200] * 4)] + EXAMPLES[2:4]
    data = write_jsonl(tmp_path / "val.jsonl", examples)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "hellaswag.py", "-m", hf_dir, "--data", data, "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert len(errors) == 2 and re.fullmatch(r"error: HellaSwag example 1 \(counting from 0\) has an ending of 2\d\d "
                                             r"tokens, more than the model's context of 128 can score", errors[0])
    assert errors[1] == "error: a HellaSwag example on another rank is longer than the model's context: see its error"


@pytest.mark.parametrize("compile", ["off", "on"])  # the lecture's code could not run HellaSwag compiled
def test_trainer_logs_hella_from_this_code(tmp_path, compile):
    text = tmp_path / "input.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    data = write_jsonl(tmp_path / "val.jsonl", EXAMPLES)
    log_dir = tmp_path / "log"
    train_gpt2.main(["--data", str(text), "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "128",
                     "--batch_size", "2", "--seq_len", "32", "--total_batch_size", "64", "--max_steps", "2",
                     "--eval_every", "0", "--sample_every", "0", "--hellaswag_every", "2", "--hellaswag_data", data,
                     "--log_dir", str(log_dir), "--device", "cpu", "--compile", compile])
    hella = [line.split() for line in (log_dir / "log.txt").read_text().splitlines() if " hella " in line]
    assert [fields[0] for fields in hella] == ["0", "2"]
    torch.manual_seed(1337)  # the trainer's seed: its model at step 0
    model = GPT(GPTConfig(block_size=128, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    assert hella[0][2] == f"{hellaswag.evaluate(model, EXAMPLES, 'cpu')['acc_norm']:.4f}"


def test_sigterm_during_the_download_leaves_nothing(tmp_path):
    """A stopped container sends SIGTERM: like Ctrl-C, the partial download and the new cache folder go."""
    import http.server
    import signal
    import threading

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            self.wfile.write(b"PAR1")
            self.wfile.flush()
            time.sleep(30)  # the rest never comes in time

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = tmp_path / "cache"
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HELLASWAG_CACHE=str(cache))
    proc = subprocess.Popen([sys.executable, "hellaswag.py", "-c", "unused.pt"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (cache.exists() and any(".tmp" in name for name in os.listdir(cache))):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        server.shutdown()
    assert proc.returncode == 130 and err == "interrupted\n"
    assert not cache.exists()
