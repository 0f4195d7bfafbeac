"""Modalities, registered by name: what nmm needs to know of a medium to read it, tokenize it,
judge it and carry it over the OpenAI API.

Each entry names its parts as "module:attribute", imported when used (nmm.plugins), so this module
imports nothing and every layer may read it:

    tokenizer        bytes -> the fitted tokenizer (encode: medium -> codes, decode: codes -> medium)
    tokenizer_file   the tokenizer's file in a dataset and a model folder
    decode           raw bytes -> the medium as an array, or a rejection carrying a ledger reason
    reasons          the ledger reasons its decoder and checks give
    suffixes         the file suffixes that hold it (WebDataset parts, folder files)
    content_part     the OpenAI chat content part that carries it
    judge            an independent judge of generated media (never trained on a model's output)

The shared vocabulary holds one range per modality (nmm.tokenizers.vocab: `ranges()`,
`markers()`); the order and the span markers live there.

Adding a modality: its tokenizer, decoder and judge modules, its entry here and its block in
nmm.tokenizers.vocab (docs/architecture.md lists the files).
"""

from __future__ import annotations

from dataclasses import dataclass

from nmm.plugins import entry


@dataclass(frozen=True)
class Modality:
    name: str
    summary: str
    tokenizer: str
    tokenizer_file: str
    content_part: str
    decode: str = ""
    reasons: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    judge: str = ""


MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality(
            "text",
            "captions, questions and answers: BPE or bytes",
            tokenizer="nmm.tokenizers.text:TextTokenizer.from_bytes",
            tokenizer_file="text_tokenizer.json",
            content_part="text",
            reasons=("caption_empty", "caption_length", "caption_near_duplicate"),
            suffixes=(".txt", ".json"),
        ),
        Modality(
            "image",
            "pictures: patch VQ or colour × mask codes, a patch stem for mid fusion",
            tokenizer="nmm.tokenizers.image:load_image_tokenizer",
            tokenizer_file="image_tokenizer.safetensors",
            content_part="image_url",
            decode="nmm.data.userdata:decode_image",
            reasons=("decode_error", "too_large", "too_small", "bad_aspect", "blank_image", "near_duplicate"),
            suffixes=(".jpg", ".jpeg", ".png", ".webp"),
            judge="nmm.evaluate.judge:DigitJudge",
        ),
        Modality(
            "audio",
            "sound: a log-mel codebook, decoded by Griffin-Lim",
            tokenizer="nmm.tokenizers.audio:LogMelVQ.from_bytes",
            tokenizer_file="audio_tokenizer.safetensors",
            content_part="input_audio",
            decode="nmm.data.audio:decode",
            reasons=("decode_error", "too_long", "too_short", "silence", "clipping", "near_duplicate"),
            suffixes=(".wav", ".flac", ".ogg", ".mp3"),
            judge="nmm.evaluate.speech:DigitJudge",
        ),
    )
}


def modality(name: str) -> Modality:
    return entry(MODALITIES, name, "modality")
