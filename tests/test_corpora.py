"""The corpus pipeline on small files in the real formats: PubMed baseline/update XML, MIMIC-III
NOTEEVENTS, text/jsonl/parquet; every bad-input case; chunking, held-out split, whole-word masking,
the ``biodistill-prepare`` command."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import MINILM, minilm_dir
from transformers import AutoTokenizer

from biodistill.engine.config import ConfigError, DataConfig
from biodistill.engine.data import corpora
from biodistill.engine.data.batches import MLMCollator
from biodistill.engine.data.cache import prepare
from biodistill.engine.data.tokenise import Chunker

ABSTRACTS = [
    "Hepatocellular carcinoma is the most common primary liver malignancy in adults.",
    "Sepsis remains a leading cause of mortality in intensive care units worldwide.",
    "Metformin reduces hepatic glucose production and improves insulin sensitivity.",
    "Tumour necrosis factor alpha mediates inflammation in rheumatoid arthritis.",
    "Chronic kidney disease progression was associated with elevated proteinuria.",
]


def citation(pmid: int, title: str, sections=(), version: int = 1) -> str:
    """A PubmedArticle as the baseline files have it (trimmed to the elements a reader needs, plus
    some it must ignore)."""
    abstract = ""
    if sections:
        texts = "".join(
            f'<AbstractText Label="{label}" NlmCategory="{label}">{body}</AbstractText>' if label else
            f"<AbstractText>{body}</AbstractText>"
            for label, body in sections
        )  # fmt: skip
        abstract = f"<Abstract>{texts}<CopyrightInformation>(c) 2024</CopyrightInformation></Abstract>"
    return f"""<PubmedArticle>
  <MedlineCitation Status="MEDLINE" Owner="NLM">
    <PMID Version="{version}">{pmid}</PMID>
    <DateCompleted><Year>2024</Year><Month>01</Month><Day>05</Day></DateCompleted>
    <Article PubModel="Print-Electronic">
      <Journal><Title>Journal of Hepatology</Title></Journal>
      <ArticleTitle>{title}</ArticleTitle>
      {abstract}
      <AuthorList CompleteYN="Y"><Author ValidYN="Y"><LastName>Smith</LastName></Author></AuthorList>
      <Language>eng</Language>
    </Article>
    <MeshHeadingList><MeshHeading><DescriptorName UI="D006528">Carcinoma</DescriptorName></MeshHeading></MeshHeadingList>
  </MedlineCitation>
  <PubmedData><ArticleIdList><ArticleId IdType="pubmed">{pmid}</ArticleId></ArticleIdList></PubmedData>
</PubmedArticle>
"""


def pubmed_file(path, records: list[str], deletions=()):
    deletes = ""
    if deletions:
        deletes = "<DeleteCitation>" + "".join(f'<PMID Version="1">{p}</PMID>' for p in deletions) + "</DeleteCitation>"
    body = (
        '<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE PubmedArticleSet PUBLIC "-//NLM//DTD PubMedArticle, '
        '1st January 2024//EN" "https://dtd.nlm.nih.gov/ncbi/pubmed/out/pubmed_240101.dtd">\n<PubmedArticleSet>\n'
        + "".join(records) + deletes + "\n</PubmedArticleSet>\n"
    )  # fmt: skip
    data = body.encode() if isinstance(body, str) else body
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def baseline(tmp_path):
    records = [
        citation(1001, "Liver cancer in adults.", [("BACKGROUND", ABSTRACTS[0]), ("METHODS", ABSTRACTS[1])]),
        citation(1002, "Sepsis <i>outcomes</i> in the ICU.", [("", ABSTRACTS[1])]),
        citation(1003, "A title without an abstract."),
        citation(1004, "Metformin and the liver.", [("", ABSTRACTS[2])]),
        "<PubmedBookArticle><BookDocument><PMID>1005</PMID></BookDocument></PubmedBookArticle>\n",
        citation(1006, "Broken record.", [("", ABSTRACTS[3])]).replace("</ArticleTitle>", "</ArticleTitel>"),
        citation(1007, "TNF in arthritis.", [("", ABSTRACTS[3])]),
    ]
    return pubmed_file(tmp_path / "pubmed25n0001.xml.gz", records)


def read_all(path, skipped=None, **options):
    skipped = Counter() if skipped is None else skipped
    return list(corpora.read(path, corpora.ReadOptions(**options), skipped)), skipped


def test_pubmed_baseline_records(tmp_path):
    docs, skipped = read_all(baseline(tmp_path))
    assert [k for k, _ in docs] == [1001, 1002, 1004, 1007]
    assert docs[0][1] == f"Liver cancer in adults.\nBACKGROUND: {ABSTRACTS[0]}\nMETHODS: {ABSTRACTS[1]}"
    assert docs[1][1] == f"Sepsis outcomes in the ICU.\n{ABSTRACTS[1]}"  # inline markup flattened
    assert skipped == {
        "citation without abstract text": 1,
        "book record, not a journal citation": 1,
        "malformed XML record": 1,
    }
    titles, _ = read_all(tmp_path / "pubmed25n0001.xml.gz", require_abstract=False)
    assert (1003, "A title without an abstract.") in titles


def test_pubmed_invalid_utf8_and_error_mode(tmp_path):
    good = citation(2001, "Good.", [("", ABSTRACTS[4])])
    bad = citation(2002, "Caf\udce9 au lait spots.", [("", ABSTRACTS[0])]).encode("utf-8", "surrogateescape")
    path = tmp_path / "pubmed25n0002.xml"
    path.write_bytes(b"<PubmedArticleSet>" + good.encode() + bad + b"</PubmedArticleSet>")
    docs, skipped = read_all(path)
    assert [k for k, _ in docs] == [2001] and skipped == {"invalid UTF-8 in an XML record": 1}
    with pytest.raises(corpora.BadInput, match=r"pubmed25n0002.xml: record 2: invalid UTF-8"):
        read_all(path, on_bad_input="error")


def test_truncated_gzip_keeps_what_came_before_and_says_so(tmp_path):
    records = [citation(3000 + i, f"Title {i}.", [("", ABSTRACTS[i % 5] * 40)]) for i in range(60)]
    path = pubmed_file(tmp_path / "pubmed25n0003.xml.gz", records)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    docs, skipped = read_all(path)
    assert 10 < len(docs) < 60 and [k for k, _ in docs] == list(range(3000, 3000 + len(docs)))
    assert list(skipped) == ["truncated or corrupt gzip"]
    empty = tmp_path / "pubmed25n0004.xml.gz"
    empty.write_bytes(b"")
    assert read_all(empty) == ([], Counter({"empty file": 1}))


NOTE_HEADER = '"ROW_ID","SUBJECT_ID","HADM_ID","CHARTDATE","CHARTTIME","STORETIME","CATEGORY","DESCRIPTION","CGID","ISERROR","TEXT"\n'


def note(row_id, category, text, iserror=""):
    text = text.replace('"', '""')
    return f'{row_id},{row_id + 100},{row_id + 200},2151-07-12,,,"{category}","Report",,{iserror},"{text}"\n'


def noteevents(tmp_path, gz=True):
    discharge = (
        "Admission Date:  [**2151-7-16**]       Discharge Date:  [**2151-8-4**]\n\n"
        "Service: MEDICINE\n\nHistory: Patient seen by Dr. [**Last Name (STitle) 1234**] at [**Hospital1 18**].\n"
        'She said "no chest pain", call [**Telephone/Fax (1) 5678**].'
    )
    body = (
        NOTE_HEADER
        + note(1, "Discharge summary", discharge)
        + note(2, "Nursing/other", "Pt resting comfortably.\nVS stable.")
        + note(3, "Radiology", "CHEST X-RAY: no acute process.", iserror="1")
        + note(4, "Radiology", "CT HEAD: no hemorrhage.")
        + '5,105,205,2151-07-12,,,"Nursing/other","Report",,,"unescaped "quote" here"\n'  # broken quoting
        + "6,106,206,2151-07-12,,,Radiology,Report\n"  # too few fields
    )
    raw = body.encode() + note(7, "Radiology", "MRI: caf\udce9").encode("utf-8", "surrogateescape")
    raw += note(8, "Nursing/other", "Family meeting held.").encode()
    path = tmp_path / ("NOTEEVENTS.csv.gz" if gz else "NOTEEVENTS.csv")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def test_noteevents(tmp_path):
    docs, skipped = read_all(noteevents(tmp_path))
    assert [k for k, _ in docs] == [1, 2, 4, 8]
    assert "Pt resting comfortably.\nVS stable." == docs[1][1]  # a quoted multi-line field
    assert "[**Last Name (STitle) 1234**]" in docs[0][1] and 'She said "no chest pain"' in docs[0][1]
    assert skipped == {
        "ISERROR note": 1,
        "broken CSV quoting": 1,
        "CSV row with 8 fields, expected 11": 1,
        "invalid UTF-8 in a note": 1,
    }
    normalised, _ = read_all(tmp_path / "NOTEEVENTS.csv.gz", deid="normalise", note_categories=("discharge summary",))
    assert [k for k, _ in normalised] == [1]
    assert normalised[0][1].startswith("Admission Date:  [DATE]       Discharge Date:  [DATE]")
    assert "Dr. [NAME] at [LOCATION]" in normalised[0][1] and "call [CONTACT]." in normalised[0][1]
    removed, _ = read_all(tmp_path / "NOTEEVENTS.csv.gz", deid="remove", note_categories=("Discharge summary",))
    assert "[**" not in removed[0][1] and "Dr.  at ." in removed[0][1]
    with pytest.raises(corpora.BadInput, match=r"NOTEEVENTS.csv.gz: line 10: ISERROR note"):
        read_all(tmp_path / "NOTEEVENTS.csv.gz", on_bad_input="error")
    other = tmp_path / "admissions.csv"
    other.write_text("ROW_ID,SUBJECT_ID,ADMITTIME\n1,2,2150-01-01\n")
    with pytest.raises(corpora.BadInput, match="not a NOTEEVENTS table: no CATEGORY, ISERROR, TEXT"):
        read_all(other)


def test_text_jsonl_parquet_bad_records(tmp_path):
    jsonl = tmp_path / "abstracts.jsonl"
    jsonl.write_bytes(
        b'{"text": "First abstract."}\n{"text": broken\n\n{"title": "no text"}\n'
        + '{"text": "caf\udce9"}\n'.encode("utf-8", "surrogateescape")
        + b'{"text": "Second abstract."}\n'
    )
    docs, skipped = read_all(jsonl)
    assert [t for _, t in docs] == ["First abstract.", "Second abstract."]
    assert skipped == {
        "malformed JSON line": 1,
        "JSON line without a string 'text' field": 1,
        "invalid UTF-8 in a line": 1,
    }
    parquet = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"text": ["Note one.", None, "Note two."]}), parquet)
    docs, skipped = read_all(parquet)
    assert [t for _, t in docs] == ["Note one.", "Note two."] and skipped == {"null 'text' value": 1}
    text = tmp_path / "lines.txt"
    text.write_text("one document\n\nanother document\n")
    assert [t for _, t in read_all(text)[0]] == ["one document", "another document"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def prep(tokenizer, tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return prepare(DataConfig(**kw), tokenizer, "recipe.yaml", is_builder=True, barrier=lambda: None)


def test_pubmed_updates_supersede_and_delete(tmp_path, tokenizer):
    records = [citation(4000 + i, f"Citation {i}.", [("", ABSTRACTS[i % 5])]) for i in range(20)]
    pubmed_file(tmp_path / "pubmed25n0001.xml.gz", records)
    update = [citation(4003, "Revised citation 3.", [("", "A corrected abstract about pancreatitis.")], version=2)]
    pubmed_file(tmp_path / "pubmed25n1275.xml.gz", update, deletions=[4005, 4006, 9999])
    splits, info = prep(tokenizer, tmp_path, train_files=[str(tmp_path / "*.xml.gz")], packing=False, max_length=64)
    assert info["documents_read"] == 21 and (info["superseded"], info["deleted"]) == (1, 2)
    assert sum(info["documents"].values()) == 18
    texts = [tokenizer.decode(x, skip_special_tokens=True) for s in splits.values() for x in s["input_ids"]]
    assert "revised citation 3. a corrected abstract about pancreatitis." in texts
    assert not any(t.startswith(("citation 3.", "citation 5.", "citation 6.")) for t in texts)


def test_prepare_chunks_splits_and_counts(tmp_path, tokenizer):
    base = noteevents(tmp_path, gz=False)
    lines = base.read_bytes().splitlines(keepends=True)
    extra = b"".join(note(100 + i, "Nursing/other", f"{ABSTRACTS[i % 5]} " * (1 + i % 9)).encode() for i in range(60))
    base.write_bytes(b"".join(lines) + extra)
    kw = dict(train_files=[str(base)], max_length=32, heldout_fraction=0.1)
    splits, info = prep(tokenizer, tmp_path, **kw, packing=False, long_documents="split")
    assert info["documents"] == {"train": 58, "heldout": 6} and info["skipped"]["ISERROR note"] == 1
    assert sum(info["skipped"].values()) == 4
    # Exactly the documents' tokens, each document in its own sequences ([CLS] body [SEP], <= 32).
    docs, _ = read_all(base)
    ids = tokenizer([t for _, t in docs], add_special_tokens=False)["input_ids"]
    seqs = [x for s in splits.values() for x in s["input_ids"]]
    assert all(len(x) <= 32 and x[0] == tokenizer.cls_token_id and x[-1] == tokenizer.sep_token_id for x in seqs)
    assert sum(len(x) - 2 for x in seqs) == sum(len(x) for x in ids) == info["tokens_read"]
    assert sorted(tuple(x[1:-1]) for x in seqs) == sorted(
        tuple(doc[i : i + 30]) for doc in ids for i in range(0, len(doc), 30)
    )
    truncated, info_t = prep(tokenizer, tmp_path, **kw, packing=False)
    assert sum(info_t["sequences"].values()) == 64 and info_t["path"] != info["path"]
    packed, info_p = prep(tokenizer, tmp_path, **kw, packing=True)
    assert all(len(x) == 32 for s in packed.values() for x in s["input_ids"])
    # The same documents held out whatever the chunking and the worker count.
    assert set(tuple(x[1:-1]) for x in splits["heldout"]["input_ids"]) >= {
        tuple(x[1:-1]) for x in truncated["heldout"]["input_ids"] if len(x) < 32
    }


def test_held_out_documents_are_independent_of_workers(tmp_path, tokenizer):
    for i in range(4):
        pubmed_file(tmp_path / f"pubmed25n000{i}.xml",
                    [citation(5000 + 10 * i + j, f"Paper {i}-{j}.", [("", ABSTRACTS[j % 5])]) for j in range(10)])  # fmt: skip
    kw = dict(train_files=[str(tmp_path / "*.xml")], packing=False, max_length=64, heldout_fraction=0.2)
    one, _ = prep(tokenizer, tmp_path, **kw, num_workers=1, cache_dir=str(tmp_path / "a"))
    four, info = prep(tokenizer, tmp_path, **kw, num_workers=4, cache_dir=str(tmp_path / "b"))
    assert info["documents"] == {"train": 32, "heldout": 8}
    for name in ("train", "heldout"):
        assert one[name]["input_ids"] == four[name]["input_ids"]
    assert not {tuple(x) for x in one["train"]["input_ids"]} & {tuple(x) for x in one["heldout"]["input_ids"]}


def test_error_mode_and_unusable_corpora_are_named(tmp_path, tokenizer):
    path = baseline(tmp_path)
    with pytest.raises(ConfigError, match=r"data.train_files\[0\]: .*record 3, PMID 1003: citation without abstract"):
        prep(tokenizer, tmp_path, train_files=[str(path)], on_bad_input="error")
    second = pubmed_file(tmp_path / "pubmed25n0002.xml", [citation(1100, "Fine.", [("", ABSTRACTS[0])])])
    with pytest.raises(ConfigError, match=r"data.train_files\[1\]: .*record 3, PMID 1003") as e:  # from a worker
        prep(tokenizer, tmp_path, train_files=[str(second), str(path)], on_bad_input="error", num_workers=2)
    assert e.value.source == "recipe.yaml"
    empty = tmp_path / "NOTEEVENTS.csv"
    empty.write_text(NOTE_HEADER)
    with pytest.raises(ConfigError, match=r"NOTEEVENTS.csv: no note found in it \(no data rows\)"):
        prep(tokenizer, tmp_path, train_files=[str(empty)])  # a header and nothing else is never a corpus
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # nothing half-written left behind


def test_chunker_packing_matches_group_texts():
    """Packing is transformers' run_mlm group_texts over documents joined by [SEP], carried across
    batches of documents."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(5, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (50,), generator=g)]
    chunk = Chunker(18, cls_id=1, sep_id=2, packing=True, long_documents="truncate")
    out = []
    for start in range(0, 50, 7):
        part = docs[start : start + 7]
        seqs = chunk(torch.tensor(sum(part, [])).int().numpy(), torch.tensor([len(d) for d in part]).numpy())
        out += seqs.to_pylist() if seqs is not None else []
    stream = sum((d + [2] for d in docs), [])
    expected = [[1, *stream[i : i + 16], 2] for i in range(0, len(stream) - 15, 16)]
    assert out == expected and len(chunk.carry) == len(stream) % 16


def test_whole_word_masking(tokenizer):
    text = "hepatocellular carcinoma and nephrolithiasis " * 12
    ids = tokenizer(text)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    collator = MLMCollator(tokenizer, 0.3, seed=3, whole_word=True)
    masked_any = 0
    for index in range(20):
        _, labels = collator.mask(ids, 0, index)
        chosen = (labels != -100).tolist()
        # Every piece of a word shares its word's fate.
        for i in range(1, len(ids)):
            if pieces[i].startswith("##"):
                assert chosen[i] == chosen[i - 1]
        masked_any += sum(chosen)
    assert 0.2 < masked_any / (20 * (len(ids) - 2)) < 0.4
    token_level = MLMCollator(tokenizer, 0.3, seed=3)
    split = sum(
        1 for index in range(20) for i, lab in enumerate(token_level.mask(ids, 0, index)[1].tolist())
        if pieces[i].startswith("##") and (lab != -100) != (token_level.mask(ids, 0, index)[1][i - 1] != -100)
    )  # fmt: skip
    assert split > 0  # token-level masking does split words: the test can tell the two apart


def prepare_command(tmp_path, train_files: list[str]) -> list[str]:
    """``biodistill-prepare`` (as ``python -m``) over a recipe whose corpus is ``train_files``, 48-token sequences."""
    recipe = {
        "teacher": {"path": MINILM},
        "student": {"init": "config", "overrides": {"num_hidden_layers": 2}},
        "losses": {"terms": [{"kind": "hidden_cosine"}]},
        "data": {"train_files": train_files, "cache_dir": str(tmp_path / "cache"), "packing": False},
        "train": {"output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    return [sys.executable, "-m", "biodistill.engine.data.cache", "--config", str(path), "--data.max_length", "48"]


def test_prepare_command(tmp_path):
    cmd = prepare_command(tmp_path, [str(baseline(tmp_path))])
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "documents read 4" in first.stdout and "skipped        1  malformed XML record" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "already there: nothing to do" in again.stdout
    bad = subprocess.run([*cmd, "--data.deid", "scrub"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "data.deid" in bad.stderr


@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_encoder_gives_the_tokenizer_s_own_ids(tokenizer, lowercase):
    """The ASCII fast path (normalised in Python, encoded without the normalizer) changes nothing."""
    from tokenizers import Tokenizer

    from biodistill.engine.data.tokenise import Encoder

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["normalizer"]["lowercase"] = lowercase
    reference = Tokenizer.from_str(json.dumps(spec))
    reference.no_padding()
    reference.no_truncation()
    texts = [
        "Hepatocellular CARCINOMA (HCC) in 12.5% of Patients;\tp<0.05\r\nsee Fig.2",
        "control\x00chars\x07 and DEL\x7f removed, \x0bvertical tab\x0c form feed",
        "Café au lait spots, α-synuclein and β-amyloid in Sjögren's syndrome",
        "中文 mixed with English and émigré",
        "",
        "   ",
    ]
    expected = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    assert Encoder(json.dumps(spec))(texts) == expected
    assert any(expected) and Encoder(json.dumps(spec)).ascii is not None


def test_recursive_glob_over_symlink_loops_reads_each_file_once(tmp_path):
    """``data/loop/{notes.jsonl, self -> ., up -> ../loop}`` under ``data/loop/**/*.jsonl``: glob follows the links
    until the path is too long (biodistill-prepare printed nothing for 300 s; with one loop the file was read 41
    times). Each real file is read once, and the command finishes."""
    import os

    loop = tmp_path / "data" / "loop"
    loop.mkdir(parents=True)
    (loop / "notes.jsonl").write_text(
        "".join(json.dumps({"text": f"{a} Note {i}."}) + "\n" for i, a in enumerate(ABSTRACTS * 2))
    )
    os.symlink(".", loop / "self")
    os.symlink("../loop", loop / "up")
    (loop / "sub").mkdir()
    (loop / "sub" / "more.jsonl").write_text(json.dumps({"text": ABSTRACTS[0]}) + "\n")
    done = subprocess.run(prepare_command(tmp_path, [str(loop / "**" / "*.jsonl")]), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "files 2, documents read 11" in done.stdout


def test_a_file_deleted_while_it_is_read_is_bad_input(tmp_path, tokenizer, monkeypatch):
    """A corpus file removed after the job listed it (a sync job, a cleanup) is handled by data.on_bad_input, like
    any file that cannot be read: counted and skipped, or the error naming it; never a FileNotFoundError traceback
    after the other files' work."""
    first = tmp_path / "a.jsonl"
    first.write_text("".join(json.dumps({"text": f"{a} First {i}."}) + "\n" for i, a in enumerate(ABSTRACTS * 2)))
    second = tmp_path / "b.jsonl"
    second.write_text(json.dumps({"text": ABSTRACTS[1]}) + "\n")
    real_read = corpora.read

    def read_then_delete(path, options, skipped):  # the second file goes while the first one is being read
        if path == first and second.exists():
            second.unlink()
        return real_read(path, options, skipped)

    monkeypatch.setattr(corpora, "read", read_then_delete)
    files = [str(tmp_path / "*.jsonl")]
    _, info = prep(tokenizer, tmp_path, train_files=files, packing=False, max_length=48)
    assert info["documents_read"] == 10 and info["skipped"] == {"cannot be read any more": 1}
    second.write_text(json.dumps({"text": ABSTRACTS[1]}) + "\n")
    with pytest.raises(ConfigError) as e:
        prep(tokenizer, tmp_path, train_files=files, packing=False, max_length=48, on_bad_input="error",
             cache_dir=str(tmp_path / "strict"))  # fmt: skip
    assert (e.value.key, e.value.message) == (
        "data.train_files[0] (b.jsonl)",
        f"{second}: cannot be read any more (No such file or directory); was it deleted or moved while being read? "
        "(data.on_bad_input: error)",
    )
