"""play.ipynb runs headless and offline: a small random GPT-2 stands in for OpenAI's, a synthetic log for a run.

nbclient executes an in-memory copy of the notebook (the committed file is never written) in a temp folder,
with a `python3` kernel pinned to this interpreter; the assertions read what its cells printed and the PNG
it saved.
"""
import json
import math
import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "play.ipynb")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def play_env(tmp_path, monkeypatch):
    """Environment for the kernel: the notebook's parameters, the repository on sys.path, no hub."""
    kernel_dir = tmp_path / "jupyter" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    # JUPYTER_PATH comes first in the kernel search, so `python3` is this interpreter (the venv), whatever
    # other kernels the machine has
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PLAY_LOG", str(tmp_path / "log" / "log.txt"))
    (tmp_path / "log").mkdir()
    return tmp_path


def execute(nb, workdir):
    """Run nb in workdir (nbclient raises on the first failing cell); returns everything the cells printed."""
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print('kernel python:', sys.executable)"))
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(workdir)}}).execute()
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for out in cell.outputs if out.output_type == "stream")
    assert f"kernel python: {sys.executable}\n" in printed
    return printed


def assert_png(path):
    assert path.is_file(), f"the notebook did not write {path}"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000, f"{path}: {len(data)} bytes, not a real figure"


def resumed_log():
    """A run stopped at step 450, resumed from its step-200 checkpoint without trimming, now at step 372.

    Evaluations every 50 steps. The older attempt's records after step 200 are stale; its val 2.0 and hella
    0.9 at step 400 would win if they were read, and so would the half-written val 1.0 on the last line.
    """
    lines = []

    def segment(first, last, val, hella):
        for step in range(first, last + 1):
            if step in val:
                lines.append(f"{step} val {val[step]:.6f}")
                lines.append(f"{step} hella {hella[step]:.4f}")
            lines.append(f"{step} train {3 + 8 * math.exp(-step / 80) + 0.05 * math.sin(step):.6f}")

    old_val = {0: 11.0, 50: 6.0, 100: 5.0, 150: 4.5, 200: 4.2, 250: 4.0, 300: 3.0, 350: 2.5, 400: 2.0}
    old_hella = {0: 0.25, 50: 0.252, 100: 0.254, 150: 0.256, 200: 0.258, 250: 0.8, 300: 0.8, 350: 0.8, 400: 0.9}
    segment(0, 450, old_val, old_hella)
    lines += ["", "# resumed from model_00200.pt", "100 lr 0.0006", "abc train 3.0"]  # noise to skip
    # the resumed run starts with the checkpoint step's training: its evaluations are logged already
    segment(200, 372, {250: 3.9, 300: 3.55, 350: 3.65}, {250: 0.27, 300: 0.28, 350: 0.275})
    return "\n".join(lines) + "\n400 val 1.0"  # cut off before its newline


def test_play_notebook(play_env, monkeypatch):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257))
    hf.save_pretrained(play_env / "hf")
    n_params = sum(p.numel() for p in hf.parameters())
    monkeypatch.setenv("PLAY_MODEL", str(play_env / "hf"))
    (play_env / "log" / "log.txt").write_text(resumed_log())

    printed = execute(nbformat.read(NOTEBOOK, as_version=4), play_env)

    # Part 1: the same network
    assert f"parameters: HF {n_params:,}, ours {n_params:,}\n" in printed
    assert "transformer.h.0.attn.c_attn.weight" in printed and "transformer.h.1." not in printed
    assert "... and 1 more block(s) like block 0: 12 more tensors equal (the Conv1D ones transposed)\n" in printed
    # all four Conv1D weights (c_attn, both c_proj, c_fc) came over transposed, every other tensor as is
    assert printed.count("  equal, transposed\n") == 4 and "DIFFERENT" not in printed
    diff = re.search(r"^max abs logit difference: (\S+)$", printed, re.M)
    assert diff, printed
    assert float(diff.group(1)) < 1e-4
    assert "identical samples: True\n" in printed
    # Part 2: the resumed run as its last attempt logged it
    assert "373 train, 8 val, 8 hella records" in printed
    assert "best val loss: 3.5500 at step 300; latest 3.6500 at step 350" in printed
    assert "best HellaSwag acc_norm: 0.2800 at step 300; latest 0.2750 at step 350" in printed
    assert_png(play_env / "log" / "play.png")


def test_play_run_just_started(play_env):
    """Part 2 alone (the first cell, then Part 2) on a log with a few train records and no evaluations, and a
    line that is not UTF-8 (train_gpt2.py keeps such lines as they are)."""
    (play_env / "log" / "log.txt").write_bytes(b"0 train 10.950000\n\xff\xfe\n1 train 10.310000\n\n2 train 9.9")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    part2 = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## Part 2"))
    nb.cells = nb.cells[:2] + nb.cells[part2:]

    printed = execute(nb, play_env)

    assert "2 train, 0 val, 0 hella records" in printed
    assert "no val records yet\n" in printed and "no hella records yet\n" in printed
    assert_png(play_env / "log" / "play.png")


def notebook_function(name):
    """A function the notebook defines, taken from its cell's source and run here on its own."""
    import ast

    import numpy as np
    nb = nbformat.read(NOTEBOOK, as_version=4)
    source = next(c.source for c in nb.cells if c.cell_type == "code" and f"def {name}(" in c.source)
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace = {"np": np}
    exec(compile(ast.Module([node], []), NOTEBOOK, "exec"), namespace)
    return namespace[name]


def test_a_skipped_step_leaves_a_gap_in_the_average_not_the_rest_of_the_curve():
    """--skip_nonfinite logs 'N train nan': a running sum carried that NaN into every later average."""
    import numpy as np
    moving_average = notebook_function("moving_average")
    values = [float(v) for v in range(1, 11)]
    assert np.allclose(moving_average(values, 3), [1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9])
    values[4] = float("nan")
    values[5] = float("inf")
    got = moving_average(values, 3)
    assert np.allclose(got, [1, 1.5, 2, 3, 3.5, 4, 7, 7.5, 8, 9])  # the windows around steps 4-5 average the rest
    assert np.isnan(moving_average([1.0, float("nan"), float("nan"), 4.0], 2)[2])  # nothing finite: a gap


def test_play_log_with_nonfinite_records(play_env):
    """Part 2 on a run whose steps 3 and 5 were skipped as non-finite and whose first val loss was NaN."""
    lines = [f"{s} train {'nan' if s in (3, 5) else 10 - s / 10}" for s in range(10)]
    lines[0:0] = ["0 val nan", "0 hella 0.25"]
    lines.insert(7, "4 hella 0.26")  # after step 4's train record; step 9 ties it
    lines += ["9 val 9.5", "9 hella 0.26"]
    (play_env / "log" / "log.txt").write_text("\n".join(lines) + "\n")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    part2 = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## Part 2"))
    nb.cells = nb.cells[:2] + nb.cells[part2:]

    printed = execute(nb, play_env)

    assert "10 train, 2 val, 3 hella records" in printed
    assert "best val loss: 9.5000 at step 9; latest 9.5000 at step 9" in printed
    assert "best HellaSwag acc_norm: 0.2600 at step 4; latest 0.2600 at step 9" in printed  # the first to reach it
    assert_png(play_env / "log" / "play.png")
