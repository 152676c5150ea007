"""SQuAD's files: the dataset JSON (v1.1 and v2.0) read and checked, its questions, the
official files' download, --predict-file, and the predictions and no-answer files the
official evaluation reads (metrics.py scores them).
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import corpus
from files import DataError, UserError

SQUAD = {
    "train": corpus.Archive("train-v1.1.json", "981b29407e0affa3b1b156f72073b945",
                            ("https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json",)),
    "dev": corpus.Archive("dev-v1.1.json", "3e85deb501d4e538b6bc56f786231552",
                          ("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",)),
}


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
    return _load_squad(path)[1]


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


def _load_squad(path):
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


@dataclass
class Question:
    qid: str
    text: str
    context: str  # the paragraph, shared by its questions
    answers: list  # [(answer text, answer_start)]; answer_start None when the file has none
    unanswerable: bool = False  # SQuAD v2.0: no answer in the context (an empty answers list)


def squad_file(given, split, data_dir, log):
    """--train-file / --dev-file, or SQuAD's own file under <data-dir>/squad/ (downloaded)."""
    if given:
        if not os.path.isfile(given):
            raise UserError(f"--{split}-file {given}: no such file")
        return Path(given)
    archive = SQUAD[split]
    path = Path(data_dir) / "squad" / archive.filename
    if not path.exists():
        try:
            corpus.download_archive(archive, path.parent, log, expected=[path])
        except DataError as e:
            raise DataError(f"{e}; or give a SQuAD file of your own with --{split}-file PATH "
                            "(--train-file and --dev-file)") from None
    return path


def read_squad(path, log=None):
    """(questions, the file's `data` list) of a SQuAD v1.1 or v2.0 file; UserError if
    unusable (load_squad_json checks, among the rest, that v2.0's is_impossible agrees
    with the answers list). has_unanswerable(data) tells v2.0 data; a file whose version
    is not SQuAD's is read by its content, which `log` is told in one line."""
    try:
        root, dataset = _load_squad(path)
    except SquadFormatError as e:
        raise UserError(str(e)) from None
    version, decided = file_version(root, dataset)
    if decided == "content" and log is not None:
        said = (f"its \"version\" {root['version']!r} is not SQuAD's" if "version" in root
                else "it has no \"version\"")
        n = sum(not qa["answers"] for qa in iter_questions(dataset))
        log(f"{path}: {said}; read as SQuAD v{version} by its content ("
            + (f"{n} questions without an answer)" if n else "every question has an answer)"))
    questions, seen = [], set()
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if qa["id"] in seen:
                    raise UserError(f"{path}: question id {qa['id']!r} appears twice; "
                                    "predictions are keyed by id")
                seen.add(qa["id"])
                answers = []
                for answer in qa["answers"]:
                    start = answer.get("answer_start")
                    if not isinstance(start, int) or isinstance(start, bool):
                        start = None  # unusable for training, like a wrong one
                    answers.append((answer["text"], start))
                questions.append(Question(qa["id"], qa["question"], paragraph["context"], answers,
                                          unanswerable=not answers))
    return questions, dataset


def subset(dataset, qids):
    """The SQuAD `data` list with only the questions whose id is in `qids` (the list
    itself when it holds no other): what an evaluation of those questions is scored on."""
    if all(qa["id"] in qids for qa in iter_questions(dataset)):
        return dataset
    return [{**article, "paragraphs": [
        {**paragraph, "qas": [qa for qa in paragraph["qas"] if qa["id"] in qids]}
        for paragraph in article["paragraphs"]]} for article in dataset]


def count_questions(questions):
    """"N questions", and how many have no answer when some do (SQuAD v2.0)."""
    unanswerable = sum(q.unanswerable for q in questions)
    return f"{len(questions)} questions" + (f" ({unanswerable} unanswerable)" if unanswerable
                                            else "")


def read_predict_file(path, log=None):
    """Questions of --predict-file, and its SQuAD `data` list (None for a plain list)."""
    try:
        with open(path, encoding="utf-8") as f:
            root = json.load(f)
    except OSError as e:
        raise UserError(f"--predict-file {path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--predict-file {path}: not JSON ({e})") from None
    if isinstance(root, dict) and "data" in root:
        return read_squad(path, log)
    items = root if isinstance(root, list) else [root]
    questions = []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("context"), str)
                and isinstance(item.get("question"), str)):
            raise UserError(f"--predict-file {path}: item {i} is not an object with string "
                            "'context' and 'question'")
        questions.append(Question(str(item.get("id", i)), item["question"], item["context"], []))
    if not questions:
        raise UserError(f"--predict-file {path}: no questions")
    return questions, None
