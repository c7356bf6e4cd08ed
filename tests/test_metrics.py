import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from dps_tune.metrics import accuracy, classification_metrics, macro_f1


def wilds_f1(y_true, y_pred):
    return f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))


def test_macro_f1_by_hand():
    # Labels present: 0 and 1. Class 2 is predicted but absent from y_true.
    y_true = torch.tensor([0, 0, 1, 1])
    y_pred = torch.tensor([0, 2, 1, 0])
    # class 0: tp=1 fp=1 fn=1 -> 0.5; class 1: tp=1 fp=0 fn=1 -> 2/3
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 2 / 3) / 2)
    assert accuracy(y_true, y_pred) == pytest.approx(0.5)


def test_class_absent_from_truth_is_not_averaged():
    # Class 3 is predicted once but never in y_true: its F1 of 0 must not enter the mean.
    y_true = torch.tensor([1, 1, 1, 2])
    y_pred = torch.tensor([1, 1, 1, 3])
    # WILDS: labels {1, 2}: class 1 F1 1.0, class 2 F1 0.0 -> 0.5. A plain macro-F1 over
    # every label seen ({1, 2, 3}) would give 1/3, so this data tells the two apart.
    assert macro_f1(y_true, y_pred) == pytest.approx(0.5)
    assert f1_score(y_true, y_pred, average="macro") == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(5))
def test_matches_wilds_definition(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 12, 200)
    y_true[y_true == 5] = 6  # a class absent from the ground truth...
    y_pred = rng.integers(0, 14, 200)  # ...and predictions of classes never seen
    ours = macro_f1(torch.from_numpy(y_true), torch.from_numpy(y_pred))
    assert ours == pytest.approx(wilds_f1(y_true, y_pred), abs=1e-12)
    # The data can tell the WILDS definition from sklearn's plain macro-F1.
    assert abs(ours - f1_score(y_true, y_pred, average="macro")) > 1e-3


def test_metric_names():
    out = classification_metrics("ood_test", torch.tensor([0, 1]), torch.tensor([0, 0]))
    assert set(out) == {"ood_test_acc", "ood_test_f1"}
