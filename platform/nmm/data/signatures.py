"""What near-duplicate detection compares: a 64-bit perceptual hash of each image (ImageHash's
pHash: robust to resizing, re-encoding and small shifts) and a MinHash of each caption's word
bigrams (datasketch), with its LSH band keys.

Images: two hashes within Hamming radius r agree exactly on at least one of r + 1 bit bands
(pigeonhole), so bands are exact lookups and only bucket-mates are compared: no O(N²) scan.
Captions: datasketch picks the (bands, rows) that make Jaccard >= threshold a near-certain
collision; candidates are then checked on the estimated Jaccard.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

NUM_PERM = 64  # MinHash permutations: 512 bytes a caption
MINHASH_SEED = 1


def phash(pixels: np.ndarray) -> int:
    """64-bit pHash of an (H, W, C) uint8 image."""
    import imagehash
    from PIL import Image

    img = Image.fromarray(pixels[..., 0], "L") if pixels.shape[-1] == 1 else Image.fromarray(pixels, "RGB")
    bits = imagehash.phash(img).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def shingles(caption: str) -> set[bytes]:
    """A caption's word bigrams (lower case, with start and end marks): word order counts, so "a red
    circle and a blue square" and "a blue circle and a red square" are not near-duplicates."""
    words = ["^", *caption.lower().split(), "$"]
    return {f"{a} {b}".encode() for a, b in zip(words, words[1:])}


@lru_cache(maxsize=1)
def _permutations():
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED)
    return m.permutations, m.scheme


def minhash(caption: str) -> np.ndarray:
    from datasketch import MinHash

    permutations, scheme = _permutations()  # made once, not per caption (datasketch redraws them per MinHash)
    m = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, permutations=permutations, scheme=scheme)
    m.update_batch(list(shingles(caption)))
    return m.hashvalues.astype(np.uint64)


@lru_cache(maxsize=8)
def lsh_shape(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) datasketch's MinHashLSH chooses for this Jaccard threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    return lsh.b, lsh.r


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two MinHash signatures."""
    return float(np.count_nonzero(a == b)) / len(a)
