"""Readers for the corpora users actually have, each yielding ``(key, text)`` documents one at a time.

- PubMed baseline / update files (``pubmed25n0001.xml.gz``, a ``PubmedArticleSet``): one document per
  citation, the title then the abstract; labelled sections of a structured abstract are joined as
  "LABEL: text" paragraphs. ``DeleteCitation`` entries of update files come out as ``(key, None)``.
  The key is ``int(PMID)``, so a later file's version of a citation (or its deletion) can supersede it.
- MIMIC-III ``NOTEEVENTS.csv(.gz)``: quoted multi-line ``TEXT`` fields, ``ISERROR`` rows excluded, an
  optional ``CATEGORY`` filter, de-identification placeholders (``[**Known lastname 123**]``) kept,
  normalised to a typed tag (``[NAME]``, ``[DATE]``, ...) or removed. The key is ``ROW_ID``.
- Plain text (one document a line), jsonl (one object a line, ``data.text_field``) and parquet.

Bad input never crashes a job and is never dropped silently: every skipped record is counted under a
reason in the ``skipped`` Counter the caller passes (and reported in the preparation summary), or,
with ``data.on_bad_input: error``, raises :class:`BadInput` naming the file, the record and the reason.

PubMed files are split into records by scanning the bytes for ``<PubmedArticle>`` elements and each
record is parsed on its own, so one malformed citation costs that citation, not the rest of the file
(a streaming XML parser stops at the first error).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from xml.etree import ElementTree

FORMATS = ("pubmed", "noteevents", "text", "jsonl", "parquet")
Key = Union[int, str]


class BadInput(ValueError):
    """A record that cannot be read, under ``data.on_bad_input: error``, or a file that is not what its
    name says."""


class MissingField(BadInput):
    """No record of a jsonl / parquet file has the configured text field (``data.text_field``)."""


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"  # jsonl / parquet column
    note_categories: tuple[str, ...] = ()  # NOTEEVENTS CATEGORY values to keep; empty: all
    deid: str = "keep"  # keep | normalise | remove  the [** ... **] placeholders
    require_abstract: bool = True  # PubMed: a citation without an abstract is skipped (title only)
    on_bad_input: str = "skip"  # skip (count and go on) | error


def detect_format(path: Path) -> Optional[str]:
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".xml"):
        return "pubmed"
    if name.endswith(".csv"):
        return "noteevents"
    if name.endswith((".txt", ".text")):
        return "text"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet") and not path.name.lower().endswith(".gz"):
        return "parquet"
    return None


def read(path: Path, options: ReadOptions, skipped: Counter) -> Iterator[tuple[Key, Optional[str]]]:
    """Documents of one file; ``(key, None)`` is a PubMed deletion. Unreadable parts are counted in
    ``skipped`` (reason -> records) or raised, per ``options.on_bad_input``."""
    fmt = detect_format(path)
    if fmt is None:
        raise ValueError(f"{path}: unknown format; expected .xml(.gz), .csv(.gz), .txt, .jsonl or .parquet")
    bad = _Bad(path, options, skipped)
    if path.stat().st_size == 0:
        bad("empty file")
        return
    try:
        yield from _READERS[fmt](path, options, bad)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # Everything before the damage has been yielded; what the damage hid cannot be counted.
        bad(f"truncated or corrupt gzip ({type(e).__name__}: {e}); the rest of the file is unreadable")


class _Bad:
    def __init__(self, path: Path, options: ReadOptions, skipped: Counter):
        self.path, self.raise_, self.skipped = path, options.on_bad_input == "error", skipped

    def __call__(self, reason: str, where: str = "") -> None:
        if self.raise_:
            raise BadInput(f"{self.path}{': ' + where if where else ''}: {reason} (data.on_bad_input: error)")
        self.skipped[reason.split(" (")[0].split(";")[0]] += 1


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _open_text(path: Path) -> io.TextIOBase:
    raw = _open_binary(path)
    # surrogateescape: invalid UTF-8 bytes survive decoding as lone surrogates, so the record holding
    # them can be found and skipped instead of failing the whole file.
    return io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")


def _valid_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ------------------------------------------------------------------------------------------ PubMed

_RECORD = re.compile(rb"<(PubmedArticle|PubmedBookArticle|DeleteCitation)[\s>]")
_BLOCK = 1 << 20


def _pubmed_records(path: Path) -> Iterator[tuple[bytes, bytes]]:
    """``(element name, bytes of the element)`` for each top-level record, in file order."""
    raw = _open_binary(path)
    damage = None

    def read_block() -> bytes:
        # read1: one decompressed chunk at a time, so a damaged gzip loses only what follows the damage.
        nonlocal damage
        try:
            return raw.read1(_BLOCK)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            damage = e
            return b""

    with raw:
        buf, eof = b"", False
        while True:
            match = _RECORD.search(buf)
            if match is None:
                if eof:
                    if damage is not None:
                        raise damage
                    return
                more = read_block()
                eof = not more
                buf = buf[-64:] + more  # keep a tail: an opening tag may straddle two blocks
                continue
            name = match.group(1)
            close = b"</" + name + b">"
            end = buf.find(close, match.start())
            while end < 0 and not eof:
                more = read_block()
                eof = not more
                buf += more
                end = buf.find(close, match.start())
            if end < 0:
                if damage is not None:
                    raise damage  # the record was cut by the damage: counted as the damage, not as bad XML
                yield name, buf[match.start() :]  # unterminated: the parser will say so
                return
            yield name, buf[match.start() : end + len(close)]
            buf = buf[end + len(close) :]


def _text(element) -> str:
    return " ".join("".join(element.itertext()).split()) if element is not None else ""


def _abstract(article) -> str:
    parts = []
    for section in article.iterfind(".//Abstract/AbstractText"):
        body = _text(section)
        if not body:
            continue
        label = section.get("Label")
        parts.append(f"{label}: {body}" if label and label.upper() != "UNLABELLED" else body)
    return "\n".join(parts)


def _read_pubmed(path: Path, options: ReadOptions, bad: _Bad) -> Iterator[tuple[Key, Optional[str]]]:
    for n, (name, record) in enumerate(_pubmed_records(path)):
        where = f"record {n + 1}"
        try:
            element = ElementTree.fromstring(record)
        except ElementTree.ParseError as e:
            try:
                record.decode("utf-8")
            except UnicodeDecodeError:
                bad("invalid UTF-8 in an XML record", where)
                continue
            bad(f"malformed XML record ({e})", where)
            continue
        if name == b"DeleteCitation":
            for pmid in element.iterfind("PMID"):
                if pmid.text and pmid.text.strip().isdigit():
                    yield int(pmid.text), None
            continue
        if name == b"PubmedBookArticle":
            bad("book record, not a journal citation (PubmedBookArticle)", where)
            continue
        pmid = element.findtext("MedlineCitation/PMID")
        if not pmid or not pmid.strip().isdigit():
            bad("citation without a PMID", where)
            continue
        article = element.find("MedlineCitation/Article")
        title = _text(article.find("ArticleTitle")) if article is not None else ""
        abstract = _abstract(article) if article is not None else ""
        if not abstract and (options.require_abstract or not title):
            bad("citation without abstract text", f"{where}, PMID {pmid.strip()}")
            continue
        yield int(pmid), f"{title}\n{abstract}".strip()


# ------------------------------------------------------------------------------------ NOTEEVENTS

_DEID = re.compile(r"\[\*\*(.*?)\*\*\]", re.S)
_DEID_TYPES = [  # first match wins; the placeholder text is MIMIC's own description of what was removed
    (re.compile(r"^\s*[\d\-/]+\s*$|year|month|date|holiday", re.I), "[DATE]"),
    (re.compile(r"name|initials|doctor|attending", re.I), "[NAME]"),
    (re.compile(r"hospital|location|address|street|state|country|ward|university|company", re.I), "[LOCATION]"),
    (re.compile(r"telephone|fax|phone|pager|e-?mail|url", re.I), "[CONTACT]"),
    (re.compile(r"age over 90", re.I), "[AGE]"),
    (re.compile(r"number|identifier|id\b|serial|medical record|md number|unit|job|provider", re.I), "[ID]"),
]


def deidentified(text: str, mode: str) -> str:
    if mode == "keep":
        return text
    if mode == "remove":
        return _DEID.sub("", text)
    return _DEID.sub(lambda m: next((tag for rx, tag in _DEID_TYPES if rx.search(m.group(1))), "[PHI]"), text)


NOTE_COLUMNS = ("ROW_ID", "CATEGORY", "ISERROR", "TEXT")


def _read_noteevents(path: Path, options: ReadOptions, bad: _Bad) -> Iterator[tuple[Key, Optional[str]]]:
    csv.field_size_limit(min(sys.maxsize, 1 << 27))  # a discharge summary can pass csv's 128 KiB default
    categories = {c.strip().lower() for c in options.note_categories}
    with _open_text(path) as f:
        rows = csv.reader(f, strict=True)
        header = next(rows, None)
        missing = [c for c in NOTE_COLUMNS if header is None or c not in [h.strip().upper() for h in header]]
        if missing:
            raise BadInput(f"{path}: not a NOTEEVENTS table: no {', '.join(missing)} column(s) in the header")
        col = {h.strip().upper(): i for i, h in enumerate(header)}
        while True:
            line = rows.line_num + 1
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as e:
                bad(f"broken CSV quoting ({e})", f"line {line}")
                continue
            if len(row) != len(header):
                bad(f"CSV row with {len(row)} fields, expected {len(header)}", f"line {line}")
                continue
            if row[col["ISERROR"]].strip() not in ("", "0"):
                bad("ISERROR note (flagged as an error by the caregiver)", f"line {line}")
                continue
            if categories and row[col["CATEGORY"]].strip().lower() not in categories:
                continue  # a filter the user asked for, not bad input: counted by the caller's totals
            text = row[col["TEXT"]]
            if not _valid_utf8(text):
                bad("invalid UTF-8 in a note", f"line {line}, ROW_ID {row[col['ROW_ID']]}")
                continue
            if not text.strip():
                bad("empty note", f"line {line}")
                continue
            yield (
                int(row[col["ROW_ID"]]) if row[col["ROW_ID"]].isdigit() else f"{path.name}:{line}",
                deidentified(text, options.deid).strip(),
            )


# ------------------------------------------------------------------------------ text, jsonl, parquet


def _read_text(path: Path, options: ReadOptions, bad: _Bad) -> Iterator[tuple[Key, Optional[str]]]:
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not _valid_utf8(line):
                bad("invalid UTF-8 in a line", f"line {n}")
            elif line.strip():
                yield f"{path.name}:{n}", line.strip()


def _read_jsonl(path: Path, options: ReadOptions, bad: _Bad) -> Iterator[tuple[Key, Optional[str]]]:
    field, parsed, found = options.text_field, None, False
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not _valid_utf8(line):
                bad("invalid UTF-8 in a line", f"line {n}")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad(f"malformed JSON line ({e})", f"line {n}")
                continue
            parsed = parsed or record
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                bad(f"JSON line without a string {field!r} field", f"line {n}")
                continue
            found = True
            if text.strip():
                yield f"{path.name}:{n}", text.strip()
    if parsed is not None and not found:  # a wrong data.text_field, not bad records
        keys = sorted(parsed) if isinstance(parsed, dict) else type(parsed).__name__
        raise MissingField(f"{path}: no line has a string {field!r} field; the first line has {keys}")


def _read_parquet(path: Path, options: ReadOptions, bad: _Bad) -> Iterator[tuple[Key, Optional[str]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged footer
        bad(f"unreadable parquet file ({e})")
        return
    if options.text_field not in table.schema_arrow.names:
        raise MissingField(f"{path}: no column {options.text_field!r}; its columns are {table.schema_arrow.names}")
    n = 0
    for batch in table.iter_batches(columns=[options.text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            n += 1
            if text is None:
                bad(f"null {options.text_field!r} value", f"row {n}")
            elif text.strip():
                yield f"{path.name}:{n}", text.strip()


_READERS = {
    "pubmed": _read_pubmed,
    "noteevents": _read_noteevents,
    "text": _read_text,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}
