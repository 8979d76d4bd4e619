"""histo.classification: macro-F1 and accuracy against scikit-learn, the vote's tie rule, and the callers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

from histo.classification import (
    ABSTAIN,
    MACRO_F1_DEFINITION,
    VOTE_DEFINITION,
    classification_report,
    confusion_report,
    vote,
)


def sklearn_scores(truth: list, pred: list, labels: list) -> dict:
    """scikit-learn's figures over `labels` (an abstention is just a prediction outside the label set)."""
    p, r, f, n = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
    return {
        "accuracy": accuracy_score(truth, pred),
        "macro_f1": f1_score(truth, pred, labels=labels, average="macro", zero_division=0),
        "per_class": {lab: (p[i], r[i], f[i], n[i]) for i, lab in enumerate(labels)},
    }


def assert_matches_sklearn(truth: list, pred: list, labels: list | None = None) -> None:
    report = classification_report(truth, pred, labels)
    expected_labels = labels or sorted(set(truth) | {p for p in pred if p != ABSTAIN})
    assert report.labels == expected_labels
    want = sklearn_scores(truth, pred, expected_labels)
    assert report.accuracy == pytest.approx(want["accuracy"])
    assert report.macro_f1 == pytest.approx(want["macro_f1"])
    assert report.n == len(truth)
    for lab, scores in want["per_class"].items():
        c = report.per_class[lab]
        assert (c.precision, c.recall, c.f1, c.support) == pytest.approx(scores)


# ---- classification_report against scikit-learn ----------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_random_labels_match_sklearn(seed: int) -> None:
    """Classes missing from the truth (e), from the predictions (d) and abstentions, default and explicit labels."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    truth = list(rng.choice(["a", "b", "c", "d"], n))
    pred = list(rng.choice(["a", "b", "c", "e", ABSTAIN], n))
    assert_matches_sklearn(truth, pred)
    assert_matches_sklearn(truth, pred, ["e", "d", "c", "b", "a", "f"])  # order kept, f nowhere: F1 0


def test_old_search_scores_match_sklearn() -> None:
    """Moved from test_search_eval (search.evaluate.scores): no abstention, labels = truth ∪ predictions."""
    rng = np.random.default_rng(0)
    truth = list(rng.choice(["a", "b", "c", "d"], 60))
    pred = list(rng.choice(["a", "b", "c", "e"], 60))
    s = classification_report(truth, pred)
    labels = sorted(set(truth) | set(pred))
    p, r, f, n = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
    assert s.macro_f1 == pytest.approx(f1_score(truth, pred, average="macro", zero_division=0))
    for i, lab in enumerate(labels):
        c = s.per_class[lab]
        assert (c.precision, c.recall, c.f1, c.support) == pytest.approx((p[i], r[i], f[i], n[i]))


def test_abstention_is_wrong_and_a_miss_but_not_a_class() -> None:
    truth = ["A", "A", "B", "B"]
    pred = [ABSTAIN, "A", "B", None]
    r = classification_report(truth, pred)
    assert r.labels == ["A", "B"] and r.accuracy == pytest.approx(2 / 4)
    assert r.per_class["A"].precision == 1.0 and r.per_class["A"].recall == pytest.approx(1 / 2)
    assert r.per_class["A"].f1 == pytest.approx(2 / 3) and r.macro_f1 == pytest.approx(2 / 3)
    assert r.confusion == [[1, 0], [0, 1]] and r.abstained == [1, 1]
    # the old search definition made "(none)" a class of F1 0 and averaged it in: (2/3 + 2/3 + 0) / 3
    assert r.macro_f1 != pytest.approx(f1_score(truth, [ABSTAIN, "A", "B", ABSTAIN], average="macro"))


def test_confusion_report_matches_sklearn() -> None:
    """Moved from test_kimianet_train (classification_metrics): a confusion matrix over more classes than occur."""
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
    cm = np.zeros((5, 5))
    np.add.at(cm, (y, p), 1)
    m = confusion_report(cm, [0, 1, 2, 3, 4])
    assert m.labels == [0, 1, 2, 3]  # class 4 neither true nor predicted: not in the default label set
    assert m.accuracy == pytest.approx(np.mean(y == p))
    assert m.macro_f1 == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    full = confusion_report(cm, [0, 1, 2, 3, 4], labels=[0, 1, 2, 3, 4])
    assert full.macro_f1 == pytest.approx(f1_score(y, p, labels=range(5), average="macro", zero_division=0))
    same = classification_report(list(y), list(p))
    assert (m.per_class, m.confusion) == (same.per_class, same.confusion)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        classification_report(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="the truth holds an abstention"):
        classification_report(["a", None], ["a", "a"])
    with pytest.raises(ValueError, match=r"miss classes of the truth or predictions: \['c'\]"):
        classification_report(["a", "b"], ["a", "c"], labels=["a", "b"])
    with pytest.raises(ValueError, match="labels repeat a class"):
        classification_report(["a"], ["a"], labels=["a", "a"])
    with pytest.raises(ValueError, match="must be square"):
        confusion_report(np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="covering every counted class"):
        confusion_report(np.eye(2), ["a", "b"], labels=["a"])


def test_no_samples_score_zero() -> None:
    r = classification_report([], [])
    assert (r.accuracy, r.macro_f1, r.labels, r.n) == (0.0, 0.0, [], 0)


def test_definitions_name_the_rules() -> None:
    assert "average='macro'" in MACRO_F1_DEFINITION and "abstention" in MACRO_F1_DEFINITION
    assert "nearest voter" in VOTE_DEFINITION and "alphabetically first" in VOTE_DEFINITION


# ---- vote --------------------------------------------------------------------------------------------------
def test_vote_majority_then_nearest_then_name() -> None:
    assert vote(["A", "B", "B"]) == "B"
    assert vote(["B", "A", "A", "B"], [1.0, 2.0, 3.0, 4.0]) == "B"  # 2-2: B's nearest voter is at 1
    assert vote(["A", "B"], [2.0, 1.0]) == "B"  # 1-1: the nearer wins, whatever the order
    assert vote(["A", "B"], [1.0, 1.0]) == "A" and vote(["B", "A"], [1.0, 1.0]) == "A"  # equal: by name
    assert vote(["B", "A"]) == "A" and vote(["b", "a", "b", "a"]) == "a"  # no distances: by name
    assert vote(["A", "B", "B"], [0.0, 5.0, 6.0]) == "B"  # a majority beats the nearest voter
    assert vote(np.array([2, 1, 1, 2])) == 1


def test_vote_moved_from_search_ranked_labels() -> None:
    """Moved from test_search_eval (majority_vote): ranked labels, so distances grow with the rank."""
    rank = [0.0, 1.0, 2.0, 3.0]
    assert vote(["A", "B", "B"], rank[:3]) == "B"
    assert vote(["B", "A"], rank[:2]) == "B"
    assert vote(["A", "B", "B", "A"], rank) == "A"
    assert vote([None, "B"], rank[:2]) == "B" and vote([None], rank[:1]) is None


def test_vote_abstainers_and_bad_distances() -> None:
    assert vote([ABSTAIN, "B", None]) == "B" and vote([]) is None
    with pytest.raises(ValueError, match="2 voters but 1 distances"):
        vote(["A", "B"], [1.0])


# ---- the callers report the module's figures --------------------------------------------------------------
def test_search_hits_vote_and_evaluation_use_the_module() -> None:
    from test_search_eval import SIX, line_engine

    from search.engine import SlideHit, vote_of
    from search.evaluate import evaluate_engine

    assert vote_of([SlideHit("x", "B", 1.0), SlideHit("y", "A", 1.0)]) == "A"  # tie, same distance: by name
    assert vote_of([SlideHit("x", "B", 1.0), SlideHit("y", "A", 2.0)]) == "B"
    ev = evaluate_engine(SIX, ks=(1, 3, 5), mode="float", progress=False)
    assert ev.definitions == {"macro_f1_definition": MACRO_F1_DEFINITION, "vote_definition": VOTE_DEFINITION}
    for sr in ev.scopes.values():
        ids = list(sr.predictions)
        truth = [SIX.catalog.labels[SIX.catalog.slide_ids.index(s)] for s in ids]
        for k, got in sr.scores.items():
            assert got == classification_report(truth, [sr.predictions[s][k] for s in ids])
    # s1 is unlabelled and the nearest slide of s0: s0 abstains at k=1
    eng = line_engine([0, 1, 5, 6], ["A", None, "B", "B"], ["p0", "p1", "p2", "p3"], [None] * 4)
    h = evaluate_engine(eng, ks=(1,), mode="float", progress=False).scopes["horizontal"]
    assert [h.predictions[s][1] for s in ("s0", "s2", "s3")] == [ABSTAIN, "B", "B"]
    s = h.scores[1]
    assert s.labels == ["A", "B"] and s.abstained == [1, 0] and s.accuracy == pytest.approx(2 / 3)
    assert s.macro_f1 == pytest.approx(
        f1_score(["A", "B", "B"], [ABSTAIN, "B", "B"], labels=["A", "B"], average="macro")
    )
    assert s.macro_f1 == pytest.approx(0.5)  # the old definition ("(none)" a class) gave 1/3


def test_robustness_scores_use_the_module() -> None:
    from pathology.robustness import classification_scores, knn_predict

    rng = np.random.default_rng(3)
    y = rng.choice(["a", "b", "c"], 90)
    p = np.where(rng.random(90) < 0.6, y, rng.choice(["a", "b", "d"], 90))  # d: predicted, never true
    slide = np.repeat(np.arange(30), 3)
    got = classification_scores(y, p, slide)
    want = classification_report(y, p)
    assert (got["accuracy"], got["macro_f1"]) == (want.accuracy, want.macro_f1)
    assert got["macro_f1"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    votes = [vote(p[slide == s]) == y[slide == s][0] for s in range(30)]
    assert got["slide_accuracy"] == pytest.approx(np.mean(votes))
    # slide vote tie (b, a): by name -> a, right; the old rule took the first tile (b)
    tie = classification_scores(np.array(["a", "a"]), np.array(["b", "a"]), np.array([0, 0]))
    assert tie["slide_accuracy"] == 1.0
    # kNN: two index tiles at the same distance vote 1-1 -> by name; a nearer one wins a 1-1 tie
    index = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
    labels, groups = np.array(["b", "a", "c"]), np.array([1, 2, 3])
    query = np.zeros((1, 2))
    assert knn_predict(query, np.array([0]), index, labels, groups, 2)[0] == "a"
    assert knn_predict(np.array([[0.5, 0.0]]), np.array([0]), index, labels, groups, 2)[0] == "b"


def test_training_validation_uses_the_module(tmp_path) -> None:
    from test_kimianet_train import PX, cohort, config, make_store

    from histo.devices import DistInfo
    from histo.training import Run
    from pathology.train import KimiaNetTask

    store = make_store(tmp_path / "t.zarr", cohort(n_classes=3, patients=3, tiles=4))
    cpu = DistInfo(0, 1, 0, torch.device("cpu"))
    task = KimiaNetTask(store, config(), cpu)
    run = Run(task, tmp_path / "m.pt", cpu)
    run.train_epoch(0)
    got = task.validate(run.model, run.model)
    ds = task.val_loader.dataset
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert x.shape[-1] == PX
    run.model.eval()
    with torch.inference_mode():
        pred = run.model(x).argmax(1).numpy()
    classes = task.data.classes
    truth = [classes[label] for _, _, label in task.data.val]
    pred_names = [classes[i] for i in pred]
    want = classification_report(truth, pred_names)
    assert got["val_acc"] == pytest.approx(want.accuracy)
    assert got["val_macro_f1"] == pytest.approx(want.macro_f1)
    slides = sorted({s for s, _, _ in task.data.val})
    of_slide = np.array([s for s, _, _ in task.data.val])
    right = [vote(np.array(pred_names)[of_slide == s]) == truth[list(of_slide).index(s)] for s in slides]
    assert got["val_slide_acc"] == pytest.approx(np.mean(right))
