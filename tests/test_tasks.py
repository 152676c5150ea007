"""mlm_task.py and ns_task.py end to end, as a user runs them: a tiny mlm -> ns run on a
small WikiText-layout folder, the checkpoints it writes, and one clear line for bad input."""

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, one_thread, write_wikitext

from model import BertConfig, BertModel, MLMTask, NextSentenceTask

TINY = ["--device", "cpu", "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--nhead", "2",
        "--bptt", "32", "--batch_size", "8", "--epochs", "1"]
DATA = ["--data-dir", "D", "--dataset", "WikiText2"]
# Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's
# spinning threads make each step 10-100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CPU = torch.device("cpu")


def run(script, *flags, cwd):
    return subprocess.run([sys.executable, str(REPO / script), *flags], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def zipf_lines(n_lines, seed, n_words=30, length=30):
    """Lines of 30 words drawn with probability ~ 1/rank^1.5: a unigram entropy of about
    2.1 nats against ln(35) = 3.6 for a model that has learned nothing."""
    rng = random.Random(seed)
    words = [f"w{k}" for k in range(n_words)]
    weights = [1 / (k + 1) ** 1.5 for k in range(n_words)]
    return [" ".join(rng.choices(words, weights, k=length)) for _ in range(n_lines)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder where mlm_task.py and then ns_task.py ran: (folder, mlm result, ns result)."""
    work = tmp_path_factory.mktemp("run")
    write_wikitext(work / "D", zipf_lines(1000, 0), zipf_lines(60, 1), zipf_lines(60, 2))
    mlm = run("mlm_task.py", *DATA, *TINY, cwd=work)
    assert mlm.returncode == 0, mlm.stdout + mlm.stderr
    ns = run("ns_task.py", "--bert-model", "mlm_bert.pt", *DATA, *TINY,
             "--min_sentence_len", "20", cwd=work)
    assert ns.returncode == 0, ns.stdout + ns.stderr
    return work, mlm, ns


def test_mlm_writes_its_outputs(trained):
    work, mlm, _ = trained
    assert "End of training" in mlm.stdout
    for name in ("mlm_bert.pt", "full_mlm_model.pt", "mlm_loss.txt", "bert_vocab.pt"):
        assert (work / name).is_file(), name
    assert "test loss" in (work / "mlm_loss.txt").read_text()
    assert "Traceback" not in mlm.stderr


def test_ns_writes_its_outputs(trained):
    work, _, ns = trained
    assert "End of training" in ns.stdout and "test accuracy" in ns.stdout
    for name in ("ns_bert.pt", "ns_model.pt", "ns_loss.txt"):
        assert (work / name).is_file(), name


@pytest.mark.parametrize("name, kind, module", [
    ("mlm_bert.pt", "encoder", BertModel), ("full_mlm_model.pt", "mlm", MLMTask),
    ("ns_bert.pt", "encoder", BertModel), ("ns_model.pt", "ns", NextSentenceTask),
    ("mlm_state.pt", "state", MLMTask), ("ns_state.pt", "state", NextSentenceTask),
])
def test_checkpoints_load_weights_only_with_config_and_vocab(trained, name, kind, module):
    work, _, _ = trained
    ckpt = torch.load(work / name, weights_only=True)
    assert ckpt["kind"] == kind
    config = BertConfig.from_dict(ckpt["config"])
    assert (config.emsize, config.nhid, config.nlayers, config.nhead) == (32, 64, 2, 2)
    vocab = ckpt["vocab"]
    assert vocab[:5] == ["<unk>", "<pad>", "<MASK>", "<cls>", "<sep>"]
    assert len(vocab) == config.vocab_size == 35
    # The saved config alone rebuilds the model the weights belong to.
    module(config).load_state_dict(ckpt["model"], strict=True)


def test_ns_bert_holds_the_trained_pooler_and_mlm_bert_none(trained):
    """ns_bert.pt carries the pooler ns_task.py trained (a classifier fine-tuned from it
    starts there); MLM pretraining trains no pooler, so mlm_bert.pt has none."""
    work, _, _ = trained
    ns_bert = torch.load(work / "ns_bert.pt", weights_only=True)
    ns_model = torch.load(work / "ns_model.pt", weights_only=True)["model"]
    assert sorted(ns_bert["pooler"]) == ["bias", "weight"]
    for name, tensor in ns_bert["pooler"].items():
        assert torch.equal(tensor, ns_model[f"linear_layer.{name}"]), name
    assert "pooler" not in torch.load(work / "mlm_bert.pt", weights_only=True)


def test_ns_keeps_the_mlm_vocab(trained):
    work, _, _ = trained
    mlm = torch.load(work / "mlm_bert.pt", weights_only=True)
    ns = torch.load(work / "ns_bert.pt", weights_only=True)
    assert ns["vocab"] == mlm["vocab"] and ns["config"] == mlm["config"]


def test_mlm_training_loss_drops(trained):
    work, mlm, _ = trained
    losses = [float(x) for x in re.findall(r"\| loss +([\d.]+) \|", mlm.stdout)]
    assert len(losses) >= 5
    test_loss = float(re.search(r"End of training \| test loss +([\d.]+)", mlm.stdout).group(1))
    vocab_size = len(torch.load(work / "bert_vocab.pt", weights_only=True)["itos"])
    # An untrained model scores about ln(vocab) = 3.56; the corpus' unigram entropy is 2.1.
    assert test_loss < math.log(vocab_size) - 1.0, mlm.stdout
    assert losses[-1] < losses[0] - 0.3, losses


###############################################################################
# Bad input: one line `error: ...`, a non-zero exit, no traceback, no file touched
###############################################################################


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts}


def _garbage(work, head=b""):
    """4,000 bytes drawn with a fixed seed (the same file every run), after `head`."""
    (work / "garbage.pt").write_bytes(head + random.Random(19).randbytes(4000 - len(head)))


def _pickle_like_garbage(work):
    # A pickle PROTO opcode with protocol 82: torch warned before failing.
    _garbage(work, b"\x80\x52")


def _tiny_corpus(work):
    write_wikitext(work / "D", ["w1 w2 w3"] * 3, ["w1 w2"] * 20, ["w1 w2"] * 20)


def _non_utf8(work):
    (work / "D" / "wikitext-2" / "wiki.train.tokens").write_bytes(b"w1 w2\n\xff\xfe\xfd w3\n")


NS = ["ns_task.py", *DATA, *TINY, "--min_sentence_len", "20"]
MLM = ["mlm_task.py", *DATA, *TINY]

BAD_INPUTS = {
    "missing --bert-model": (None, [*NS, "--bert-model", "missing.pt"], "missing.pt"),
    "--bert-model not a checkpoint": (_garbage, [*NS, "--bert-model", "garbage.pt"], "garbage.pt"),
    "config does not fit the flags": (
        # --overwrite: the folder's ns_bert.pt is another run's, refused before this
        None, [*NS, "--bert-model", "mlm_bert.pt", "--emsize", "48", "--overwrite"],
        "--emsize 48"),
    "unknown --dataset": (None, [*MLM, "--dataset", "NoSuchSet"], "NoSuchSet"),
    "--next-sentence without room for a pair": (
        None, [*MLM, "--next-sentence", "--bptt", "4"], "--next-sentence: --bptt 4"),
    "fewer tokens than one batch": (_tiny_corpus, MLM, "fewer than one batch"),
    "non-UTF-8 data file": (_non_utf8, MLM, "wiki.train.tokens is not UTF-8"),
    "--checkpoint is a model, not a state file": (
        None, [*MLM, "--checkpoint", "mlm_bert.pt"], "not a state file"),
    "--checkpoint is garbage": (_garbage, [*MLM, "--checkpoint", "garbage.pt"], "garbage.pt"),
    "--save-vocab is garbage": (_garbage, [*MLM, "--save-vocab", "garbage.pt"], "not a vocab file"),
    "--save-vocab is pickle-like garbage": (
        _pickle_like_garbage, [*MLM, "--save-vocab", "garbage.pt"], "not a vocab file"),
    "--checkpoint is pickle-like garbage": (
        _pickle_like_garbage, [*MLM, "--checkpoint", "garbage.pt"], "garbage.pt"),
    "--bert-model is pickle-like garbage": (
        _pickle_like_garbage, [*NS, "--bert-model", "garbage.pt"], "garbage.pt"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(trained, tmp_path, case):
    prepare, command, mentioned = BAD_INPUTS[case]
    work = tmp_path / "work"
    shutil.copytree(trained[0], work, ignore=shutil.ignore_patterns(".cache"))
    if prepare:
        prepare(work)
    before = snapshot(work)
    result = run(*command, cwd=work)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert mentioned in lines[0]
    assert snapshot(work).items() >= before.items()  # every existing file as it was
    new_files = set(snapshot(work)) - set(before)
    assert not {f for f in new_files if Path(f).parent == Path(".")}, new_files


###############################################################################
# One folder per run, the length trained on, evaluation alone: in this process, the
# way `python SCRIPT FLAGS` runs (a subprocess would spend seconds importing torch)
###############################################################################


def run_here(script, argv, cwd):
    """The script's main on `argv` (flags.parse_args, as its __main__), in `cwd`: its stdout."""
    from bertkit import checks, flags, mains

    module = __import__(script.removesuffix(".py"))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), one_thread():
        patch.chdir(cwd)
        args = flags.parse_args(module.get_parser(), [str(a) for a in argv])
        mains.launch(module.main, args)
        checks.release_outputs()  # as the process's exit would
    return out.getvalue()


def files_in(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


SMALL = ["--device", "cpu", "--emsize", "32", "--nhid", "64", "--nlayers", "1", "--nhead", "2",
         "--batch_size", "8", "--epochs", "1", "--no-progress", *DATA]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mlm_task.py at --bptt 16 into runs/mlm, then ns_task.py at --bptt 24 into runs/ns,
    as the quick steps' NS (AdamW, a loss line every few steps), in one folder:
    (folder, mlm stdout, ns stdout)."""
    work = tmp_path_factory.mktemp("runs")
    write_wikitext(work / "D", zipf_lines(300, 0), zipf_lines(40, 1), zipf_lines(40, 2))
    mlm = run_here("mlm_task.py", [*SMALL, "--bptt", 16, "--max-steps", 20,
                                   "--output-dir", "runs/mlm"], work)
    ns = run_here("ns_task.py", [*SMALL, "--bptt", 24, "--bert-model", "runs/mlm/mlm_bert.pt",
                                 "--min_sentence_len", 20, "--log-interval", 5,
                                 "--optimizer", "adamw", "--lr", "1e-3",
                                 "--output-dir", "runs/ns"], work)
    return work, mlm, ns


def test_every_output_of_a_run_goes_to_its_output_dir(runs):
    work, mlm, ns = runs
    assert sorted(files_in(work / "runs" / "mlm")) == [
        "bert_vocab.pt", "full_mlm_model.pt", "mlm_bert.pt", "mlm_loss.txt", "mlm_metrics.jsonl",
        "mlm_state.pt"]
    assert sorted(files_in(work / "runs" / "ns")) == [
        "bert_vocab.pt", "ns_bert.pt", "ns_loss.txt", "ns_metrics.jsonl", "ns_model.pt",
        "ns_state.pt"]
    assert sorted(p.name for p in work.iterdir()) == ["D", "runs"]  # nothing beside them
    assert "wrote runs/mlm/mlm_bert.pt (encoder), runs/mlm/full_mlm_model.pt (best model)" in mlm
    state = torch.load(work / "runs/ns/ns_state.pt", weights_only=True)
    assert state["args"]["output_dir"] == "runs/ns" and state["best_model"] == "runs/ns/ns_model.pt"


def test_checkpoints_record_the_longest_sequence_trained_on(runs):
    work, mlm, ns = runs
    for name, length in (("mlm/mlm_bert.pt", 16), ("mlm/full_mlm_model.pt", 16),
                         ("mlm/mlm_state.pt", 16), ("ns/ns_bert.pt", 24), ("ns/ns_model.pt", 24),
                         ("ns/ns_state.pt", 24)):
        config = torch.load(work / "runs" / name, weights_only=True)["config"]
        assert config["trained_len"] == length, name
    assert "warning" not in mlm
    warnings = [line for line in ns.splitlines() if line.startswith("warning")]
    assert warnings == ["warning: --bptt 24 is longer than the sequences of at most 16 tokens "
                        "runs/mlm/mlm_bert.pt was trained on: its position embeddings past 16 "
                        "were never learned (pretrain at --bptt 24, or give --bptt 16)"]


def test_a_checkpoint_without_the_record_still_loads_silently(runs, tmp_path):
    work = runs[0]
    ckpt = torch.load(work / "runs/mlm/mlm_bert.pt", weights_only=True)
    del ckpt["config"]["trained_len"]  # as written before the record existed
    torch.save(ckpt, tmp_path / "old.pt")
    shutil.copytree(work / "D", tmp_path / "D")
    out = run_here("ns_task.py", [*SMALL, "--bptt", 24, "--bert-model", "old.pt", "--max-steps",
                                  1, "--min_sentence_len", 20], tmp_path)
    assert "End of training" in out and "warning" not in out
    assert torch.load(tmp_path / "ns_bert.pt", weights_only=True)["config"]["trained_len"] == 24


def test_a_short_ns_run_logs_its_training_loss(runs):
    """The quick steps' NS (--log-interval below the steps of an epoch): loss lines in the
    log, rows in the metrics log for plot.py; 37 steps, one every 5."""
    work, _, ns = runs
    lines = re.findall(r"^\| epoch +1 \| +(\d+)/ +37 batches \| lr 0\.00100 \| .* \| loss +([\d.]+)",
                       ns, re.M)
    assert [int(step) for step, _ in lines] == [5, 10, 15, 20, 25, 30, 35]
    rows = [json.loads(line) for line in (work / "runs/ns/ns_metrics.jsonl").open()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 7 and all(0 < loss < 2 for loss in losses)


def test_evaluate_only_writes_the_metrics_log_and_nothing_else(runs):
    """The best model on the valid and test splits: the numbers of its training run's
    best validation and final test, and no file but the new metrics log."""
    work = runs[0]
    before = files_in(work)  # the token id caches beside the data included
    out = run_here("mlm_task.py", [*SMALL, "--bptt", 16, "--evaluate-only",
                                   "--bert-model", "runs/mlm/full_mlm_model.pt",
                                   "--output-dir", "runs/eval"], work)
    after = files_in(work)
    assert {name: after[name] for name in before} == before
    assert sorted(set(after) - set(before)) == ["runs/eval/mlm_metrics.jsonl"]
    assert "wrote runs/eval/mlm_metrics.jsonl (metrics)" in out
    rows = [json.loads(line) for line in (work / "runs/eval/mlm_metrics.jsonl").open()]
    assert [(row["step"], row["epoch"]) for row in rows] == [(0, 0), (0, 0)]
    trained = [json.loads(line) for line in (work / "runs/mlm/mlm_metrics.jsonl").open()]
    best_valid = min(row["valid_loss"] for row in trained if "valid_loss" in row)
    assert rows[0]["valid_loss"] == pytest.approx(best_valid, rel=1e-6)
    assert rows[1]["test_loss"] == pytest.approx(trained[-1]["test_loss"], rel=1e-6)
    assert rows[1]["test_tokens"] == trained[-1]["test_tokens"]

    out = run_here("ns_task.py", [*SMALL, "--bptt", 24, "--evaluate-only", "--min_sentence_len",
                                  20, "--bert-model", "runs/ns/ns_model.pt", "--eval-batches", 1,
                                  "--output-dir", "runs/eval"], work)
    rows = [json.loads(line) for line in (work / "runs/eval/ns_metrics.jsonl").open()]
    assert [row.get("valid_pairs", row.get("test_pairs")) for row in rows] == [8, 8]
    assert "| evaluation | valid loss" in out and "| evaluation | test loss" in out
    assert sorted(set(files_in(work)) - set(after)) == ["runs/eval/ns_metrics.jsonl"]


###############################################################################
# --next-sentence: BERT's two pretraining tasks at once
###############################################################################


def topic_lines(n_lines, seed, n_topics=6, words_per_topic=5, block=5):
    """Lines whose words come from one topic's own words, a topic for `block` lines in a
    row: a continuation shares its first part's topic, text from elsewhere mostly does
    not, so the next-sentence task can be learned."""
    rng = random.Random(seed)
    lines = []
    for start in range(0, n_lines, block):
        topic = rng.randrange(n_topics)
        words = [f"t{topic}w{k}" for k in range(words_per_topic)]
        lines += [" ".join(rng.choices(words, k=30)) for _ in range(min(block, n_lines - start))]
    return lines


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    """mlm_task.py --next-sentence on topic text: (folder, stdout)."""
    work = tmp_path_factory.mktemp("pairs")
    write_wikitext(work / "D", topic_lines(600, 0), topic_lines(60, 1), topic_lines(60, 2))
    out = run_here("mlm_task.py", [*SMALL, "--bptt", 24, "--next-sentence", "--optimizer",
                                   "adamw", "--lr", "3e-3", "--epochs", 6, "--log-interval", 10,
                                   "--output-dir", "pairs"], work)
    return work, out


def test_next_sentence_is_learned_beside_mlm(pair_run):
    """The log shows the MLM part's perplexity and the next-sentence accuracy, which rises
    from chance; the metrics log records both."""
    work, out = pair_run
    accuracies = [float(a) for a in re.findall(r"\| ns_accuracy +([\d.]+)%", out)]
    assert len(accuracies) >= 5 and "| ppl " in out
    # Chance is 50%; on text whose continuation shares its topic it climbs well above.
    assert max(accuracies[:2]) < 60 and sum(accuracies[-3:]) / 3 > 62, accuracies
    rows = [json.loads(line) for line in (work / "pairs/mlm_metrics.jsonl").open()]
    trained = [row for row in rows if "ns_accuracy" in row]
    assert all(row["loss"] > row["mlm_loss"] > 0 for row in trained)
    assert "test_ppl" in rows[-1]  # the MLM test on plain windows, as without the flag


def test_next_sentence_models_carry_the_trained_pooler(pair_run):
    """mlm_bert.pt and full_mlm_model.pt hold the pooler the next-sentence head trained;
    full_mlm_model.pt is still an MLM model (MLMTask loads it strictly), and a GLUE
    classifier or a continued pretraining starts from its pooler."""
    from bertkit import checkpoint
    from mlm_task import build_model
    from model import PreTrainingTask, SequenceClassificationTask

    work, _ = pair_run
    encoder = torch.load(work / "pairs/mlm_bert.pt", weights_only=True)
    full = torch.load(work / "pairs/full_mlm_model.pt", weights_only=True)
    state = torch.load(work / "pairs/mlm_state.pt", weights_only=True)
    config = BertConfig.from_dict(full["config"])
    MLMTask(config).load_state_dict(full["model"], strict=True)
    PreTrainingTask(config).load_state_dict(state["model"], strict=True)
    assert sorted(encoder["pooler"]) == ["bias", "weight"]
    for name, tensor in encoder["pooler"].items():
        assert torch.equal(tensor, full["pooler"][name])
    fresh = PreTrainingTask(config).pooler.weight
    assert not torch.equal(encoder["pooler"]["weight"], fresh)
    for path in ("pairs/mlm_bert.pt", "pairs/full_mlm_model.pt"):
        ckpt = checkpoint.load_checkpoint(str(work / path), "--bert-model")
        weights = checkpoint.starting_weights(ckpt, "glue", path)
        classifier = checkpoint.task_model(SequenceClassificationTask, config, weights, path,
                                           CPU, n_labels=2)
        assert torch.equal(classifier.pooler.weight, encoder["pooler"]["weight"]), path
    ckpt = checkpoint.load_checkpoint(str(work / "pairs/full_mlm_model.pt"), "--bert-model")
    args = argparse.Namespace(next_sentence=True, bert_model="full_mlm_model.pt")
    model = build_model(args, config, checkpoint.starting_weights(ckpt, "mlm", "f"), CPU)
    assert torch.equal(model.pooler.weight, encoder["pooler"]["weight"])
    assert torch.equal(model.mlm_head.weight, full["model"]["mlm_head.weight"])
