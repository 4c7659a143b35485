"""The data cache: ``prepare`` finds a corpus's memory-mapped Arrow cache by its key (sources, tokenizer,
chunking and split options) or builds it; ``biodistill-prepare --config recipe.yaml`` builds it ahead of
the job, once for every rank and node of later jobs.

Two phases, so that the expensive one runs in parallel and the exact one sees everything:
1. per file, in ``data.num_workers`` processes: read documents (``corpora.py``), tokenise them in
   batches with the fast tokenizer's Rust encoder, write ``[key, hash, ids]`` to an Arrow shard;
2. one pass over the shards with NumPy: PubMed updates applied (a later file's version of a PMID
   supersedes earlier ones, DeleteCitation removes it), the held-out documents chosen (the
   ``heldout_fraction`` of documents with the smallest seeded hash of their key: an exact count,
   independent of file order and worker count), then each split chunked to ``max_length`` and written
   as one Arrow stream of ``input_ids`` (int32).
Chunking keeps document boundaries unless ``data.packing``: ``long_documents: truncate`` keeps the
first ``max_length`` tokens of a document (the published recipes), ``split`` continues it in further
sequences; packing joins documents with [SEP] and cuts full blocks (run_mlm's ``group_texts``).

Compared with ``datasets.map`` tokenisation then ``group_texts`` (the transformers example), this
reads and writes the tokens once, as int32 and without attention masks or token-type ids, and
chunks with array arithmetic instead of Python lists (BENCHMARKS.md has the ratio).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from ..config import ConfigError, DataConfig, data_files
from . import corpora
from .tokenise import Chunker, Encoder, doc_hash, recipe_tokenizer, tokenizer_fingerprint

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when the cached layout, a reader or the chunking rule changes
ENCODE_BATCH = 1000  # documents per tokenizer call and per Arrow record batch
_DOC_SCHEMA = pa.schema([("key", pa.int64()), ("hash", pa.float64()), ("ids", pa.list_(pa.int32()))])
_SEQ_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])


# ------------------------------------------------------------------------ the cache: find or build


def _source_fingerprint(data: DataConfig, source: str) -> list:
    if data.dataset:
        return [data.dataset, data.dataset_config, data.dataset_split]
    out = []
    for _, path in data_files(data, source):
        st = path.stat()
        out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return out


def cache_key(data: DataConfig, tokenizer) -> str:
    key = {
        "format": CACHE_FORMAT,
        "sources": _source_fingerprint(data, "data.train_files"),
        "text_field": data.text_field,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_length": data.max_length,
        "packing": data.packing,
        "long_documents": data.long_documents,
        "note_categories": sorted(c.lower() for c in data.note_categories),
        "note_types": sorted(c.upper() for c in data.note_types),
        "pmc": [data.pmc_parts, data.pmc_section_titles, data.pmc_require_body],
        "deid": data.deid,
        "require_abstract": data.require_abstract,
        "heldout_fraction": data.heldout_fraction,
        "seed": data.seed,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def prepare(data: DataConfig, tokenizer, source: str, is_builder: bool, barrier: Callable[[], None]):
    """Return ``(DatasetDict(train, heldout), info)``, tokenising only if no cache matches.

    One process per node (``is_builder``) builds; the others wait at ``barrier`` then read the cache.
    The cache directory appears whole or not at all: it is written under a temporary name and renamed.
    """
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or tokenizer.mask_token_id is None:
        raise ConfigError(
            source, "teacher.path", "the tokenizer needs [CLS], [SEP] and [MASK] tokens for masked-LM data"
        )
    root = Path(data.cache_dir).expanduser()
    final = root / cache_key(data, tokenizer)
    built = False
    if is_builder and not (final / "meta.json").is_file():
        build(data, tokenizer, source, final, progress=is_builder)
        built = True
    elif is_builder and data.on_bad_input == "error" and json.loads((final / "meta.json").read_text())["skipped"]:
        # Built under on_bad_input: skip, this cache left records out, which strict mode must not accept in
        # silence: read the files again, so the first bad record stops the job by file and line. (The cache
        # stays: its key and content do not depend on the mode, only on what the files hold.)
        build(data, tokenizer, source, final, progress=is_builder)
    barrier()
    if not (final / "meta.json").is_file():
        raise RuntimeError(f"data cache {final} was not built; is data.cache_dir shared between the ranks of a node?")
    # Memory-mapped: every rank of a node shares the page cache, whatever the corpus size.
    splits = datasets.DatasetDict(
        {name: datasets.Dataset.from_file(str(final / f"{name}.arrow")) for name in ("train", "heldout")}
    )
    info = json.loads((final / "meta.json").read_text())
    info.update(path=str(final), from_cache=not built)
    return splits, info


# --------------------------------------------------------------------------- phase 1: tokenise


@dataclass
class FileResult:
    shard: str
    source: str = ""  # the corpus file (or dataset) it was read from
    documents: int = 0
    tokens: int = 0
    deletions: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


@dataclass
class _Job:
    index: int
    path: Path
    key: str  # the recipe key naming the file, for errors
    source: str  # the recipe file
    shard: Path
    options: corpora.ReadOptions
    tokenizer_json: str
    seed: int
    pubmed: bool


def _write_docs(writer, keys: list[int], hashes: list[float], ids: list[list[int]]) -> int:
    """One record batch of tokenised documents into a phase-1 shard; returns its token count."""
    columns = [pa.array(keys, pa.int64()), pa.array(hashes, pa.float64()), pa.array(ids, pa.list_(pa.int32()))]
    writer.write_batch(pa.record_batch(columns, schema=_DOC_SCHEMA))
    return sum(len(x) for x in ids)


def _tokenise_file(job: _Job, progress: Optional[tqdm] = None) -> FileResult:
    encode = Encoder(job.tokenizer_json)
    result = FileResult(str(job.shard), str(job.path))
    keys, hashes, texts = [], [], []

    def flush(writer):
        result.tokens += _write_docs(writer, keys, hashes, encode(texts))
        if progress is not None:
            progress.update(len(texts))
        keys.clear(), hashes.clear(), texts.clear()

    with pa.OSFile(str(job.shard), "wb") as sink, pa.ipc.new_stream(sink, _DOC_SCHEMA) as writer:
        try:
            for key, text in corpora.read(job.path, job.options, result.skipped):
                if text is None:
                    result.deletions.append(int(key))
                    continue
                keys.append(int(key) if job.pubmed else -1)
                hashes.append(doc_hash(key, job.seed))
                texts.append(text)
                result.documents += 1
                if len(texts) == ENCODE_BATCH:
                    flush(writer)
        except corpora.MissingField as e:
            raise ConfigError(job.source, "data.text_field", str(e)) from None
        except corpora.BadInput as e:
            raise ConfigError(job.source, job.key, str(e)) from None
        if texts:
            flush(writer)
    return result


def _tokenise_in_pool(job: _Job) -> FileResult:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per file already uses the cores
    return _tokenise_file(job)


def _dataset_job(data: DataConfig, shard: Path, tokenizer_json: str, source: str) -> FileResult:
    """``data.dataset``: a Hugging Face dataset by name, read in-process as one source."""
    import datasets

    try:
        part = datasets.load_dataset(data.dataset, data.dataset_config or None, split=data.dataset_split)
    except Exception as e:  # datasets raises many types for "cannot get it"; all mean the same here
        raise ConfigError(source, "data.dataset", f"cannot load dataset {data.dataset!r}: {e}") from None
    if data.text_field not in part.column_names:
        raise ConfigError(
            source, "data.text_field", f"data.dataset ({data.dataset}) has no column {data.text_field!r}; "
            f"its columns are {part.column_names}",
        )  # fmt: skip
    encode = Encoder(tokenizer_json)
    result = FileResult(str(shard), data.dataset)
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, _DOC_SCHEMA) as writer:
        for start in range(0, len(part), ENCODE_BATCH):
            rows = part[start : start + ENCODE_BATCH][data.text_field]
            texts = [t.strip() for t in rows if isinstance(t, str) and t.strip()]
            result.skipped["empty or non-string text"] += len(rows) - len(texts)
            hashes = [doc_hash(f"{data.dataset}:{start + i}", data.seed) for i in range(len(texts))]
            result.documents += len(texts)
            result.tokens += _write_docs(writer, [-1] * len(texts), hashes, encode(texts))
    return result


def tokenise(data: DataConfig, tokenizer, source: str, work: Path, progress: bool) -> list[FileResult]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(source, "teacher.path", "data preparation needs a fast (Rust) tokenizer; this one is slow")
    tokenizer_json = backend.to_str()
    if data.dataset:
        return [_dataset_job(data, work / "docs-0.arrow", tokenizer_json, source)]
    files = data_files(data, source)
    formats = [corpora.require_known_format(source, key, path) for key, path in files]
    options = corpora.read_options(data)
    jobs = [
        _Job(i, path, key, source, work / f"docs-{i}.arrow", options, tokenizer_json, data.seed, fmt == "pubmed")
        for i, ((key, path), fmt) in enumerate(zip(files, formats))
    ]
    workers = min(data.num_workers, len(jobs))
    if workers <= 1:
        # One file (e.g. NOTEEVENTS.csv.gz): parse here and let the Rust encoder use the cores.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if data.num_workers > 1 else "false"
        try:
            with tqdm(desc="tokenising", unit=" docs", disable=not progress, dynamic_ncols=True) as bar:
                return [_tokenise_file(job, bar) for job in jobs]
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM")
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
    results = []
    # fork: the workers inherit the imported modules (spawn would re-import torch in each).
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        bar = tqdm(total=len(jobs), desc="tokenising", unit=" files", disable=not progress, dynamic_ncols=True)
        for result in pool.imap(_tokenise_in_pool, jobs):
            results.append(result)
            bar.update(1)
            bar.set_postfix(docs=sum(r.documents for r in results), refresh=False)
        bar.close()
    return results


# ------------------------------------------------------------------- phase 2: select and chunk


def _shard_batches(path: str):
    with pa.memory_map(path) as source:
        yield from pa.ipc.open_stream(source)


def _shard_column(result: FileResult, name: str, dtype) -> np.ndarray:
    """One column of a phase-1 shard, whole (keys and hashes: 8 bytes a document, read from the map)."""
    return np.concatenate([b.column(name).to_numpy() for b in _shard_batches(result.shard)] or [np.empty(0, dtype)])


def latest_versions(results: list[FileResult]) -> tuple[list[np.ndarray], int, int]:
    """Per shard, which documents survive PubMed's update semantics: the last file to mention a PMID
    decides (a newer version replaces an older one; a DeleteCitation removes it; within one file the
    deletions come after the records). Returns the keep masks, and counts superseded / deleted."""
    keys, files, order, deleted = [], [], [], []
    sizes = []
    for i, r in enumerate(results):
        k = _shard_column(r, "key", np.int64)
        sizes.append(len(k))
        keys.append(k)
        files.append(np.full(len(k), i))
        order.append(np.arange(len(k)))
        deleted.append(np.zeros(len(k), bool))
        d = np.asarray(r.deletions, np.int64)
        keys.append(d)
        files.append(np.full(len(d), i))
        order.append(np.full(len(d), np.iinfo(np.int64).max))
        deleted.append(np.ones(len(d), bool))
    keys, files, order, deleted = (np.concatenate(x) for x in (keys, files, order, deleted))
    if len(keys) == 0:
        return [np.zeros(0, bool) for _ in results], 0, 0
    is_doc = ~deleted
    idx = np.lexsort((order, files, keys))
    last = np.ones(len(idx), bool)
    last[:-1] = keys[idx][1:] != keys[idx][:-1]
    last |= keys[idx] < 0  # no key (not PubMed): always its own latest version
    # The event that decides each key, spread back to every event of that key.
    group = np.cumsum(np.r_[True, last[:-1]]) - 1
    decider_deleted = deleted[idx][last][group]
    keep_sorted = last & is_doc[idx]
    keep = np.empty(len(idx), bool)
    keep[idx] = keep_sorted
    removed_by_delete = np.zeros(len(idx), bool)
    removed_by_delete[idx] = decider_deleted & is_doc[idx]
    n_deleted = int(removed_by_delete.sum())
    n_superseded = int((is_doc & ~keep).sum()) - n_deleted
    masks, start = [], 0
    doc_positions = np.flatnonzero(is_doc)
    for size in sizes:
        masks.append(keep[doc_positions[start : start + size]])
        start += size
    return masks, n_superseded, n_deleted


def write_splits(results: list[FileResult], keep: list[np.ndarray], data: DataConfig, tokenizer, out_dir: Path) -> dict:
    """Choose the held-out documents, chunk both splits, write ``train.arrow`` and ``heldout.arrow``."""
    hashes = np.concatenate([_shard_column(r, "hash", np.float64)[k] for r, k in zip(results, keep)])
    n_docs = len(hashes)
    n_held = max(1, round(n_docs * data.heldout_fraction)) if n_docs >= 2 else 0
    threshold = np.partition(hashes, n_held - 1)[n_held - 1] if n_held else -1.0
    stats = {name: Counter() for name in ("train", "heldout")}
    chunkers = {
        name: Chunker(data.max_length, tokenizer.cls_token_id, tokenizer.sep_token_id, data.packing,
                      data.long_documents)
        for name in stats
    }  # fmt: skip
    with (
        pa.OSFile(str(out_dir / "train.arrow"), "wb") as train_sink,
        pa.OSFile(str(out_dir / "heldout.arrow"), "wb") as held_sink,
        pa.ipc.new_stream(train_sink, _SEQ_SCHEMA) as train_writer,
        pa.ipc.new_stream(held_sink, _SEQ_SCHEMA) as held_writer,
    ):
        writers = {"train": train_writer, "heldout": held_writer}
        for result, mask in zip(results, keep):
            start = 0
            for batch in _shard_batches(result.shard):
                selected = mask[start : start + batch.num_rows]
                start += batch.num_rows
                held = batch.column("hash").to_numpy() <= threshold
                ids = batch.column("ids")
                for name, rows in (("train", selected & ~held), ("heldout", selected & held)):
                    if not rows.any():
                        continue
                    part = ids.filter(pa.array(rows))
                    lengths = np.diff(part.offsets.to_numpy()).astype(np.int64)
                    values = part.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
                    stats[name]["documents"] += len(lengths)
                    sequences = chunkers[name](values, lengths[lengths > 0])
                    if sequences is not None:
                        stats[name]["sequences"] += len(sequences)
                        stats[name]["tokens"] += len(sequences.values)
                        writers[name].write_batch(pa.record_batch([sequences], schema=_SEQ_SCHEMA))
    return {key: {name: int(stats[name][key]) for name in stats} for key in ("documents", "sequences", "tokens")} | {
        "dropped_tail_tokens": sum(len(c.carry) for c in chunkers.values())
    }


def build(data: DataConfig, tokenizer, source: str, final: Path, progress: bool = True) -> dict:
    """Prepare the cache at ``final`` (written under a temporary name, renamed whole); return its summary."""
    start = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "shards").mkdir(parents=True)
    try:
        results = tokenise(data, tokenizer, source, tmp / "shards", progress)
        keep, superseded, deleted = latest_versions(results)
        kept = int(sum(k.sum() for k in keep))
        if kept < 2:
            raise ConfigError(
                source, "data", f"found {kept} usable document(s); need at least 2 (one held out). Per file: "
                + "; ".join(_what_was_found(r) for r in results),
            )  # fmt: skip
        meta = write_splits(results, keep, data, tokenizer, tmp)
        for name, n in meta["sequences"].items():
            if n == 0:
                raise ConfigError(
                    source, "data", f"the {name} split has no sequence of data.max_length={data.max_length} "
                    "tokens; add text or set data.packing: false",
                )  # fmt: skip
        skipped = Counter()
        for r in results:
            skipped.update(r.skipped)
        seconds = time.perf_counter() - start
        meta = {
            **meta,
            "files": len(results),
            "documents_read": sum(r.documents for r in results),
            "tokens_read": sum(r.tokens for r in results),
            "superseded": superseded,
            "deleted": deleted,
            "skipped": dict(sorted(skipped.items())),
            "max_length": data.max_length,
            "packing": data.packing,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(sum(r.tokens for r in results) / max(seconds, 1e-9)),
        }
        shutil.rmtree(tmp / "shards")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:  # another node's builder won the race on a shared filesystem: same content
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s", final)
    return meta


def _what_was_found(result: FileResult) -> str:
    """``path: N documents, skipped M as <reason>, ...``: which file to fix, and why."""
    skipped = ", ".join(f"{n} {reason}" for reason, n in result.skipped.most_common())
    return f"{result.source}: {result.documents} document(s)" + (f", skipped {skipped}" if skipped else "")


def format_summary(info: dict) -> str:
    lines = [
        f"prepared {info['path']}" + (" (already there: nothing to do)" if info.get("from_cache") else ""),
        f"  files {info['files']}, documents read {info['documents_read']:,}, "
        f"tokens {info['tokens_read']:,} in {info['seconds']} s ({info['tokens_per_s']:,} tokens/s)",
    ]
    for name in ("train", "heldout"):
        lines.append(
            f"  {name:<8} documents {info['documents'][name]:>10,}  sequences {info['sequences'][name]:>10,}  "
            f"tokens {info['tokens'][name]:>12,}"
        )
    if info["superseded"] or info["deleted"]:
        lines.append(
            f"  PubMed updates: {info['superseded']:,} superseded by newer versions, {info['deleted']:,} deleted"
        )
    for reason, n in info["skipped"].items():
        lines.append(f"  skipped {n:>8,}  {reason}")
    if info["dropped_tail_tokens"]:
        lines.append(f"  {info['dropped_tail_tokens']:,} tokens in the last partial packed block(s) left out")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    """``biodistill-prepare --config recipe.yaml [--data.key value ...]``: build the recipe's data cache."""
    parser = argparse.ArgumentParser(
        prog="biodistill-prepare",
        description="Tokenise a recipe's corpus once into the cache its training jobs read. "
        "Override any recipe key with --section.key value (e.g. --data.num_workers 16).",
    )
    parser.add_argument("--config", required=True, help="recipe YAML (configs/*.yaml)")
    args, overrides = parser.parse_known_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    from ..config import load_recipe
    from ..runtime import hub

    hub.decide()
    try:
        recipe = load_recipe(args.config, overrides)
        _, info = prepare(recipe.data, recipe_tokenizer(recipe), recipe.source, True, lambda: None)
    except ConfigError as e:
        print(f"biodistill-prepare: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(format_summary(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
