"""glue_task.py --task A B ... and --task all (bertkit/glue/suite.py): each task's run in its
own folder, then the GLUE table; a from-scratch run's folder beside read into it; a stopped
command given again with --checkpoint auto; flags of one task's files refused before any
work. Tiny encoders and toy GLUE-layout files, as tests/test_glue.py."""

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_rte
from test_glue import write_encoders, write_task

import glue_task
from bertkit import checks
from bertkit.glue import suite

ENV = {"OMP_NUM_THREADS": "1"}
TINY = ["--data-dir", "../D", "--device", "cpu", "--lr", "5e-3", "--batch_size", "16",
        "--epochs", "1", "--bptt", "32", "--log-interval", "5", "--no-progress"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny encoders (ns_bert.pt, mlm_bert.pt), an RTE and an MNLI data folder."""
    folder = tmp_path_factory.mktemp("suite")
    write_encoders(folder, nlayers=1)
    write_rte(folder / "D" / "glue" / "RTE", 48, 24)
    write_task(folder / "D", "MNLI", {"train.tsv": (48, 3), "dev_matched.tsv": (18, 4),
                                      "dev_mismatched.tsv": (12, 5)},
               ["contradiction", "entailment", "neutral"],
               "index\tsentence1\tsentence2\tgold_label")
    (folder / "runs").mkdir()
    return folder


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          env={**os.environ, **ENV}, capture_output=True,
                          text=True, timeout=600)


def last_row(path):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return rows[-1]


def test_several_tasks_run_each_in_its_folder_then_the_table(work):
    cwd = work / "runs"
    several = ["--bert-model", "../ns_bert.pt", "--task", "rte", "MNLI", *TINY,
               "--output-dir", "glue"]
    result = run("glue_task.py", *several, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "== RTE (1 of 2): --output-dir glue/RTE" in out
    assert "== MNLI (2 of 2): --output-dir glue/MNLI" in out
    assert out.count("End of training") == 2
    glue = cwd / "glue"
    for task in ("RTE", "MNLI"):  # each folder: a whole run's files, and its time
        names = {p.name for p in (glue / task).iterdir()}
        assert {"glue_model.pt", "glue_predictions.tsv", "glue_metrics.jsonl", "glue_loss.txt",
                "glue_state.pt", "bert_vocab.pt", "glue_run.json"} <= names, names
        assert "task:    " + task in (glue / task / "glue_loss.txt").read_text()
        record = json.loads((glue / task / "glue_run.json").read_text())
        assert record["task"] == task and record["finished"] is True and record["seconds"] > 0
    assert not (cwd / "glue_model.pt").exists() and not (glue / "glue_model.pt").exists()
    rte, mnli = last_row(glue / "RTE" / "glue_metrics.jsonl"), last_row(
        glue / "MNLI" / "glue_metrics.jsonl")
    rows = list(csv.DictReader((glue / "glue_results.csv").open()))
    assert [(r["task"], r["metric"], r["score"], r["examples"]) for r in rows] == [
        ("MNLI-m", "accuracy", f"{mnli['test_accuracy']:.2f}", "18"),
        ("MNLI-mm", "accuracy", f"{mnli['test_accuracy_mm']:.2f}", "12"),
        ("RTE", "accuracy", f"{rte['test_accuracy']:.2f}", "24")]
    md = (glue / "glue_results.md").read_text()
    assert "GLUE average not given: every task must be there; missing CoLA" in md
    assert md.rstrip() in out  # printed at the end

    # A from-scratch run of RTE beside (a single --task: today's run, no record, no table;
    # its folder's name says from scratch), then the table again, standalone.
    alone = run("glue_task.py", "--bert-model", "../mlm_bert.pt", "--task", "RTE", *TINY,
                "--output-dir", "glue/RTE-scratch", cwd=cwd)
    assert alone.returncode == 0, alone.stderr
    assert "== RTE (" not in alone.stdout and "glue_results" not in alone.stdout
    scratch = glue / "RTE-scratch"
    assert not (scratch / "glue_run.json").exists() and not (scratch / "glue_results.md").exists()
    table = run("plot.py", "--glue-table", "glue", cwd=cwd)
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader((glue / "glue_results.csv").open()))
    base = last_row(scratch / "glue_metrics.jsonl")["test_accuracy"]
    assert rows[-1]["scratch_score"] == f"{base:.2f}"
    assert rows[-1]["gain"] == f"{float(rows[-1]['score']) - float(f'{base:.2f}'):.2f}"
    assert rows[-1]["seconds"] != "" and rows[-1]["scratch_seconds"] == ""

    # Given again with --checkpoint auto: both finished, nothing trains, the table is new.
    logs = {task: (glue / task / "glue_metrics.jsonl").read_bytes() for task in ("RTE", "MNLI")}
    again = run("glue_task.py", *several, "--checkpoint", "auto", cwd=cwd)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("finished before, nothing to do") == 2
    assert "End of training" not in again.stdout and "wrote glue/glue_results.md" in again.stdout
    assert logs == {task: (glue / task / "glue_metrics.jsonl").read_bytes() for task in logs}


def test_one_task_is_todays_run_and_the_help_says_what_all_is():
    parser = glue_task.get_parser()
    assert suite.run(parser, lambda *a: pytest.fail("ran"), ["--task", "RTE"]) is False
    assert parser.parse_args(["--task", "RTE"]).task == "RTE"
    assert parser.parse_args(["--task", "RTE", "mrpc"]).task == ["RTE", "mrpc"]
    assert parser.parse_args(["--task", "all"]).task == ["all"]
    assert suite.task_names(["all"]) == ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI",
                                         "QNLI", "RTE", "WNLI"]
    assert suite.task_names(["stsb", "rte"]) == ["STS-B", "RTE"]
    text = " ".join(parser.format_help().split())
    assert "several, or all (those nine), run one after another" in text


BAD = {
    "--train-file": (["--task", "RTE", "MNLI", "--train-file", "x.tsv"],
                     "--train-file with several tasks (--task RTE MNLI)"),
    "--dev-file": (["--task", "RTE", "MNLI", "--dev-file", "x.tsv"], "--dev-file with several"),
    "--test-file": (["--task", "all", "--test-file", "x.tsv"], "--test-file with several"),
    "--predict": (["--task", "all", "--predict", "--sentence", "w1"], "--predict with several"),
    "--text-columns": (["--task", "RTE", "WNLI", "--text-columns", "a"], "--text-columns with"),
    "--save": (["--task", "RTE", "MNLI", "--save", "m.pt"], "--save with several tasks"),
    "--metrics-file": (["--task", "RTE", "MNLI", "--metrics-file", "m.jsonl"],
                       "--metrics-file with several tasks"),
    "--checkpoint FILE": (["--task", "RTE", "MNLI", "--checkpoint", "glue_state.pt"],
                          "--checkpoint glue_state.pt with several tasks"),
    "--tensorboard DIR": (["--task", "RTE", "MNLI", "--tensorboard", "tb"],
                          "--tensorboard tb with several tasks"),
    "all and a task": (["--task", "all", "RTE"], "all is every GLUE task; give it alone"),
    "a task twice": (["--task", "RTE", "rte"], "RTE named twice"),
    "an unknown task": (["--task", "RTE", "GLUEY"], "--task GLUEY: not a GLUE task"),
    "a bad value for every task": (["--task", "RTE", "MNLI", "--lr", "-1"], "--lr -1.0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_several_tasks_with_one_tasks_flags_is_one_error_line(case, work, tmp_path,
                                                               monkeypatch, capsys):
    argv, expected = BAD[case]
    (tmp_path / "ns_bert.pt").write_bytes((work / "ns_bert.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        suite.run(glue_task.get_parser(), lambda *a: pytest.fail("ran"),
                  [*argv, "--bert-model", "ns_bert.pt", "--device", "cpu"])
    checks.release_outputs()
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in tmp_path.iterdir()} == before


def test_a_stopped_tasks_time_is_added_to_its_resumed_runs(tmp_path):
    """glue_run.json: a run stopped by a signal records its seconds, unfinished; the run
    that resumes it (--checkpoint) adds its own; a new run (no --checkpoint) starts over."""
    import argparse
    import time

    from bertkit.training import distributed

    def stopped(args, info):
        time.sleep(0.05)
        raise distributed.Stopped(130)

    def finishes(args, info):
        time.sleep(0.05)

    def record():
        return json.loads((tmp_path / "glue_run.json").read_text())

    args = argparse.Namespace(parallel="None", no_progress=True, checkpoint="None")
    with pytest.raises(SystemExit) as exit_info:
        suite.run_task(stopped, args, "RTE", tmp_path, main_rank=True)
    assert exit_info.value.code == 130
    first = record()
    assert first["finished"] is False and first["seconds"] >= 0.05 and first["task"] == "RTE"
    args.checkpoint = str(tmp_path / "glue_state.pt")
    suite.run_task(finishes, args, "RTE", tmp_path, main_rank=True)
    assert record()["finished"] is True
    assert record()["seconds"] >= first["seconds"] + 0.05
    args.checkpoint = "None"
    suite.run_task(lambda args, info: None, args, "RTE", tmp_path, main_rank=True)
    assert record()["seconds"] < first["seconds"]  # no sleep, and nothing added
