"""glue_metrics against the libraries the `evaluate` library's GLUE metric calls:
sklearn.metrics (accuracy_score, f1_score, matthews_corrcoef) and scipy.stats (pearsonr,
spearmanr), on random inputs and on the edge cases where they differ or are undefined."""

import math
import warnings

import numpy as np
import pytest
import torch

from bertkit.glue import metrics as glue_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")
scipy_stats = pytest.importorskip("scipy.stats")


def sklearn_f1(predictions, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero_division: sklearn warns, then returns 0.0
        return sklearn_metrics.f1_score(labels, predictions)


def sklearn_mcc(predictions, labels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sklearn_metrics.matthews_corrcoef(labels, predictions)


def scipy_pearson(predictions, labels):
    return scipy_stats.pearsonr(predictions, labels)[0]


def scipy_spearman(predictions, labels):
    return scipy_stats.spearmanr(predictions, labels)[0]


CLASSIFICATION = [
    (glue_metrics.accuracy, sklearn_metrics.accuracy_score),
    (glue_metrics.f1, sklearn_f1),
    (glue_metrics.matthews_correlation, sklearn_mcc),
]


def binary_cases():
    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 2, (2, n)) for n in (1, 2, 3, 5, 17, 200, 1001)]
    # Correlated: predictions right 80% of the time.
    labels = rng.integers(0, 2, 500)
    cases.append(np.stack([np.where(rng.random(500) < 0.8, labels, 1 - labels), labels]))
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    cases += [
        np.stack([labels, labels]),  # all correct
        np.stack([1 - labels, labels]),  # all wrong
        np.stack([np.ones(8, int), labels]),  # constant predictions
        np.stack([np.zeros(8, int), labels]),
        np.stack([labels, np.zeros(8, int)]),  # a single class among the labels
        np.stack([np.zeros(8, int), np.zeros(8, int)]),  # one class everywhere
        np.stack([np.ones(8, int), np.ones(8, int)]),
    ]
    return [(c[0], c[1]) for c in cases]


@pytest.mark.parametrize("ours, theirs", CLASSIFICATION)
def test_classification_metrics_equal_sklearn(ours, theirs):
    for predictions, labels in binary_cases():
        expected = theirs(labels, predictions) if theirs is sklearn_metrics.accuracy_score \
            else theirs(predictions, labels)
        assert ours(predictions, labels) == pytest.approx(expected, abs=1e-12), (predictions, labels)


def test_multiclass_matthews_and_accuracy_equal_sklearn():
    rng = np.random.default_rng(1)
    for n, k in ((10, 3), (300, 3), (999, 5)):
        labels = rng.integers(0, k, n)
        predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, k, n))
        assert glue_metrics.matthews_correlation(predictions, labels) == pytest.approx(
            sklearn_mcc(predictions, labels), abs=1e-12)
        assert glue_metrics.accuracy(predictions, labels) == pytest.approx(
            sklearn_metrics.accuracy_score(labels, predictions), abs=1e-15)
        # F1 of class 1 against the rest, as sklearn's per-class F1.
        assert glue_metrics.f1(predictions, labels) == pytest.approx(
            sklearn_metrics.f1_score(labels, predictions, labels=[1], average=None)[0], abs=1e-12)
    # A class only among the predictions (a label id the dev set never has).
    predictions, labels = np.array([0, 2, 1, 1, 2]), np.array([0, 0, 1, 1, 1])
    assert glue_metrics.matthews_correlation(predictions, labels) == pytest.approx(
        sklearn_mcc(predictions, labels), abs=1e-12)


def test_matthews_is_zero_where_undefined_and_exact_at_the_extremes():
    labels = [0, 1, 1, 0, 1]
    assert glue_metrics.matthews_correlation([1] * 5, labels) == 0.0  # constant predictions
    assert glue_metrics.matthews_correlation(labels, [1] * 5) == 0.0  # constant labels
    assert glue_metrics.matthews_correlation(labels, labels) == 1.0
    assert glue_metrics.matthews_correlation([1 - x for x in labels], labels) == -1.0
    assert glue_metrics.f1([0] * 5, [0] * 5) == 0.0  # no positive anywhere: sklearn's 0.0
    assert glue_metrics.f1([1] * 3, [1] * 3) == 1.0


def regression_cases():
    rng = np.random.default_rng(2)
    cases = []
    for n in (2, 3, 7, 100, 1500):
        labels = rng.uniform(0, 5, n)
        cases.append((labels + rng.normal(0, 1, n), labels))
        cases.append((rng.normal(0, 1, n), labels))
    # Ties, in the predictions and in the labels (STS-B's scores repeat: 0.0, 2.4, 5.0 ...).
    labels = rng.integers(0, 6, 300).astype(float)
    cases.append((np.round(labels + rng.normal(0, 1, 300)), labels))
    cases.append((np.array([1.0, 2.0, 2.0, 3.0, 3.0, 3.0]), np.array([5.0, 1.0, 1.0, 2.0, 2.0, 0.5])))
    cases.append((np.array([0.5, 0.5, 1.0]), np.array([1.0, 2.0, 2.0])))
    return cases


def test_pearson_and_spearman_equal_scipy():
    for predictions, labels in regression_cases():
        assert glue_metrics.pearson(predictions, labels) == pytest.approx(
            scipy_pearson(predictions, labels), abs=1e-10)
        assert glue_metrics.spearmanr(predictions, labels) == pytest.approx(
            scipy_spearman(predictions, labels), abs=1e-10)
        assert glue_metrics.rank(predictions) == pytest.approx(scipy_stats.rankdata(predictions))


def test_correlations_of_constant_predictions_are_zero_where_scipy_gives_nan():
    labels = np.array([0.0, 2.4, 5.0, 3.2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(scipy_pearson(np.full(4, 2.5), labels))
        assert math.isnan(scipy_spearman(np.full(4, 2.5), labels))
    for metric in (glue_metrics.pearson, glue_metrics.spearmanr):
        assert metric(np.full(4, 2.5), labels) == 0.0
        assert metric(labels, np.full(4, 1.0)) == 0.0  # constant labels
        assert metric([0.1] * 3, [1.0, 2.0, 3.0]) == 0.0  # a mean that rounds: still constant
        assert metric([3.0], [1.0]) == 0.0  # one pair
        assert metric(labels, labels) == pytest.approx(1.0)
        assert metric(-labels, labels) == pytest.approx(-1.0)
        # Only a non-finite prediction (a diverged model) gives NaN.
        assert math.isnan(metric([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]))
        assert math.isnan(metric([1.0, float("inf"), 2.0], [1.0, 2.0, 3.0]))


def test_compute_names_the_metrics_and_takes_tensors():
    predictions, labels = torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, 1])
    result = glue_metrics.compute(("accuracy", "f1"), predictions, labels)
    assert result == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    assert list(glue_metrics.compute(("matthews_correlation",), [0, 1], [0, 1])) == [
        "matthews_correlation"]
    scores = torch.tensor([0.5, 2.0, 4.5], dtype=torch.float32)
    result = glue_metrics.compute(("pearson", "spearmanr"), scores, torch.tensor([1.0, 2.0, 5.0]))
    assert result["spearmanr"] == pytest.approx(1.0) and 0.9 < result["pearson"] < 1.0
    with pytest.raises(ValueError, match="unknown metric f2"):
        glue_metrics.compute(("f2",), [0], [0])
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        glue_metrics.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        glue_metrics.pearson([], [])
