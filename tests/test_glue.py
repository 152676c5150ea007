"""glue_task.py end to end, as a user runs it, on tiny encoders and small GLUE-layout files
of a rule a tiny model learns (the second sentence's last word gives the label): the run
and its files, --predict, resume after Ctrl-C, two processes under torchrun, your own
files (regression), and one clear line for every bad input."""

import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REAL_RTE, REPO, absent_reason, hashes, one_error_line

import glue_task
from bertkit import checkpoint, checks, mains, recipes
from bertkit import flags as cli
from bertkit.glue import classifier, sentences
from bertkit.glue import tasks as glue
from bertkit.glue.classifier import Rows
from bertkit.text import tokenizer as tok
from model import BertConfig, NextSentenceTask, SequenceClassificationTask

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
WORDS = [f"w{i}" for i in range(40)]
# The last word of the second sentence says the label.
MARKS = {"entailment": "yes", "not_entailment": "no", "contradiction": "no", "neutral": "maybe"}


def pairs(n, labels, seed):
    """(sentence1, sentence2, label) of n examples: random words, then the label's mark."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(labels)
        first = " ".join(rng.choices(WORDS, k=rng.randrange(3, 12)))
        second = " ".join(rng.choices(WORDS, k=rng.randrange(1, 6)) + [MARKS[label]])
        rows.append((first, second, label))
    return rows


def write_task(folder, name, files, labels, header="index\tsentence1\tsentence2\tlabel"):
    """<folder>/glue/<name>/<file> for {file: (number of examples, seed)}."""
    path = Path(folder) / "glue" / name
    path.mkdir(parents=True, exist_ok=True)
    for file, (n, seed) in files.items():
        lines = [header] + [f"{i}\t{a}\t{b}\t{label}"
                            for i, (a, b, label) in enumerate(pairs(n, labels, seed))]
        (path / file).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Tiny models gain nothing from a second thread, and on a busy machine spinning OpenMP
# threads make the runs in this process many times slower.
pytestmark = pytest.mark.usefixtures("single_thread")


def write_encoders(folder, nlayers):
    """Two tiny encoders of the task's words in `folder`: ns_bert.pt with a pooler,
    mlm_bert.pt without."""
    vocab = tok.Vocab(list(tok.SPECIALS) + WORDS + sorted(set(MARKS.values())))
    config = BertConfig(vocab_size=len(vocab), emsize=32, nhead=2, nhid=64, nlayers=nlayers,
                        dropout=0.1, max_len=64, pad_id=vocab.pad_id)
    torch.manual_seed(0)
    ns = NextSentenceTask(config)
    checkpoint.save_encoder(ns, config, vocab, folder / "ns_bert.pt")
    checkpoint.save_model("encoder", ns.bert_model, config, vocab, folder / "mlm_bert.pt")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with two tiny encoders of the task's words (ns_bert.pt with a pooler,
    mlm_bert.pt without), an RTE-layout and an MNLI-layout data folder."""
    folder = tmp_path_factory.mktemp("glue")
    write_encoders(folder, nlayers=2)
    rte = ["entailment", "not_entailment"]
    write_task(folder / "D", "RTE", {"train.tsv": (160, 0), "dev.tsv": (40, 1),
                                     "test.tsv": (12, 2)}, rte)
    nli = ["contradiction", "entailment", "neutral"]
    header = "index\tsentence1\tsentence2\tgold_label"
    write_task(folder / "D", "MNLI", {"train.tsv": (96, 3), "dev_matched.tsv": (30, 4),
                                      "dev_mismatched.tsv": (20, 5)}, nli, header)
    return folder


def run(*args, cwd, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"] if torchrun else [sys.executable]
    return subprocess.run([*launcher, str(REPO / "glue_task.py"), *map(str, args)], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=300)


# The RTE run: learned in 3 epochs of 20 steps at a tiny model's learning rate, validated
# every 8 steps on a sample of 2 batches, the best model then scored on all of dev.
RTE_RUN = ["--bert-model", "../ns_bert.pt", "--task", "rte", "--data-dir", "../D",
           "--device", "cpu", "--lr", "5e-3", "--batch_size", 8, "--epochs", 3, "--bptt", 32,
           "--eval-every", 8, "--eval-batches", 2, "--log-interval", 1, "--no-progress",
           "--test-file", "../D/glue/RTE/test.tsv"]


@pytest.fixture(scope="module")
def rte(work):
    folder = work / "rte"
    folder.mkdir()
    result = run(*RTE_RUN, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    return folder, result.stdout


def metrics_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_rte_run_learns_and_writes_every_file(rte, work):
    folder, out = rte
    assert "head: BERT's pooler from ../ns_bert.pt, a new classifier of 2 labels" in out
    end = re.search(r"\| End of training \| test loss +([\d.]+) \| test accuracy ([\d.]+)% \| "
                    r"scored 40 examples\n", out)
    assert end, out
    assert float(end[2]) >= 90, out  # the rule is learned (chance: about 50%)
    rows = metrics_rows(folder / "glue_metrics.jsonl")
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 60 and sum(losses[-10:]) < sum(losses[:10]) - 2
    valid = [row for row in rows if "valid_accuracy" in row]
    # --eval-every 8 and each epoch's end (20 steps an epoch), on a sample of 2 batches.
    assert [row["step"] for row in valid] == [8, 16, 20, 24, 32, 40, 48, 56, 60]
    assert {row["valid_examples"] for row in valid} == {16}
    test = rows[-1]
    assert list(test) == ["step", "epoch", "test_loss", "test_accuracy", "test_examples"]
    assert test["test_accuracy"] == pytest.approx(float(end[2]), abs=0.01)
    # The dev predictions: every dev row in file order, the label strings; the test file's
    # under GLUE's submission name.
    dev = (work / "D" / "glue" / "RTE" / "dev.tsv").read_text().splitlines()
    predicted = (folder / "glue_predictions.tsv").read_text().splitlines()
    assert predicted[0] == "index\tprediction" and len(predicted) == len(dev)
    right = sum(p.split("\t") == [d.split("\t")[0], d.split("\t")[3]]
                for p, d in zip(predicted[1:], dev[1:]))
    assert right / 40 * 100 == pytest.approx(test["test_accuracy"])
    submission = (folder / "RTE.tsv").read_text().splitlines()
    assert submission[0] == "index\tprediction" and len(submission) == 13
    assert {line.split("\t")[1] for line in submission[1:]} <= {"entailment", "not_entailment"}
    saved = torch.load(folder / "glue_model.pt", weights_only=True)
    assert saved["kind"] == "glue" and saved["labels"] == ["entailment", "not_entailment"]
    assert saved["task"] == "RTE" and saved["bptt"] == 32
    assert "glue_model.pt (best model), glue_predictions.tsv (predictions), RTE.tsv" in out


def test_predict_a_pair_and_a_dev_file(rte, work, monkeypatch, capsys):
    folder, out = rte
    monkeypatch.chdir(folder)
    model = ["--predict", "--model", "glue_model.pt", "--device", "cpu"]
    mains.launch(glue_task.main, cli.parse_args(glue_task.get_parser(), [
        *model, "--sentence", "w1 w2 w3", "--sentence2", "w4 yes"]))
    line = json.loads(capsys.readouterr().out)
    assert line["label"] == "entailment" and list(line["probabilities"]) == [
        "entailment", "not_entailment"]
    assert sum(line["probabilities"].values()) == pytest.approx(1, abs=1e-5)
    # The dev file scored again: the End of training's numbers and predictions.
    mains.launch(glue_task.main, cli.parse_args(glue_task.get_parser(), [
        *model, "--dev-file", "../D/glue/RTE/dev.tsv", "--predictions", "again.tsv"]))
    again = capsys.readouterr().out
    test = metrics_rows("glue_metrics.jsonl")[-1]
    assert f"dev accuracy {test['test_accuracy']:.2f}%" in again
    assert Path("again.tsv").read_text() == Path("glue_predictions.tsv").read_text()
    checks.release_outputs()


def test_a_rows_logits_do_not_depend_on_its_batch(rte):
    """Padding changes nothing: each dev row's logits alone and in batches of 8 (padded to
    the longest) agree; and a training batch is cut to its longest row."""
    folder, _ = rte
    found = classifier.load_classifier(str(folder / "glue_model.pt"))
    dev = glue.read_task_file(folder.parent / "D" / "glue" / "RTE" / "dev.tsv",
                              glue.TASKS["RTE"], "dev")
    rows = Rows.of(dev, found.vocab, 32, found.labels)
    assert len(set(rows.encoded.lengths.tolist())) > 5  # rows of many lengths
    alone, _ = classifier.score(found.model, rows, found.vocab.pad_id, 1, torch.device("cpu"))
    batched, loss_sum = classifier.score(found.model, rows, found.vocab.pad_id, 8,
                                         torch.device("cpu"))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    batch = sentences.pair_batch(rows.encoded, rows.labels, found.vocab.pad_id, 0,
                                 torch.arange(8))
    assert batch["inputs"].shape[1] == int(rows.encoded.lengths[:8].max())


def test_ctrl_c_then_resume_gives_the_uninterrupted_model_bitwise(rte, work):
    folder = work / "interrupted"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, str(REPO / "glue_task.py"), *map(str, RTE_RUN)],
                            cwd=folder, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # interrupt once training is under way
        if line.startswith("| epoch"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "stopped by a signal" in rest and "End of training" not in rest
    resumed = run("--checkpoint", "glue_state.pt", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from glue_state.pt" in resumed.stdout
    a = torch.load(rte[0] / "glue_model.pt", weights_only=True)["model"]
    b = torch.load(folder / "glue_model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (folder / "RTE.tsv").read_text() == (rte[0] / "RTE.tsv").read_text()


def test_mnli_under_torchrun_scores_both_dev_sets_as_one_process(work):
    """Two processes (torchrun, gloo): one End of training, MNLI's matched and mismatched
    dev sets both scored (_mm) and predicted, the scores those of one process scoring the
    saved model; the best model's scores are reused for the test, not computed again."""
    folder = work / "mnli"
    folder.mkdir()
    result = run("--bert-model", "../mlm_bert.pt", "--task", "MNLI", "--data-dir", "../D",
                 "--device", "cpu", "--lr", "2e-3", "--batch_size", 8, "--epochs", 1,
                 "--bptt", 32, "--parallel", "DDP", "--no-progress", cwd=folder, torchrun=True)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("End of training") == 1 and "2 process(es)" in out
    assert "a new pooler (../mlm_bert.pt has none" in out
    assert "test: the best model's scores of every dev example" in out
    test = metrics_rows(folder / "glue_metrics.jsonl")[-1]
    assert test["test_examples"] == 30 and test["test_examples_mm"] == 20
    assert {"test_loss_mm", "test_accuracy_mm"} <= set(test)
    for name, n in (("glue_predictions.tsv", 30), ("glue_predictions_mm.tsv", 20)):
        assert len((folder / name).read_text().splitlines()) == n + 1
    found = classifier.load_classifier(str(folder / "glue_model.pt"))
    assert found.task.name == "MNLI" and found.labels == ("contradiction", "entailment", "neutral")
    for suffix, file in (("", "dev_matched.tsv"), ("_mm", "dev_mismatched.tsv")):
        examples = glue.read_task_file(work / "D" / "glue" / "MNLI" / file, found.task, "dev")
        scores, _ = classifier.evaluate(found.model, Rows.of(examples, found.vocab, 32,
                                                             found.labels),
                                        found.task.metrics, found.vocab.pad_id, 5,
                                        torch.device("cpu"))
        assert scores["accuracy"] == pytest.approx(test["test_accuracy" + suffix])
        assert scores["loss"] == pytest.approx(test["test_loss" + suffix], rel=1e-5)


def test_your_own_jsonl_files_train_a_regression_head(work, tmp_path, monkeypatch, capsys):
    """--text-columns and --regression on .jsonl files: one output trained with the squared
    error, scored by Pearson and Spearman, predictions written as %.3f."""
    rng = random.Random(0)
    for name, n in (("train", 64), ("dev", 16)):
        lines = []
        for i in range(n):
            score = rng.randrange(6)
            text = " ".join(rng.choices(WORDS[:10], k=3) + [WORDS[10 + score]])
            lines.append(json.dumps({"id": i, "review": text, "stars": score}))
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    mains.launch(glue_task.main, cli.parse_args(glue_task.get_parser(), list(map(str, [
        "--bert-model", work / "ns_bert.pt", "--train-file", "train.jsonl", "--dev-file",
        "dev.jsonl", "--text-columns", "review", "--label-column", "stars", "--regression",
        "--device", "cpu", "--lr", "1e-2", "--batch_size", 8, "--epochs", 8, "--bptt", 16,
        "--no-progress"]))))
    out = capsys.readouterr().out
    assert "a new classifier of one output (regression)" in out
    end = re.search(r"End of training \| test loss +([\d.]+) \| test pearson ([-\d.]+) \| "
                    r"test spearmanr ([-\d.]+) \| scored 16 examples", out)
    assert end, out
    assert float(end[2]) > 50  # learned: a correlation of 0.5 at least (x100)
    saved = torch.load("glue_model.pt", weights_only=True)
    assert saved["labels"] is None and saved["task"] is None
    assert saved["model"]["classifier.weight"].shape[0] == 1
    predicted = Path("glue_predictions.tsv").read_text().splitlines()
    assert len(predicted) == 17 and re.fullmatch(r"0\t-?\d+\.\d{3}", predicted[1])
    checks.release_outputs()


###############################################################################
# Bad input: one line, exit 2, before any training, nothing on disk changed
###############################################################################


@pytest.fixture
def bad_inputs(work, rte, tmp_path):
    """A folder with files for the cases below, and copies of the run's models."""
    for name in ("ns_bert.pt", "mlm_bert.pt"):
        (tmp_path / name).write_bytes((work / name).read_bytes())
    (tmp_path / "glue_model.pt").write_bytes((rte[0] / "glue_model.pt").read_bytes())
    (tmp_path / "glue_predictions.tsv").write_text("old")
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "own.tsv").write_text("text\tlabel\nw1 w2\ta\nw3\tb\n")
    (tmp_path / "own_dev.tsv").write_text("text\tlabel\nw1\ta\nw4 w5\tc\n")
    sts = write_task(tmp_path / "D", "STS-B", {}, [])
    (sts / "train.tsv").write_text("index\tsentence1\tsentence2\tscore\n0\tw1\tw2\t3.2\n"
                                   "1\tw3\tw4\tabout four\n")
    cola = write_task(tmp_path / "D", "CoLA", {}, [])
    (cola / "train.tsv").write_text("src\t1\t\tw1 w2\nsrc\t0\t*\tw2 w1\n")
    (tmp_path / "sst2_dev.tsv").write_text("sentence\tlabel\nw1 w2\t1\n")
    # GLUE's test files where --predict's default outputs would be: an RTE model names its
    # predictions of a file RTE.tsv, and of the diagnostic set AX.tsv.
    for name in ("AX.tsv", "RTE.tsv", "test.tsv"):
        (tmp_path / name).write_bytes((work / "D" / "glue" / "RTE" / "test.tsv").read_bytes())
    (tmp_path / "dev.tsv").write_bytes((work / "D" / "glue" / "RTE" / "dev.tsv").read_bytes())
    return tmp_path


# --overwrite: the folder holds the RTE run's glue_model.pt, of other settings, which a run
# is refused to replace; these cases test the errors after that check.
COMMON = ["--bert-model", "ns_bert.pt", "--device", "cpu", "--data-dir", "D", "--bptt", "32",
          "--overwrite"]
BAD_INPUTS = {
    "unknown --task": ([*COMMON, "--task", "GLUEY"], "--task GLUEY: not a GLUE task"),
    "--text-columns names no column": (
        [*COMMON, "--train-file", "own.tsv", "--dev-file", "own_dev.tsv", "--text-columns",
         "review"], "own.tsv has no column 'review' (its columns: text, label)"),
    "an empty train file": (
        [*COMMON, "--train-file", "empty.tsv", "--dev-file", "own_dev.tsv", "--text-columns",
         "text"], "empty.tsv is empty"),
    "a non-numeric STS-B score": ([*COMMON, "--task", "stsb"],
                                  "train.tsv, line 3: score 'about four' is not a number"),
    "a dev label unseen in training": (
        [*COMMON, "--train-file", "own.tsv", "--dev-file", "own_dev.tsv", "--text-columns",
         "text"], "own_dev.tsv, line 3: label 'c' is not one of the training labels (a, b)"),
    "a dev file of another task": (
        [*COMMON, "--task", "CoLA", "--dev-file", "sst2_dev.tsv"],
        "sst2_dev.tsv, line 1: 2 fields where CoLA's dev file has 4; is it a file of another "
        "task?"),
    "--predict without --sentence": (["--predict", "--device", "cpu"],
                                     "--predict needs --sentence"),
    "--model is an MLM checkpoint": (["--predict", "--model", "mlm_bert.pt", "--sentence", "w1",
                                      "--device", "cpu"],
                                     "--model mlm_bert.pt: not a sequence classifier"),
    "--model of other labels": (["--predict", "--model", "glue_model.pt", "--task", "MNLI",
                                 "--sentence", "w1", "--device", "cpu"],
                                "its labels are entailment, not_entailment, not MNLI's"),
    "--regression for a classification task": ([*COMMON, "--task", "RTE", "--regression"],
                                               "--regression: RTE is a classification task"),
    "a pair model given one sentence": (["--predict", "--model", "glue_model.pt", "--sentence",
                                         "w1 w2", "--device", "cpu"],
                                        "--model glue_model.pt was trained on sentence pairs "
                                        "(RTE): give --sentence2 too"),
    "the missing model of the task given": (
        ["--predict", "--model", "nope/glue_model.pt", "--task", "QQP", "--sentence", "w1",
         "--device", "cpu"], "--model nope/glue_model.pt: no such file (python glue_task.py "
                             "--bert-model ns_bert.pt --task QQP writes it)"),
    # every output of every mode against every input: --predict's are named by the model's
    # task (RTE), with or without --task
    "--predict of the diagnostic set into itself": (
        ["--predict", "--model", "glue_model.pt", "--test-file", "AX.tsv", "--device", "cpu"],
        "--test-predictions (1) AX.tsv is also --test-file (1): writing it would overwrite "
        "that input"),
    "--predict of RTE.tsv into itself": (
        ["--predict", "--model", "glue_model.pt", "--test-file", "test.tsv", "RTE.tsv",
         "--device", "cpu"], "--test-predictions (1) RTE.tsv is also --test-file (2)"),
    "--predict's dev predictions over the dev file": (
        ["--predict", "--model", "glue_model.pt", "--dev-file", "dev.tsv", "--predictions",
         "dev.tsv", "--device", "cpu"], "--predictions dev.tsv is also --dev-file"),
    "--predict's test predictions over the model": (
        ["--predict", "--model", "glue_model.pt", "--test-file", "test.tsv",
         "--test-predictions", "glue_model.pt", "--device", "cpu"],
        "--test-predictions (1) glue_model.pt is also --model"),
    "--predict's predictions over another model": (
        ["--predict", "--model", "glue_model.pt", "--dev-file", "dev.tsv", "--predictions",
         "ns_bert.pt", "--device", "cpu"],
        "--predictions ns_bert.pt holds a model, which this run's output would replace"),
    "a training run's test predictions over its test file": (
        [*COMMON, "--task", "RTE", "--test-file", "RTE.tsv"],
        "--test-predictions (1) RTE.tsv is also --test-file (1)"),
    "a model of another task": (
        [*COMMON[:-1], "--task", "CoLA"], "--save glue_model.pt holds the model of another run"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_changes_nothing(case, bad_inputs, monkeypatch, capsys):
    argv, expected = BAD_INPUTS[case]
    monkeypatch.chdir(bad_inputs)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    before = hashes(bad_inputs)
    out, line = one_error_line(glue_task, argv, capsys)
    assert expected in line, line
    assert "End of training" not in out and "| epoch" not in out
    assert hashes(bad_inputs) == before


def test_predict_names_its_files_by_the_models_task_and_writes_those_it_checked(
        bad_inputs, monkeypatch, capsys):
    """Without --task, an RTE model's predictions of AX.tsv and test.tsv go to AX.tsv and
    RTE.tsv in --output-dir, the names the checks locked: the inputs stay as they were."""
    monkeypatch.chdir(bad_inputs)
    before = hashes(bad_inputs)
    mains.launch(glue_task.main, cli.parse_args(glue_task.get_parser(), [
        "--predict", "--model", "glue_model.pt", "--test-file", "AX.tsv", "test.tsv",
        "--output-dir", "sub", "--device", "cpu"]))
    checks.release_outputs()
    out = capsys.readouterr().out
    assert "wrote sub/AX.tsv: 12 predictions for AX.tsv" in out
    assert "wrote sub/RTE.tsv: 12 predictions for test.tsv" in out
    assert sorted(os.listdir(bad_inputs / "sub")) == ["AX.tsv", "RTE.tsv"]
    assert {k: v for k, v in hashes(bad_inputs).items() if not k.startswith("sub/")} == before


def test_the_rte_run_says_what_it_is_in_its_lines_state_and_model(rte):
    """Its training lines give the accuracy of the training batches, not a perplexity; its
    state file records its task; its model, that it reads pairs, and the run."""
    folder, out = rte
    lines = [line for line in out.splitlines() if line.startswith("| epoch")]
    assert lines and all(re.search(r"\| loss +[\d.]+ \| accuracy +[\d.]+%$", line)
                         for line in lines), lines[:3]
    assert "ppl" not in out
    rows = metrics_rows(folder / "glue_metrics.jsonl")
    assert all(0 <= row["accuracy"] <= 100 for row in rows if "loss" in row)
    state = torch.load(folder / "glue_state.pt", weights_only=True)
    assert (state["script"], state["task"], state["finished"]) == ("glue_task.py", "RTE", True)
    saved = torch.load(folder / "glue_model.pt", weights_only=True)
    assert saved["pairs"] is True and saved["run"]["id"] == state["args"]["run_id"]
    assert saved["run"]["settings"]["task"] == "rte"


def test_classifier_head_from_a_classifier_of_other_labels_keeps_its_pooler():
    """--bert-model glue_model.pt of another task: its encoder and pooler, a new classifier."""
    config = BertConfig(vocab_size=20, emsize=16, nhead=2, nhid=32, nlayers=1, max_len=16)
    torch.manual_seed(0)
    mnli = SequenceClassificationTask(config, 3)
    ckpt = {"kind": "glue", "model": mnli.state_dict(), "labels": ["a", "b", "c"]}
    start = checkpoint.starting_weights(ckpt, "glue", "mnli.pt")
    lines = []
    weights = classifier.start_head(start, ("x", "y"), "mnli.pt", lines.append)
    assert lines == ["head: BERT's pooler from mnli.pt, a new classifier of 2 labels"]
    rte = checkpoint.task_model(SequenceClassificationTask, config, weights, "mnli.pt",
                                torch.device("cpu"), n_labels=2)
    assert torch.equal(rte.pooler.weight, mnli.pooler.weight)
    assert torch.equal(rte.bert_model.bert_embed.embed.weight, mnli.bert_model.bert_embed.embed.weight)
    same = classifier.start_head(start, ("a", "b", "c"), "mnli.pt", lines.append)
    assert same.part == "task" and lines[-1].startswith("head: mnli.pt's pooler and classifier")


@pytest.mark.skipif(not REAL_RTE.is_dir(), reason=absent_reason(REAL_RTE))
def test_real_rte_files_read_and_encode(work):
    vocab = tok.Vocab(list(tok.SPECIALS) + WORDS)
    for split in ("train", "dev"):
        examples = glue.read_task_file(REAL_RTE / f"{split}.tsv", glue.TASKS["RTE"], split)
        rows = Rows.of(examples, vocab, 128, glue.TASKS["RTE"].labels)
        assert len(rows.encoded) == {"train": 2490, "dev": 277}[split]
        assert int(rows.encoded.lengths.max()) <= 128


def test_recipe_bert_is_berts_glue_fine_tuning_and_the_command_line_wins():
    parse = glue_task.get_parser()
    args = cli.parse_args(parse, ["--recipe", "bert"])
    assert (args.optimizer, args.lr, args.weight_decay, args.schedule, args.warmup, args.clip,
            args.epochs, args.bptt, args.dropout, args.global_batch) == (
        "adamw", 2e-5, 0.01, "linear", 0.1, 1.0, 3, 128, 0.1, 32)
    recipes.split_global_batch(args, 2)
    assert (args.batch_size, args.grad_accum) == (16, 1)
    assert "dropout 0.1 (--recipe)" in recipes.recipe_summary(args, 2, 0.1)
    given = cli.parse_args(parse, ["--recipe", "bert", "--lr", "3e-5", "--dropout", "0.2"])
    assert (given.lr, given.dropout, given.epochs) == (3e-5, 0.2, 3)
    assert "dropout 0.2 (--dropout)" in recipes.recipe_summary(given, 1, 0.2)
    # Without --recipe: the same optimizer and schedule, the checkpoint's dropout, 32 a
    # process.
    plain = cli.parse_args(parse, [])
    assert (plain.optimizer, plain.lr, plain.weight_decay, plain.schedule, plain.warmup,
            plain.clip, plain.epochs, plain.batch_size, plain.bptt, plain.dropout) == (
        "adamw", 2e-5, 0.01, "linear", 0.1, 1.0, 3, 32, 128, None)


###############################################################################
# transformers folders in and out
###############################################################################


def test_an_exported_classifier_answers_in_transformers_as_the_predictions_file(
        rte, work, tmp_path, monkeypatch, capsys):
    """convert.py glue_model.pt OUT: transformers' text-classification pipeline gives each
    dev pair the label of the predictions file; and --model OUT (a
    BertForSequenceClassification folder) scores and predicts as glue_model.pt does."""
    transformers = pytest.importorskip("transformers")
    import convert

    folder, _ = rte
    convert.main([str(folder / "glue_model.pt"), str(tmp_path / "out")])
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "out"),
                                 device="cpu")
    dev = [line.split("\t") for line in
           (work / "D" / "glue" / "RTE" / "dev.tsv").read_text().splitlines()[1:]]
    answers = pipe([{"text": a, "text_pair": b} for _, a, b, _ in dev])
    predicted = [line.split("\t")[1] for line in
                 (folder / "glue_predictions.tsv").read_text().splitlines()[1:]]
    assert [answer["label"] for answer in answers] == predicted
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    mains.launch(glue_task.main, cli.parse_args(glue_task.get_parser(), [
        "--predict", "--model", "out", "--task", "RTE", "--device", "cpu", "--bptt", "32",
        "--dev-file", str(work / "D" / "glue" / "RTE" / "dev.tsv"), "--test-file",
        str(work / "D" / "glue" / "RTE" / "test.tsv")]))
    assert "wrote glue_predictions.tsv | dev loss" in capsys.readouterr().out
    assert Path("glue_predictions.tsv").read_text() == (folder / "glue_predictions.tsv").read_text()
    assert Path("RTE.tsv").read_text() == (folder / "RTE.tsv").read_text()
    checks.release_outputs()


def test_a_transformers_bert_folder_fine_tunes_from_its_pooler(work, tmp_path, monkeypatch,
                                                               capsys):
    """--bert-model FOLDER (a BertModel that save_pretrained wrote, pooler included): the
    classifier starts from its encoder and pooler; one step at warmup's lr 0 keeps them."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *sorted(set(MARKS.values()))]
    torch.manual_seed(0)
    theirs = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0))
    theirs.save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("".join(w + "\n" for w in words))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    capsys.readouterr()
    mains.launch(glue_task.main, cli.parse_args(glue_task.get_parser(), list(map(str, [
        "--bert-model", "bert", "--task", "RTE", "--data-dir", work / "D", "--device", "cpu",
        "--bptt", 32, "--batch_size", 8, "--max-steps", 1, "--no-progress"]))))
    out = capsys.readouterr().out
    assert "head: BERT's pooler from bert, a new classifier of 2 labels" in out
    assert "End of training" in out
    saved = torch.load("glue_model.pt", weights_only=True)["model"]
    assert torch.equal(saved["pooler.weight"], theirs.pooler.dense.weight)
    assert torch.equal(saved["bert_model.bert_embed.embed.weight"],
                       theirs.embeddings.word_embeddings.weight)
    checks.release_outputs()


def test_a_nan_main_metric_is_worse_than_any_number():
    """A diverged regression model's correlation is NaN (glue_metrics): never the best."""
    from bertkit.training import trainer

    assert trainer.best_score({"pearson": float("nan")}, ("pearson", "max")) == float("inf")
    assert trainer.best_score({"pearson": -99.0}, ("pearson", "max")) < float("inf")


def test_from_scratch_is_the_bert_models_architecture_and_vocabulary_with_fresh_weights(work):
    """The random-init control: --bert-model's shape and tokenizer, none of its weights."""
    folder = work / "scratch"
    folder.mkdir()
    result = run("--bert-model", "../ns_bert.pt", "--from-scratch", "--task", "rte",
                 "--data-dir", "../D", "--device", "cpu", "--batch_size", 8, "--bptt", 32,
                 "--epochs", 1, "--max-steps", 2, "--no-progress", cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("--from-scratch: the architecture (2 layers, hidden 32) and vocabulary of "
            "../ns_bert.pt, fresh weights") in result.stdout
    assert "from scratch (../ns_bert.pt's architecture and vocabulary)" in result.stdout
    pretrained = torch.load(work / "ns_bert.pt", weights_only=True)
    fresh = torch.load(folder / "glue_model.pt", weights_only=True)
    assert {**fresh["config"], "trained_len": None} == {**pretrained["config"], "trained_len": None}
    assert fresh["vocab"] == pretrained["vocab"]
    embedding = "bert_model.bert_embed.embed.weight"
    assert fresh["model"][embedding].shape == pretrained["model"][embedding[11:]].shape
    assert not torch.allclose(fresh["model"][embedding], pretrained["model"][embedding[11:]],
                              atol=0.05)
