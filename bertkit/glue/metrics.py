"""GLUE's metrics, as the `evaluate` library's GLUE metric computes them (with sklearn and
scipy), in plain NumPy: accuracy, F1 of the positive class, Matthews correlation, Pearson
and Spearman correlation. Each returns a fraction (accuracy and F1 in [0, 1], the
correlations in [-1, 1]); compute() gives a dict of the ones a task names.

Where a metric is undefined the value is fixed, never NaN from the inputs alone:
- Matthews correlation of constant predictions (or constant labels) is 0.0, as sklearn's
  matthews_corrcoef reports it (and so the `evaluate` library and GLUE's leaderboard).
- Pearson and Spearman correlation of constant predictions (or constant labels) is 0.0,
  where scipy.stats gives NaN with a ConstantInputWarning: a model that predicts one value
  for every pair has no correlation with the scores, and a NaN main metric would stop the
  best-model choice from ever moving past it.
- F1 with no positive example among the predictions and labels is 0.0, as sklearn's
  f1_score reports it (zero_division's default).
NaN comes out only when a prediction is itself NaN or infinite (a diverged regression
model): a caller choosing the best model treats NaN as worse than any number.
"""

import numpy as np
import torch


def _arrays(predictions, labels, dtype):
    predictions, labels = (
        (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(
            dtype).ravel() for x in (predictions, labels))
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not len(labels):
        raise ValueError("no predictions to score")
    return predictions, labels


def accuracy(predictions, labels):
    """The fraction of predictions equal to their label."""
    predictions, labels = _arrays(predictions, labels, np.int64)
    return float(np.mean(predictions == labels))


def f1(predictions, labels):
    """F1 of the positive class (label id 1) against all others: 2 tp / (2 tp + fp + fn),
    as sklearn's f1_score with its default pos_label=1; 0.0 when there is no positive
    prediction or label at all."""
    predictions, labels = _arrays(predictions, labels, np.int64)
    predicted, actual = predictions == 1, labels == 1
    true_positives = int(np.sum(predicted & actual))
    denominator = 2 * true_positives + int(np.sum(predicted & ~actual)) + int(
        np.sum(~predicted & actual))
    return 2 * true_positives / denominator if denominator else 0.0


def matthews_correlation(predictions, labels):
    """Matthews correlation coefficient for any number of classes (Gorodkin's R_K, as
    sklearn's matthews_corrcoef computes it from the confusion matrix); 0.0 when the
    predictions or the labels are constant."""
    predictions, labels = _arrays(predictions, labels, np.int64)
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    n_classes, n = len(classes), len(labels)
    confusion = np.bincount(encoded[:n] * n_classes + encoded[n:],
                            minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    true_sum = confusion.sum(axis=1, dtype=np.float64)
    predicted_sum = confusion.sum(axis=0, dtype=np.float64)
    correct, samples = float(np.trace(confusion)), float(n)
    cov_true_predicted = correct * samples - true_sum @ predicted_sum
    cov_predicted = samples * samples - predicted_sum @ predicted_sum
    cov_true = samples * samples - true_sum @ true_sum
    if cov_predicted * cov_true == 0:
        return 0.0
    return float(cov_true_predicted / np.sqrt(cov_true * cov_predicted))


def _correlation(x, y):
    """Pearson's r of two float64 arrays; 0.0 when either is constant, NaN when either
    holds NaN or infinity."""
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return float("nan")
    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    x, y = x / np.linalg.norm(x), y / np.linalg.norm(y)
    return float(np.clip(x @ y, -1.0, 1.0))


def pearson(predictions, labels):
    """Pearson correlation coefficient, as scipy.stats.pearsonr's statistic."""
    return _correlation(*_arrays(predictions, labels, np.float64))


def rank(values):
    """1-based ranks, ties given the average of the ranks they span (scipy.stats.rankdata's
    default "average" method)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], len(values))  # one past each group's last position
    ranks = np.empty(len(values))
    ranks[order] = ((starts + ends - 1) / 2 + 1)[group]
    return ranks


def spearmanr(predictions, labels):
    """Spearman rank correlation (Pearson's r of the ranks, ties averaged), as
    scipy.stats.spearmanr's statistic."""
    predictions, labels = _arrays(predictions, labels, np.float64)
    if not (np.all(np.isfinite(predictions)) and np.all(np.isfinite(labels))):
        return float("nan")
    return _correlation(rank(predictions), rank(labels))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews_correlation": matthews_correlation,
           "pearson": pearson, "spearmanr": spearmanr}


def compute(names, predictions, labels):
    """{name: value} of the metrics `names` (GlueTask.metrics), e.g. {"accuracy": 0.84,
    "f1": 0.89}. Classification: predictions and labels are label ids; regression: floats."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {', '.join(unknown)}: use {', '.join(METRICS)}")
    return {name: METRICS[name](predictions, labels) for name in names}
