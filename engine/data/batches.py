"""Sequences in, masked micro-batches out: the MLM collator, the sharded sampler, the loaders.

Determinism is what makes resume exact and data sharding auditable:
- the held-out split is a seeded split of documents, before chunking, so no document straddles it;
- the batch at micro-step k on rank r is a pure function of (seed, k, r, world size): the sampler
  keeps no state but the count of micro-batches consumed, which checkpoints save;
- the MLM mask of a sequence is a pure function of (seed, epoch, sequence index), so a resumed run
  masks exactly as the uninterrupted one did, whatever the RNG did in between.
"""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import torch
from torch.utils.data import DataLoader

from ..config import ConfigError


class MaskedBatches:
    """Map-style view of a tokenised split; indexed by ``(epoch, i)`` so masks are reproducible."""

    def __init__(self, split: datasets.Dataset):
        self.split = split.with_format(None)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[int], int, int]:
        epoch, index = key
        return self.split[index]["input_ids"], epoch, index


class MLMCollator:
    """Pads a batch and applies BERT masking: ``p`` of the non-special tokens become targets, of which
    80% are replaced by [MASK], 10% by a random token, 10% left unchanged.

    Also computes, on the CPU in the loader, so that the training step needs no host sync for them: the
    flat indices of the rows where the LM heads run (``rows``) and their labels, and ``padded`` (a Python
    bool: whether any row is shorter than the batch; the models are given no mask when none is).
    """

    def __init__(
        self, tokenizer, mlm_probability: float, seed: int, logit_rows: str = "masked", whole_word: bool = False
    ):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.p, self.seed, self.logit_rows = mlm_probability, seed, logit_rows
        self.continues_word = word_continuations(tokenizer) if whole_word else None

    def mask(self, ids: list[int], epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index)
        ids = torch.tensor(ids, dtype=torch.long)
        candidates = ~torch.isin(ids, self.special)
        if self.continues_word is None:
            targets = (torch.rand(ids.shape, generator=g) < self.p) & candidates
        else:  # whole words: a word is a start piece and the continuation pieces after it
            word = torch.cumsum(~(self.continues_word[ids] & candidates), 0) - 1
            targets = (torch.rand(int(word[-1]) + 1, generator=g) < self.p)[word] & candidates
        action = torch.rand(ids.shape, generator=g)
        random_tokens = torch.randint(self.vocab_size, ids.shape, generator=g)
        labels = torch.where(targets, ids, -100)
        ids = torch.where(targets & (action < 0.8), self.mask_id, ids)
        ids = torch.where(targets & (action >= 0.8) & (action < 0.9), random_tokens, ids)
        return ids, labels

    def __call__(self, items: list[tuple[list[int], int, int]]) -> dict:
        length = max(len(ids) for ids, _, _ in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, (ids, epoch, index) in enumerate(items):
            masked, target = self.mask(ids, epoch, index)
            input_ids[row, : len(ids)], labels[row, : len(ids)], attention_mask[row, : len(ids)] = masked, target, 1
        select = labels != -100 if self.logit_rows == "masked" else attention_mask.bool()
        rows = select.flatten().nonzero().squeeze(1)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "rows": rows,
            "row_labels": labels.flatten().index_select(0, rows),
            "sample_ids": torch.tensor([index for _, _, index in items]),
            "sample_epochs": torch.tensor([epoch for _, epoch, _ in items]),
            "padded": any(len(ids) < length for ids, _, _ in items),
        }


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """The batch's tensors on ``device``; its host values (``padded``) as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def word_continuations(tokenizer) -> torch.Tensor:
    """``[vocab]`` bool: True for pieces that continue a word. WordPiece marks continuations ("##ing");
    SentencePiece ("\u2581") and byte-level BPE ("\u0120") mark word starts instead."""
    vocab = tokenizer.get_vocab()
    pieces = [""] * len(tokenizer)
    for piece, i in vocab.items():
        if i < len(pieces):
            pieces[i] = piece
    if any(p.startswith("##") for p in pieces):
        flags = [p.startswith("##") for p in pieces]
    else:
        marker = "\u2581" if any(p.startswith("\u2581") for p in pieces) else "\u0120"
        flags = [bool(p) and not p.startswith(marker) for p in pieces]
    return torch.tensor(flags, dtype=torch.bool)


class ShardedBatchSampler:
    """Endless, deterministic batches of ``(epoch, index)`` for one rank.

    Epoch e is a seeded permutation of the split; global micro-batch b of an epoch is its slice
    ``[b*W*B, (b+1)*W*B)`` and rank r takes the r-th B of it, so the ranks together read every sequence
    once per epoch. An epoch is a whole number of optimiser steps (``global_batch`` sequences each; the
    remainder is left out of that epoch), so the sequence consumed at any position depends only on the
    seed and the global batch: a job resumed on another world size (same global batch) goes on with
    exactly the sequences the original job would have read next.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        start: int = 0,
        shuffle: bool = True,
        global_batch: int = 0,
    ):
        global_batch = global_batch or micro_batch * world
        if global_batch % (micro_batch * world):
            raise ValueError(f"global batch {global_batch} is not a multiple of {micro_batch} x {world} ranks")
        self.per_epoch = num_samples // global_batch * global_batch // (micro_batch * world)
        if self.per_epoch == 0:
            raise ConfigError(
                "data",
                "train.micro_batch_size",
                f"the training split has {num_samples} sequences, fewer than one global batch "
                f"({global_batch} = {micro_batch} x {world} ranks x accumulation); add data or lower the batch",
            )
        self.num_samples, self.micro_batch, self.rank, self.world = num_samples, micro_batch, rank, world
        self.seed, self.start, self.shuffle = seed, start, shuffle
        self._epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (
                torch.randperm(self.num_samples, generator=g) if self.shuffle else torch.arange(self.num_samples)
            )
            self._epoch = epoch
        return self._perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        epoch, b = divmod(step, self.per_epoch)
        offset = (b * self.world + self.rank) * self.micro_batch
        return [(epoch, int(i)) for i in self.permutation(epoch)[offset : offset + self.micro_batch]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            yield self.batch(step)
            step += 1


def _view(split):
    """The sampler's view of a split: a tokenised corpus split masked per (epoch, index), or a view that already
    takes (epoch, index) (a task's examples, ``task/examples.TaskView``)."""
    return MaskedBatches(split) if isinstance(split, datasets.Dataset) else split


def heldout_batches(
    split: datasets.Dataset, collator: MLMCollator, micro_batch: int, rank: int, world: int, max_batches: int
) -> list[dict]:
    """The same fixed held-out batches at every evaluation; every rank gets the same number of them
    (ZeRO-3 forwards are collectives, so an uneven count would hang)."""
    if len(split) < world:
        raise ConfigError(
            "data",
            "data.heldout_fraction",
            f"the held-out split has {len(split)} sequences, fewer than the {world} ranks; raise it",
        )
    micro_batch = min(micro_batch, len(split) // world)
    n = min(max_batches, len(split) // (micro_batch * world))
    sampler = ShardedBatchSampler(len(split), micro_batch, rank, world, seed=0, shuffle=False)
    data = _view(split)
    return [collator([data[k] for k in sampler.batch(b)]) for b in range(n)]


def train_loader(split: datasets.Dataset, collator: MLMCollator, sampler: ShardedBatchSampler) -> DataLoader:
    # Its own generator: a DataLoader iterator otherwise draws a seed from the global torch RNG, which
    # would shift the dropout stream of a resumed run by one draw against the uninterrupted one.
    return DataLoader(
        _view(split),
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=0,
        generator=torch.Generator().manual_seed(0),
    )
