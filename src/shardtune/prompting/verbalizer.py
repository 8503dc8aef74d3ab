"""Verbalizers: from the model's distribution at the label slot to label probabilities.

Each label has one or more label words. A word of several tokens is scored by the mean
log-probability of its tokens at the slot (OpenPrompt's "mean" handling: one forward pass
per example however many words there are); a label's score is the log of the mean
probability of its words; label probabilities are those scores normalised over the labels.

Also here: content-free calibration, combining several templates, and the automatic
verbalizer that finds label words from the model's own output distribution.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from shardtune.prompting.template import word_ids


class WordTable:
    """Every label word's token ids, padded into tensors the scoring gathers with."""

    def __init__(self, verbalizer: dict[str, list[str]], labels: list[str], tokenizer, spaces: list[bool]):
        words = [(labels.index(label), word) for label in labels for word in verbalizer[label]]
        self.word_label = torch.tensor([label for label, _ in words])
        per_template = [[word_ids(tokenizer, word, space) for _, word in words] for space in spaces]
        width = max(len(ids) for table in per_template for ids in table)
        self.ids = torch.zeros(len(spaces), len(words), width, dtype=torch.long)  # (template, word, token)
        self.mask = torch.zeros(len(spaces), len(words), width)
        for t, table in enumerate(per_template):
            for w, ids in enumerate(table):
                self.ids[t, w, :len(ids)] = torch.tensor(ids)
                self.mask[t, w, :len(ids)] = 1.0
        self.n_labels = len(labels)


def unencodable(tokenizer, word: str, space: bool) -> str | None:
    """Why the tokenizer cannot spell `word` as a label word, or None."""
    ids = word_ids(tokenizer, word, space)
    if not word.strip():
        return "is empty"
    if not ids:
        return "encodes to no tokens"
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        return f"is not in the vocabulary (it encodes to {tokenizer.unk_token})"
    return None


def label_log_probs(slot_log_probs: torch.Tensor, word_ids: torch.Tensor, word_mask: torch.Tensor,
                    word_label: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(rows, vocab) log-probabilities at the slot -> (rows, labels) label log-probabilities.

    word_ids/word_mask: (rows, words, tokens), each row's word table (templates may spell a
    word differently)."""
    rows, words, width = word_ids.shape
    token_lp = slot_log_probs.gather(1, word_ids.reshape(rows, -1)).reshape(rows, words, width)
    word_lp = (token_lp * word_mask).sum(-1) / word_mask.sum(-1)
    word_label = word_label.to(word_lp.device)
    scores = torch.stack([torch.logsumexp(word_lp[:, word_label == label], dim=-1)
                          - math.log(int((word_label == label).sum())) for label in range(n_labels)], dim=-1)
    return scores.log_softmax(-1)


# ------------------------------------------------------------------- calibration, ensembles
def calibrate(log_probs: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Divide each template's label probabilities by its content-free ones and renormalise
    (contextual calibration, Zhao et al. 2021). log_probs: (examples, templates, labels);
    content_free: (templates, labels)."""
    shifted = log_probs - content_free[None]
    return shifted - _logsumexp(shifted, axis=-1)


def combine(log_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average of the templates' label probabilities, as log-probabilities:
    (examples, templates, labels) -> (examples, labels)."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return _logsumexp(log_probs + np.log(np.maximum(weights, 1e-30))[None, :, None], axis=1)[:, 0]


def learn_weights(log_probs: np.ndarray, targets: np.ndarray, steps: int = 300) -> np.ndarray:
    """Template weights (on the simplex) that maximise the likelihood of `targets` under
    the combined probabilities: a convex problem in the weights, solved by gradient ascent
    on their softmax parameters."""
    lp = torch.tensor(log_probs, dtype=torch.float64)
    target_lp = lp[torch.arange(len(targets)), :, torch.as_tensor(targets)]  # (examples, templates)
    theta = torch.zeros(lp.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([theta], lr=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -torch.logsumexp(target_lp + theta.log_softmax(0)[None], dim=1).mean()
        loss.backward()
        optimizer.step()
    return theta.detach().softmax(0).numpy()


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    return top + np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True))


# ---------------------------------------------------------------------- automatic words
def candidate_tokens(tokenizer, log_probs: np.ndarray, space: bool, pool: int) -> list[int]:
    """The `pool` most probable tokens (by `log_probs` over the vocabulary) that are whole
    words on their own: alphabetic, and spelled by the tokenizer as exactly that one token
    where the label word goes."""
    chosen = []
    special = set(tokenizer.all_special_ids)
    for token in np.argsort(-log_probs):
        token = int(token)
        if token in special:
            continue
        word = tokenizer.decode([token]).strip()
        if len(word) >= 2 and word.isalpha() and word_ids(tokenizer, word, space) == [token]:
            chosen.append(token)
            if len(chosen) == pool:
                break
    return chosen


def choose_words(class_log_probs: np.ndarray, candidates: list[int], per_label: int) -> list[list[int]]:
    """Label words by how well they separate each class: a token's mean log-probability on
    the class's examples minus its mean over the other classes (a likelihood ratio). Each
    token goes to one label at most; labels take turns picking so none is starved.

    class_log_probs: (classes, vocab) mean slot log-probabilities per class."""
    lp = class_log_probs[:, candidates]
    n = lp.shape[0]
    others = (lp.sum(axis=0, keepdims=True) - lp) / max(n - 1, 1)
    score = lp - others
    ranked = [list(np.argsort(-score[c])) for c in range(n)]
    taken: set[int] = set()
    words: list[list[int]] = [[] for _ in range(n)]
    for _ in range(per_label):
        for c in range(n):
            while ranked[c] and ranked[c][0] in taken:
                ranked[c].pop(0)
            if ranked[c]:
                pick = ranked[c].pop(0)
                taken.add(pick)
                words[c].append(candidates[pick])
    return words
