"""Writes tinybooth/assets/common_short_words.txt: the words of 1-3 lower-case ASCII letters that the rare-token
search (tinybooth/rare_tokens.py) refuses as identifiers, because they are words of the prompt language (English)
or of the other languages of T5's vocabulary (German, French, Romanian: T5 was trained on C4 and on WMT
translation into those three).

Sources, both permissively licensed (their notices are copied into the file's header):
  en  SCOWL size 70 (Debian package wamerican-large 2020.12.07-2: words, proper names, abbreviations),
      lower-cased
  de, fr, ro  stopwords-iso (Python package stopwordsiso 0.7.1, MIT)

    apt-get download wamerican-large && dpkg-deb -x wamerican-large_*.deb wam
    pip download --no-deps stopwordsiso==0.7.1 && unzip stopwordsiso-*.whl -d sw
    python tests/reference/make_common_words.py wam/usr/share/dict/american-english-large \
        sw/stopwordsiso/stopwords-iso.json
"""
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "tinybooth" / "assets" / "common_short_words.txt"
SHORT = re.compile(r"[a-z]{1,3}")
HEADER = """\
# Words of 1-3 lower-case ASCII letters that tinybooth.rare_tokens refuses as identifiers, one per line with the
# languages it is a word of (en: English word, name or abbreviation; de/fr/ro: a German, French, Romanian stop word).
# Made by tests/reference/make_common_words.py from:
#
# en: SCOWL (Spell Checker Oriented Word Lists), size 70, as in Debian's wamerican-large 2020.12.07-2.
#   Copyright 2000-2011 by Kevin Atkinson
#   Permission to use, copy, modify, distribute and sell these word lists, the associated scripts, the output
#   created from the scripts, and its documentation for any purpose is hereby granted without fee, provided that
#   the above copyright notice appears in all copies and that both that copyright notice and this permission
#   notice appear in supporting documentation. Kevin Atkinson makes no representations about the suitability of
#   this array for any purpose. It is provided "as is" without express or implied warranty.
#   (SCOWL's parts are public domain, and WordNet 1.6 Copyright 1997 by Princeton University, all rights reserved,
#   used under its licence: see SCOWL's README.)
#
# de, fr, ro: stopwords-iso (https://github.com/stopwords-iso), as packaged in stopwordsiso 0.7.1. MIT License:
#   Copyright (c) 2016 Gene Diaz
#   Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
#   documentation files (the "Software"), to deal in the Software without restriction, including without limitation
#   the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and
#   to permit persons to whom the Software is furnished to do so, subject to the following conditions: The above
#   copyright notice and this permission notice shall be included in all copies or substantial portions of the
#   Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.
"""


def main(scowl_path, stopwords_path):
    langs = {}
    for line in Path(scowl_path).read_text(encoding="utf-8").split():
        if SHORT.fullmatch(line.lower()):
            langs.setdefault(line.lower(), set()).add("en")
    stop = json.loads(Path(stopwords_path).read_text(encoding="utf-8"))
    for lang in ("de", "fr", "ro"):
        for word in stop[lang]:
            if SHORT.fullmatch(word):
                langs.setdefault(word, set()).add(lang)
    order = ("en", "de", "fr", "ro")
    lines = [f"{w} {','.join(l for l in order if l in langs[w])}" for w in sorted(langs)]
    OUT.write_text(HEADER + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"{OUT}: {len(lines)} words")


if __name__ == "__main__":
    main(*sys.argv[1:])
