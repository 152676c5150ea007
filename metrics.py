"""SQuAD question-answering metrics: the official v1.1 and v2.0 evaluation scripts.

The string metrics (``normalize_answer`` … ``evaluate``) follow the official
SQuAD v1.1 evaluation script exactly, and ``evaluate_v2`` the official v2.0
script, so the numbers are comparable with published results. A dataset with an
unanswerable question (``has_unanswerable``) is scored with v2.0, any other with
v1.1. ``compute_qa_exact`` / ``compute_qa_f1`` are the legacy token-list metric
of the old torchtext BERT example and are not comparable.

Command line::

    python metrics.py DATASET.json PREDICTIONS.json [--na-prob-file NA_PROBS.json]
"""

import argparse
import json
import math
import re
import string
import sys
from collections import Counter

# How many characters of a bad value to show, so that a message stays one line.
_MAX_VALUE_CHARS = 60


class SquadFormatError(ValueError):
    """An input file is unreadable or not in the expected format."""


def iter_questions(dataset):
    """Yield every qa dict of a SQuAD ``data`` list."""
    for article in dataset:
        for paragraph in article["paragraphs"]:
            yield from paragraph["qas"]


def has_unanswerable(dataset):
    """True if a question of ``dataset`` has an empty ``answers`` list (SQuAD v2.0), so that
    ``evaluate_v2`` scores it; ``load_squad_json`` checks that ``is_impossible`` agrees."""
    return any(not qa["answers"] for qa in iter_questions(dataset))


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


_KIND_NAMES = {list: "list", str: "string", bool: "bool"}


def _require(obj, key, kind, where, path):
    if not isinstance(obj, dict):
        raise SquadFormatError(f"{path}: {where} is not a JSON object")
    if key not in obj:
        raise SquadFormatError(f"{path}: {where} has no '{key}' key")
    value = obj[key]
    if not isinstance(value, kind):
        raise SquadFormatError(
            f"{path}: '{key}' of {where} must be a {_KIND_NAMES[kind]}, got {type(value).__name__}"
        )
    return value


def _check_answerability(qa, answers, where, path):
    """SQuAD v2.0's ``is_impossible``, where present, must agree with the ``answers`` list,
    which is what scoring goes by (as in the official script)."""
    if "is_impossible" not in qa:
        return
    if _require(qa, "is_impossible", bool, where, path):
        if answers:
            raise SquadFormatError(
                f"{path}: {where} has 'is_impossible' true but {len(answers)} answer(s)"
            )
    elif not answers:
        raise SquadFormatError(
            f"{path}: {where} has 'is_impossible' false but an empty 'answers' list"
        )


# A file's top-level "version" as SQuAD's own files spell it, and what it means.
VERSIONS = {"1.1": "1.1", "v1.1": "1.1", "2.0": "2.0", "v2.0": "2.0"}


def load_squad_json(path):
    """Load a SQuAD v1.1 or v2.0 file and return its ``data`` list.

    Raises ``SquadFormatError`` (a ``ValueError``) with one message naming the
    file and the problem when the file is unreadable, not JSON, lacks one of
    the keys the evaluation needs, holds no question, has an ``is_impossible``
    that is not a bool or disagrees with the question's ``answers`` (an empty
    list is an unanswerable question), or says ``"version": "1.1"`` but has an
    unanswerable question (named). A missing or other top-level ``version`` is
    accepted (``file_version`` says how the file reads); ``plausible_answers`` is
    not read.
    """
    return load_squad_root(path)[1]


def file_version(root, data):
    """(SQuAD version of a loaded file, how that was decided): its top-level "version",
    else its content (v2.0 when a question has no answer)."""
    declared = _declared_version(root)
    if declared:
        return declared, "declared"
    return ("2.0" if has_unanswerable(data) else "1.1"), "content"


def _declared_version(root):
    version = root.get("version")
    return VERSIONS.get(version) if isinstance(version, str) else None


def load_squad_root(path):
    """(the file's top level, its checked ``data`` list): load_squad_json's checks."""
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
                for m, answer in enumerate(answers):
                    _require(answer, "text", str, f"{q_where} answer {m}", path)
                _check_answerability(qa, answers, q_where, path)
                n_questions += 1
    if n_questions == 0:
        raise SquadFormatError(f"{path}: dataset contains no questions")
    if _declared_version(root) == "1.1":
        for qa in iter_questions(data):
            if not qa["answers"]:
                raise SquadFormatError(
                    f"{path}: question id {qa['id']!r} has no answer, but the file says "
                    f"\"version\": {root['version']!r} (SQuAD v1.1: every question has one); "
                    "give it its answer, or make the file SQuAD v2.0 (\"version\": \"v2.0\")")
    return root, data


def _load_id_map(path, what, value_ok, value_kind):
    """A JSON object of question id -> value, each value passing ``value_ok``."""
    mapping = _load_json(path)
    if not isinstance(mapping, dict):
        raise SquadFormatError(
            f"{path}: expected a JSON object of question id -> {value_kind}, "
            f"got {type(mapping).__name__}"
        )
    for qid, value in mapping.items():
        if not value_ok(value):
            # Cut, so that a large nested value still gives a short message.
            shown = repr(value)[:_MAX_VALUE_CHARS]
            raise SquadFormatError(
                f"{path}: {what} for id {qid!r} must be {value_kind}, got {shown}"
            )
    return mapping


def load_predictions(path):
    """Load a predictions file: a JSON object mapping question id to answer text."""
    return _load_id_map(path, "prediction", lambda answer: isinstance(answer, str), "a string")


def _is_finite_number(value):
    # bool is an int subclass but no probability; NaN would make the sort by probability
    # (find_best_thresh) meaningless.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_na_probs(path):
    """Load a no-answer probability file: a JSON object mapping question id to a number."""
    return _load_id_map(path, "no-answer probability", _is_finite_number, "a finite number")


_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# How many ids to show, so that a message stays one line.
_MAX_IDS_SHOWN = 5
# The official v2.0 script's default: a probability in [0, 1] never exceeds it, so by default
# no answer is overridden.
DEFAULT_NA_PROB_THRESH = 1.0


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


def _token_f1(prediction_tokens, ground_truth_tokens):
    """Bag-of-tokens F1 of two token lists; 0 when no token is shared, even when both are empty."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    # Precision first, then recall, in the official scripts' order: the float result is theirs.
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction, ground_truth):
    """Token-bag F1 between the normalized strings.

    As in the official v1.1 script this is 0 whenever no token is shared, which
    includes the case where both strings normalize to ''.
    """
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    """Best score of ``prediction`` against any of the ``ground_truths``."""
    return max(metric_fn(prediction, gt) for gt in ground_truths)


def _shown(ids):
    """The first few ids, comma-separated, for a one-line report."""
    more = ", ..." if len(ids) > _MAX_IDS_SHOWN else ""
    return ", ".join(map(str, ids[:_MAX_IDS_SHOWN])) + more


def _report_unmatched_ids(question_ids, predictions):
    """One stderr line for the questions without a prediction (they score 0), one for the
    predictions of no question (ignored, as by the official scripts)."""
    missing = [qid for qid in question_ids if qid not in predictions]
    if missing:
        print(
            f"Unanswered questions: {len(missing)} of {len(question_ids)} will receive score 0 "
            f"(ids: {_shown(missing)})",
            file=sys.stderr,
        )
    known = set(question_ids)
    ignored = [qid for qid in predictions if qid not in known]
    if ignored:
        print(
            f"Ignored predictions: {len(ignored)} id(s) not in the dataset (ids: {_shown(ignored)})",
            file=sys.stderr,
        )


def evaluate(dataset, predictions):
    """Official SQuAD v1.1 evaluation.

    ``dataset`` is the SQuAD ``data`` list, ``predictions`` maps question id to
    answer text. Every question counts in the denominator; an unanswered one
    scores 0. Predictions for ids not in the dataset are ignored, as in the
    official script. Each of the two cases is reported in one stderr line.

    Returns ``{"exact_match": pct, "f1": pct}`` with percentages in [0, 100].
    Raises ``ValueError`` for a dataset with unanswerable questions: score those
    with ``evaluate_v2``.
    """
    if has_unanswerable(dataset):
        raise ValueError("the dataset has unanswerable questions (SQuAD v2.0): use evaluate_v2")
    exact_match = f1 = 0.0
    question_ids = []
    for qa in iter_questions(dataset):
        question_ids.append(qa["id"])
        if qa["id"] not in predictions:
            continue
        ground_truths = [answer["text"] for answer in qa["answers"]]
        prediction = predictions[qa["id"]]
        exact_match += metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        f1 += metric_max_over_ground_truths(f1_score, prediction, ground_truths)
    if not question_ids:
        raise ValueError("dataset contains no questions")
    _report_unmatched_ids(question_ids, predictions)
    total = len(question_ids)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# --------------------------------------------------------------------------
# Official SQuAD v2.0 metric
# --------------------------------------------------------------------------


def _no_answer_aware_f1(prediction_tokens, ground_truth_tokens):
    """``_token_f1``, but an empty token list means "no answer": 1 when both are, else 0.

    This is the official v2.0 rule; the old torchtext example's F1 used it too.
    """
    if not prediction_tokens or not ground_truth_tokens:
        return int(prediction_tokens == ground_truth_tokens)
    return _token_f1(prediction_tokens, ground_truth_tokens)


def f1_score_v2(prediction, ground_truth):
    """Official v2.0 F1: ``f1_score``, except that two strings normalizing to '' score 1."""
    return _no_answer_aware_f1(
        normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    )


def _raw_scores_v2(dataset, predictions):
    """({id: exact}, {id: f1}) of the questions that have a prediction."""
    exact, f1 = {}, {}
    for qa in iter_questions(dataset):
        if qa["id"] not in predictions:
            continue
        # An answer that normalizes to '' cannot be told from "no answer", so the official
        # script drops it; a question left with none has the one ground truth ''.
        ground_truths = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])] or [""]
        prediction = predictions[qa["id"]]
        exact[qa["id"]] = int(
            metric_max_over_ground_truths(exact_match_score, prediction, ground_truths)
        )
        f1[qa["id"]] = metric_max_over_ground_truths(f1_score_v2, prediction, ground_truths)
    return exact, f1


def _apply_no_answer_threshold(scores, na_probs, has_answer, na_prob_thresh):
    """Scores once a no-answer probability above ``na_prob_thresh`` overrides the answer:
    such a question scores 1 exactly when it has no answer."""
    return {
        qid: float(not has_answer[qid]) if na_probs[qid] > na_prob_thresh else score
        for qid, score in scores.items()
    }


def _percentages(exact, f1, question_ids):
    """exact / f1 percentages over ``question_ids``; one without a score counts 0."""
    total = len(question_ids)
    return {
        "exact": 100.0 * sum(exact.get(qid, 0) for qid in question_ids) / total,
        "f1": 100.0 * sum(f1.get(qid, 0) for qid in question_ids) / total,
        "total": total,
    }


def _best_threshold(raw_scores, predictions, na_probs, has_answer, total):
    """(best percentage, its threshold) over all no-answer thresholds, exactly as the
    official ``find_best_thresh``.

    Below every probability each question is answered "no answer", so the score starts at
    the number of unanswerable ones; raising the threshold past a question's probability
    puts its predicted answer back, by rising probability (ties in ``na_probs`` order).
    """
    score = sum(not has_answer[qid] for qid in raw_scores)
    best_score, best_thresh = score, 0.0
    for qid in sorted(na_probs, key=na_probs.get):
        if qid not in raw_scores:
            continue
        if has_answer[qid]:
            score += raw_scores[qid]
        elif predictions[qid]:
            # The raw text, not its normalized form, as in the official script.
            score -= 1
        if score > best_score:
            best_score, best_thresh = score, na_probs[qid]
    return 100.0 * best_score / total, best_thresh


def evaluate_v2(dataset, predictions, na_probs=None, na_prob_thresh=DEFAULT_NA_PROB_THRESH):
    """Official SQuAD v2.0 evaluation (evaluate-v2.0.py).

    ``predictions`` maps question id to answer text, '' meaning "no answer";
    ``na_probs`` optionally maps question id to the model's no-answer probability.
    A question whose probability exceeds ``na_prob_thresh`` counts as answered
    "no answer". Returns the official dict: ``exact``, ``f1``, ``total``, the same
    three prefixed ``HasAns_`` / ``NoAns_`` for each non-empty subset, and with
    ``na_probs`` also ``best_exact``, ``best_exact_thresh``, ``best_f1``,
    ``best_f1_thresh``. Percentages are in [0, 100].

    Unknown prediction ids are ignored. A question without a prediction scores 0
    in every total, as in v1.1 (the official v2.0 script stops with a KeyError).
    Raises ``ValueError`` when ``na_probs`` lacks a predicted question.
    """
    has_answer = {qa["id"]: bool(qa["answers"]) for qa in iter_questions(dataset)}
    if not has_answer:
        raise ValueError("dataset contains no questions")
    if na_probs is None:
        thresholded_probs = {qid: 0.0 for qid in predictions}  # the official default
    else:
        lacking = [qid for qid in has_answer if qid in predictions and qid not in na_probs]
        if lacking:
            raise ValueError(
                f"no-answer probabilities lack {len(lacking)} predicted question(s) "
                f"(ids: {_shown(lacking)})"
            )
        thresholded_probs = na_probs
    _report_unmatched_ids(list(has_answer), predictions)
    exact_raw, f1_raw = _raw_scores_v2(dataset, predictions)
    exact = _apply_no_answer_threshold(exact_raw, thresholded_probs, has_answer, na_prob_thresh)
    f1 = _apply_no_answer_threshold(f1_raw, thresholded_probs, has_answer, na_prob_thresh)
    result = _percentages(exact, f1, list(has_answer))
    for prefix, answerable in (("HasAns", True), ("NoAns", False)):
        subset = [qid for qid, has in has_answer.items() if has == answerable]
        if subset:
            result.update((f"{prefix}_{k}", v) for k, v in _percentages(exact, f1, subset).items())
    if na_probs is not None:
        for name, raw in (("exact", exact_raw), ("f1", f1_raw)):
            best, thresh = _best_threshold(raw, predictions, na_probs, has_answer, len(has_answer))
            result[f"best_{name}"] = best
            result[f"best_{name}_thresh"] = thresh
    return result


# --------------------------------------------------------------------------
# Input files
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Legacy token-list metric (old torchtext BERT example)
# --------------------------------------------------------------------------


def _check_samples(ans_pred_tokens_samples, name):
    if not ans_pred_tokens_samples:
        raise ValueError(f"{name} needs at least one sample")


def compute_qa_exact(ans_pred_tokens_samples):
    """Legacy exact match of the old torchtext BERT example (examples/BERT/metrics.py).

    ``ans_pred_tokens_samples`` is a list of
    ``(list_of_ground_truth_token_lists, predicted_token_list)`` pairs. Each token
    list is joined with spaces and normalized by ``normalize_answer`` (case,
    punctuation and articles do not matter); returns the percentage of samples
    whose prediction equals any ground truth. NOT comparable with the official
    SQuAD numbers: it scores tokens, not the answer text.
    """
    _check_samples(ans_pred_tokens_samples, "compute_qa_exact")
    hits = sum(
        metric_max_over_ground_truths(
            exact_match_score, " ".join(pred_tokens), [" ".join(gold) for gold in gold_lists]
        )
        for gold_lists, pred_tokens in ans_pred_tokens_samples
    )
    return 100.0 * hits / len(ans_pred_tokens_samples)


def compute_qa_f1(ans_pred_tokens_samples):
    """Legacy F1 of the old torchtext BERT example (examples/BERT/metrics.py).

    Same input as ``compute_qa_exact``. Returns, as a percentage, the mean over
    samples of the best token-bag F1 against any ground truth, with the v2.0
    rule for empty lists (1 when both are empty, 0 when one is). Unlike its
    exact match, the old example's F1 compares the tokens as given, without
    normalization, so case and articles count. NOT comparable with the official
    SQuAD numbers.
    """
    _check_samples(ans_pred_tokens_samples, "compute_qa_f1")
    total = sum(
        max(_no_answer_aware_f1(list(pred_tokens), list(gold)) for gold in gold_lists)
        for gold_lists, pred_tokens in ans_pred_tokens_samples
    )
    return 100.0 * total / len(ans_pred_tokens_samples)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Official SQuAD evaluation, printing one JSON line with percentages: "
        'v1.1 {"exact_match", "f1"}, or, for a dataset with unanswerable questions, v2.0 '
        '{"exact", "f1", "total", "HasAns_...", "NoAns_...", ...}.'
    )
    parser.add_argument("dataset_file", help="SQuAD v1.1 or v2.0 dataset JSON (with a 'data' list)")
    parser.add_argument(
        "prediction_file", help="JSON object mapping question id to answer text ('' = no answer)"
    )
    parser.add_argument(
        "--na-prob-file",
        help="v2.0 only: JSON object mapping question id to the probability of no answer; "
        "adds best_exact, best_f1 and their thresholds (default: none)",
    )
    parser.add_argument(
        "--na-prob-thresh",
        type=float,
        help="v2.0 only: a question whose no-answer probability is above this counts as "
        f"answered with no answer (default: {DEFAULT_NA_PROB_THRESH}, as the official script)",
    )
    return parser.parse_args(argv)


def _check_some_ids_match(dataset, predictions, args):
    """Predictions of which no id is a question of the dataset (another dataset's, or
    none at all) would score 0: a mistake, not a result."""
    ids = {qa["id"] for qa in iter_questions(dataset)}
    if not ids & predictions.keys():
        shown = _shown(list(predictions)) or "none"
        raise ValueError(f"{args.prediction_file}: none of its {len(predictions)} prediction "
                         f"id(s) is a question of {args.dataset_file} (ids: {shown}); "
                         "predictions of another dataset?")


def main(argv=None):
    args = _parse_args(argv)
    thresh = DEFAULT_NA_PROB_THRESH if args.na_prob_thresh is None else args.na_prob_thresh
    try:
        if not math.isfinite(thresh):
            raise ValueError(f"--na-prob-thresh must be a finite number, got {thresh}")
        dataset = load_squad_json(args.dataset_file)
        predictions = load_predictions(args.prediction_file)
        na_probs = load_na_probs(args.na_prob_file) if args.na_prob_file else None
        v2 = has_unanswerable(dataset)
        if not v2 and (args.na_prob_file or args.na_prob_thresh is not None):
            raise ValueError(
                f"--na-prob-file and --na-prob-thresh apply to SQuAD v2.0 data only; "
                f"{args.dataset_file} has no unanswerable question"
            )
        _check_some_ids_match(dataset, predictions, args)
        if v2:
            result = evaluate_v2(dataset, predictions, na_probs, thresh)
        else:
            result = evaluate(dataset, predictions)
    except ValueError as e:  # SquadFormatError included: bad input, said in one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
