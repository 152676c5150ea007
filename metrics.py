"""SQuAD v1.1 question-answering metrics.

The string metrics (``normalize_answer`` … ``evaluate``) follow the official
SQuAD v1.1 evaluation script exactly, so the numbers are comparable with
published results. ``compute_qa_exact`` / ``compute_qa_f1`` are the legacy
token-list metric of the old torchtext BERT example and are not comparable.

Command line::

    python metrics.py DATASET.json PREDICTIONS.json
"""

import argparse
import json
import re
import string
import sys
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# How many unanswered ids to show; the rest are only counted so stderr stays one line.
_MAX_IDS_SHOWN = 5


class SquadFormatError(ValueError):
    """An input file is unreadable or not in the expected format."""


# --------------------------------------------------------------------------
# Official SQuAD v1.1 metric
# --------------------------------------------------------------------------


def normalize_answer(s):
    """Lower-case, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    # Same order as the official script: punctuation goes first, so "the-end"
    # becomes "theend" rather than "end".
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction, ground_truth):
    """True if both strings are equal after ``normalize_answer``."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction, ground_truth):
    """Token-bag F1 between the normalized strings.

    As in the official script this is 0 whenever no token is shared, which
    includes the case where both strings normalize to ''.
    """
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    """Best score of ``prediction`` against any of the ``ground_truths``."""
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def iter_questions(dataset):
    """Yield every qa dict of a SQuAD ``data`` list."""
    for article in dataset:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def evaluate(dataset, predictions):
    """Official SQuAD v1.1 evaluation.

    ``dataset`` is the SQuAD ``data`` list, ``predictions`` maps question id to
    answer text. Every question counts in the denominator; an unanswered one
    scores 0 and is reported in a single stderr line. Predictions for ids not
    in the dataset are ignored, as in the official script.

    Returns ``{"exact_match": pct, "f1": pct}`` with percentages in [0, 100].
    """
    exact_match = f1 = 0.0
    total = 0
    missing = []
    for qa in iter_questions(dataset):
        total += 1
        if qa["id"] not in predictions:
            missing.append(qa["id"])
            continue
        ground_truths = [answer["text"] for answer in qa["answers"]]
        prediction = predictions[qa["id"]]
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    if total == 0:
        raise ValueError("dataset contains no questions")
    if missing:
        shown = ", ".join(missing[:_MAX_IDS_SHOWN])
        more = ", ..." if len(missing) > _MAX_IDS_SHOWN else ""
        print(
            f"Unanswered questions: {len(missing)} of {total} will receive score 0 "
            f"(ids: {shown}{more})",
            file=sys.stderr,
        )
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# --------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise SquadFormatError(f"{path}: cannot read file: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SquadFormatError(f"{path}: not UTF-8 text: {e.reason}") from None
    except json.JSONDecodeError as e:
        raise SquadFormatError(
            f"{path}: malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None


def _require(obj, key, kind, where, path):
    if not isinstance(obj, dict):
        raise SquadFormatError(f"{path}: {where} is not a JSON object")
    if key not in obj:
        raise SquadFormatError(f"{path}: {where} has no '{key}' key")
    value = obj[key]
    if not isinstance(value, kind):
        raise SquadFormatError(
            f"{path}: '{key}' of {where} must be a {'list' if kind is list else 'string'}, "
            f"got {type(value).__name__}"
        )
    return value


def load_squad_json(path):
    """Load a SQuAD v1.1 file and return its ``data`` list.

    Raises ``SquadFormatError`` (a ``ValueError``) with one message naming the
    file and the problem when the file is unreadable, not JSON, lacks one of
    the keys the evaluation needs, or holds no question. A missing or other
    top-level ``version`` is accepted.
    """
    root = _load_json(path)
    data = _require(root, "data", list, "top level", path)
    n_questions = 0
    for i, article in enumerate(data):
        a_where = f"article {i}"
        paragraphs = _require(article, "paragraphs", list, a_where, path)
        for j, paragraph in enumerate(paragraphs):
            p_where = f"{a_where} paragraph {j}"
            _require(paragraph, "context", str, p_where, path)
            qas = _require(paragraph, "qas", list, p_where, path)
            for k, qa in enumerate(qas):
                q_where = f"{p_where} question {k}"
                qid = _require(qa, "id", str, q_where, path)
                q_where = f"{q_where} (id {qid})"
                _require(qa, "question", str, q_where, path)
                answers = _require(qa, "answers", list, q_where, path)
                # max() over no ground truths is undefined, so v1.1 needs at least one.
                if not answers:
                    raise SquadFormatError(f"{path}: {q_where} has an empty 'answers' list")
                for m, answer in enumerate(answers):
                    _require(answer, "text", str, f"{q_where} answer {m}", path)
                n_questions += 1
    if n_questions == 0:
        raise SquadFormatError(f"{path}: dataset contains no questions")
    return data


def load_predictions(path):
    """Load a predictions file: a JSON object mapping question id to answer text."""
    predictions = _load_json(path)
    if not isinstance(predictions, dict):
        raise SquadFormatError(
            f"{path}: predictions must be a JSON object of id -> answer text, "
            f"got {type(predictions).__name__}"
        )
    for qid, answer in predictions.items():
        if not isinstance(answer, str):
            raise SquadFormatError(
                f"{path}: prediction for id {qid!r} must be a string, got {type(answer).__name__}"
            )
    return predictions


def unknown_prediction_ids(dataset, predictions):
    """Prediction ids that are not questions of ``dataset``, in file order."""
    known = {qa["id"] for qa in iter_questions(dataset)}
    return [qid for qid in predictions if qid not in known]


# --------------------------------------------------------------------------
# Legacy token-list metric (old torchtext BERT example)
# --------------------------------------------------------------------------


def _legacy_token_f1(gold_tokens, pred_tokens):
    common = Counter(gold_tokens) & Counter(pred_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def compute_qa_exact(ans_pred_tokens_samples):
    """Legacy token-list exact match of the old torchtext BERT example.

    NOT comparable with the official SQuAD numbers: tokens are compared as
    given, with no answer normalization.

    ``ans_pred_tokens_samples`` is a list of
    ``(list_of_ground_truth_token_lists, predicted_token_list)`` pairs. Returns
    the percentage of samples whose prediction equals any ground truth.
    """
    if not ans_pred_tokens_samples:
        raise ValueError("compute_qa_exact needs at least one sample")
    hits = sum(
        any(list(pred_tokens) == list(gold) for gold in gold_lists)
        for gold_lists, pred_tokens in ans_pred_tokens_samples
    )
    return 100.0 * hits / len(ans_pred_tokens_samples)


def compute_qa_f1(ans_pred_tokens_samples):
    """Legacy token-list F1 of the old torchtext BERT example.

    NOT comparable with the official SQuAD numbers: tokens are compared as
    given, with no answer normalization.

    Same input as ``compute_qa_exact``. Returns, as a percentage, the mean over
    samples of the best token-bag F1 against any ground truth (0 when no token
    is shared).
    """
    if not ans_pred_tokens_samples:
        raise ValueError("compute_qa_f1 needs at least one sample")
    total = sum(
        max(_legacy_token_f1(gold, pred_tokens) for gold in gold_lists)
        for gold_lists, pred_tokens in ans_pred_tokens_samples
    )
    return 100.0 * total / len(ans_pred_tokens_samples)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Official-style SQuAD v1.1 evaluation: prints one JSON line "
        '{"exact_match": ..., "f1": ...} with percentages.'
    )
    parser.add_argument("dataset_file", help="SQuAD v1.1 dataset JSON (with a 'data' list)")
    parser.add_argument("prediction_file", help="JSON object mapping question id to answer text")
    args = parser.parse_args(argv)

    try:
        dataset = load_squad_json(args.dataset_file)
        predictions = load_predictions(args.prediction_file)
    except SquadFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    unknown = unknown_prediction_ids(dataset, predictions)
    if unknown:
        shown = ", ".join(repr(qid) for qid in unknown[:_MAX_IDS_SHOWN])
        more = ", ..." if len(unknown) > _MAX_IDS_SHOWN else ""
        print(
            f"error: {args.prediction_file}: {len(unknown)} prediction id(s) not in "
            f"{args.dataset_file}: {shown}{more}",
            file=sys.stderr,
        )
        return 2

    print(json.dumps(evaluate(dataset, predictions)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
