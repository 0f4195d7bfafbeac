"""Image tokenizers: non-overlapping patches, each turned into one code.

`PatchVQ` (kind patch-vq): each patch vector-quantized against a k-means codebook of whole patches.
`ColourMaskVQ` (kind colour-mask): each patch as a colour from a palette and a binary mask from a
codebook of masks, the code being the pair; for flat-colour images (cartoons, diagrams, the
shapes source), where a patch a codebook of whole patches never saw — a colour on a shape's edge
that no training image has — is still one the pair codebook holds.
Codebooks are fitted on the train split only; encode maps each patch to its nearest code, decode
pastes the code's patch back. Images are float32 in [0, 1], shape (N, H, W, C).
"""

from __future__ import annotations

import json

import numpy as np


def _patches(images: np.ndarray, p: int) -> np.ndarray:
    n, h, w, c = images.shape
    x = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


class PatchVQ:
    KEY = "patchvq"
    factors: tuple[int, ...] = ()  # one codebook: the model gives each code its own embedding

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
    def fit(cls, images: np.ndarray, patch: int, codebook_size: int, seed: int = 0) -> PatchVQ:
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

    def drawing_codes(self, codes: np.ndarray) -> np.ndarray:
        """The codes a model drawing this image emits: `encode`'s own."""
        return codes

    def encode(self, images: np.ndarray) -> np.ndarray:
        flat = _patches(images.astype(np.float32), self.patch)
        d = (flat**2).sum(-1, keepdims=True) - 2 * flat @ self.codebook.T + (self.codebook**2).sum(-1)[None, None, :]
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
        meta = {PatchVQ.KEY: json.dumps({"patch": self.patch, "image_shape": list(self.image_shape)}, sort_keys=True)}
        return save({"codebook": self.codebook}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> PatchVQ:
        from safetensors.numpy import load

        arrays = load(data)
        meta = _metadata(data)
        if cls.KEY in meta:
            cfg = json.loads(meta[cls.KEY])
            return cls(arrays["codebook"], int(cfg["patch"]), tuple(cfg["image_shape"]))
        # written by nmm 0.1.0 before the single entry: two entries
        return cls(arrays["codebook"], int(meta["patch"]), tuple(json.loads(meta["image_shape"])))


class ColourMaskVQ:
    """Each patch: the colour of its foreground (pixels away from the ground colour) from a
    palette, and the foreground's shape from a codebook of binary masks; the code of colour k and
    mask m is k * masks + m, colour 0 being the ground itself and mask 0 the empty mask.
    `factors` (colours, masks) tells the model that codes are pairs, so a pair never seen in
    training is embedded and drawn from its colour and its mask (nmm.model.transformer.FactorCodes).

    An empty patch is drawn as the ground whatever its colour, so it has two codings: `encode`
    gives it the ground's colour (the coding images are read in), and `drawing_codes` the colour
    of the next non-empty patch in raster order (after the last one: that one's). Models draw in
    the second: they predict a pair's colour and mask independently of each other (the output
    layer's row of a pair is the sum of the two factors' rows), so a patch's colour must not
    decide whether it is empty; drawn so, each object's colour is chosen before its first patch,
    where it starts is the mask's decision alone, and the ground colour is never a target (a
    ground-coloured object patch would be a hole). In shapes-m2m-rl, drawing in the first coding
    scored GenEval 0.55; reading in the second cost VQA colour answers 0.99 → 0.77, and reading
    empty patches as one of the object colours cost "where is" answers 0.99 → 0.36. One colour
    per patch: where two objects share a patch, it takes its most common foreground colour."""

    KEY = "colourmask"
    FOREGROUND = 0.1  # a pixel farther than this (Euclidean, in [0, 1] units) from the ground is foreground

    def __init__(
        self, ground: np.ndarray, palette: np.ndarray, masks: np.ndarray, patch: int, image_shape: tuple[int, int, int]
    ):
        self.ground = ground.astype(np.float32)  # (C,)
        self.palette = palette.astype(np.float32)  # (K, C): the object colours, 1..K in codes
        self.masks = masks.astype(bool)  # (masks, patch * patch); row 0 the empty mask
        self.patch = patch
        self.image_shape = tuple(image_shape)

    @property
    def factors(self) -> tuple[int, int]:
        return len(self.palette) + 1, len(self.masks)

    @property
    def size(self) -> int:
        return (len(self.palette) + 1) * len(self.masks)

    tokens_per_image = PatchVQ.tokens_per_image
    patch_dim = PatchVQ.patch_dim
    patches = PatchVQ.patches

    def _split(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, P, p*p, C) pixels of each patch and (N, P, p*p) whether each is foreground."""
        c = self.image_shape[2]
        px = _patches(images.astype(np.float32), self.patch)
        px = px.reshape(*px.shape[:2], -1, c)
        return px, np.linalg.norm(px - self.ground, axis=-1) > self.FOREGROUND

    @classmethod
    def fit(cls, images: np.ndarray, patch: int, colours: int, masks: int, seed: int = 0) -> ColourMaskVQ:
        from sklearn.cluster import KMeans

        n, h, w, c = images.shape
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of patchSize {patch}")
        values, counts = np.unique(np.round(images.reshape(-1, c).astype(np.float32), 2), axis=0, return_counts=True)
        ground = values[counts.argmax()]
        px, fg = cls(ground, np.zeros((0, c)), np.zeros((1, patch * patch), bool), patch, (h, w, c))._split(images)
        fg_pixels = px[fg]
        palette = np.zeros((0, c), np.float32)  # no foreground at all: the ground alone
        if len(fg_pixels):
            k = min(colours - 1, len(np.unique(fg_pixels, axis=0)))
            sample = fg_pixels[np.random.default_rng(seed).permutation(len(fg_pixels))[:200_000]]
            palette = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=100).fit(sample).cluster_centers_
        uniq, counts = np.unique(fg.reshape(-1, patch * patch), axis=0, return_counts=True)
        drawn = uniq.any(1)
        if drawn.sum() < masks:  # every mask seen fits: keep them exactly
            book = uniq[drawn]
        else:
            km = KMeans(n_clusters=masks - 1, n_init=1, random_state=seed, max_iter=100)
            book = km.fit(uniq[drawn].astype(np.float32), sample_weight=counts[drawn]).cluster_centers_ > 0.5
        return cls(ground, palette, np.concatenate([np.zeros((1, patch * patch), bool), book]), patch, (h, w, c))

    def encode(self, images: np.ndarray) -> np.ndarray:
        px, fg = self._split(images)
        m, book = fg.astype(np.float32), self.masks.astype(np.float32)
        mask = ((m**2).sum(-1, keepdims=True) - 2 * m @ book.T + (book**2).sum(-1)).argmin(-1)  # (N, P)
        colour = np.zeros(mask.shape, np.int64)
        if len(self.palette):
            pal = self.palette
            nearest = (-2 * px @ pal.T + (pal**2).sum(-1)).argmin(-1)  # (N, P, p*p): each pixel's palette colour
            votes = np.stack([((nearest == k) & fg).sum(-1) for k in range(len(pal))], -1)
            colour = np.where(mask > 0, votes.argmax(-1) + 1, 0)
        return (colour * len(self.masks) + mask).astype(np.int32)

    def drawing_codes(self, codes: np.ndarray) -> np.ndarray:
        """`codes` (N, P) with each empty patch's colour that of the next non-empty patch."""
        colour, mask = np.divmod(codes, len(self.masks))
        return (_fill_ahead(colour, mask > 0) * len(self.masks) + mask).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        h, w, c = self.image_shape
        p = self.patch
        n = codes.shape[0]
        codes = np.clip(codes, 0, self.size - 1)
        colour, mask = codes // len(self.masks), codes % len(self.masks)
        on = self.masks[mask][..., None]  # (N, P, p*p, 1)
        table = np.concatenate([self.ground[None], self.palette])
        x = np.where(on, table[colour][:, :, None, :], self.ground).astype(np.float32)
        x = x.reshape(n, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h, w, c)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = {self.KEY: json.dumps({"patch": self.patch, "image_shape": list(self.image_shape)}, sort_keys=True)}
        return save(
            {"ground": self.ground, "palette": self.palette, "masks": self.masks.astype(np.uint8)}, metadata=meta
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ColourMaskVQ:
        from safetensors.numpy import load

        cfg = json.loads(_metadata(data)[cls.KEY])
        a = load(data)
        return cls(a["ground"], a["palette"], a["masks"].astype(bool), int(cfg["patch"]), tuple(cfg["image_shape"]))


def _fill_ahead(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(N, P): each row's `values` where `known`; elsewhere the next known value along the row,
    after the last known one that one, and 0 in a row with none."""
    n, p = values.shape
    at = np.arange(p)
    ahead = np.minimum.accumulate(np.where(known, at, p)[:, ::-1], axis=1)[:, ::-1]
    behind = np.maximum.accumulate(np.where(known, at, -1), axis=1)
    src = np.where(ahead < p, ahead, behind)
    return np.where(src >= 0, np.take_along_axis(values, src.clip(0, p - 1), 1), 0)


def _metadata(data: bytes) -> dict:
    header_len = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + header_len])["__metadata__"]


ImageTokenizer = PatchVQ | ColourMaskVQ


def load_image_tokenizer(data: bytes) -> ImageTokenizer:
    """The image tokenizer saved in `data` (`to_bytes` of either kind)."""
    return ColourMaskVQ.from_bytes(data) if ColourMaskVQ.KEY in _metadata(data) else PatchVQ.from_bytes(data)
