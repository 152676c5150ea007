"""mlm_task.py and ns_task.py end to end, as a user runs them: a tiny mlm -> ns run on a
small WikiText-layout folder, the checkpoints it writes, and one clear line for bad input."""

import hashlib
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
from conftest import REPO, write_wikitext

from model import BertConfig, BertModel, MLMTask, NextSentenceTask

TINY = ["--device", "cpu", "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--nhead", "2",
        "--bptt", "32", "--batch_size", "8", "--epochs", "1"]
DATA = ["--data-dir", "D", "--dataset", "WikiText2"]
# Tiny models gain nothing from a second thread, and on a busy 2-core machine OpenMP's
# spinning threads make each step 10-100x slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


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
        None, [*NS, "--bert-model", "mlm_bert.pt", "--emsize", "48"], "--emsize 48"),
    "unknown --dataset": (None, [*MLM, "--dataset", "NoSuchSet"], "NoSuchSet"),
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
