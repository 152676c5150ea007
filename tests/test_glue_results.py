"""The GLUE table (bertkit/glue/results.py) on folders of synthetic runs, as glue_task.py
writes them: the test row of each metrics log, the task and --from-scratch from the loss
log's settings; GLUE's average only when every task is there; plot.py --glue-table."""

import csv
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO

from bertkit.files import UserError
from bertkit.glue import results

# A score for every metric of every entry: {entry: {metric: value}}.
FULL = {"CoLA": {"matthews_correlation": 40.0}, "SST-2": {"accuracy": 90.0},
        "MRPC": {"f1": 88.0, "accuracy": 84.0}, "STS-B": {"pearson": 86.0, "spearmanr": 85.0},
        "QQP": {"f1": 87.0, "accuracy": 90.0}, "MNLI-m": {"accuracy": 84.0},
        "MNLI-mm": {"accuracy": 83.0}, "QNLI": {"accuracy": 91.0}, "RTE": {"accuracy": 66.0},
        "WNLI": {"accuracy": 56.0}}
# GLUE's score: the nine tasks' means, MNLI's the mean of matched and mismatched.
FULL_AVERAGE = (40 + 90 + 86 + 85.5 + 88.5 + 83.5 + 91 + 66 + 56) / 9


def write_run(folder, task, test, settings=None, rows=(), record=None):
    """A finished glue_task.py run in `folder`: its metrics log (a training row, a
    validation, then `test` as the test row), its loss log's settings (task: ..., and
    `settings`), and `record` as glue_run.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 1, "epoch": 1, "loss": 0.7, "lr": 2e-5, "tokens_per_s": 100.0},
             {"step": 2, "epoch": 1, "valid_loss": 0.6, "valid_accuracy": 50.0}, *rows]
    if test is not None:
        lines.append({"step": 2, "epoch": 1, "test_loss": 0.6, **test})
    (folder / "glue_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if test is not None:
        given = {"task": task, "lr": 2e-05, **(settings or {})}
        (folder / "glue_loss.txt").write_text(
            "".join(f"{k}:    {v}\n" for k, v in given.items()) + "test loss  0.60000\n")
    if record is not None:
        (folder / "glue_run.json").write_text(json.dumps(record))
    return folder


def write_glue(folder, scores, suffix="", settings=None):
    """A run of each task in `scores` ({entry: {metric: value}}): <folder>/<TASK><suffix>."""
    tasks = {}
    for entry, values in scores.items():
        task = "MNLI" if entry.startswith("MNLI") else entry
        row = tasks.setdefault(task, {"test_examples": 100})
        mm = "_mm" if entry == "MNLI-mm" else ""
        row.update({f"test_{m}{mm}": v for m, v in values.items()})
        if mm:
            row["test_examples_mm"] = 90
    for task, row in tasks.items():
        write_run(Path(folder) / (task + suffix), task, row, settings)


def read_csv(path):
    return list(csv.DictReader(Path(path).open()))


def test_glue_average_is_the_leaderboards_score_of_bert_base():
    """BERT-base's GLUE test row (CoLA 52.1, SST-2 93.5, MRPC 88.9/84.8, STS-B 87.1/85.8,
    QQP 71.2/89.2, MNLI 84.6/83.4, QNLI 90.5, RTE 66.4, WNLI 65.1) scores 78.3 on the
    leaderboard: nine tasks, MNLI one of them."""
    bert_base = {"CoLA": {"matthews_correlation": 52.1}, "SST-2": {"accuracy": 93.5},
                 "MRPC": {"f1": 88.9, "accuracy": 84.8}, "STS-B": {"pearson": 87.1,
                                                                    "spearmanr": 85.8},
                 "QQP": {"f1": 71.2, "accuracy": 89.2}, "MNLI-m": {"accuracy": 84.6},
                 "MNLI-mm": {"accuracy": 83.4}, "QNLI": {"accuracy": 90.5},
                 "RTE": {"accuracy": 66.4}, "WNLI": {"accuracy": 65.1}}
    average, missing = results.glue_average(bert_base)
    assert missing == [] and round(average, 1) == 78.3


def test_glue_average_is_the_benchmarks_and_only_with_every_task():
    average, missing = results.glue_average(FULL)
    assert average == pytest.approx(FULL_AVERAGE) and missing == []
    for left_out in ("WNLI", "MNLI-mm"):
        average, missing = results.glue_average({k: v for k, v in FULL.items() if k != left_out})
        assert average is None and missing == [left_out]
    # A task with one of its two metrics is not there either.
    half = {**FULL, "STS-B": {"pearson": 86.0}}
    assert results.glue_average(half) == (None, ["STS-B"])
    assert results.glue_average({}) == (None, [e for e, _, _ in results.ENTRIES])


def test_the_table_reads_every_runs_metrics_log_and_puts_scratch_runs_beside(tmp_path):
    write_glue(tmp_path, {"RTE": {"accuracy": 60.0}, "STS-B": {"pearson": 30.0,
                                                              "spearmanr": 28.0}})
    write_glue(tmp_path, {"RTE": {"accuracy": 52.5}, "STS-B": {"pearson": 5.0,
                                                              "spearmanr": 4.0}},
               suffix="-scratch")
    # Seconds from glue_task.py --task A B ...'s record; a folder of another name whose
    # settings say --from-scratch; MNLI's two dev sets; an unfinished run; not GLUE.
    (tmp_path / "RTE" / "glue_run.json").write_text(json.dumps(
        {"task": "RTE", "seconds": 31.25, "finished": True, "from_scratch": False}))
    write_run(tmp_path / "mnli-random", "mnli", {"test_accuracy": 40.0, "test_accuracy_mm": 41.0,
                                                 "test_examples": 30, "test_examples_mm": 20},
              {"from_scratch": True})
    write_run(tmp_path / "CoLA", "CoLA", None)
    write_run(tmp_path / "mine", None, {"test_accuracy": 70.0, "test_examples": 5})
    paths = results.write(tmp_path, log=lambda line: None)
    assert [Path(p).name for p in paths[:2]] == ["glue_results.md", "glue_results.csv"]
    rows = read_csv(tmp_path / "glue_results.csv")
    assert [(r["task"], r["metric"]) for r in rows] == [
        ("STS-B", "pearson"), ("STS-B", "spearmanr"), ("MNLI-m", "accuracy"),
        ("MNLI-mm", "accuracy"), ("RTE", "accuracy")]
    rte = rows[-1]
    assert rte == {"task": "RTE", "metric": "accuracy", "score": "60.00",
                   "scratch_score": "52.50", "gain": "7.50", "examples": "100",
                   "seconds": "31.2", "scratch_seconds": ""}
    assert rows[0]["score"] == "30.00" and rows[0]["scratch_score"] == "5.00"
    assert (rows[2]["score"], rows[2]["scratch_score"], rows[2]["examples"]) == ("", "40.00", "30")
    assert (rows[3]["scratch_score"], rows[3]["examples"]) == ("41.00", "20")
    md = (tmp_path / "glue_results.md").read_text()
    assert "| task | metric | score | from scratch | gain | examples | seconds |" in md
    assert "| RTE | accuracy | 60.00 | 52.50 | +7.50 | 100 | 31.2 |" in md
    assert ("GLUE average not given: every task must be there; missing CoLA, SST-2, MRPC, "
            "QQP, MNLI-m, MNLI-mm, QNLI, WNLI") in md
    assert "GLUE average from scratch: not given" in md
    assert "CoLA: unfinished" in md and "mine: not a run of a GLUE task (--task None)" in md


def test_the_average_is_given_once_every_task_is_there(tmp_path):
    write_glue(tmp_path, {k: v for k, v in FULL.items() if k != "CoLA"})
    write_glue(tmp_path, {k: {m: v - 10 for m, v in s.items()} for k, s in FULL.items()},
               suffix="-scratch")
    results.write(tmp_path, log=lambda line: None)
    md = (tmp_path / "glue_results.md").read_text()
    assert "GLUE average not given: every task must be there; missing CoLA" in md
    assert f"GLUE average from scratch: {FULL_AVERAGE - 10:.2f}" in md
    assert read_csv(tmp_path / "glue_results.csv")[-1] == {
        "task": "GLUE", "metric": "average", "score": "", "scratch_score":
        f"{FULL_AVERAGE - 10:.2f}", "gain": "", "examples": "", "seconds": "",
        "scratch_seconds": ""}
    write_glue(tmp_path, {"CoLA": FULL["CoLA"]})
    results.write(tmp_path, log=lambda line: None)
    md = (tmp_path / "glue_results.md").read_text()
    assert f"GLUE average {FULL_AVERAGE:.2f} (the mean of the nine task scores" in md
    assert "GLUE average gain of pretraining: +10.00" in md
    assert read_csv(tmp_path / "glue_results.csv")[-1]["gain"] == "10.00"
    # No scratch run: no scratch columns in the markdown, the CSV's columns stay.
    for folder in tmp_path.glob("*-scratch"):
        (folder / "glue_metrics.jsonl").unlink()
    results.write(tmp_path, log=lambda line: None)
    md = (tmp_path / "glue_results.md").read_text()
    assert "| task | metric | score | examples | seconds |" in md and "from scratch" not in md
    assert list(read_csv(tmp_path / "glue_results.csv")[0]) == list(results.COLUMNS)


def test_scratch_runs_are_known_by_settings_metrics_rows_or_folder_name(tmp_path):
    for name, settings, rows in (("a", {"from_scratch": True}, ()),
                                 ("b", {}, ({"step": 0, "from_scratch": True},)),
                                 ("RTE-scratch", {}, ()), ("c", {"from_scratch": False}, ())):
        write_run(tmp_path / name, "RTE", {"test_accuracy": 50.0}, settings, rows)
        run = results.read_run(tmp_path / name)
        assert run.scratch == (name != "c"), name


def test_of_two_runs_of_a_task_the_newer_is_in_the_table(tmp_path):
    import os

    old = write_run(tmp_path / "rte-old", "RTE", {"test_accuracy": 50.0})
    write_run(tmp_path / "rte-new", "RTE", {"test_accuracy": 70.0})
    os.utime(old / "glue_metrics.jsonl", (1, 1))
    runs, notes = results.find_runs(tmp_path)
    assert runs[("RTE", False)].test["test_accuracy"] == 70.0
    assert notes == [f"{old}: an older run of RTE than {tmp_path / 'rte-new'}, left out"]


def test_without_matplotlib_one_line_says_how_to_get_the_plot(tmp_path, monkeypatch):
    write_glue(tmp_path, {"RTE": {"accuracy": 60.0}})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    said = []
    paths = results.write(tmp_path, log=said.append)
    assert not (tmp_path / "glue_results.png").exists() and len(paths) == 2
    assert any("glue_results.png not drawn" in line and "pip install matplotlib" in line
               for line in said)


def test_plot_py_glue_table_writes_the_table_and_the_bar_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(REPO))
    import plot

    write_glue(tmp_path, {"RTE": {"accuracy": 60.0}, "MRPC": {"f1": 80.0, "accuracy": 70.0}})
    write_glue(tmp_path, {"RTE": {"accuracy": 50.0}}, suffix="-scratch")
    plot.main(["--glue-table", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| MRPC | f1 | 80.00 |" in out and "glue_results.png" in out
    assert (tmp_path / "glue_results.png").read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, expected in (([str(empty)], "no finished glue_task.py run of a GLUE task"),
                           ([str(tmp_path / "absent")], "no such folder"),
                           ([str(tmp_path), "-o", "x.png"], "give no metrics log or -o")):
        with pytest.raises(SystemExit) as exit_info:
            plot.main(["--glue-table", *argv])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("error: ") and expected in err
    with pytest.raises(UserError, match="no such folder"):
        results.find_runs(tmp_path / "absent")
