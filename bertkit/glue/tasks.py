"""GLUE's files, as bertkit/squad/dataset.py is SQuAD's: the nine tasks (their columns, labels, metrics and
files), GLUE's TSV read exactly as it is written, your own .tsv / .csv / .jsonl, the download
of a missing task file from GLUE's archives, and predictions in GLUE's submission layout.

GLUE's TSV is not CSV. Fields are split at tabs and nothing is quoted: a sentence may hold
an unmatched `"`, and a CSV reader would swallow the lines after it. MRPC's train and dev
files begin with a UTF-8 BOM; CoLA's train and dev files have no header (its test file has
one); QQP's files have malformed lines, which are skipped and counted; STS-B's scores are
floats written in several ways ("5.000", "3.8", "4"). Any other row with the wrong number of
fields, or a label outside the task's set, is a DataError naming the file and line.
"""

import csv
import json
import math
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from bertkit.files import DataError, UserError, atomic_write_text
from bertkit.text import corpus

###############################################################################
# The tasks
###############################################################################


@dataclass(frozen=True)
class Layout:
    """Where a file of a split keeps its columns: names looked up in its header, or
    positions in a file without one (CoLA's train and dev)."""

    text_a: str | int
    text_b: str | int | None = None  # None: one sentence per example
    label: str | int | None = None  # None: unlabeled (GLUE's test files)
    index: str | int | None = None  # None: the examples are numbered 0, 1, ... in file order
    header: bool = True
    n_fields: int = 0  # of a file without a header; else the header's count


@dataclass(frozen=True)
class GlueTask:
    name: str  # "CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"
    # Label strings as the TSV files write them, in the fixed order of their ids (that of
    # transformers' GLUE processors); None: regression (STS-B).
    labels: tuple | None
    metrics: tuple  # names as the `evaluate` library's GLUE metric gives them
    main_metric: str  # the one that picks the best model
    dev_files: tuple = ("dev.tsv",)
    test_files: tuple = ("test.tsv",)
    train_layout: Layout = None
    dev_layout: Layout = None
    test_layout: Layout = None
    skip_malformed: bool = False  # QQP: a line with the wrong number of fields is skipped
    score_range: tuple = None  # regression: the scores the task's files may hold
    train_file: str = "train.tsv"

    @property
    def is_regression(self):
        return self.labels is None

    @property
    def files(self):
        return (self.train_file, *self.dev_files, *self.test_files)

    def layout(self, split):
        if split not in ("train", "dev", "test"):
            raise ValueError(f"split {split!r}: use train, dev or test")
        return getattr(self, f"{split}_layout")


def _pair_task(name, labels, metrics, main_metric, a, b, label, index="index",
               test_index="index", **kwargs):
    """A task whose train and dev files share one header layout; its test files have no
    label column."""
    labeled = Layout(a, b, label, index)
    return GlueTask(name, labels, metrics, main_metric, train_layout=labeled, dev_layout=labeled,
                    test_layout=Layout(a, b, None, test_index), **kwargs)


_ACCURACY = (("accuracy",), "accuracy")
_F1 = (("accuracy", "f1"), "f1")
_CORRELATION = (("pearson", "spearmanr"), "pearson")
_BINARY = ("0", "1")
_ENTAILMENT = ("entailment", "not_entailment")

TASKS = {task.name: task for task in (
    # CoLA's train/dev lines: source, label, the original author's mark, sentence.
    GlueTask("CoLA", _BINARY, ("matthews_correlation",), "matthews_correlation",
             train_layout=Layout(3, label=1, header=False, n_fields=4),
             dev_layout=Layout(3, label=1, header=False, n_fields=4),
             test_layout=Layout("sentence", index="index")),
    GlueTask("SST-2", _BINARY, *_ACCURACY, train_layout=Layout("sentence", label="label"),
             dev_layout=Layout("sentence", label="label"),
             test_layout=Layout("sentence", index="index")),
    _pair_task("MRPC", _BINARY, *_F1, "#1 String", "#2 String", "Quality", index=None),
    _pair_task("STS-B", None, *_CORRELATION, "sentence1", "sentence2", "score",
               score_range=(0.0, 5.0)),
    _pair_task("QQP", _BINARY, *_F1, "question1", "question2", "is_duplicate", index="id",
               test_index="id", skip_malformed=True),
    _pair_task("MNLI", ("contradiction", "entailment", "neutral"), *_ACCURACY, "sentence1",
               "sentence2", "gold_label", dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
               test_files=("test_matched.tsv", "test_mismatched.tsv")),
    _pair_task("QNLI", _ENTAILMENT, *_ACCURACY, "question", "sentence", "label"),
    _pair_task("RTE", _ENTAILMENT, *_ACCURACY, "sentence1", "sentence2", "label"),
    _pair_task("WNLI", _BINARY, *_ACCURACY, "sentence1", "sentence2", "label"),
)}

_BY_KEY = {name.lower().replace("-", ""): task for name, task in TASKS.items()}


def task_by_name(given):
    """The task `given` names, case-insensitive, as GLUE spells it (SST-2, STS-B) or as
    transformers does (sst2, stsb); UserError otherwise."""
    task = _BY_KEY.get(str(given).lower().replace("-", "").replace("_", ""))
    if task is None:
        raise UserError(f"--task {given}: not a GLUE task; use one of {', '.join(TASKS)} "
                        "(any case; sst2, stsb, ... as transformers spells them work too)")
    return task


def own_task(labels):
    """A task for your own files: `labels` the training labels (sorted_labels), or None for
    regression (--regression). Scored by accuracy (and the F1 of labels[1] when there are
    two), or by Pearson and Spearman correlation."""
    if labels is None:
        return GlueTask("own data", None, *_CORRELATION, dev_files=(), test_files=())
    metrics = ("accuracy", "f1") if len(labels) == 2 else ("accuracy",)
    return GlueTask("own data", tuple(labels), metrics, "accuracy", dev_files=(), test_files=())


###############################################################################
# Examples
###############################################################################


@dataclass
class Examples:
    path: str
    texts_a: list
    texts_b: list | None  # None: one sentence per example
    labels: list | None  # label strings, or floats (regression); None: unlabeled
    indices: list  # the file's index column (or row numbers), in file order
    skipped: int = 0  # malformed lines skipped (QQP)
    line_numbers: list = field(default_factory=list)  # each example's line in the file

    def __len__(self):
        return len(self.texts_a)


def describe(examples):
    """One line for the log: how many examples, each label's count or the score range, and
    the malformed lines skipped."""
    kind = "pairs" if examples.texts_b is not None else "sentences"
    parts = [f"{examples.path}: {len(examples):,} {kind}"]
    if examples.labels and isinstance(examples.labels[0], float):
        parts.append(f"scores {min(examples.labels):g} to {max(examples.labels):g}")
    elif examples.labels:
        counts = Counter(examples.labels)
        parts.append(", ".join(f"{label} {counts[label]:,}" for label in sorted_labels(counts)))
    if examples.skipped:
        parts.append(f"{examples.skipped:,} malformed lines skipped")
    return "; ".join(parts)


def sorted_labels(labels):
    """The distinct labels of a training set in a fixed order: by number when every label
    is an integer ("2" before "10"), else as strings."""
    distinct = set(labels)
    try:
        return tuple(sorted(distinct, key=lambda label: (int(label), label)))
    except ValueError:
        return tuple(sorted(distinct))


def label_ids(examples, labels):
    """The id of each example's label among `labels`; a label not among them (one unseen in
    training) is a DataError naming the file and line."""
    position = {label: i for i, label in enumerate(labels)}
    ids = []
    for row, label in enumerate(examples.labels):
        if label not in position:
            number = examples.line_numbers[row] if examples.line_numbers else row + 1
            raise DataError(f"{examples.path}, line {number}: label {label!r} is not one of the "
                            f"training labels ({', '.join(labels)})")
        ids.append(position[label])
    return ids


###############################################################################
# Reading GLUE's TSV
###############################################################################


def _lines(path):
    """(line number, text with its line break) of a UTF-8 file, split at \\n only: GLUE's
    sentences may hold \\r or U+2028, which Python's text mode would take for line breaks.
    A UTF-8 BOM at the start is dropped."""
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}, line {number}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


def _tsv_rows(path):
    """(line number, fields) of each non-blank line of a TSV file without quoting."""
    for number, line in _lines(path):
        line = line.removesuffix("\n").removesuffix("\r")
        if line:
            yield number, line.split("\t")


def _columns(layout, header, path, what):
    """Positions of the layout's columns in `header` (a list of names, or None for a file
    without a header)."""
    wanted = {key: getattr(layout, key) for key in ("text_a", "text_b", "label", "index")}
    if header is None:
        return {key: value for key, value in wanted.items() if value is not None}
    missing = [name for name in wanted.values() if name is not None and name not in header]
    if missing:
        needed = ", ".join(name for name in wanted.values() if name is not None)
        raise DataError(f"{path}, line 1: no column {', '.join(missing)} in its header "
                        f"({', '.join(header)}); {what} has the columns {needed}")
    return {key: header.index(name) for key, name in wanted.items() if name is not None}


def _score(text, path, number, score_range):
    try:
        score = float(text)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise DataError(f"{path}, line {number}: score {text!r} is not a number")
    if score_range and not score_range[0] <= score <= score_range[1]:
        raise DataError(f"{path}, line {number}: score {text} is outside "
                        f"{score_range[0]:g} to {score_range[1]:g}")
    return score


def read_task_file(path, task, split):
    """A file of a GLUE task, `split` "train", "dev" or "test", read as GLUE writes it
    (see the module's docstring). A row with the wrong number of fields, or a label
    outside the task's set, is a DataError naming the file and line."""
    layout = task.layout(split)
    what = f"{task.name}'s {split} file"
    rows = _tsv_rows(path)
    header = None
    if layout.header:
        _, header = next(rows, (None, None))
        if header is None:
            raise DataError(f"{path} is empty")
    columns = _columns(layout, header, path, what)
    n_fields = len(header) if header else layout.n_fields
    examples = Examples(str(path), [], [] if "text_b" in columns else None,
                        [] if "label" in columns else None, [])
    allowed = set(task.labels or ())
    for number, fields in rows:
        if len(fields) != n_fields:
            if task.skip_malformed:
                examples.skipped += 1
                continue
            raise DataError(f"{path}, line {number}: {len(fields)} fields where {what} has "
                            f"{n_fields}; is it a file of another task?")
        examples.texts_a.append(fields[columns["text_a"]])
        if examples.texts_b is not None:
            examples.texts_b.append(fields[columns["text_b"]])
        if examples.labels is not None:
            label = fields[columns["label"]]
            if task.is_regression:
                label = _score(label, path, number, task.score_range)
            elif label not in allowed:
                raise DataError(f"{path}, line {number}: label {label!r} is not one of "
                                f"{task.name}'s labels ({', '.join(task.labels)})")
            examples.labels.append(label)
        index = fields[columns["index"]] if "index" in columns else len(examples.indices)
        examples.indices.append(str(index))
        examples.line_numbers.append(number)
    if not examples.texts_a:
        raise DataError(f"{path}: no examples" + (" (only malformed lines)" if examples.skipped
                                                  else ""))
    return examples


###############################################################################
# Your own files: .tsv, .csv, .jsonl
###############################################################################

OWN_SUFFIXES = (".tsv", ".csv", ".jsonl")


def _own_records(path):
    """(column names or None, iterator of (line number, record)): a record is a list of
    fields (.tsv without quoting, as GLUE's; .csv with CSV's quoting) or a dict (.jsonl)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return None, _jsonl_records(path)
    if suffix == ".tsv":
        rows = _tsv_rows(path)
    elif suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise UserError(f"{path}: use a .tsv, .csv or .jsonl file (not {suffix or 'no suffix'})")
    _, header = next(rows, (None, None))
    if header is None:
        raise DataError(f"{path} is empty")
    return header, rows


# Python's csv module refuses a field over 131,072 characters by default; a sentence of
# your own may be longer (a .tsv line has no limit), so the limit is the largest C long.
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


def _csv_rows(path):
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    lines = _lines(path)
    reader = csv.reader(line for _, line in lines)
    try:
        start = 1
        for fields in reader:
            if fields:
                yield start, fields
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not CSV ({e})") from None


def _jsonl_records(path):
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: not a JSON object")
        yield number, record


def _own_value(record, column, header, path, number):
    """A record's value in `column`, as a string (jsonl numbers and booleans as JSON writes
    them)."""
    if header is not None:
        value = record[header.index(column)]
    elif column not in record:
        raise DataError(f"{path}, line {number}: no key {column!r} (its keys: "
                        f"{', '.join(record) or 'none'})")
    else:
        value = record[column]
        if isinstance(value, bool | int | float):
            value = json.dumps(value)
        elif not isinstance(value, str):
            raise DataError(f"{path}, line {number}: {column!r} is {json.dumps(value)[:40]}, "
                            "not a string or a number")
    return value


def _own_label(value, regression, path, number, column):
    if regression:
        return _score(value, path, number, None)
    if not value:
        raise DataError(f"{path}, line {number}: no label in column {column!r}")
    return value


def read_own_file(path, text_columns, label_column, labeled=True, regression=False):
    """Your own .tsv, .csv or .jsonl file: `text_columns` one column name or two (a pair),
    `label_column` the label's (read when `labeled`): strings, or floats when `regression`.
    A .tsv is read as GLUE's (tabs, no quoting; a header line), a .csv with CSV's quoting
    (a header line), a .jsonl as one JSON object a line. The examples are numbered in file
    order, unless the file has a column (a key) "index"."""
    text_columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
    if not 1 <= len(text_columns) <= 2:
        raise UserError(f"--text-columns {' '.join(text_columns)}: give one column or two")
    if labeled and not label_column:
        raise UserError(f"{path}: name its label's column (--label-column)")
    header, records = _own_records(path)
    wanted = text_columns + ([label_column] if labeled else [])
    if header is not None:
        missing = [name for name in wanted if name not in header]
        if missing:
            raise DataError(f"{path} has no column {', '.join(map(repr, missing))} (its "
                            f"columns: {', '.join(header)})")
    has_index = header is not None and "index" in header
    examples = Examples(str(path), [], [] if len(text_columns) == 2 else None,
                        [] if labeled else None, [])
    for number, record in records:
        if header is not None and len(record) != len(header):
            raise DataError(f"{path}, line {number}: {len(record)} fields where the header "
                            f"has {len(header)}")
        values = [_own_value(record, column, header, path, number) for column in wanted]
        examples.texts_a.append(values[0])
        if examples.texts_b is not None:
            examples.texts_b.append(values[1])
        if labeled:
            examples.labels.append(_own_label(values[-1], regression, path, number, label_column))
        if header is None:
            index = record.get("index", len(examples.indices))
        else:
            index = record[header.index("index")] if has_index else len(examples.indices)
        examples.indices.append(str(index))
        examples.line_numbers.append(number)
    if not examples.texts_a:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


###############################################################################
# GLUE's files on disk, downloaded when missing
###############################################################################

# GLUE's archives and the SHA-256 their publishers give, from the `download_checksums` of
# huggingface/datasets' datasets/glue/dataset_infos.json (the same digests and sizes as
# tensorflow/datasets' url_checksums/glue.txt, which lists the archives' earlier hosts).
# Each zip holds <TASK>/train.tsv, dev*.tsv, test*.tsv (GLUE's download_glue_data.py
# extracts them as they are).
_GLUE_DATA = "https://dl.fbaipublicfiles.com/glue/data/"
ARCHIVES = {name: corpus.Archive(filename, "", (_GLUE_DATA + filename,), sha256=sha256)
            for name, filename, sha256 in (
    ("CoLA", "CoLA.zip", "f212fcd832b8f7b435fb991f101abf89f96b933ab400603bf198960dfc32cbff"),
    ("SST-2", "SST-2.zip", "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa"),
    ("QQP", "QQP-clean.zip", "40e7c862c04eb26ee04b67fd900e76c45c6ba8e6d8fab4f8f1f8072a1a3fbae0"),
    ("STS-B", "STS-B.zip", "e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85"),
    ("MNLI", "MNLI.zip", "e7c1d896d26ed6caf700110645df426cc2d8ebf02a5ab743d5a5c68ac1c83633"),
    ("QNLI", "QNLIv2.zip", "e634e78627a29adaecd4f955359b22bf5e70f2cbd93b493f2d624138a0c0e5f5"),
    ("RTE", "RTE.zip", "6bf86de103ecd335f3441bd43574d23fef87ecc695977a63b82d5efb206556ee"),
    ("WNLI", "WNLI.zip", "ae0e8e4d16f4d46d4a0a566ec7ecceccfd3fbfaa4a7a4b4e02848c0f2561ac46"),
)}
# MRPC is not in an archive of GLUE's (its license): GLUE's download script builds its
# files from SentEval's copy of the corpus and GLUE's list of the dev pairs (same source).
_SENTEVAL = "https://dl.fbaipublicfiles.com/senteval/senteval_data/"
MRPC_SOURCES = {
    "train": corpus.Archive("msr_paraphrase_train.txt", "", (_SENTEVAL + "msr_paraphrase_train.txt",),
        sha256="60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89"),
    "test": corpus.Archive("msr_paraphrase_test.txt", "", (_SENTEVAL + "msr_paraphrase_test.txt",),
        sha256="a04e271090879aaba6423d65b94950c089298587d9c084bf9cd7439bd785f784"),
    "dev_ids": corpus.Archive("dev_ids.tsv", "", (_GLUE_DATA + "mrpc_dev_ids.tsv",),
        sha256="971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7"),
}


def task_file(task, filename, data_dir, log=print):
    """<data_dir>/glue/<TASK>/<filename>, the layout GLUE's download script writes. A
    missing file is downloaded from GLUE's archive (checked against its published SHA-256)
    with the task's other files that are missing; offline, a DataError names the file to
    place and where (or the archive)."""
    path = Path(data_dir) / "glue" / task.name
    path = path / filename
    if path.is_file():
        return path
    if filename not in task.files:
        raise UserError(f"{task.name} has no file {filename} (its files: {', '.join(task.files)})")
    log(f"{path} is missing: fetching GLUE's {task.name} files")
    if task.name == "MRPC":
        _fetch_mrpc(path, log)
    else:
        _fetch_task_archive(task, path, log)
    return path


def _fetch_task_archive(task, path, log):
    """Download the task's zip into <data_dir>/glue/, extract it into a hidden folder there,
    check it holds the file, then move each of its files that is not there yet into place:
    a failure leaves no part of the archive behind and changes no file already there."""
    glue_dir, folder = path.parent.parent, path.parent
    made = [p for p in (folder, glue_dir, *glue_dir.parents) if not p.exists()]
    staging = glue_dir / f".{task.name}.download"
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    # The offline error names every file a run needs that is missing: train and dev too.
    needed = [p for p in (path, *(folder / name for name in (task.train_file, *task.dev_files)))
              if not p.is_file()]
    try:
        archive = replace(ARCHIVES[task.name], extract_to=staging.name)
        corpus.download_archive(archive, glue_dir, log, expected=list(dict.fromkeys(needed)))
        extracted = staging / task.name
        if not (extracted / path.name).is_file():
            raise DataError(f"{archive.filename} holds no {task.name}/{path.name}; place "
                            f"{path} by hand")
        folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(extracted)):
            if not (folder / name).exists():
                os.replace(extracted / name, folder / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not path.is_file():  # failed: the folders made for it go too, deepest first
            for made_folder in filter(Path.exists, made):
                try:
                    made_folder.rmdir()
                except OSError:
                    break


def _fetch_mrpc(path, log):
    """MRPC's train.tsv / dev.tsv / test.tsv as GLUE's download script writes them: train
    and dev from msr_paraphrase_train.txt (its header, BOM included, copied to both) split
    by dev_ids.tsv; test from msr_paraphrase_test.txt, numbered. Only missing files are
    written, each atomically; the sources stay beside them, as the script leaves them."""
    folder = path.parent
    sources = ["test"] if path.name == "test.tsv" else ["train", "dev_ids"]
    needed = [path] if path.name == "test.tsv" else [
        p for p in (folder / "train.tsv", folder / "dev.tsv") if not p.is_file()]
    for key in sources:
        corpus.download_archive(MRPC_SOURCES[key], folder, log, expected=needed)
    if path.name == "test.tsv":
        header, rows = _mrpc_rows(folder / MRPC_SOURCES["test"].filename)
        text = "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + "".join(
            f"{i}\t{id1}\t{id2}\t{s1}\t{s2}\n" for i, (_, id1, id2, s1, s2) in enumerate(rows))
        atomic_write_text(path, text)
        return
    dev_ids = set()
    for _, line in _lines(folder / MRPC_SOURCES["dev_ids"].filename):
        dev_ids.add(tuple(line.strip().split("\t")))
    header, rows = _mrpc_rows(folder / MRPC_SOURCES["train"].filename)
    for name, in_dev in (("train.tsv", False), ("dev.tsv", True)):
        if not (folder / name).exists():
            atomic_write_text(folder / name, header + "".join(
                "\t".join(row) + "\n" for row in rows if ((row[1], row[2]) in dev_ids) == in_dev))


def _mrpc_rows(source):
    """The header line (as it is, BOM included) and the rows of an msr_paraphrase file."""
    with open(source, encoding="utf-8", newline="\n") as f:
        header, *lines = f.readlines()
    rows = []
    for number, line in enumerate(lines, 2):
        row = line.strip().split("\t")
        if len(row) != 5:
            raise DataError(f"{source}, line {number}: {len(row)} fields, not 5")
        rows.append(row)
    return header, rows


###############################################################################
# Predictions in GLUE's submission layout
###############################################################################


def write_predictions(path, indices, predictions, labels):
    """GLUE's submission file, atomically: an "index<TAB>prediction" header, then one row
    per example in file order. `predictions`: label ids, written as the label strings
    labels[id] (as the task's files write them: 0 / 1, entailment, ...); or floats when
    `labels` is None (regression), written as %.3f."""
    values = predictions.tolist() if hasattr(predictions, "tolist") else list(predictions)
    if len(values) != len(indices):
        raise ValueError(f"{len(values)} predictions for {len(indices)} examples")
    if labels is None:
        rows = [f"{index}\t{value:.3f}\n" for index, value in zip(indices, values)]
    else:
        rows = [f"{index}\t{labels[int(value)]}\n" for index, value in zip(indices, values)]
    atomic_write_text(path, "index\tprediction\n" + "".join(rows))
