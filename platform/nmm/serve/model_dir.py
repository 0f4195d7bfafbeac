"""A published model folder: weights (safetensors), config and tokenizers, loaded for inference;
and a request laid out the way the model was trained (`read_prompt`, `draw_prompt`), or refused
with what the model does — one layout for the server and the pyfunc."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nmm import modalities
from nmm.data.sequences import INSTRUCTIONS, Prompts, caption_ask
from nmm.model import ModelConfig
from nmm.model.generate import chat_prompt_limit, draw_prompt_limit
from nmm.tokenizers import ImageTokenizer, SharedVocab, TextTokenizer, load_image_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TEXT_TOKENIZER = modalities.modality("text").tokenizer_file
IMAGE_TOKENIZER = modalities.modality("image").tokenizer_file
FILES = (WEIGHTS, CONFIG, TEXT_TOKENIZER, IMAGE_TOKENIZER)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    vocab: SharedVocab
    text: TextTokenizer
    vq: ImageTokenizer
    config: dict
    prompts: Prompts  # the prompt style the model was trained to answer (config "prompts"; "plans": plan first)

    @property
    def serves(self) -> dict[str, bool]:
        """What the model was trained to do: caption an image, answer a question about one, draw."""
        return served_tasks(self.config)

    def read_prompt(self, codes, text: str | None) -> list[int]:
        """The prompt for an image and the user's text, laid out as the model was trained: no text
        or a caption ask ("Describe the image.") is the caption prompt, other text a question for
        a model trained to answer; anything else is Refused, never turned into a worse prompt."""
        k = caption_ask(text) if text else 0
        if k is not None:
            prompt = self.prompts.caption(codes, k)
        elif self.serves["answer"]:
            prompt = self.prompts.question(codes, self.text.encode(text))
        else:
            raise Refused(
                "messages",
                "this model captions images and answers no questions: send the image alone or "
                f"with {INSTRUCTIONS['caption'][0]!r} (got {text[:60]!r})",
            )
        limit = chat_prompt_limit(self.model.cfg.max_seq_len)
        if len(prompt) > limit:
            raise Refused(
                "messages",
                f"the prompt is {len(prompt)} tokens; this model reads at most {limit} "
                f"(its context is {self.model.cfg.max_seq_len} tokens)",
            )
        return prompt

    def draw_prompt(self, text: str) -> list[int]:
        """The drawing prompt for `text`, or Refused when the model does not draw or the prompt
        leaves no room for a whole image."""
        if not self.serves["draw"]:
            raise Refused("prompt", "this model does not draw; it captions images (POST /v1/chat/completions)")
        prompt = self.prompts.draw(self.text.encode(text))
        limit = draw_prompt_limit(self.model.cfg.max_seq_len, self.vq.tokens_per_image, self.prompts.plans)
        if len(prompt) > limit:
            raise Refused(
                "prompt",
                f"the prompt is {len(prompt)} tokens; this model draws after at most {limit} "
                f"(its context is {self.model.cfg.max_seq_len} tokens, an image {self.vq.tokens_per_image})",
            )
        return prompt


class Refused(ValueError):
    """A request the model cannot serve as asked (HTTP 400); `param` names the request's field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def served_tasks(config: dict) -> dict[str, bool]:
    """config.json's "serves"; a folder published before nmm wrote it was trained on every task
    of its data: captions, answers unless it is digits, drawings unless it reads pixels."""
    if "serves" in config:
        return {k: bool(config["serves"].get(k)) for k in ("caption", "answer", "draw")}
    reads_pixels = config["model"].get("fusion", "early") != "early"
    return {"caption": True, "answer": config.get("source") != "digits", "draw": not reads_pixels}


def model_files(model: torch.nn.Module, config: dict, text_bytes: bytes, vq_bytes: bytes) -> dict[str, bytes]:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        WEIGHTS: save(state),
        CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
        TEXT_TOKENIZER: text_bytes,
        IMAGE_TOKENIZER: vq_bytes,
    }


def load_from_files(files: dict[str, bytes], device: str | torch.device = "cpu") -> LoadedModel:
    from safetensors.torch import load

    config = json.loads(files[CONFIG])
    cfg = ModelConfig.from_json(json.dumps(config["model"]))
    model = cfg.build()
    model.load_state_dict(load(files[WEIGHTS]))
    model.to(device).eval()
    vocab = SharedVocab(**config["vocab"])
    text = TextTokenizer.from_bytes(files[TEXT_TOKENIZER])
    prompts = Prompts.of(vocab, config.get("prompts", "plain"), text.encode, plans=bool(config.get("plans", False)))
    return LoadedModel(model, vocab, text, load_image_tokenizer(files[IMAGE_TOKENIZER]), config, prompts)


def load_from_dir(path: str | Path) -> LoadedModel:
    path = Path(path)
    return load_from_files({name: (path / name).read_bytes() for name in FILES})


class ServeError(RuntimeError):
    """A published model that cannot be found or does not match its manifest (user input: exit 2)."""


def load_published(
    source: str, store: str, *, name: str | None = None, digest: str | None = None
) -> tuple[LoadedModel, str]:
    """(the model, the name it is served under) — for `nmm serve` and curation's model filter —
    from `models:/<name>@<alias>`, `models:/<name>/<version>` or a published model folder (a
    store URI or path; served as `name`, and holding `digest` when given: what the operator
    passes a model server, which asks no registry). Every file is checked against the folder's
    manifest; a registered version's manifest digest must be the one it was registered with."""
    from nmm import lineage, storage

    if not source.startswith("models:/"):
        folder = storage.in_store(storage.uri_of(source), store)
        name = name or "nmm"
    else:
        if digest is not None:
            raise ServeError(f"{source}: --digest goes with a model folder (a registered version brings its own)")
        registered, sep, alias = source.removeprefix("models:/").partition("@")
        if sep:
            info = lineage.alias_version(registered, alias)
        else:
            registered, _, version = registered.partition("/")
            info = lineage.model_version(registered, version)
        name = name or registered
        if info is None:
            raise ServeError(f"{source}: no such registered model, version or alias")
        folder, digest = info.folder, info.digest
        if not folder:
            raise ServeError(
                f"{source}: version {info.version} records no model folder (registered by an older nmm); "
                "serve its folder in the store instead"
            )
    manifest = storage.read_manifest(folder, verify=True)
    if manifest is None or manifest.get("kind") != "nmm.model":
        raise ServeError(f"{folder}: no published nmm model (manifest.json missing or not a model)")
    if digest is not None and manifest["digest"] != digest:
        raise ServeError(f"{folder}: holds {manifest['digest']}, but {source} was registered as {digest}")
    try:
        files = {n: storage.read_file(folder, manifest, n) for n in FILES}
    except storage.IntegrityError as exc:
        raise ServeError(f"refusing to serve: {exc}") from None
    return load_from_files(files), name
