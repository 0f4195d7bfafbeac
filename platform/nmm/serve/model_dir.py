"""A published model folder: weights (safetensors), config and tokenizers, loaded for inference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from nmm.data.sequences import Prompts
from nmm.model import ModelConfig
from nmm.tokenizers import PatchVQ, SharedVocab, TextTokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TEXT_TOKENIZER = "text_tokenizer.json"
IMAGE_TOKENIZER = "image_tokenizer.safetensors"
FILES = (WEIGHTS, CONFIG, TEXT_TOKENIZER, IMAGE_TOKENIZER)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    vocab: SharedVocab
    text: TextTokenizer
    vq: PatchVQ
    config: dict
    prompts: Prompts  # the prompt style the model was trained to answer (config "prompts")


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
    prompts = Prompts.of(vocab, config.get("prompts", "plain"), text.encode)
    return LoadedModel(model, vocab, text, PatchVQ.from_bytes(files[IMAGE_TOKENIZER]), config, prompts)


def load_from_dir(path: str | Path) -> LoadedModel:
    path = Path(path)
    return load_from_files({name: (path / name).read_bytes() for name in FILES})
