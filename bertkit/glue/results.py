"""The GLUE table of a folder of glue_task.py runs: each run's dev scores read from the
files it wrote (the test row of its metrics log, glue_metrics.jsonl; its task and
--from-scratch from its loss log's settings, glue_loss.txt), pretrained and from-scratch
runs of a task side by side, GLUE's average where every task is there; written as
<folder>/glue_results.md, .csv and a bar plot, .png (with matplotlib).

    python plot.py --glue-table glue          # any time; glue_task.py --task A B ... at its end

A run is a folder holding glue_metrics.jsonl: the folder itself, or one of its subfolders
(glue_task.py --task A B ... writes <output-dir>/<TASK>/, with --from-scratch
<TASK>-scratch/). A run is from scratch when its settings say --from-scratch, or its
folder's name ends in -scratch.
"""

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from bertkit.files import UserError, atomic_write_text
from bertkit.glue import tasks as glue

METRICS_LOG, LOSS_LOG = "glue_metrics.jsonl", "glue_loss.txt"
RUN_RECORD = "glue_run.json"  # glue_task.py --task A B ...: each run's seconds (suite.py)
SCRATCH_SUFFIX = "-scratch"
TABLE = "glue_results"  # .md, .csv, .png in the folder

# GLUE's score: the mean over the nine tasks of each one's score, the mean of its metrics
# (MRPC and QQP: F1 and accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched
# accuracy); the diagnostic set AX is not in it. BERT-base's leaderboard row gives 78.3 so
# (tests/test_glue_results.py). The table lists MNLI's two dev sets as two entries.
# (entry, task, suffix of its metric names in the metrics log)
ENTRIES = (("CoLA", "CoLA", ""), ("SST-2", "SST-2", ""), ("MRPC", "MRPC", ""),
           ("STS-B", "STS-B", ""), ("QQP", "QQP", ""), ("MNLI-m", "MNLI", ""),
           ("MNLI-mm", "MNLI", "_mm"), ("QNLI", "QNLI", ""), ("RTE", "RTE", ""),
           ("WNLI", "WNLI", ""))
COLUMNS = ("task", "metric", "score", "scratch_score", "gain", "examples", "seconds",
           "scratch_seconds")
AVERAGE_RULE = ("the mean of the nine task scores, each the mean of its metrics (MRPC, QQP: "
                "F1 and accuracy; STS-B: Pearson and Spearman; MNLI: matched and mismatched), "
                "AX left out; on the dev sets")


@dataclass
class Run:
    folder: Path
    task: glue.GlueTask
    scratch: bool
    test: dict  # the metrics log's test row: test_<metric>, test_examples (_mm: MNLI's)
    seconds: float | None  # wall time, when glue_task.py --task A B ... ran it
    written: float  # the metrics log's mtime: the newest of two runs of a task wins


def metric_names(task):
    """The task's metrics, the main one (that picks the best model) first."""
    return (task.main_metric, *(m for m in task.metrics if m != task.main_metric))


def read_settings(path):
    """{flag: value as written} of a loss log's settings lines (`name:    value`)."""
    settings = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return settings
    for line in lines:
        name, sep, value = line.partition(":")
        if sep and name.isidentifier():
            settings.setdefault(name, value.strip())
    return settings


def read_json(path):
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def read_run(folder):
    """The Run in `folder`, or a note (str) saying why it is left out of the table."""
    folder, rows = Path(folder), []
    try:
        with open(folder / METRICS_LOG, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (ValueError, UnicodeDecodeError):
        return f"{folder}: {METRICS_LOG} is not a metrics log"
    rows = [row for row in rows if isinstance(row, dict)]
    tests = [row for row in rows if any(name.startswith("test_") for name in row)]
    if not tests:
        return f"{folder}: unfinished (no test row in its {METRICS_LOG})"
    settings, record = read_settings(folder / LOSS_LOG), read_json(folder / RUN_RECORD)
    name = record.get("task") or settings.get("task")
    if name is None:  # no settings: the folder's name
        name = folder.name.removesuffix(SCRATCH_SUFFIX)
    try:
        task = glue.task_by_name(name)
    except UserError:
        return f"{folder}: not a run of a GLUE task (--task {name})"
    scratch = (folder.name.endswith(SCRATCH_SUFFIX) or settings.get("from_scratch") == "True"
               or any(row.get("from_scratch") is True for row in rows)
               or record.get("from_scratch") is True)
    seconds = record.get("seconds") if record.get("finished") is True else None
    return Run(folder, task, scratch, tests[-1], seconds,
               os.path.getmtime(folder / METRICS_LOG))


def find_runs(folder):
    """({(task name, scratch): Run}, [notes]): the runs in `folder` and its subfolders; of
    two runs of a task (and kind), the newer."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    candidates = [folder] + sorted(p for p in folder.iterdir()
                                   if p.is_dir() and not p.name.startswith("."))
    runs, notes = {}, []
    for candidate in candidates:
        if not (candidate / METRICS_LOG).is_file():
            continue
        run = read_run(candidate)
        if isinstance(run, str):
            notes.append(run)
            continue
        key = (run.task.name, run.scratch)
        older = runs.get(key)
        if older is not None:
            older, run = sorted((older, run), key=lambda r: r.written)
            notes.append(f"{older.folder}: an older run of {key[0]}"
                         f"{' from scratch' if key[1] else ''} than {run.folder}, left out")
        runs[key] = run
    return runs, notes


def entry_scores(run, task, suffix):
    """{metric: value} of one GLUE entry (MNLI-mm: the _mm names) in a run's test row."""
    if run is None:
        return {}
    return {m: run.test[f"test_{m}{suffix}"] for m in metric_names(task)
            if isinstance(run.test.get(f"test_{m}{suffix}"), (int, float))}


def scores(runs, scratch):
    """{entry: {metric: value}} of the pretrained (or from-scratch) runs."""
    found = {}
    for entry, name, suffix in ENTRIES:
        values = entry_scores(runs.get((name, scratch)), glue.TASKS[name], suffix)
        if values:
            found[entry] = values
    return found


def glue_average(entry_scores_):
    """(GLUE's average, []) when every entry has all its metrics, else (None, [the entries
    missing]). `entry_scores_`: {entry: {metric: value}}, as scores() gives."""
    missing = [entry for entry, name, _ in ENTRIES
               if not set(glue.TASKS[name].metrics) <= set(entry_scores_.get(entry, ()))]
    if missing:
        return None, missing
    per_task = {}
    for entry, name, _ in ENTRIES:
        per_task.setdefault(name, []).extend(entry_scores_[entry].values())
    means = [sum(values) / len(values) for values in per_task.values()]
    return sum(means) / len(means), []


def table_rows(runs):
    """One dict a metric of each entry that has a run (COLUMNS), in GLUE's order."""
    rows = []
    for entry, name, suffix in ENTRIES:
        task = glue.TASKS[name]
        pre, scratch = runs.get((name, False)), runs.get((name, True))
        if pre is None and scratch is None:
            continue
        ours, theirs = entry_scores(pre, task, suffix), entry_scores(scratch, task, suffix)
        either = pre or scratch
        for metric in metric_names(task):
            score, base = ours.get(metric), theirs.get(metric)
            rows.append({"task": entry, "metric": metric, "score": score, "scratch_score": base,
                         "gain": None if score is None or base is None else score - base,
                         "examples": either.test.get(f"test_examples{suffix}"),
                         "seconds": pre and pre.seconds,
                         "scratch_seconds": scratch and scratch.seconds})
    return rows


def text(value, column, signed=False):
    """A table cell: scores with 2 decimals (x100, as the logs give them), seconds with
    1, counts as they are; '' where there is none."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if column in ("examples",):
        return f"{int(value)}"
    if column.endswith("seconds"):
        return f"{value:.1f}"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def average_lines(runs):
    """The GLUE average, said for the pretrained runs and the from-scratch ones (when any)."""
    pre, pre_missing = glue_average(scores(runs, False))
    kinds = [("", pre, pre_missing)]
    if any(scratch for _, scratch in runs):
        kinds.append(("from scratch: ", *glue_average(scores(runs, True))))
    lines = []
    for label, average, missing in kinds:
        if average is None:
            lines.append(f"GLUE average {label}not given: every task must be there; missing "
                         f"{', '.join(missing)}")
        else:
            lines.append(f"GLUE average {label}{text(average, 'score')} ({AVERAGE_RULE})")
    if pre is not None and len(kinds) == 2 and kinds[1][1] is not None:
        lines.append(f"GLUE average gain of pretraining: {text(pre - kinds[1][1], 'score', True)}")
    return lines, pre, kinds[1][1] if len(kinds) == 2 else None


def markdown(rows, runs, notes):
    """The table as markdown: scratch columns only when a from-scratch run is there."""
    columns = list(COLUMNS)
    if not any(scratch for _, scratch in runs):
        columns = [c for c in columns if c not in ("scratch_score", "gain", "scratch_seconds")]
    heads = {"scratch_score": "from scratch", "scratch_seconds": "scratch seconds"}
    lines = ["# GLUE dev scores", "",
             "| " + " | ".join(heads.get(c, c) for c in columns) + " |",
             "| " + " | ".join("---" if c in ("task", "metric") else "---:" for c in columns)
             + " |"]
    for row in rows:
        lines.append("| " + " | ".join(row[c] if c in ("task", "metric") else
                                       text(row[c], c, signed=c == "gain") for c in columns)
                     + " |")
    for line in average_lines(runs)[0]:
        lines += ["", line]
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def csv_text(rows, runs):
    """The table as CSV (COLUMNS), and a last row `GLUE,average` when an average is given."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([row[c] if c in ("task", "metric") else text(row[c], c)
                         for c in COLUMNS])
    _, pre, scratch = average_lines(runs)
    if pre is not None or scratch is not None:
        gain = None if pre is None or scratch is None else pre - scratch
        writer.writerow(["GLUE", "average", text(pre, "score"), text(scratch, "score"),
                         text(gain, "score"), "", "", ""])
    return out.getvalue()


def bar_plot(runs, path):
    """Each entry's task score (the mean of its metrics), pretrained beside from scratch;
    False (nothing written) without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [(False, "pretrained"), (True, "from scratch")]
    kinds = [(scratch, label, scores(runs, scratch)) for scratch, label in kinds
             if any(s == scratch for _, s in runs)]
    entries = [e for e, _, _ in ENTRIES if any(e in found for _, _, found in kinds)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(entries) + 2), 3.6))
    width = 0.8 / len(kinds)
    for i, (_, label, found) in enumerate(kinds):
        values = [sum(found[e].values()) / len(found[e]) if e in found else math.nan
                  for e in entries]  # no bar where a kind has no run
        ax.bar([x + (i - (len(kinds) - 1) / 2) * width for x in range(len(entries))], values,
               width, label=label)
    ax.set_xticks(range(len(entries)), entries, rotation=30 if len(entries) > 6 else 0)
    ax.set_ylabel("dev score (x100)")
    ax.set_title("GLUE dev: the mean of each task's metrics")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(loc="best", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(folder, log=print):
    """The table of the runs in `folder`: <folder>/glue_results.md, .csv and .png (with
    matplotlib; one line says how to get it otherwise), the markdown printed. Returns the
    paths written; UserError when no finished run of a GLUE task is there."""
    runs, notes = find_runs(folder)
    if not runs:
        raise UserError(f"no GLUE table: no finished glue_task.py run of a GLUE task in "
                        f"{folder} or its subfolders ({METRICS_LOG} with its test row)"
                        + "".join(f"; {note}" for note in notes))
    rows = table_rows(runs)
    paths = [os.path.join(folder, TABLE + ext) for ext in (".md", ".csv", ".png")]
    table = markdown(rows, runs, notes)
    atomic_write_text(paths[0], table)
    atomic_write_text(paths[1], csv_text(rows, runs))
    if not bar_plot(runs, paths[2]):
        log(f"{paths[2]} not drawn: the bar plot needs matplotlib (pip install matplotlib)")
        paths.pop()
    log(table.rstrip("\n"))
    log(f"wrote {', '.join(paths)}")
    return paths
