"""The canary's quality probe: a slice of the evaluation suite's held-out cases, sent over HTTP
to a served version, graded as the suite grades them.

Cases are JSON lines, so an operator on a cluster reads the same file a local rollout does:

    {"image": "data:image/png;base64,…", "question": null, "expect": {"digit": 7}}
    {"image": "data:image/png;base64,…", "question": "what colour is the circle?", "expect": {"answer": "red"}}

A case is right when the parsed digit is the label (m2t.digits) or the answer is the expected one
exactly (m2t.shapes_vqa). Sent greedily (temperature 0), so both versions are asked the same.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nmm.data.sources import parse_digit

MAX_TOKENS = 24


class ProbeError(RuntimeError):
    """The probe could not be run against a version (unreachable, or it answered an error)."""


def _data_url(pixels: np.ndarray) -> str:
    from PIL import Image

    px = pixels.astype(np.uint8)
    img = Image.fromarray(px[..., 0], "L") if px.shape[-1] == 1 else Image.fromarray(px, "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def cases_from_split(split, suites: list[str], limit: int) -> list[dict]:
    """Up to `limit` cases from a dataset's test split for the pipeline's M2T suites (digits
    labels, shapes VQA questions), alternating between suites; [] when it has none."""
    per_suite: list[list[dict]] = []
    if "m2t.digits" in suites and "labels" in split.arrays:
        labels = split.arrays["labels"]
        per_suite.append([{"image": _data_url(split.arrays["images"][i]), "question": None, "expect": {"digit": int(labels[i])}}
                          for i in np.flatnonzero(labels >= 0)[:limit]])
    if "m2t.shapes_vqa" in suites and split.vqa:
        per_suite.append([{"image": _data_url(split.arrays["images"][i]), "question": qs[0][0], "expect": {"answer": qs[0][1]}}
                          for i, qs in enumerate(split.vqa) if qs][:limit])
    mixed = [c for group in zip(*per_suite) for c in group] if len(per_suite) > 1 else (per_suite or [[]])[0]
    return mixed[:limit]


def dumps(cases: list[dict]) -> bytes:
    return "".join(json.dumps(c, sort_keys=True) + "\n" for c in cases).encode()


def loads(data: bytes, limit: int) -> list[dict]:
    cases = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
            ok = isinstance(case["image"], str) and isinstance(case["expect"], dict) and \
                ("digit" in case["expect"] or "answer" in case["expect"])
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ProbeError(f"probe cases line {n}: expected {{image, question, expect: {{digit|answer}}}}")
        cases.append(case)
    return cases[:limit]


def right(case: dict, said: str) -> bool:
    expect = case["expect"]
    if "digit" in expect:
        return parse_digit(said) == int(expect["digit"])
    return said.strip() == str(expect["answer"])


def served_model(base_url: str, timeout: float = 10.0) -> str:
    """The name the server at `base_url` serves its model under (its /v1/models)."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/v1/models", timeout=timeout) as r:
            return json.loads(r.read())["data"][0]["id"]
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as exc:
        raise ProbeError(f"{base_url}/v1/models: {exc}") from None


def chat_body(case: dict, model: str, **options) -> dict:
    """The chat request that asks a case (OpenAI's schema: an image part, the question as text)."""
    content = [{"type": "image_url", "image_url": {"url": case["image"]}}]
    if case.get("question"):
        content.insert(0, {"type": "text", "text": case["question"]})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS,
            "temperature": 0} | options


def _ask(base_url: str, model: str, case: dict, timeout: float) -> str:
    req = urllib.request.Request(base_url.rstrip("/") + "/v1/chat/completions", data=json.dumps(chat_body(case, model)).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as exc:
        raise ProbeError(f"{base_url} answered {exc.code} to a probe case") from None
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError) as exc:
        raise ProbeError(f"{base_url}: {exc}") from None


def score(base_url: str, cases: list[dict], *, concurrency: int = 8, timeout: float = 60.0) -> float:
    """The fraction of cases the version at `base_url` gets right (ProbeError when it cannot say)."""
    if not cases:
        raise ProbeError("no probe cases")
    model = served_model(base_url)
    with ThreadPoolExecutor(concurrency) as pool:
        said = list(pool.map(lambda c: _ask(base_url, model, c, timeout), cases))
    return sum(right(c, s) for c, s in zip(cases, said)) / len(cases)
