"""Which labels are likely wrong: out-of-sample probabilities and a suspect score per image.

Every image gets class probabilities from a logistic regression that did NOT see it
(stratified k-fold over the collected set, on frozen embeddings), so a wrong label cannot
vouch for itself. From those (cleanlab-style):

- self-confidence  = p[given label]; low means the rest of the data disagrees with the label;
- suspect score    = 1 - self-confidence, what the review grid sorts by;
- confident disagreement: the top prediction is another class k with p[k] >= t_k, where t_k is
  the mean p[k] over images labelled k (the class's own typical confidence, per-class so that
  hard classes are not flagged wholesale). These are the "confident joint" off-diagonal cells.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from collector.review.config import DEFAULT_FOLDS

PCA_DIMS = 256


@dataclass
class LabelIssues:
    classes: list[str]
    probs: np.ndarray                  # [N, C] out-of-sample
    given: np.ndarray                  # [N] class index of the (effective) label
    predicted: np.ndarray              # [N] argmax class index
    self_confidence: np.ndarray        # [N] p[given]
    suspect_score: np.ndarray          # [N] 1 - self_confidence
    confident_disagreement: np.ndarray  # [N] bool


def out_of_sample_probs(features: np.ndarray, labels: list[str], folds: int = DEFAULT_FOLDS,
                        seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """[N, C] probabilities, each row from a model trained on the other folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError("model-assisted review needs at least two labels")
    y = np.array([classes.index(label) for label in labels])
    counts = np.bincount(y, minlength=len(classes))
    # A class with fewer members than folds cannot appear in every fold; cap the folds so
    # each fold still sees most classes (classes of 1 get a prediction from models without them).
    n_splits = int(max(2, min(folds, np.sort(counts)[len(counts) // 2], len(y) // 2)))
    probs = np.zeros((len(y), len(classes)), dtype=np.float64)
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    # Measured on the demo catalog (300 photos, 15 flipped labels): PCA to 256 dims (fit
    # without labels, so nothing leaks across folds) and one BLAS thread found the same
    # flipped labels as the full 1280-d fit, 7x faster; on the shared 2-core machine
    # multi-threaded BLAS made it 50x slower. Features are L2-normalised, so x10 brings them
    # to the scale where the default C=1 regularises well.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only N members"
        reduced = reduce_features(features, seed)
        for train_idx, test_idx in splitter.split(reduced, y):
            train_y = y[train_idx]
            if len(np.unique(train_y)) < 2:
                probs[test_idx] = 1.0 / len(classes)
                continue
            model = LogisticRegression(C=1.0, max_iter=500).fit(reduced[train_idx], train_y)
            fold_probs = model.predict_proba(reduced[test_idx])
            probs[test_idx[:, None], model.classes_[None, :]] = fold_probs
    return probs, classes


def reduce_features(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """PCA to PCA_DIMS (fit without labels) and scaled for the default C=1 (see above)."""
    from sklearn.decomposition import PCA

    dims = min(PCA_DIMS, features.shape[1], len(features) - 1)
    return PCA(dims, random_state=seed).fit_transform(features) * 10.0


def find_label_issues(probs: np.ndarray, labels: list[str], classes: list[str]) -> LabelIssues:
    given = np.array([classes.index(label) for label in labels])
    rows = np.arange(len(given))
    self_confidence = probs[rows, given]
    predicted = probs.argmax(axis=1)
    thresholds = np.array([
        probs[given == k, k].mean() if np.any(given == k) else 1.0 for k in range(len(classes))
    ])
    confident = (predicted != given) & (probs[rows, predicted] >= thresholds[predicted])
    return LabelIssues(classes, probs, given, predicted, self_confidence,
                       1.0 - self_confidence, confident)


def rank_label_issues(features: np.ndarray, labels: list[str], folds: int = DEFAULT_FOLDS,
                      seed: int = 0) -> LabelIssues:
    probs, classes = out_of_sample_probs(features, labels, folds=folds, seed=seed)
    return find_label_issues(probs, labels, classes)
