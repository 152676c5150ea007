"""SQuAD's files: the dataset JSON (v1.1 and v2.0) read and checked, its questions, the
official files' download, --predict-file, and the predictions and no-answer files the
official evaluation reads (metrics.py scores them).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from bertkit.files import DataError, UserError
from bertkit.text import corpus
from metrics import SquadFormatError, file_version, iter_questions, load_squad_root

SQUAD = {
    "train": corpus.Archive("train-v1.1.json", "981b29407e0affa3b1b156f72073b945",
                            ("https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json",)),
    "dev": corpus.Archive("dev-v1.1.json", "3e85deb501d4e538b6bc56f786231552",
                          ("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",)),
}


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
        root, dataset = load_squad_root(path)
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
