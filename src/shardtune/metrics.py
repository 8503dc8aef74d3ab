"""Task metrics. scikit-learn computes them; this module only names and shapes them."""

from __future__ import annotations

import numpy as np


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
    """loss, accuracy, macro-F1, Matthews correlation (CoLA's metric) and, with two labels,
    F1 of the second label as the positive class (MRPC's F1)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef  # sklearn costs seconds to import

    predicted = logits.argmax(axis=-1)
    labels = list(range(logits.shape[-1]))
    # Macro-F1 over the labels this data carries (or that were predicted): a label the run
    # knows but the file never holds is not a 0 in the average (`eval` names those labels).
    present = sorted(set(targets.tolist()) | set(predicted.tolist()))
    metrics = {
        "loss": cross_entropy(logits, targets),
        "accuracy": float(accuracy_score(targets, predicted)),
        "macro_f1": float(f1_score(targets, predicted, labels=present, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(targets, predicted)),
    }
    if len(labels) == 2:
        metrics["f1"] = float(f1_score(targets, predicted, pos_label=1, average="binary", zero_division=0))
    return metrics


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """MSE loss and Pearson/Spearman correlation (STS-B's metrics), via scipy."""
    from scipy.stats import pearsonr, spearmanr

    constant = np.ptp(predictions) == 0 or np.ptp(targets) == 0  # correlation undefined
    return {
        "loss": float(np.mean((predictions - targets) ** 2)),
        "pearson": 0.0 if constant else float(pearsonr(predictions, targets)[0]),
        "spearman": 0.0 if constant else float(spearmanr(predictions, targets)[0]),
    }


def tagging_metrics(gold: list[list[str]], predicted: list[list[str]], logits: np.ndarray,
                    targets: np.ndarray) -> dict[str, float]:
    """Entity-level precision/recall/F1 (seqeval: CoNLL's chunk definition), word accuracy, loss."""
    from seqeval.metrics import f1_score as entity_f1
    from seqeval.metrics import precision_score, recall_score

    words = sum(len(g) for g in gold)
    correct = sum(p == g for gs, ps in zip(gold, predicted) for g, p in zip(gs, ps))
    return {
        "loss": cross_entropy(logits, targets) if len(targets) else 0.0,
        "entity_f1": float(entity_f1(gold, predicted, zero_division=0)),
        "entity_precision": float(precision_score(gold, predicted, zero_division=0)),
        "entity_recall": float(recall_score(gold, predicted, zero_division=0)),
        "token_accuracy": correct / words if words else 0.0,
    }


# -------------------------------------------------------- SQuAD (official definitions)
# The official SQuAD v1.1/v2.0 evaluation script's normalisation and scores, restated:
# the `evaluate` library's squad metrics fetch their code from the hub, which is not
# reachable offline.
def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    from collections import Counter

    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # unanswerable: right only if both are empty
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """Mean exact match and F1 (0-100, as SQuAD reports), each the max over gold answers."""
    em = [max(exact_match(p, g) for g in (gs or [""])) for p, gs in zip(predictions, golds)]
    f1 = [max(token_f1(p, g) for g in (gs or [""])) for p, gs in zip(predictions, golds)]
    n = max(len(predictions), 1)
    return {"exact_match": 100 * sum(em) / n, "f1": 100 * sum(f1) / n}


def best_no_answer_threshold(candidates: list[tuple[str, float]], golds: list[list[str]]) -> dict[str, float]:
    """SQuAD 2.0's best F1 over no-answer thresholds (the official script's find_best_thresh).

    candidates: per question (best span, no-answer score minus span score). A question
    answers its span when the margin is at most the threshold, else "" (no answer).
    """
    if not candidates:
        return {"best_f1": 0.0, "best_exact_match": 0.0, "best_no_answer_threshold": 0.0}
    order = np.argsort([margin for _, margin in candidates], kind="stable")
    best = {}
    for name, score in (("f1", token_f1), ("exact_match", exact_match)):
        span = np.array([max(score(candidates[i][0], g) for g in (golds[i] or [""])) for i in order])
        null = np.array([max(score("", g) for g in (golds[i] or [""])) for i in order])
        # answering the k questions with the smallest margins, abstaining on the rest
        totals = np.concatenate([[0.0], np.cumsum(span)]) + np.concatenate([np.cumsum(null[::-1])[::-1], [0.0]])
        k = int(np.argmax(totals))
        best[name] = (100 * totals[k] / len(candidates), k)
    k = best["f1"][1]
    margins = [candidates[i][1] for i in order]
    threshold = margins[k - 1] if k > 0 else margins[0] - 1.0
    return {"best_f1": float(best["f1"][0]), "best_exact_match": float(best["exact_match"][0]),
            "best_no_answer_threshold": float(threshold)}
