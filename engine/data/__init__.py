"""Text in, masked batches out.

corpora.py (readers: PubMed XML, NOTEEVENTS, text, jsonl, parquet) -> tokenise.py (which tokenizer,
token ids, chunking into sequences, the held-out hash) -> cache.py (``biodistill-prepare``: the Arrow
cache, built once, memory-mapped by every rank) or stream.py (the same sequences read on the fly) ->
batches.py (the MLM collator, the sharded sampler, the loaders).
"""
