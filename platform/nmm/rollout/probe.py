"""The canary's quality probe: a slice of the evaluation suites' held-out cases, sent over HTTP to
a served version, graded as the suites grade them — one score per task the model serves.

Cases are JSON lines, so an operator on a cluster reads the same file a local rollout does:

    {"image": "data:image/png;base64,…", "question": null, "expect": {"digit": 7}}             m2t.digits
    {"image": "data:image/png;base64,…", "question": "what colour is the circle?", "expect": {"answer": "red"}}
    {"prompt": "a handwritten digit 7", "expect": {"digit": 7}, "temperature": 0.7, "guidance": 1.0}   m2g.digits
    {"prompt": "a photo of a red circle", "expect": {"scene": {…}}, "temperature": 0.7, "guidance": 2.0}
    {"judge": "digits", "images": "<base64 .npy, uint8 N×H×W×C>", "labels": [3, 1, …]}      the digits judge's data

A chat case is right when the parsed digit is the label (m2t.digits) or the answer is the expected
one exactly (m2t.shapes_vqa), asked greedily. A drawing is right when the suite's independent
judge says so: the digits classifier (fitted, as evaluation fits it, on the train split's pixels
carried in the judge line) reads the digit, or the shapes detector finds the scene (GenEval
rules). Drawings are sampled with the case's temperature and guidance and a seed per case, so
both versions are asked the same.
"""

from __future__ import annotations

import base64
import functools
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from nmm.data.sources import digit_prompt, parse_digit
from nmm.rollout import client

MAX_TOKENS = 24
JUDGE_IMAGES = 2000  # the digits judge's training pixels carried in a probe file at most
TASKS = ("m2t", "m2g")


class ProbeError(RuntimeError):
    """The probe could not be run against a version (unreachable, or it answered an error)."""


@dataclass
class Cases:
    chat: list[dict] = field(default_factory=list)  # m2t: an image (and a question) → text
    draw: list[dict] = field(default_factory=list)  # m2g: a prompt → an image the judge grades
    judge_images: np.ndarray | None = None  # the digits judge's training pixels (uint8), when a drawing expects a digit
    judge_labels: np.ndarray | None = None

    @property
    def tasks(self) -> list[str]:
        return [t for t, cases in zip(TASKS, (self.chat, self.draw)) if cases]

    def __len__(self) -> int:
        return len(self.chat) + len(self.draw)

    @functools.cached_property
    def digit_judge(self):
        from nmm.evaluate.judge import DigitJudge

        if self.judge_images is None:
            raise ProbeError("a drawing expects a digit and the probe file carries no digits judge")
        return DigitJudge(self.judge_images.astype(np.float32) / 255.0, self.judge_labels)


def _data_url(pixels: np.ndarray) -> str:
    from PIL import Image

    px = pixels.astype(np.uint8)
    img = Image.fromarray(px[..., 0], "L") if px.shape[-1] == 1 else Image.fromarray(px, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _interleave(groups: list[list[dict]], limit: int) -> list[dict]:
    mixed = [c for group in zip(*groups) for c in group] if len(groups) > 1 else (groups or [[]])[0]
    return mixed[:limit]


def cases_from_split(
    split, suites: list[str], limit: int, train=None, drawing: tuple[float, float] = (0.7, 1.0)
) -> Cases:
    """Up to `limit` cases per task from a dataset's test split for the pipeline's suites: chat
    cases for the M2T suites (digits labels, shapes VQA questions) and, with `train` (whose
    labelled pixels fit the digits judge), drawing cases for the M2G suites, sampled with
    `drawing` = (temperature, guidance) as evaluation samples."""
    out = Cases()
    labels = split.arrays.get("labels")
    chat = []
    if "m2t.digits" in suites and labels is not None:
        chat.append(
            [
                {"image": _data_url(split.arrays["images"][i]), "question": None, "expect": {"digit": int(labels[i])}}
                for i in np.flatnonzero(labels >= 0)[:limit]
            ]
        )
    if "m2t.shapes_vqa" in suites and split.vqa:
        chat.append(
            [
                {"image": _data_url(split.arrays["images"][i]), "question": qs[0][0], "expect": {"answer": qs[0][1]}}
                for i, qs in enumerate(split.vqa)
                if qs
            ][:limit]
        )
    out.chat = _interleave(chat, limit)
    temperature, guidance = drawing
    draw = []
    if "m2g.digits" in suites and train is not None and (train.arrays["labels"] >= 0).any():
        draw.append([{"prompt": digit_prompt(i % 10, i), "expect": {"digit": i % 10}} for i in range(limit)])
        known = np.flatnonzero(train.arrays["labels"] >= 0)[:JUDGE_IMAGES]
        out.judge_images, out.judge_labels = train.arrays["images"][known], train.arrays["labels"][known]
    if "m2g.shapes_geneval" in suites and split.scenes:
        draw.append([{"prompt": s["prompt"], "expect": {"scene": s}} for s in split.scenes if s][:limit])
    out.draw = [c | {"temperature": temperature, "guidance": guidance} for c in _interleave(draw, limit)]
    return out


def _npy(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def _from_npy(text: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)


def dumps(cases: Cases) -> bytes:
    lines = [json.dumps(c, sort_keys=True) for c in cases.chat + cases.draw]
    if cases.judge_images is not None:
        lines.append(
            json.dumps(
                {
                    "judge": "digits",
                    "images": _npy(cases.judge_images.astype(np.uint8)),
                    "labels": [int(v) for v in cases.judge_labels],
                }
            )
        )
    return "".join(line + "\n" for line in lines).encode()


def _kind(case) -> str | None:
    """Which line a probe file holds: chat, draw, judge, or None when it is none of them."""
    if not isinstance(case, dict):
        return None
    expect = case.get("expect")
    if isinstance(case.get("image"), str) and isinstance(expect, dict) and ("digit" in expect or "answer" in expect):
        return "chat"
    if (
        isinstance(case.get("prompt"), str)
        and isinstance(expect, dict)
        and ("digit" in expect or isinstance(expect.get("scene"), dict))
    ):
        return "draw"
    if case.get("judge") == "digits" and isinstance(case.get("images"), str) and isinstance(case.get("labels"), list):
        return "judge"
    return None


def loads(data: bytes, limit: int) -> Cases:
    """The probe file's cases, at most `limit` per task; ProbeError naming the first bad line."""
    out = Cases()
    for n, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
            kind = _kind(case)
            if kind == "judge":
                out.judge_images, out.judge_labels = _from_npy(case["images"]), np.asarray(case["labels"], np.int64)
                if out.judge_images.dtype != np.uint8 or len(out.judge_images) != len(out.judge_labels):
                    kind = None
        except (ValueError, KeyError, TypeError):
            kind = None
        if kind is None:
            raise ProbeError(
                f"probe cases line {n}: expected {{image, question, expect: {{digit|answer}}}}, "
                "{prompt, expect: {digit|scene}} or the digits judge's {judge, images, labels}"
            )
        if kind != "judge":
            getattr(out, kind).append(case)
    out.chat, out.draw = out.chat[:limit], out.draw[:limit]
    return out


def right(case: dict, said: str) -> bool:
    expect = case["expect"]
    if "digit" in expect:
        return parse_digit(said) == int(expect["digit"])
    return said.strip() == str(expect["answer"])


def drawn_right(cases: Cases, case: dict, b64_png: str) -> bool:
    """Whether the suite's judge finds the case's expectation in the drawn image."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64_png))) as img:
        pixels = np.asarray(img, np.float32) / 255.0
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    expect = case["expect"]
    if "digit" in expect:
        return int(cases.digit_judge.predict(pixels[None])[0]) == int(expect["digit"])
    from nmm.data.shapes import scene_from_dict
    from nmm.evaluate import shapes_judge

    return shapes_judge.score(scene_from_dict(expect["scene"]), pixels)


def served_model(base_url: str, timeout: float = 10.0) -> str:
    """The name the server at `base_url` serves its model under (its /v1/models)."""
    try:
        answer = client.get(base_url.rstrip("/") + "/v1/models", timeout=timeout)
        if answer.status != 200:
            raise ProbeError(f"{base_url}/v1/models: HTTP {answer.status}")
        return answer.json()["data"][0]["id"]
    except (client.Unreachable, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ProbeError(f"{base_url}/v1/models: {exc}") from None


def chat_body(case: dict, model: str, **options) -> dict:
    """The chat request that asks a case (OpenAI's schema: an image part, the question as text)."""
    content = [{"type": "image_url", "image_url": {"url": case["image"]}}]
    if case.get("question"):
        content.insert(0, {"type": "text", "text": case["question"]})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    } | options


def draw_body(case: dict, model: str, seed: int) -> dict:
    return {
        "model": model,
        "prompt": case["prompt"],
        "n": 1,
        "response_format": "b64_json",
        "seed": seed,
        "temperature": case.get("temperature", 0.7),
        "guidance": case.get("guidance", 1.0),
    }


def _post(base_url: str, path: str, body: dict, timeout: float) -> dict:
    try:
        answer = client.post_json(base_url.rstrip("/") + path, body, timeout=timeout)
        if answer.status >= 400:
            raise ProbeError(f"{base_url} answered {answer.status} to a probe case ({path})")
        return answer.json()
    except (client.Unreachable, ValueError) as exc:
        raise ProbeError(f"{base_url}{path}: {exc}") from None


def _ask(base_url: str, model: str, case: dict, timeout: float) -> bool:
    try:
        said = _post(base_url, "/v1/chat/completions", chat_body(case, model), timeout)["choices"][0]["message"][
            "content"
        ]
    except (KeyError, IndexError, TypeError) as exc:
        raise ProbeError(f"{base_url}: an answer without choices[0].message.content ({exc})") from None
    return right(case, said)


def _draw(base_url: str, model: str, cases: Cases, n: int, timeout: float) -> bool:
    case = cases.draw[n]
    try:
        b64 = _post(base_url, "/v1/images/generations", draw_body(case, model, n), timeout)["data"][0]["b64_json"]
        return drawn_right(cases, case, b64)
    except (KeyError, IndexError, TypeError, ValueError, OSError) as exc:
        raise ProbeError(f"{base_url}: a drawing the judge cannot read ({type(exc).__name__}: {exc})") from None


def score(base_url: str, cases: Cases, *, concurrency: int = 8, timeout: float = 60.0) -> dict[str, float]:
    """Per task the model serves, the fraction of its cases the version at `base_url` gets right
    (ProbeError when it cannot say: unreachable, an error answer, an unreadable drawing)."""
    if not len(cases):
        raise ProbeError("no probe cases")
    model = served_model(base_url)
    with ThreadPoolExecutor(concurrency) as pool:
        chat = list(pool.map(lambda c: _ask(base_url, model, c, timeout), cases.chat))
        draw = list(pool.map(lambda n: _draw(base_url, model, cases, n, timeout), range(len(cases.draw))))
    return {task: sum(hits) / len(hits) for task, hits in (("m2t", chat), ("m2g", draw)) if hits}
