"""Tokens: which tokenizer a job uses, how documents become token ids, and how ids become sequences.

Shared by the prepared cache (``cache.py``) and the stream (``stream.py``), so that both produce the same
sequences from the same documents, and by the start-up checks (:func:`check_tokenizers`).
- :func:`recipe_tokenizer`: the teacher's tokenizer, or the student checkpoint's where the data is
  tokenised with the student's (no teacher, or ``teacher.vocab_map``);
- :class:`Encoder`: token ids from the fast tokenizer's Rust backend, with an ASCII fast path;
- :class:`Chunker`: token lists -> ``[CLS] ... [SEP]`` sequences (truncate, split or pack);
- :func:`doc_hash`: a document's seeded place in [0, 1), which decides the held-out split;
- :class:`VocabMap`: student ids -> teacher ids through token strings (``teacher.vocab_map: by_token``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from ..config import Recipe, is_local, resolve_path
from ..runtime import hub


def recipe_tokenizer(recipe):
    """The tokenizer a recipe's jobs use: the teacher's; the student checkpoint's without a teacher or
    with ``teacher.vocab_map``."""
    from transformers import AutoTokenizer

    own = recipe.student.path and (recipe.teacher.vocab_map or not recipe.teacher.path)
    key, name = ("student.path", recipe.student.path) if own else ("teacher.path", recipe.teacher.path)
    try:
        return AutoTokenizer.from_pretrained(hub.location(name))
    except (OSError, ValueError) as e:
        raise recipe.error(key, hub.load_error(name, e, "tokenizer")) from None


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: vocabulary, normaliser, pre-tokeniser, model, added tokens. The
    backend's truncation/padding state is left out: calling the tokenizer changes it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def doc_hash(key, seed: int) -> float:
    """A document's place in [0, 1) for the held-out split: a pure function of its key and the seed."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


# BertNormalizer's clean_text on ASCII: control characters go, tab / newline / return become spaces.
_ASCII_CLEAN = {i: None for i in [*range(32), 127] if i not in (9, 10, 13)} | {9: " ", 10: " ", 13: " "}


class Encoder:
    """Token ids without special tokens, from the tokenizer's Rust backend.

    BERT tokenizers spend about 40% of their time in BertNormalizer (Unicode cleaning, accent
    stripping, lowercasing), which on ASCII text reduces to ``str.translate`` + ``str.lower``. So ASCII
    documents (most of PubMed and MIMIC) are normalised here and encoded without the normalizer; the
    rest take the full path. The ids are identical either way (tests/test_corpora.py checks).
    """

    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self.full = Tokenizer.from_str(tokenizer_json)
        self.full.no_truncation()
        self.full.no_padding()
        normalizer = json.loads(tokenizer_json).get("normalizer") or {}
        self.ascii = None
        if normalizer.get("type") == "BertNormalizer":
            self.clean, self.lower = normalizer.get("clean_text", True), normalizer.get("lowercase", True)
            self.ascii = Tokenizer.from_str(tokenizer_json)
            self.ascii.normalizer = None
            self.ascii.no_truncation()
            self.ascii.no_padding()

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.ascii is None:
            return [e.ids for e in self.full.encode_batch_fast(texts, add_special_tokens=False)]
        fast = [i for i, t in enumerate(texts) if t.isascii()]
        out: list[list[int]] = [[] for _ in texts]
        prepared = [texts[i].translate(_ASCII_CLEAN) if self.clean else texts[i] for i in fast]
        prepared = [t.lower() for t in prepared] if self.lower else prepared
        for i, e in zip(fast, self.ascii.encode_batch_fast(prepared, add_special_tokens=False)):
            out[i] = e.ids
        if len(fast) < len(texts):
            rest = [i for i, t in enumerate(texts) if not t.isascii()]
            for i, e in zip(rest, self.full.encode_batch_fast([texts[i] for i in rest], add_special_tokens=False)):
                out[i] = e.ids
        return out


class Chunker:
    """Token lists of documents -> ``[CLS] ... [SEP]`` sequences of at most ``max_length``, vectorised.
    Packing carries the unfinished block from one batch of documents to the next."""

    def __init__(self, max_length: int, cls_id: int, sep_id: int, packing: bool, long_documents: str):
        self.body, self.cls, self.sep = max_length - 2, cls_id, sep_id
        self.packing, self.split = packing, long_documents == "split"
        self.carry = np.empty(0, np.int32)

    def __call__(self, values: np.ndarray, lengths: np.ndarray) -> Optional[pa.Array]:
        body = self.body
        if self.packing:
            ends = np.cumsum(lengths)
            stream = np.concatenate([self.carry, np.insert(values, ends, self.sep)])
            n = len(stream) // body
            self.carry = stream[n * body :]
            if n == 0:
                return None
            blocks = stream[: n * body].reshape(n, body)
            out = np.hstack([np.full((n, 1), self.cls, np.int32), blocks, np.full((n, 1), self.sep, np.int32)])
            return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * (body + 2)), out.ravel())
        if self.split:
            pieces = (lengths + body - 1) // body
            piece_lens = np.full(int(pieces.sum()), body, np.int64)
            piece_lens[np.cumsum(pieces) - 1] = lengths - (pieces - 1) * body
        else:  # truncate: the first body tokens of each document
            starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
            values = values[(np.arange(len(values)) - starts) < body]
            piece_lens = np.minimum(lengths, body)
        if len(piece_lens) == 0:
            return None
        offsets = np.zeros(len(piece_lens) + 1, np.int64)
        np.cumsum(piece_lens + 2, out=offsets[1:])
        out = np.empty(offsets[-1], np.int32)
        is_body = np.ones(offsets[-1], bool)
        is_body[offsets[:-1]] = is_body[offsets[1:] - 1] = False
        out[offsets[:-1]], out[offsets[1:] - 1] = self.cls, self.sep
        out[is_body] = values
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), out)


class VocabMap:
    """Student token ids -> teacher token ids through token strings (``teacher.vocab_map: by_token``).

    The teacher reads the student's sequences with its own ids (a token it lacks becomes its [UNK]), and
    its logits come back over the student's vocabulary: column i is the teacher's logit of student token
    i, or a very low logit where the teacher has no such token (no probability, and no inf in the KL).
    """

    LOW = -1e4

    def __init__(self, student_tokenizer, teacher_tokenizer, student_vocab_size: int):
        teacher_vocab = teacher_tokenizer.get_vocab()
        self.ids = torch.full((student_vocab_size,), teacher_tokenizer.unk_token_id, dtype=torch.long)
        self.known = torch.zeros(student_vocab_size, dtype=torch.bool)
        for token, i in student_tokenizer.get_vocab().items():
            j = teacher_vocab.get(token)
            if j is not None and i < student_vocab_size:
                self.ids[i], self.known[i] = j, True
        self.coverage = self.known.sum().item() / max(len(student_tokenizer), 1)

    def to(self, device) -> VocabMap:
        self.ids, self.known = self.ids.to(device), self.known.to(device)
        return self

    def inputs(self, student_ids: torch.Tensor) -> torch.Tensor:
        return self.ids[student_ids]

    def logits(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """[rows, V_teacher] -> [rows, V_student]."""
        return teacher_logits[:, self.ids].masked_fill(~self.known, self.LOW)


# ------------------------------------------------------------------------------- start-up checks


def check_tokenizers(r: Recipe, teacher_config, student_config) -> None:
    """The data is tokenised once: the teacher's and the student's tokenizers must be the same (or
    ``teacher.vocab_map`` maps one to the other), and each model's embeddings must cover its tokenizer."""
    teacher_tok = _tokenizer(r, "teacher.path", r.teacher.path) if r.teacher.path else None
    own = bool(r.teacher.vocab_map) or not r.teacher.path  # the student's tokenizer is the one the data uses
    student_tok = _tokenizer(r, "student.path", r.student.path, required=own) if r.student.path else None
    if r.teacher.vocab_map and teacher_tok is not None and student_tok is not None:
        coverage = VocabMap(student_tok, teacher_tok, max(student_config.vocab_size, len(student_tok))).coverage
        if coverage < 0.5:
            raise r.error(
                "teacher.vocab_map",
                f"only {coverage:.0%} of the student's tokens are in the teacher's vocabulary: the teacher would "
                "read mostly [UNK]; distil from a teacher with a similar vocabulary",
            )  # fmt: skip
        _covers(r, "teacher.path", teacher_config, teacher_tok)
        _covers(r, "student.path", student_config, student_tok)
    elif teacher_tok is not None:
        if student_tok is not None:
            _same_tokenizer(r, teacher_tok, student_tok)
        _covers(r, "teacher.path", teacher_config, teacher_tok)
        _covers(r, "student.path" if r.student.path else "student.overrides.vocab_size", student_config, teacher_tok)
    elif student_tok is not None:
        _covers(r, "student.path", student_config, student_tok)


def _tokenizer(r: Recipe, key: str, path: str, required: bool = True):
    if not is_local(path):
        return None  # a hub name: the loader fetches it, or says why it cannot
    from transformers import AutoTokenizer

    where = resolve_path(path)
    has_files = any((where / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    if not has_files:
        if not required:
            return None
        raise r.error(key, f"{where} has no tokenizer (tokenizer.json, vocab.txt or tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(str(where))
    except (OSError, ValueError) as e:
        raise r.error(key, f"cannot load the tokenizer in {where}: {e}") from None


def _same_tokenizer(r: Recipe, teacher, student) -> None:
    if tokenizer_fingerprint(teacher) == tokenizer_fingerprint(student):
        return
    tv, sv = teacher.get_vocab(), student.get_vocab()
    only_s = sorted(set(sv) - set(tv), key=sv.get)[:3]
    moved = sorted((t for t in set(sv) & set(tv) if sv[t] != tv[t]), key=sv.get)[:3]
    if only_s or moved or len(sv) != len(tv):
        differs = (
            f"{len(sv)} tokens vs the teacher's {len(tv)}"
            + (f"; not in the teacher's: {only_s}" if only_s else "")
            + (f"; other ids: {[(t, sv[t], tv[t]) for t in moved]}" if moved else "")
        )
    else:
        differs = "same vocabulary, different normalisation or pre-tokenisation (e.g. cased vs uncased)"
    raise r.error(
        "student.path",
        f"the student's tokenizer differs from the teacher's ({differs}); the data is tokenised once, with "
        "the teacher's: start the student from a checkpoint with the teacher's tokenizer, or set "
        "teacher.vocab_map: by_token to map the student's to the teacher's",
    )  # fmt: skip


def _covers(r: Recipe, key: str, config, tokenizer) -> None:
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if vocab is not None and vocab < len(tokenizer):
        raise r.error(
            key,
            f"the model's vocab_size {vocab} is smaller than its tokenizer's {len(tokenizer)} tokens: token ids "
            f">= {vocab} have no embedding",
        )  # fmt: skip
