"""Text tokenizer: byte-level BPE trained with Hugging Face `tokenizers`, or raw bytes."""

from __future__ import annotations

import json


class TextTokenizer:
    """Local ids 0..size-1; the shared vocabulary offsets them after the special tokens."""

    def __init__(self, kind: str, tokenizer=None):
        self.kind = kind
        self._tok = tokenizer

    @classmethod
    def train(cls, kind: str, texts: list[str], vocab_size: int) -> TextTokenizer:
        if kind == "byte":
            return cls("byte")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        # SentencePiece-style word boundaries; the alphabet comes from the data, and characters
        # never seen in training map to <unk> (id 0).
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False)
        tok.train_from_iterator(sorted(texts), trainer=trainer)
        return cls("bpe", tok)

    @property
    def size(self) -> int:
        return 256 if self.kind == "byte" else self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        if self.kind == "byte":
            return list(text.encode("utf-8"))
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if 0 <= i < self.size]
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", "replace")
        return self._tok.decode(ids)

    def to_bytes(self) -> bytes:
        body = {"kind": self.kind, "tokenizer": self._tok.to_str() if self._tok else None}
        return json.dumps(body, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TextTokenizer:
        body = json.loads(data)
        if body["kind"] == "byte":
            return cls("byte")
        from tokenizers import Tokenizer

        return cls("bpe", Tokenizer.from_str(body["tokenizer"]))
