"""Classification metrics and the majority vote: the one definition every command reports.

Macro-F1 (MACRO_F1_DEFINITION) is scikit-learn's `f1_score(truth, pred, labels=L, average="macro",
zero_division=0)`: the unweighted mean of the per-class F1 over the label set L. L is the caller's `labels`
or, by default, the classes that occur in the truth or the predictions (scikit-learn's default). An
abstention (`None` or ABSTAIN, e.g. a search whose neighbours have no label) is never a class: it is a wrong
prediction for accuracy and a miss (false negative) of its true class, so it lowers that class's recall and
no class's precision. Accuracy is scikit-learn's `accuracy_score` over every sample, abstentions included.

The vote (VOTE_DEFINITION) is the most frequent label; a tie goes to the tied label with the nearest voter
(smallest distance), then to the smallest label, so the winner never depends on the order of the voters.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ABSTAIN = "(none)"  # the prediction of a classifier that abstains (no labelled neighbour)
MACRO_F1_DEFINITION = (
    "unweighted mean of per-class F1 over the label set = scikit-learn "
    "f1_score(labels=L, average='macro', zero_division=0); L = the classes in the truth or the predictions; "
    "an abstention '(none)' is a wrong prediction and a miss of its true class, never a class"
)
VOTE_DEFINITION = (
    "most frequent label; a tie goes to the tied label with the nearest voter (smallest distance), "
    "then to the alphabetically first label; unlabelled voters abstain"
)
DEFINITIONS = {"macro_f1_definition": MACRO_F1_DEFINITION, "vote_definition": VOTE_DEFINITION}


@dataclass(frozen=True)
class ClassScores:
    """One class of the label set: precision, recall, F1 (0 where undefined) and true count."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ClassificationReport:
    """Accuracy, macro-F1 and per-class scores over `labels` (MACRO_F1_DEFINITION)."""

    accuracy: float
    macro_f1: float
    per_class: dict[Any, ClassScores]
    labels: list
    confusion: list[list[int]]  # rows: true label, columns: predicted label (order of `labels`)
    abstained: list[int]  # per true label (order of `labels`): predictions that abstained
    n: int


def is_abstention(label: Any) -> bool:
    """True for a prediction that names no class (None or ABSTAIN)."""
    return label is None or (isinstance(label, str) and label == ABSTAIN)


def classification_report(
    truth: Sequence[Hashable], pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> ClassificationReport:
    """Scores of predictions against the truth per MACRO_F1_DEFINITION (explicit `labels` fix L and its order)."""
    truth, pred = list(truth), list(pred)
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} true labels but {len(pred)} predictions")
    if any(is_abstention(t) for t in truth):
        raise ValueError("the truth holds an abstention (None or '(none)'); every sample needs its class")
    seen = set(truth) | {p for p in pred if not is_abstention(p)}
    labels = sorted(seen) if labels is None else list(labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels repeat a class: {labels}")
    missing = seen - set(labels)
    if missing:
        raise ValueError(f"labels {labels} miss classes of the truth or predictions: {sorted(missing)}")
    pos = {lab: i for i, lab in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    abstained = np.zeros(len(labels), dtype=np.int64)
    for t, p in zip(truth, pred, strict=True):
        if is_abstention(p):
            abstained[pos[t]] += 1
        else:
            confusion[pos[t], pos[p]] += 1
    return _report(confusion, abstained, labels)


def confusion_report(
    confusion: np.ndarray, classes: Sequence[Hashable], labels: Sequence[Hashable] | None = None
) -> ClassificationReport:
    """classification_report from a confusion matrix over `classes` [true, pred] (e.g. summed over ranks)."""
    cm = np.rint(np.asarray(confusion)).astype(np.int64)
    classes = list(classes)
    if cm.shape != (len(classes), len(classes)):
        raise ValueError(f"a confusion matrix over {len(classes)} classes must be square, got {cm.shape}")
    present = [c for i, c in enumerate(classes) if cm[i].sum() or cm[:, i].sum()]
    labels = present if labels is None else list(labels)
    unknown = set(labels) - set(classes)
    if unknown or set(present) - set(labels):
        raise ValueError(f"labels {labels} must be classes covering every counted class {present}")
    idx = [classes.index(c) for c in labels]
    return _report(cm[np.ix_(idx, idx)], np.zeros(len(idx), dtype=np.int64), labels)


def _report(confusion: np.ndarray, abstained: np.ndarray, labels: list) -> ClassificationReport:
    """The one computation: per-class precision/recall/F1 (0 where 0/0), their mean, and accuracy."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(0).astype(np.float64)
    support = (confusion.sum(1) + abstained).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * tp, predicted + support, out=np.zeros_like(tp), where=predicted + support > 0)
    n = int(support.sum())
    return ClassificationReport(
        accuracy=float(tp.sum() / n) if n else 0.0,
        macro_f1=float(f1.mean()) if len(labels) else 0.0,
        per_class={
            lab: ClassScores(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
            for i, lab in enumerate(labels)
        },
        labels=labels,
        confusion=confusion.tolist(),
        abstained=abstained.tolist(),
        n=n,
    )


def vote(labels: Sequence[Any], distances: Sequence[float] | None = None) -> Any:
    """The majority label per VOTE_DEFINITION (None when every voter abstains); without distances, ties by label."""
    if distances is not None and len(distances) != len(labels):
        raise ValueError(f"{len(labels)} voters but {len(distances)} distances")
    tally: dict[Any, tuple[int, float]] = {}
    for i, label in enumerate(labels):
        if is_abstention(label):
            continue
        d = 0.0 if distances is None else float(distances[i])
        count, nearest = tally.get(label, (0, np.inf))
        tally[label] = (count + 1, min(nearest, d))
    if not tally:
        return None
    return min(tally, key=lambda label: (-tally[label][0], tally[label][1], label))
