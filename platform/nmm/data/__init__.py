"""Data: sources, curation (dedup, split, tokenization on Ray Data), sequences and shards."""
