"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shardtune.metrics import classification_metrics, cross_entropy, softmax


def test_cross_entropy_by_hand():
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    expected = -(math.log(math.e**2 / (math.e**2 + 1)) + math.log(math.e / (1 + math.e))) / 2
    assert cross_entropy(logits, np.array([0, 1])) == pytest.approx(expected)


def test_cross_entropy_matches_torch():
    import torch

    rng = np.random.default_rng(0)
    logits, targets = rng.normal(size=(7, 3)), rng.integers(0, 3, size=7)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(targets)).item()
    assert cross_entropy(logits, targets) == pytest.approx(expected)


def test_classification_metrics_by_hand():
    # predictions 0,1,1,0 vs targets 0,1,0,0: accuracy 3/4
    logits = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=float)
    metrics = classification_metrics(logits, np.array([0, 1, 0, 0]))
    assert metrics["accuracy"] == pytest.approx(0.75)
    # class 0: p=1, r=2/3 -> f1 0.8; class 1: p=1/2, r=1 -> f1 2/3
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    # MCC = (TP*TN - FP*FN) / sqrt(...) with TP=1, TN=2, FP=1, FN=0
    assert metrics["mcc"] == pytest.approx((1 * 2 - 1 * 0) / math.sqrt(2 * 1 * 3 * 2))
    assert metrics["f1"] == pytest.approx(2 / 3)  # class 1 as positive: P 1/2, R 1


def test_softmax_rows_sum_to_one():
    probs = softmax(np.array([[1000.0, 0.0], [1.0, 1.0]]))
    assert np.allclose(probs.sum(axis=1), 1) and probs[0, 0] == pytest.approx(1.0)
