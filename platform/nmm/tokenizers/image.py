"""Image tokenizer: non-overlapping patches vector-quantized against a k-means codebook.

The codebook is fitted on the train split only; encode maps each patch to its nearest code,
decode pastes the code's patch back. Images are float32 in [0, 1], shape (N, H, W, C).
"""

from __future__ import annotations

import json

import numpy as np


def _patches(images: np.ndarray, p: int) -> np.ndarray:
    n, h, w, c = images.shape
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


class PatchVQ:
    def __init__(self, codebook: np.ndarray, patch: int, image_shape: tuple[int, int, int]):
        self.codebook = codebook.astype(np.float32)
        self.patch = patch
        self.image_shape = tuple(image_shape)

    @property
    def size(self) -> int:
        return len(self.codebook)

    @property
    def tokens_per_image(self) -> int:
        h, w, _ = self.image_shape
        return (h // self.patch) * (w // self.patch)

    @classmethod
    def fit(cls, images: np.ndarray, patch: int, codebook_size: int, seed: int = 0) -> "PatchVQ":
        from sklearn.cluster import KMeans

        n, h, w, c = images.shape
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of patchSize {patch}")
        flat = _patches(images, patch).reshape(-1, patch * patch * c)
        uniq = np.unique(flat, axis=0)
        k = min(codebook_size, len(uniq))
        km = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100).fit(flat)
        return cls(km.cluster_centers_, patch, (h, w, c))

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.image_shape[2]

    def patches(self, images: np.ndarray) -> np.ndarray:
        """Raw pixels per patch, (N, tokens_per_image, patch_dim): what mid and late fusion
        feed their image stems instead of codes."""
        return _patches(images.astype(np.float32), self.patch)

    def encode(self, images: np.ndarray) -> np.ndarray:
        flat = _patches(images.astype(np.float32), self.patch)
        d = (
            (flat**2).sum(-1, keepdims=True)
            - 2 * flat @ self.codebook.T
            + (self.codebook**2).sum(-1)[None, None, :]
        )
        return d.argmin(-1).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        h, w, c = self.image_shape
        p = self.patch
        n = codes.shape[0]
        x = self.codebook[np.clip(codes, 0, self.size - 1)]
        x = x.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h, w, c)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        # One metadata entry: safetensors writes its metadata map in no fixed order (a hash map),
        # so with two entries the file's bytes, and the dataset's digest, changed from process
        # to process for the same codebook.
        meta = {"patchvq": json.dumps({"patch": self.patch, "image_shape": list(self.image_shape)}, sort_keys=True)}
        return save({"codebook": self.codebook}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> "PatchVQ":
        from safetensors.numpy import load

        arrays = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len])["__metadata__"]
        if "patchvq" in meta:
            cfg = json.loads(meta["patchvq"])
            return cls(arrays["codebook"], int(cfg["patch"]), tuple(cfg["image_shape"]))
        # written by nmm 0.1.0 before the single entry: two entries
        return cls(arrays["codebook"], int(meta["patch"]), tuple(json.loads(meta["image_shape"])))
