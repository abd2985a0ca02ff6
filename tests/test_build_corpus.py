"""Pure text helpers of scripts/build_corpus.py on inline strings (no network, no packages)."""

import gzip
import importlib.util
import json
import struct
import sys
import zlib
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "build_corpus.py"
_spec = importlib.util.spec_from_file_location("build_corpus", _PATH)
bc = importlib.util.module_from_spec(_spec)
sys.modules["build_corpus"] = bc  # dataclasses look their module up
_spec.loader.exec_module(bc)


def test_brown_tags_stripped_and_detokenized():
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n"
           "\n\n\tAtlanta's/np$ 1/2/cd share/nn (/( small/jj )/) ,/, he/pps said/vbd ./.\n")
    assert bc.strip_brown_tags(raw) == (
        'The jury said "no evidence" was found.\n\n'
        "Atlanta's 1/2 share (small), he said.")


def test_documents_round_trip_through_blank_line_format():
    paras = bc.paragraphs("A first\nline.\n\n\n  indented\n    code\n\nlast\r\nline\n")
    assert paras == ["A first\nline.", "indented\n  code", "last\nline"]
    assert bc.paragraphs("wrapped\nprose  here\n\nnext", unwrap=True) == ["wrapped prose here",
                                                                           "next"]
    docs = bc.pack(["aaaa", "bbbb", "cc\n\n  \ncc", "d" * 20], max_chars=10)
    assert docs == ["aaaa\nbbbb", "cc\ncc", "d" * 20]  # blank lines never survive in a document
    text = "".join(d + "\n\n" for d in docs)
    assert bc.split_documents(text) == docs
    assert bc.normalize_doc("\x1b[32mred\x1b[m  \n\n\tx\x07") == "red\n    x"


def test_cap_is_deterministic_deduplicated_and_ordered():
    docs = [f"document number {i}" * 5 for i in range(50)]
    kept, capped = bc.cap_documents(docs + docs[:5], max_bytes=2000)
    assert capped and sum(len(d.encode()) + 2 for d in kept) <= 2000
    assert kept == [d for d in docs if d in kept]  # original order
    assert bc.cap_documents(docs, 2000) == (kept, True)
    assert bc.cap_documents(docs + docs, 10**9) == (docs, False)
    h = bc.holdout_fraction("some document")
    assert 0 <= h < 1 and h == bc.holdout_fraction("some document")


def test_markup_cleaners():
    rst = ("Title\n=====\n\n.. index:: single: foo\n   pair: a; b\n\n.. function:: abs(x)\n\n"
           "   Return :func:`~os.path.abs` of ``x`` and *y*, see `docs <https://x>`_::\n\n"
           "      print(x)\n")
    text = bc.clean_rst(rst)
    assert "Title" in text and "=====" not in text and "index" not in text
    assert "abs(x)" in text and "Return abs of x and y, see docs:" in text and "print(x)" in text
    roff = ('.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list \\fBfiles\\fR\n.TP\n.BR \\-a ", " '
            '\\-\\-all\ndo not ignore\n')
    assert bc.clean_roff(roff) == "NAME\n\nls - list files\n\n-a, --all\ndo not ignore"
    assert bc.clean_roff('.\\" x\n.so man1/other.1\n') == ""
    page = ("<html><head><title>t</title><script>x()</script></head><body><ul class='docnav'>"
            "<li>Prev</li></ul><h1>Head</h1><p>One <b>two</b>\n three.</p><span hidden>no"
            "</span><pre>a\n  b</pre></body></html>")
    assert bc.html_to_text(page) == "Head\n\nOne two three.\n\na\n  b"
    assert bc.parse_fortunes("one\n%\ntwo\nlines\n%\n") == ["one", "two\nlines"]
    assert bc.clean_gcide("Calorie \\Cal\"o*rie\\, n. [F.] 0[deg] caf[`e]\n   {Foot\n   pound}.\n"
                          "   [1913 Webster]\n") == "Calorie, n. [F.] 0° cafè Foot pound."
    line = "00001930 03 n 02 physical_entity 0 thing(a) 0 000 | an entity that exists  "
    assert bc.wordnet_line(line, "noun") == "physical entity, thing (noun): an entity that exists"


def _rxdr_strings(values):
    out = b"X\n" + struct.pack(">iii", 2, 0x40000, 0x20300)
    out += struct.pack(">ii", 16, len(values))
    for v in values:
        out += struct.pack(">ii", 0x40009, len(v.encode())) + v.encode()
    return out


def test_r_lazyload_reader(tmp_path):
    chunk = _rxdr_strings(["EMMA", "", "Emma Woodhouse, handsome"])
    rdb = struct.pack(">i", len(chunk)) + zlib.compress(chunk)
    # index: list(variables = list(emma = c(0L, n)), references = list(), compressed = TRUE)
    idx = b"X\n" + struct.pack(">iii", 2, 0x40000, 0x20300)
    names = lambda *ns: (struct.pack(">i", 1026) + struct.pack(">i", 1) + struct.pack(">i", 0x40009)
                         + struct.pack(">i", 5) + b"names" + struct.pack(">ii", 16, len(ns))
                         + b"".join(struct.pack(">ii", 0x40009, len(n)) + n for n in ns)
                         + struct.pack(">i", 254))
    idx += struct.pack(">ii", 19 | 1 << 9, 1) + struct.pack(">ii", 19 | 1 << 9, 1)
    idx += struct.pack(">iiii", 13, 2, 0, len(rdb)) + names(b"emma") + names(b"variables")
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(idx))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    objs = bc.read_r_lazyload(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert objs == {"emma": ["EMMA", "", "Emma Woodhouse, handsome"]}


def test_manifest_merges_runs(tmp_path):
    path = tmp_path / "corpus" / "manifest.json"
    entry = lambda name, lang, tokens: {"name": name, "language": lang, "chars": 10,
                                        "documents": 2, "tokens": tokens}
    bc.write_manifest(path, {"a": entry("a", "en", 3)}, {"b": "FetchError: no"}, {"holdout": 0.1})
    m = bc.write_manifest(path, {"b": entry("b", "en", 4), "c": entry("c", "fr", None)}, {},
                          {"holdout": 0.1})
    assert m == json.loads(path.read_text())
    assert [s["name"] for s in m["sources"]] == ["a", "b", "c"] and m["failed"] == {}
    assert m["totals"] == {"en": {"chars": 20, "tokens": 7, "documents": 4},
                           "fr": {"chars": 10, "tokens": None, "documents": 2}}
    assert m["version"] == bc.MANIFEST_VERSION and m["holdout"] == 0.1
