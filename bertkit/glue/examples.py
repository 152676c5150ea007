"""The examples of a glue_task.py run: a GLUE task's files (downloaded when absent) or your
own, read and checked before any training (Splits), their label names, and where their
predictions go (GLUE's submission file names): every file a run writes (run_files).
"""

import os
from dataclasses import dataclass
from pathlib import Path

from bertkit.files import UserError, in_folder
from bertkit.glue import tasks as glue


@dataclass
class Columns:
    """Where your own files keep their texts and labels (--text-columns, --label-column,
    --regression); None for GLUE's own files, read by their task's layout."""

    text: list
    label: str = "label"
    regression: bool = False


@dataclass
class Splits:
    """A run's examples: train, the dev file(s) (MNLI: matched, mismatched), the unlabeled
    test file(s); the task (its metrics), the label names in id order (None: regression)
    and the GLUE task's name for the checkpoint (None for your own files)."""

    task: glue.GlueTask
    labels: tuple | None
    glue_task: str | None
    train: glue.Examples
    dev: list
    test: list


def read_file(path, split, task, columns):
    """A file of `split` ("train", "dev" or "test", which is read unlabeled): your own
    (`columns`: Columns), or else a GLUE task's file in its layout."""
    if columns is not None:
        return glue.read_own_file(path, columns.text, columns.label, labeled=split != "test",
                                  regression=columns.regression)
    return glue.read_task_file(path, task, split)


def read_splits(task, columns, train_file, dev_file, test_files, data_dir, log):
    """Every file of a run: `task` a GlueTask or None, `columns` a Columns for your own
    files or None; a file not given is the task's own (<data_dir>/glue/<TASK>/...),
    downloaded when absent. The label names: the task's, or your train file's, sorted
    (and logged)."""
    if task is None and not (columns and train_file and dev_file):
        raise UserError("give --task (a GLUE task), or your own --train-file, --dev-file and "
                        "--text-columns")
    if task is not None and columns is not None:
        if columns.regression and not task.is_regression:
            raise UserError(f"--regression: {task.name} is a classification task")
        columns.regression = task.is_regression

    def default(name):
        return glue.task_file(task, name, data_dir, log)

    train = read_file(train_file or default(task.train_file), "train", task, columns)
    dev_files = [dev_file] if dev_file else [default(name) for name in task.dev_files]
    dev = [read_file(path, "dev", task, columns) for path in dev_files]
    test = [read_file(path, "test", task, columns) for path in test_files or ()]
    for examples in (train, *dev, *test):
        log(glue.describe(examples))
    regression = task.is_regression if task else columns.regression
    labels = None if regression else task.labels if task else glue.sorted_labels(train.labels)
    if task is None and labels is not None:
        if len(labels) < 2:
            raise UserError(f"{train.path}: every example has the label {labels[0]!r}; a "
                            "classifier needs two labels at least (--regression for numbers)")
        log(f"labels (from the train file, sorted): {', '.join(labels)}")
    return Splits(task or glue.own_task(labels), labels, task.name if task else None, train,
                  dev, test)


def task_files(task, data_dir):
    """{what: path} of a GLUE task's own files a run reads, in <data_dir>/glue/<TASK>/
    (downloaded when absent); none without a task."""
    return {} if task is None else {
        f"{task.name}'s {name}": os.path.join(data_dir, "glue", task.name, name)
        for name in task.files}


def dev_predictions_paths(predictions, n_dev):
    """--predictions, and beside it with _mm the mismatched set's (MNLI)."""
    stem, suffix = os.path.splitext(predictions)
    return [predictions, f"{stem}_mm{suffix}"][:n_dev]


def test_predictions_paths(given, test_files, output_dir, task):
    """Where each of `test_files` (--test-file) has its predictions: `given`
    (--test-predictions) as given, one per test file, or the names GLUE's submission
    expects, in `output_dir` (--output-dir): <TASK>.tsv; MNLI-m.tsv, MNLI-mm.tsv, and AX.tsv
    for the diagnostic set (scored by the MNLI model); <name>_predictions.tsv for your own
    files (`task` None)."""
    test_files = test_files or []
    if given is not None:
        if len(given) != len(test_files):
            raise UserError(f"--test-predictions: {len(given)} file(s) for {len(test_files)} "
                            "--test-file(s)")
        return list(given)
    names = []
    for path in test_files:
        stem = Path(path).stem
        if task is None:
            names.append(f"{stem}_predictions.tsv")
        elif "diagnostic" in stem.lower() or stem.lower() == "ax":
            names.append("AX.tsv")
        elif task.name == "MNLI":
            names.append("MNLI-mm.tsv" if "mismatched" in stem else "MNLI-m.tsv")
        else:
            names.append(f"{task.name}.tsv")
    return [in_folder(output_dir, name) for name in names]


def dev_flag(i):
    return "--predictions" if i == 0 else "--predictions (mismatched)"


def test_flag(i):
    return f"--test-predictions ({i + 1})"


def run_files(task, dev_file, predictions, test_paths, save=None, loss_log=None,
              save_vocab=None):
    """{flag: (path, what)} of every file a glue_task.py run writes besides the Trainer's
    own (checks.run_outputs adds those), for its checks, its locks and its writers alike:
    `task` the GlueTask of --task (training), or of the model --predict predicts with;
    `dev_file` (--dev-file), `predictions` (--predictions) and `test_paths` (the --test-file
    predictions, test_predictions_paths: GLUE's submission names for `task`). `save`,
    `loss_log`, `save_vocab`: a training run's model, loss log and vocab copy; `save` None:
    --predict, which writes the predictions alone."""
    tests = {test_flag(i): (path, "test predictions") for i, path in enumerate(test_paths)}
    if save is None:
        return {**({"--predictions": (predictions, "predictions")} if dev_file else {}), **tests}
    n_dev = 1 if dev_file or task is None else len(task.dev_files)
    dev = {dev_flag(i): (path, "predictions")
           for i, path in enumerate(dev_predictions_paths(predictions, n_dev))}
    return {"--save": (save, "best model"), **dev, **tests, "the loss log": (loss_log, "losses"),
            "--save-vocab": (save_vocab, "vocab")}
