"""Readers for the corpora users actually have, each yielding ``(key, text)`` documents one at a time.

- PubMed / MEDLINE citations in every format NLM has shipped: current baseline and update files and
  E-utilities efetch output (``pubmed25n0001.xml.gz``, a ``PubmedArticleSet`` of ``PubmedArticle``)
  and the older MEDLINE files (``medline16n0001.xml.gz``, a ``MedlineCitationSet`` of bare
  ``MedlineCitation``). One document per citation, the title then the abstract; labelled sections of a
  structured abstract are joined as "LABEL: text" paragraphs. ``DeleteCitation`` entries come out as
  ``(key, None)``. The key is ``int(PMID)``, so a later file's version of a citation (or its deletion)
  can supersede it.
- PMC Open Access full texts (JATS): one ``article`` per ``.nxml`` / ``.xml`` file, loose or inside
  PMC's bulk packages (``oa_comm_xml.*.tar.gz``), which are streamed without unpacking. Title,
  abstract and body paragraphs in order, section titles as paragraph labels; references, tables,
  figures, formulas and supplementary material left out. The key is the PMCID.
- MIMIC-III ``NOTEEVENTS.csv(.gz)``: quoted multi-line ``TEXT`` fields, ``ISERROR`` rows excluded, an
  optional ``CATEGORY`` filter, de-identification placeholders (``[**Known lastname 123**]``) kept,
  normalised to a typed tag (``[NAME]``, ``[DATE]``, ...) or removed. The key is ``ROW_ID``.
- MIMIC-IV-Note ``discharge.csv.gz`` / ``radiology.csv.gz``: an optional ``note_type`` filter (DS,
  AD, RR, AR), the ``___`` de-identification marks kept, normalised to ``[PHI]`` or removed. The key
  is ``note_id``.
- Plain text (one document a line), jsonl (one object a line, ``data.text_field``) and parquet.

A file that gives nothing at all (no document, no deletion, no skipped record) is an error naming the
file and what was found in it (for XML, its root element): a silently empty file is never a corpus.

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
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from html.entities import html5
from pathlib import Path
from typing import Optional, Union
from xml.etree import ElementTree

from ..config import ConfigError, DataConfig

FORMATS = ("pubmed", "jats", "noteevents", "text", "jsonl", "parquet")
_GZIP = (".gz", ".tgz")  # names of gzip files
_TAR = (".tar", ".tar.gz", ".tgz")  # names of PMC's bulk packages
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
    note_types: tuple[str, ...] = ()  # MIMIC-IV-Note note_type values to keep; empty: all
    deid: str = "keep"  # keep | normalise | remove  the [** ... **] (III) and ___ (IV) marks
    require_abstract: bool = True  # PubMed: a citation without an abstract is skipped (title only)
    pmc_parts: tuple[str, ...] = ("title", "abstract", "body")  # JATS: which parts make the document
    pmc_section_titles: str = "label"  # JATS: "label" ("Methods: ...") or "drop"
    pmc_require_body: bool = False  # JATS: skip (and count) articles without body paragraphs
    on_bad_input: str = "skip"  # skip (count and go on) | error


def read_options(data: DataConfig) -> ReadOptions:
    return ReadOptions(
        text_field=data.text_field,
        note_categories=tuple(data.note_categories),
        note_types=tuple(data.note_types),
        deid=data.deid,
        require_abstract=data.require_abstract,
        pmc_parts=tuple(data.pmc_parts),
        pmc_section_titles=data.pmc_section_titles,
        pmc_require_body=data.pmc_require_body,
        on_bad_input=data.on_bad_input,
    )


def detect_format(path: Path) -> Optional[str]:
    name = path.name.lower().removesuffix(".gz")
    if path.name.lower().endswith(_TAR) or name.endswith(".nxml"):
        return "jats"  # a PMC bulk package, or one JATS article
    if name.endswith(".xml"):
        # Both PubMed and PMC ship .xml: the root element decides (an unreadable file stays PubMed's,
        # whose reader says what is wrong with it).
        return "jats" if _root_element(path) == "article" else "pubmed"
    if name.endswith(".csv"):
        return "noteevents"
    if name.endswith((".txt", ".text")):
        return "text"
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet") and not path.name.lower().endswith(".gz"):
        return "parquet"
    return None


def require_known_format(source: str, key: str, path: Path) -> str:
    """The file's format (one of FORMATS), or a ConfigError naming the key and the formats known."""
    fmt = detect_format(path)
    if fmt is None:
        raise ConfigError(
            source, key, f"{path}: unknown format; expected .xml(.gz) (PubMed or PMC), .nxml or .tar.gz (PMC), "
            ".csv(.gz) (MIMIC-III NOTEEVENTS, MIMIC-IV-Note), .txt, .jsonl or .parquet",
        )  # fmt: skip
    return fmt


def read(path: Path, options: ReadOptions, skipped: Counter) -> Iterator[tuple[Key, Optional[str]]]:
    """Documents of one file; ``(key, None)`` is a PubMed deletion. Unreadable parts are counted in
    ``skipped`` (reason -> records) or raised, per ``options.on_bad_input``."""
    fmt = detect_format(path)
    if fmt is None:
        raise ValueError(
            f"{path}: unknown format; expected .xml(.gz), .nxml, .tar.gz, .csv(.gz), .txt, .jsonl or .parquet"
        )
    bad = _Bad(path, options, skipped)
    yielded = 0
    try:
        if path.stat().st_size == 0:
            bad("empty file")
            return
        if path.name.lower().endswith(_GZIP) and not _is_gzip(path):
            bad("not a gzip file, though named .gz")
            return
        for record in _READERS[fmt](path, options, bad):
            yielded += 1
            yield record
    except (EOFError, gzip.BadGzipFile, zlib.error, tarfile.ReadError) as e:
        # Everything before the damage has been yielded; what the damage hid cannot be counted.
        bad(f"truncated or corrupt gzip ({type(e).__name__}: {e}); the rest of the file is unreadable")
    except OSError as e:  # deleted, moved or unreadable since the job listed it: bad input like any other
        bad(f"cannot be read any more ({e.strerror or type(e).__name__}); was it deleted or moved while being read?")
        return
    if yielded == bad.count == bad.filtered == 0:  # nothing yielded, counted or filtered: not what its name says
        raise BadInput(f"{path}: no {_WHAT[fmt]} found in it ({_found_instead(path, fmt)})")


_WHAT = {
    "pubmed": "PubMed citation (PubmedArticle, MedlineCitation or DeleteCitation)",
    "jats": "JATS article",
    "noteevents": "note",
    "text": "line of text",
    "jsonl": "JSON line",
    "parquet": "row",
}


def _found_instead(path: Path, fmt: str) -> str:
    if fmt in ("pubmed", "jats") and not path.name.lower().endswith(_TAR):
        root = _root_element(path)
        return f"its root element is <{root}>" if root else "no XML element"
    return "only blank lines" if fmt in ("text", "jsonl") else "no data rows"


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _root_element(path: Path) -> Optional[str]:
    """The name of the first element of an XML file (after the prolog, DOCTYPE and comments), or None."""
    try:
        with _open_binary(path) as f:
            head = f.read(1 << 16)
    except (OSError, EOFError, zlib.error):
        return None
    match = _FIRST_ELEMENT.search(head)
    return match.group(1).decode("ascii", "replace") if match else None


_FIRST_ELEMENT = re.compile(rb"<(?![?!/])([A-Za-z_][\w.:-]*)")


class _Bad:
    def __init__(self, path: Path, options: ReadOptions, skipped: Counter):
        self.path, self.raise_, self.skipped = path, options.on_bad_input == "error", skipped
        self.count = 0  # records counted for this file
        self.filtered = 0  # records left out by a filter the user asked for (not bad input, not silence)

    def __call__(self, reason: str, where: str = "") -> None:
        if self.raise_:
            raise BadInput(f"{self.path}{': ' + where if where else ''}: {reason} (data.on_bad_input: error)")
        self.count += 1
        self.skipped[reason.split(" (")[0].split(";")[0]] += 1


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(_GZIP) else open(path, "rb")  # noqa: SIM115


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


# HTML's named entities (&nbsp;, &ndash;, ...), which JATS and older NLM files use through their DTDs;
# expat does not read external DTDs, so without these an article with one &ndash; would be unreadable.
_ENTITIES = {name.rstrip(";"): text for name, text in html5.items() if name.endswith(";")}


def _parse_xml(data: bytes, doctype: bool = False):
    """Parse XML bytes, resolving HTML's named entities. ``doctype``: the bytes are a record cut out of
    a file, without its DOCTYPE; one is added, since expat resolves undeclared entities only under one."""
    parser = ElementTree.XMLParser()
    parser.entity.update(_ENTITIES)
    if doctype:
        parser.feed(b'<!DOCTYPE record SYSTEM "record.dtd">')
    parser.feed(data)
    return parser.close()


# ------------------------------------------------------------------------------------------ PubMed

# A current file's records are PubmedArticle (whose MedlineCitation is inside it: the scan resumes after
# the record's end), an older MEDLINE file's are bare MedlineCitation; "<PubmedArticleSet>" and
# "<MedlineCitationSet>" do not match (the name must end at a space or ">").
_RECORD = re.compile(rb"<(PubmedArticle|PubmedBookArticle|MedlineCitation|DeleteCitation)[\s>]")
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
            element = _parse_xml(record, doctype=True)
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
        citation = element if name == b"MedlineCitation" else element.find("MedlineCitation")
        pmid = citation.findtext("PMID") if citation is not None else None
        if not pmid or not pmid.strip().isdigit():
            bad("citation without a PMID", where)
            continue
        article = citation.find("Article")
        title = _text(article.find("ArticleTitle")) if article is not None else ""
        abstract = _abstract(article) if article is not None else ""
        if not abstract and (options.require_abstract or not title):
            bad("citation without abstract text", f"{where}, PMID {pmid.strip()}")
            continue
        yield int(pmid), f"{title}\n{abstract}".strip()


# ------------------------------------------------------------------------------------ PMC (JATS)

_MATHML = "{http://www.w3.org/1998/Math/MathML}"
# Never text of the article: floats, formulas, graphics, notes, references, supplementary material.
_JATS_DROP = {
    "fig", "fig-group", "table-wrap", "table-wrap-group", "table", "disp-formula", "disp-formula-group",
    "inline-formula", "tex-math", "graphic", "inline-graphic", "media", "supplementary-material",
    "inline-supplementary-material", "ref-list", "fn-group", "fn", "object-id", "label", "alternatives",
    "chem-struct-wrap", "code", "preformat",
}  # fmt: skip
# Cross-references that are markers ("[12]", "Fig. 2" as a link target), not prose.
_MARKER_XREFS = {"bibr", "fig", "table", "supplementary-material", "fn", "table-fn", "disp-formula", "scheme"}
_EMPTY_BRACKETS = re.compile(r"\s*[\[(][\s,;\u2013\u2014-]*[\])]")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:)\]])")
# Elements whose paragraphs are the section's own, in order (a list's items, a boxed text, a quote).
_PARAGRAPH_CONTAINERS = {"list", "list-item", "boxed-text", "disp-quote", "statement", "def-list", "def-item", "def"}


def _local(tag) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _jats_text(element) -> str:
    """The prose of an element: its text with dropped elements and marker cross-references left out."""
    parts = [element.text or ""]
    for child in element:
        tag = _local(child.tag)
        dropped = tag in _JATS_DROP or child.tag == f"{_MATHML}math"
        if tag == "xref" and child.get("ref-type") in _MARKER_XREFS:
            dropped = True
        if not dropped:
            parts.append(_jats_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


def _clean(text: str) -> str:
    text = " ".join(text.split())
    text = _EMPTY_BRACKETS.sub("", text)  # "as shown [3, 4]" with the markers gone: "as shown"
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()


def _paragraphs(container, options: ReadOptions, label: str = "") -> list[str]:
    """Paragraphs of a body or abstract in document order; the first of each titled section carries
    its title as a label (``data.pmc_section_titles: label``)."""
    out: list[str] = []
    for child in container:
        tag = _local(child.tag)
        if tag == "sec":
            title = child.find("title")
            labelled = options.pmc_section_titles == "label" and title is not None
            out += _paragraphs(child, options, _clean(_jats_text(title)) if labelled else "")
        elif tag == "p":
            text = _clean(_jats_text(child))
            if text:
                out.append(f"{label}: {text}" if label else text)
                label = ""
        elif tag in _PARAGRAPH_CONTAINERS:
            inner = _paragraphs(child, options, label)
            label = "" if inner else label  # the label went to the container's first paragraph
            out += inner
    return out


def _pmcid(meta) -> Optional[str]:
    for kind in ("pmc", "pmcid"):
        for el in meta.iterfind(f"article-id[@pub-id-type='{kind}']") if meta is not None else ():
            digits = (el.text or "").strip().upper().removeprefix("PMC")
            if digits.isdigit():
                return f"PMC{digits}"
    return None


def _article(data: bytes, name: str, options: ReadOptions, bad: _Bad) -> Optional[tuple[Key, str]]:
    """One JATS article as ``(PMCID, text)``, or None when it is counted as skipped."""
    try:
        root = _parse_xml(data)
    except ElementTree.ParseError as e:
        bad(f"malformed XML article ({e})", name)
        return None
    if _local(root.tag) != "article":
        bad(f"not a JATS article (root element <{_local(root.tag)}>)", name)
        return None
    meta = root.find("front/article-meta")
    key = _pmcid(meta) or name
    parts = []
    if "title" in options.pmc_parts and meta is not None:
        title = meta.find("title-group/article-title")
        if title is not None and _clean(_jats_text(title)):
            parts.append(_clean(_jats_text(title)))
    if "abstract" in options.pmc_parts and meta is not None:
        # The main abstract: the one without an abstract-type ("graphical", "teaser", "summary" are extras).
        abstracts = meta.findall("abstract")
        main = next((a for a in abstracts if a.get("abstract-type") is None), abstracts[0] if abstracts else None)
        if main is not None:
            parts += _paragraphs(main, options)
    body = root.find("body")
    paragraphs = _paragraphs(body, options) if body is not None and "body" in options.pmc_parts else []
    if options.pmc_require_body and not paragraphs:
        bad("article without body text (data.pmc_require_body)", f"{name}, {key}")
        return None
    parts += paragraphs
    if not parts:
        bad("article without text", f"{name}, {key}")
        return None
    return key, "\n".join(parts)


def _read_jats(path: Path, options: ReadOptions, bad: _Bad) -> Iterator[tuple[Key, Optional[str]]]:
    if not path.name.lower().endswith(_TAR):
        with _open_binary(path) as f:
            article = _article(f.read(), path.name, options, bad)
        if article is not None:
            yield article
        return
    # A stream ("r|"), member after member, never seeking: a 4 GB bulk package is read once, not unpacked.
    # The gzip layer is ours, not tarfile's: tarfile ends a cut stream silently as if the archive ended
    # there, while GzipFile raises EOFError, which read() counts as damage.
    with _open_binary(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith((".nxml", ".xml")):
                continue  # directories, PDFs and images of the per-article packages
            f = tar.extractfile(member)
            article = _article(f.read(), member.name, options, bad) if f is not None else None
            if article is not None:
                yield article


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


def deidentified_iv(text: str, mode: str) -> str:
    """MIMIC-IV-Note's ``___`` marks: kept, replaced by one tag (they carry no type), or removed."""
    if mode == "keep":
        return text
    return _DEID_IV.sub("[PHI]" if mode == "normalise" else "", text)


NOTE_COLUMNS = ("ROW_ID", "CATEGORY", "ISERROR", "TEXT")  # MIMIC-III NOTEEVENTS
NOTE_IV_COLUMNS = ("NOTE_ID", "NOTE_TYPE", "TEXT")  # MIMIC-IV-Note discharge / radiology
_DEID_IV = re.compile(r"(?<!_)___(?!_)")  # MIMIC-IV's mark for every removed span; longer runs are form lines


def _read_noteevents(path: Path, options: ReadOptions, bad: _Bad) -> Iterator[tuple[Key, Optional[str]]]:
    csv.field_size_limit(min(sys.maxsize, 1 << 27))  # a discharge summary can pass csv's 128 KiB default
    with _open_text(path) as f:
        rows = csv.reader(f, strict=True)
        header = next(rows, None)
        names = [h.strip().upper() for h in header or []]
        col = {h: i for i, h in enumerate(names)}
        if all(c in col for c in NOTE_COLUMNS):
            kind, keep = "III", {c.strip().lower() for c in options.note_categories}
        elif all(c in col for c in NOTE_IV_COLUMNS):
            kind, keep = "IV", {c.strip().upper() for c in options.note_types}
        elif {"NOTE_ID", "FIELD_NAME", "FIELD_VALUE"} <= set(col):
            raise BadInput(
                f"{path}: a MIMIC-IV-Note detail table (note_id, field_name, field_value): key-value fields, "
                "no note text; train on discharge.csv.gz or radiology.csv.gz"
            )
        elif "ROW_ID" in col or "NOTE_ID" in col:  # one of the two, short of a column
            wanted = NOTE_COLUMNS if "ROW_ID" in col else NOTE_IV_COLUMNS
            table = "NOTEEVENTS" if "ROW_ID" in col else "MIMIC-IV-Note"
            missing = [c if table == "NOTEEVENTS" else c.lower() for c in wanted if c not in col]
            raise BadInput(f"{path}: not a {table} table: no {', '.join(missing)} column(s) in the header")
        else:
            shown = ", ".join(h.strip() for h in (header or [])[:8]) or "no header"
            raise BadInput(
                f"{path}: not a MIMIC-III NOTEEVENTS table (needs {', '.join(NOTE_COLUMNS)}) nor a MIMIC-IV-Note "
                f"table (needs {', '.join(c.lower() for c in NOTE_IV_COLUMNS)}); its header has {shown}"
            )
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
            if kind == "III" and row[col["ISERROR"]].strip() not in ("", "0"):
                bad("ISERROR note (flagged as an error by the caregiver)", f"line {line}")
                continue
            value = row[col["CATEGORY"]].strip().lower() if kind == "III" else row[col["NOTE_TYPE"]].strip().upper()
            if keep and value not in keep:
                bad.filtered += 1  # a filter the user asked for, not bad input
                continue
            text = row[col["TEXT"]]
            ident = row[col["ROW_ID" if kind == "III" else "NOTE_ID"]].strip()
            if not _valid_utf8(text):
                bad("invalid UTF-8 in a note", f"line {line}, {'ROW_ID' if kind == 'III' else 'note_id'} {ident}")
                continue
            if not text.strip():
                bad("empty note", f"line {line}")
                continue
            if kind == "III":
                yield (
                    int(ident) if ident.isdigit() else f"{path.name}:{line}",
                    deidentified(text, options.deid).strip(),
                )
            else:
                yield ident or f"{path.name}:{line}", deidentified_iv(text, options.deid).strip()


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
    "jats": _read_jats,
    "noteevents": _read_noteevents,
    "text": _read_text,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}
