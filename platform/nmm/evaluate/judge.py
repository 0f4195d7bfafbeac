"""An independent judge of generated digits: a scikit-learn classifier trained on the raw
pixels of the train split only (it never sees the model or its tokenizer)."""

from __future__ import annotations

import numpy as np


class DigitJudge:
    def __init__(self, train_images: np.ndarray, train_labels: np.ndarray, seed: int = 0):
        from sklearn.svm import SVC

        self.shape = train_images.shape[1:]
        self.clf = SVC(gamma="scale", C=10.0, random_state=seed).fit(self._flat(train_images), train_labels)

    def _flat(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.clf.predict(self._flat(images))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        return float((self.predict(images) == labels).mean()) if len(labels) else 0.0
