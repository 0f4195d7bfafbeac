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
from nmm.plugins import resolve
from nmm.tokenizers import ImageTokenizer, SharedVocab, TextTokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TASKS = ("caption", "answer", "draw", "transcribe", "speak")  # what config.json's "serves" may say
MAX_SPEECH_CODES = 256  # a spoken answer's codes at most (the model's context bounds it further)


def tokenizer_files(vocab: SharedVocab) -> dict[str, str]:
    """Each modality of the vocabulary → its tokenizer's file (nmm.modalities): what a model
    folder holds beside its weights and config."""
    return {m: modalities.modality(m).tokenizer_file for m in vocab.sizes()}


def read_files(read) -> dict[str, bytes]:
    """A model folder's files through `read(name) -> bytes`: the config, then the weights and the
    tokenizers of the modalities its vocabulary has."""
    config = read(CONFIG)
    names = [WEIGHTS, *tokenizer_files(SharedVocab(**json.loads(config)["vocab"])).values()]
    return {CONFIG: config} | {name: read(name) for name in names}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    vocab: SharedVocab
    text: TextTokenizer
    tokenizers: dict  # modality → its fitted tokenizer (text's too)
    config: dict
    prompts: Prompts  # the prompt style the model was trained to answer (config "prompts"; "plans": plan first)

    @property
    def vq(self) -> ImageTokenizer | None:
        """The image tokenizer; None for a model without images."""
        return self.tokenizers.get("image")

    @property
    def audio(self):
        """The audio tokenizer (nmm.tokenizers.audio.LogMelVQ); None for a model without audio."""
        return self.tokenizers.get("audio")

    @property
    def serves(self) -> dict[str, bool]:
        """What the model was trained to do: caption an image, answer a question about one, draw,
        transcribe speech, speak."""
        return served_tasks(self.config)

    def listen_prompt(self, codes) -> list[int]:
        """The prompt asking what a recording (its audio codes) says, or Refused."""
        if not self.serves["transcribe"]:
            raise Refused("file", "this model does not transcribe speech")
        return self._answerable(self.prompts.listen(codes), "file")

    def say_prompt(self, text: str) -> tuple[list[int], int]:
        """(the prompt asking for speech of `text`, the most codes its answer may have), or Refused."""
        if not self.serves["speak"]:
            raise Refused("model", "this model does not speak")
        prompt = self.prompts.say(self.text.encode(text))
        room = min(MAX_SPEECH_CODES, self.model.cfg.max_seq_len - len(prompt) - 1)
        if room < 1:
            raise Refused(
                "input",
                f"the prompt is {len(prompt)} tokens; this model's context ({self.model.cfg.max_seq_len}) "
                "leaves no room for speech after it",
            )
        return prompt, room

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
        return self._answerable(prompt, "messages")

    def _answerable(self, prompt: list[int], param: str) -> list[int]:
        """The prompt, or Refused when it leaves the model no room to answer in its context."""
        limit = chat_prompt_limit(self.model.cfg.max_seq_len)
        if len(prompt) > limit:
            raise Refused(
                param,
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
    """config.json's "serves" (a task it does not name is not served); a folder published before
    nmm wrote it was trained on every task of its data: captions, answers unless it is digits,
    drawings unless it reads pixels."""
    if "serves" in config:
        return {k: bool(config["serves"].get(k)) for k in TASKS}
    reads_pixels = config["model"].get("fusion", "early") != "early"
    old = {"caption": True, "answer": config.get("source") != "digits", "draw": not reads_pixels}
    return {k: old.get(k, False) for k in TASKS}


def model_files(model: torch.nn.Module, config: dict, tokenizers: dict[str, bytes]) -> dict[str, bytes]:
    """A model folder's files: the weights, config.json and each modality's tokenizer (`tokenizers`:
    modality → its bytes; exactly the modalities of the config's vocabulary)."""
    from safetensors.torch import save

    files = tokenizer_files(SharedVocab(**config["vocab"]))
    if set(tokenizers) != set(files):
        raise ValueError(f"a model of {sorted(files)} needs those tokenizers, got {sorted(tokenizers)}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        WEIGHTS: save(state),
        CONFIG: json.dumps(config, indent=2, sort_keys=True).encode(),
    } | {files[m]: data for m, data in tokenizers.items()}


def load_from_files(files: dict[str, bytes], device: str | torch.device = "cpu") -> LoadedModel:
    from safetensors.torch import load

    config = json.loads(files[CONFIG])
    cfg = ModelConfig.from_json(json.dumps(config["model"]))
    model = cfg.build()
    model.load_state_dict(load(files[WEIGHTS]))
    model.to(device).eval()
    vocab = SharedVocab(**config["vocab"])
    tokenizers = {
        m: resolve(modalities.modality(m).tokenizer)(files[name]) for m, name in tokenizer_files(vocab).items()
    }
    text = tokenizers["text"]
    prompts = Prompts.of(vocab, config.get("prompts", "plain"), text.encode, plans=bool(config.get("plans", False)))
    return LoadedModel(model, vocab, text, tokenizers, config, prompts)


def load_from_dir(path: str | Path) -> LoadedModel:
    path = Path(path)
    return load_from_files(read_files(lambda name: (path / name).read_bytes()))


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
        files = read_files(lambda n: storage.read_file(folder, manifest, n))
    except storage.IntegrityError as exc:
        raise ServeError(f"refusing to serve: {exc}") from None
    return load_from_files(files), name
