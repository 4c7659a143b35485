"""``data.streaming: true``: read, tokenise and chunk on the fly, for corpora larger than memory or
local disk. Nothing is cached; memory holds one tokenisation batch, the chunker's carry and the
sequences not yet batched, whatever the corpus size.

Each rank reads its own shard: whole files (file i goes to rank i mod world) when there are at least
as many files as ranks (PubMed's ~1,300 files), else every world-th document of each file (one big
NOTEEVENTS.csv.gz). Documents whose seeded hash falls below ``data.heldout_fraction`` are the
held-out split and never trained on; the evaluation batches are the first of them.

The stream's position (epoch, file, documents read in it, the unfinished packed block, the sequences
not yet batched) is a small dict: checkpoints save every rank's, and a resumed job reopens the file,
skips the documents already read (parsing, not tokenising) and continues exactly where it stopped.
PubMed update semantics (a later file superseding or deleting a citation) need the whole corpus and
so apply only to prepared caches; a stream reads each file as it is (DeleteCitation entries skipped).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..config import ConfigError, DataConfig, data_files
from . import corpora
from .tokenise import Chunker, Encoder, doc_hash

BATCH_DOCS = 256  # documents tokenised per call


class DocumentStream:
    """Sequences (token-id lists) for one rank, endless (epoch after epoch), resumable from ``state()``."""

    def __init__(self, data: DataConfig, tokenizer, source: str, rank: int, world: int, heldout: bool = False):
        self.files = [path for _, path in data_files(data, source)]
        self.data, self.source, self.rank, self.world, self.heldout = data, source, rank, world, heldout
        self.by_file = len(self.files) >= world
        self.mine = self.files[rank::world] if self.by_file else self.files
        self.encode = Encoder(tokenizer.backend_tokenizer.to_str())
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.options = corpora.read_options(data)
        self.skipped: Counter = Counter()
        self.position = {"epoch": 0, "file": 0, "docs": 0, "carry": [], "pending": [], "sequence": 0}

    def _chunker(self) -> Chunker:
        chunker = Chunker(self.data.max_length, self.cls, self.sep, self.data.packing, self.data.long_documents)
        chunker.carry = np.asarray(self.position["carry"], np.int32)
        return chunker

    def _documents(self, path: Path, start: int) -> Iterator[tuple[int, str]]:
        """``(index, text)`` of this rank's documents in ``path``, from document ``start`` on."""
        docs = (
            (i, text)
            for i, (key, text) in enumerate((k, t) for k, t in corpora.read(path, self.options, self.skipped) if t)
            if (self.by_file or i % self.world == self.rank)
            and (doc_hash(key, self.data.seed) < self.data.heldout_fraction) == self.heldout
        )
        return itertools.dropwhile(lambda d: d[0] < start, docs)

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.position
        whole_epoch, produced, docs = pos["file"] == 0 and pos["docs"] == 0, False, None
        while True:
            while pos["pending"]:
                pos["sequence"] += 1
                produced = True
                yield pos["pending"].pop(0)
            if pos["file"] >= len(self.mine):
                if whole_epoch and not produced:  # an endless loop over nothing otherwise
                    split = "held-out" if self.heldout else "training"
                    raise ConfigError(
                        self.source, "data.train_files",
                        f"rank {self.rank}'s share of the files ({len(self.mine)} of {len(self.files)}) gives no "
                        f"{split} sequence of data.max_length={self.data.max_length} tokens",
                    )  # fmt: skip
                pos.update(epoch=pos["epoch"] + 1, file=0, docs=0)
                whole_epoch, produced, docs = True, False, None
                continue
            if docs is None:  # one reader per file, kept open across batches
                docs = self._documents(self.mine[pos["file"]], pos["docs"])
            batch = list(itertools.islice(docs, BATCH_DOCS))
            if not batch:  # the file is done
                pos.update(file=pos["file"] + 1, docs=0)
                docs = None
                continue
            texts, last, chunker = [text for _, text in batch], batch[-1][0] + 1, self._chunker()
            ids = self.encode(texts)
            lengths = np.array([len(x) for x in ids], np.int64)
            values = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
            sequences = chunker(values, lengths[lengths > 0])
            pos["docs"], pos["carry"] = last, chunker.carry.tolist()
            pos["pending"] = sequences.to_pylist() if sequences is not None else []

    def state(self) -> dict:
        return {"rank": self.rank, "world": self.world, **self.position}

    def load_state(self, state: dict) -> None:
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ConfigError(
                "--resume",
                "data.streaming",
                f"this checkpoint streamed with {state['world']} ranks; a stream resumes only on the same world "
                "size (prepare a cache to change it)",
            )
        self.position = {k: state[k] for k in self.position}


class StreamBatches:
    """Micro-batches of ``micro_batch`` sequences, masked like the cached path: the mask of sequence k
    of a rank's stream is a pure function of (seed, rank, k)."""

    def __init__(self, stream: DocumentStream, collator, micro_batch: int):
        self.stream, self.collator, self.micro_batch = stream, collator, micro_batch
        self._it = iter(stream)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        items = []
        for _ in range(self.micro_batch):
            seq = next(self._it)
            items.append((seq, self.stream.rank, self.stream.position["sequence"] - 1))
        return self.collator(items)

    def state(self) -> dict:
        return self.stream.state()


def heldout_stream_batches(
    data: DataConfig, tokenizer, source: str, collator, micro_batch: int, rank: int, world: int, max_batches: int
) -> list[dict]:
    """The evaluation batches of a streamed corpus: the first held-out sequences (one pass at most),
    dealt round-robin so every rank gets the same number of batches (ZeRO-3 forwards are collectives)."""
    stream = DocumentStream(data, tokenizer, source, rank=0, world=1, heldout=True)
    wanted, sequences = max_batches * micro_batch * world, []
    for seq in stream:
        if stream.position["epoch"] > 0 or len(sequences) == wanted:
            break
        sequences.append(seq)
    if len(sequences) < world:
        raise ConfigError(
            source, "data.heldout_fraction",
            f"the streamed corpus gives {len(sequences)} held-out sequences, fewer than the {world} ranks; raise it",
        )  # fmt: skip
    mine = sequences[rank::world][: len(sequences) // world]
    micro_batch = min(micro_batch, len(mine))
    return [
        collator(
            [(seq, -1, i + b * micro_batch) for i, seq in enumerate(mine[b * micro_batch : (b + 1) * micro_batch])]
        )
        for b in range(len(mine) // micro_batch)
    ]
