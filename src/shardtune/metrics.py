"""Task metrics. scikit-learn computes them; this module only names and shapes them."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(logits))


def cross_entropy(logits: np.ndarray, targets: np.ndarray) -> float:
    """Mean cross-entropy; the same number the model's own loss gives on the same batch."""
    logp = log_softmax(logits.astype(np.float64))
    return float(-logp[np.arange(len(targets)), targets].mean())


def classification_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """loss, accuracy, macro-F1 and Matthews correlation (CoLA's metric)."""
    predicted = logits.argmax(axis=-1)
    labels = list(range(logits.shape[-1]))
    return {
        "loss": cross_entropy(logits, targets),
        "accuracy": float(accuracy_score(targets, predicted)),
        "macro_f1": float(f1_score(targets, predicted, labels=labels, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(targets, predicted)),
    }
