"""Bad input and interruptions: one `error:` line, exit 2 (130 for Ctrl-C), no traceback,
before any work, and no file that was there before changed or lost."""

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, hashes, one_error_line, one_thread, toy_lines, write_wikitext

from bertkit import checks, files, mains
from bertkit import flags as cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--device", "cpu", "--emsize", "16", "--nhid", "32", "--nlayers", "1", "--nhead", "2",
        "--bptt", "16", "--batch_size", "4", "--epochs", "1"]
DATA = ["--data-dir", "D", "--dataset", "WikiText2"]
# The work folder holds the fixture's models, written with other settings, which a run is
# refused to replace: the cases whose error comes after that check replace them.
REPLACE = ["--overwrite"]


def run(script, *flags, cwd, timeout=120):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, flags)], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


# What the work fixture's two runs printed, by script.
PRINTED = {}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a corpus, a trained tiny encoder, its ns state and a SQuAD file."""
    folder = tmp_path_factory.mktemp("checks")
    write_wikitext(folder / "D", toy_lines(120, 0, 30), toy_lines(12, 1, 30),
                   toy_lines(12, 2, 30))
    out = run("mlm_task.py", *DATA, *TINY, "--max-steps", "2", cwd=folder)
    assert out.returncode == 0, out.stderr
    PRINTED["mlm_task.py"] = out.stdout
    out = run("ns_task.py", *DATA, *TINY, "--max-steps", "2", "--min_sentence_len", "10",
              "--save-every", "1", cwd=folder)
    assert out.returncode == 0, out.stderr
    PRINTED["ns_task.py"] = out.stdout
    paragraphs = [{"context": line, "qas": [{"id": str(i), "question": "what?", "answers": [
        {"text": line.split()[2], "answer_start": line.index(line.split()[2])}]}]}
        for i, line in enumerate(toy_lines(6, 3, 20))]
    (folder / "squad.json").write_text(json.dumps({"data": [{"paragraphs": paragraphs}]}))
    (folder / "a_file").write_text("not a folder")
    (folder / "a_folder").mkdir()
    bad = torch.load(folder / "mlm_bert.pt", weights_only=True)
    bad["config"]["emsize"] = -16
    torch.save(bad, folder / "negative.pt")
    # Files whose fields have the wrong type: data from disk, checked when read.
    for name, (source, field, value) in DAMAGED.items():
        damaged = torch.load(folder / source, weights_only=True)
        damaged[field] = value
        torch.save(damaged, folder / name)
    return folder


DAMAGED = {  # file: (the file it is a copy of, the field replaced, its new value)
    "args_list.pt": ("mlm_state.pt", "args", [["lr", 1.0]]),
    "train_state_list.pt": ("mlm_state.pt", "train_state", [1, 2]),
    "train_state_text.pt": ("mlm_state.pt", "train_state", {"epoch": "one"}),
    "rng_text.pt": ("mlm_state.pt", "rng", "seed"),
    "rng_damaged.pt": ("mlm_state.pt", "rng", [{"torch": "x", "python": 3}]),
    "optimizer_list.pt": ("mlm_state.pt", "optimizer", [1]),
    "optimizer_damaged.pt": ("mlm_state.pt", "optimizer", {"state": 1, "param_groups": 2}),
    "scheduler_text.pt": ("mlm_state.pt", "scheduler", "x"),
    "scaler_list.pt": ("mlm_state.pt", "scaler", [1]),
    "model_list.pt": ("mlm_bert.pt", "model", [1, 2]),
    "model_numbers.pt": ("mlm_bert.pt", "model", {"embedding.weight": 3}),
    "config_list.pt": ("mlm_bert.pt", "config", [16, 32]),
    "vocab_text.pt": ("mlm_bert.pt", "vocab", "abc"),
    "vocab_numbers.pt": ("mlm_bert.pt", "vocab", [1, 2, 3]),
    "tokenizer_list.pt": ("mlm_bert.pt", "tokenizer", ["basic_english"]),
    "tokenizer_json_garbage.pt": ("mlm_bert.pt", "tokenizer", {"kind": "wordpiece", "json": "x"}),
    "kind_list.pt": ("mlm_bert.pt", "kind", ["encoder"]),
    "windowing_list.pt": ("mlm_bert.pt", "windowing", [128]),
    "squad_v2_text.pt": ("mlm_bert.pt", "squad_v2", "yes"),
    "pooler_list.pt": ("ns_bert.pt", "pooler", [1]),
    "pooler_numbers.pt": ("ns_bert.pt", "pooler", {"weight": 3}),
    "labels_numbers.pt": ("mlm_bert.pt", "labels", [0, 1]),
}


QA = ["--bert-model", "mlm_bert.pt", "--train-file", "squad.json", "--dev-file", "squad.json"]
CASES = {
    # values
    "negative lr": ("mlm_task.py", ["--lr", "-1"], "--lr -1.0: must be > 0"),
    "nan lr": ("mlm_task.py", ["--lr", "nan"], "--lr nan: must be > 0"),
    "dropout above 1": ("mlm_task.py", ["--dropout", "1.5"], "--dropout 1.5: must be in [0, 1)"),
    "zero emsize": ("mlm_task.py", ["--emsize", "0"], "--emsize 0: must be a positive integer"),
    "zero nlayers": ("mlm_task.py", ["--nlayers", "0"], "--nlayers 0: must be a positive integer"),
    "emsize not divisible": ("mlm_task.py", [*DATA, *TINY, "--emsize", "15"],
                             "emsize 15 is not divisible by nhead 2"),
    "zero log interval": ("mlm_task.py", ["--log-interval", "0"], "--log-interval 0: must be"),
    "negative workers": ("mlm_task.py", ["--num-workers", "-1"], "--num-workers -1: must be"),
    "huge seed": ("mlm_task.py", ["--seed", "99999999999999999999"], "--seed 9999"),
    "zero world size": ("mlm_task.py", ["--world_size", "0"], "--world_size 0: must be"),
    "negative clip": ("mlm_task.py", ["--clip", "-1"], "--clip -1.0: must be > 0"),
    "zero epochs": ("mlm_task.py", ["--epochs", "0"], "--epochs 0: must be at least 1"),
    "negative max steps": ("mlm_task.py", ["--max-steps", "-1"], "--max-steps -1: must be"),
    "negative save every": ("mlm_task.py", ["--save-every", "-1"], "--save-every -1: must be"),
    "mask frac 1.5": ("mlm_task.py", ["--mask_frac", "1.5"], "--mask_frac 1.5: must be in (0, 1)"),
    "dash spelling checked too": ("mlm_task.py", ["--batch-size", "0"], "--batch_size 0: must be"),
    "not a number": ("mlm_task.py", ["--lr", "fast"], "--lr: invalid float value: 'fast'"),
    "negative min sentence": ("ns_task.py", ["--min_sentence_len", "-5"],
                              "--min_sentence_len -5: must be at least 2"),
    "huge min freq": ("mlm_task.py", [*DATA, *TINY, *REPLACE, "--min-freq", "100000000"],
                      "--min-freq 100000000: no word of the train split"),
    "unknown recipe": ("qa_task.py", ["--recipe", "roberta"],
                       "--recipe: invalid choice: 'roberta'"),
    "unknown recipe (ns)": ("ns_task.py", ["--recipe", "Bert"], "--recipe: invalid choice"),
    "unknown span loss": ("qa_task.py", ["--span-loss", "sum"], "--span-loss: invalid choice"),
    "recipe batch that does not divide": ("qa_task.py", ["--recipe", "bert", "--batch_size", "5"],
                                          "--recipe bert: its global batch of 32 sequences"),
    "context and predict file": ("qa_task.py", ["--predict", "--qa-model", "mlm_bert.pt",
                                                "--predict-file", "squad.json", "--context", "x"],
                                 "not both"),
    # paths
    "data dir is a file": ("mlm_task.py", [*TINY, "--data-dir", "a_file"],
                           "--data-dir a_file: is a file, not a folder"),
    "save is a folder": ("mlm_task.py", [*DATA, *TINY, "--save", "a_folder"],
                         "--save a_folder: is a folder"),
    "save under a file": ("mlm_task.py", [*DATA, *TINY, "--save", "a_file/x.pt"],
                          "a_file is a file, not a folder"),
    "save unwritable": ("mlm_task.py", [*DATA, *TINY, "--save", "/proc/x/y.pt"], "cannot write"),
    "save is the state file": ("mlm_task.py", [*DATA, *TINY, "--save", "s.pt", "--state-file",
                                               "s.pt"], "two outputs in one file"),
    "ns save over its input": ("ns_task.py", [*DATA, *TINY, "--save", "mlm_bert.pt"],
                               "--save mlm_bert.pt is also --bert-model"),
    "predictions over the dev file": ("qa_task.py", [*QA, *TINY, "--predictions", "squad.json"],
                                      "--predictions squad.json is also --train-file"),
    "predictions over the predict file": ("qa_task.py", [
        "--predict", "--qa-model", "mlm_bert.pt", "--predict-file", "squad.json",
        "--predictions", "squad.json"], "is also --predict-file"),
    # checkpoints
    "missing bert model": ("qa_task.py", ["--bert-model", "nope/ns_bert.pt"],
                           "no such file (python ns_task.py --bert-model mlm_bert.pt writes it)"),
    "another script's state": ("mlm_task.py", ["--checkpoint", "ns_state.pt"],
                               "a state file of ns_task.py; resume it with python ns_task.py"),
    "mlm state to qa": ("qa_task.py", ["--checkpoint", "ns_state.pt"], "a state file of ns_task"),
    # state files and checkpoints with a field of the wrong type
    "state args a list": ("mlm_task.py", ["--checkpoint", "args_list.pt"],
                          "--checkpoint args_list.pt: its saved flags are a list"),
    "state train_state a list": ("mlm_task.py", ["--checkpoint", "train_state_list.pt"],
                                 "train_state_list.pt: its 'train_state' is a list, not a dict"),
    "state train_state text": ("mlm_task.py", ["--checkpoint", "train_state_text.pt"],
                               "train_state_text.pt: its train_state has epoch = 'one'"),
    "state rng text": ("mlm_task.py", ["--checkpoint", "rng_text.pt"],
                       "rng_text.pt: its 'rng' is a str, not a list or dict"),
    "state rng damaged": ("mlm_task.py", ["--checkpoint", "rng_damaged.pt"],
                          "rng_damaged.pt: its random number generator state is unusable"),
    "state optimizer a list": ("mlm_task.py", ["--checkpoint", "optimizer_list.pt"],
                               "optimizer_list.pt: its 'optimizer' is a list, not a dict"),
    "state optimizer damaged": ("mlm_task.py", ["--checkpoint", "optimizer_damaged.pt"],
                                "optimizer_damaged.pt: its optimizer"),
    "state scheduler text": ("mlm_task.py", ["--checkpoint", "scheduler_text.pt"],
                             "scheduler_text.pt: its 'scheduler' is a str"),
    "state scaler a list": ("mlm_task.py", ["--checkpoint", "scaler_list.pt"],
                            "scaler_list.pt: its 'scaler' is a list"),
    "model a list": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model", "model_list.pt"],
                     "--bert-model model_list.pt: its 'model' is a list, not a dict"),
    "model of numbers": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model", "model_numbers.pt"],
                         "model_numbers.pt: its 'model' is not a state dict of named tensors"),
    "config a list": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model", "config_list.pt"],
                      "config_list.pt: its 'config' is a list, not a dict"),
    "vocab text": ("qa_task.py", ["--bert-model", "vocab_text.pt"],
                   "vocab_text.pt: its 'vocab' is a str, not a list"),
    "vocab of numbers": ("mlm_task.py", [*DATA, *TINY, *REPLACE, "--bert-model", "vocab_numbers.pt"],
                         "vocab_numbers.pt: its 'vocab' is not a list of words"),
    "tokenizer a list": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model", "tokenizer_list.pt"],
                         "tokenizer_list.pt: its 'tokenizer' is a list, not a dict"),
    "tokenizer json garbage": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model",
                                              "tokenizer_json_garbage.pt"],
                               "tokenizer_json_garbage.pt: its config or vocab is unusable "
                               "(not a tokenizer.json"),
    "kind a list": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model", "kind_list.pt"],
                    "kind_list.pt: its 'kind' is a list, not a str"),
    "windowing a list": ("qa_task.py", ["--predict", "--qa-model", "windowing_list.pt",
                                        "--question", "q", "--context", "c"],
                         "windowing_list.pt: its 'windowing' is a list, not a dict"),
    "squad_v2 text": ("qa_task.py", ["--predict", "--qa-model", "squad_v2_text.pt",
                                     "--question", "q", "--context", "c"],
                      "squad_v2_text.pt: its 'squad_v2' is a str, not a bool"),
    "pooler a list": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model", "pooler_list.pt"],
                      "pooler_list.pt: its 'pooler' is a list, not a dict"),
    "pooler of numbers": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model", "pooler_numbers.pt"],
                          "pooler_numbers.pt: its 'pooler' is not a state dict of named tensors"),
    "labels of numbers": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model", "labels_numbers.pt"],
                          "labels_numbers.pt: its 'labels' is not a list of label names"),
    "negative size in a config": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model", "negative.pt"],
                                  "emsize -16: must be a positive integer"),
    # sizes that make no model: refused before the vocabulary is built (a new vocab file
    # would appear) or any other file is touched
    "heads that do not divide the size": (
        "mlm_task.py", [*DATA, *TINY, "--emsize", "128", "--nhead", "5", "--save-vocab",
                        "new_vocab.pt"], "emsize 128 is not divisible by nhead 5"),
    # a state file where a model is wanted: the best model of its run named
    "state file as qa --bert-model": ("qa_task.py", ["--bert-model", "mlm_state.pt"],
                                      "--bert-model mlm_state.pt: a training state file (what "
                                      "--checkpoint resumes); give its run's best model, "
                                      "full_mlm_model.pt"),
    "state file as ns --bert-model": ("ns_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model",
                                                     "mlm_state.pt"], "full_mlm_model.pt"),
    "ns state file as qa --bert-model": ("qa_task.py", ["--bert-model", "ns_state.pt"],
                                         "give its run's best model, ns_model.pt"),
    "state file as mlm --bert-model": ("mlm_task.py", [*DATA, *TINY[:2], *REPLACE, "--bert-model",
                                                       "ns_state.pt"], "a training state file"),
    "state file as --qa-model": ("qa_task.py", ["--predict", "--qa-model", "ns_state.pt",
                                                "--question", "q", "--context", "c"],
                                 "--qa-model ns_state.pt: a training state file"),
    # --output-dir
    "output dir is a file": ("mlm_task.py", [*DATA, *TINY, "--output-dir", "a_file"],
                             "--output-dir a_file: is a file, not a folder"),
    "resumed in another output dir": ("mlm_task.py", ["--checkpoint", "mlm_state.pt",
                                                      "--output-dir", "elsewhere"],
                                      "--checkpoint mlm_state.pt is a run of --output-dir ., "
                                      "where it resumes"),
    # --evaluate-only
    "evaluate-only without a model": ("mlm_task.py", [*DATA, *TINY, "--evaluate-only"],
                                      "--evaluate-only needs --bert-model"),
    "evaluate-only of an encoder": ("ns_task.py", [*DATA, *TINY[:2], "--evaluate-only",
                                                   "--bert-model", "mlm_bert.pt"],
                                    "of kind 'encoder', without the ns head to evaluate; give "
                                    "a model with it (ns_model.pt"),
    "evaluate-only and resume": ("ns_task.py", ["--evaluate-only", "--checkpoint", "ns_state.pt"],
                                 "--evaluate-only evaluates --bert-model; --checkpoint"),
    # every output of every mode against every input: --evaluate-only's too, TensorBoard's
    # folder included
    "evaluate-only metrics over its model": (
        "mlm_task.py", [*DATA, *TINY[:2], "--evaluate-only", "--bert-model", "full_mlm_model.pt",
                        "--metrics-file", "full_mlm_model.pt"],
        "--metrics-file full_mlm_model.pt is also --bert-model"),
    "evaluate-only tensorboard in the token cache": (
        "mlm_task.py", [*DATA, *TINY[:2], "--evaluate-only", "--bert-model", "full_mlm_model.pt",
                        "--tensorboard", "D/wikitext-2/.cache/tb"],
        "--tensorboard D/wikitext-2/.cache/tb is inside D/wikitext-2/.cache"),
    "tensorboard over a file": ("mlm_task.py", [*DATA, *TINY, "--tensorboard", "a_file"],
                                "--tensorboard a_file: is a file; give a folder"),
    "qa predictions over a model": ("qa_task.py", [
        "--predict", "--qa-model", "mlm_bert.pt", "--predict-file", "squad.json",
        "--predictions", "ns_bert.pt"], "--predictions ns_bert.pt holds a model, which this "
                                        "run's output would replace"),
    # a model another run wrote (the fixture's, of --emsize 16): not replaced unasked
    "a model of other sizes": ("mlm_task.py", [*DATA, *TINY, "--max-steps", "2", "--emsize", "32"],
                               "--save mlm_bert.pt holds the model of another run (--emsize 16 "
                               "(this run: 32)): give this run another --output-dir (or --save "
                               "path), or --overwrite to replace it"),
    "a model of other settings under another name": (
        "mlm_task.py", [*DATA, *TINY, "--save", "ns_bert.pt"],
        "--save ns_bert.pt holds the model of another run"),
    # --checkpoint auto compares the state's run before "finished" (mlm_state.pt is)
    "auto over a finished run of other sizes": (
        "mlm_task.py", [*DATA, *TINY, "--max-steps", "2", "--nhid", "64", "--checkpoint", "auto"],
        "--checkpoint auto: mlm_state.pt: the state of another run (--nhid 32, not 64); give "
        "this run another --output-dir or --state-file"),
    "auto over a finished run of other data": (
        "mlm_task.py", [*TINY, "--dataset", "D/wikitext-2", "--checkpoint", "auto"],
        "the state of another run (--dataset WikiText2, not D/wikitext-2)"),
    "auto over another script's finished state": (
        "qa_task.py", [*QA, "--state-file", "ns_state.pt", "--checkpoint", "auto"],
        "--checkpoint auto: ns_state.pt: a state file of ns_task.py; resume it with python "
        "ns_task.py"),
    "a resume of other sizes": ("mlm_task.py", ["--checkpoint", "mlm_state.pt", "--emsize", "32"],
                                "--checkpoint mlm_state.pt: the state of another run (--emsize "
                                "16, not 32); a resumed run keeps them"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(work, case, monkeypatch, capsys):
    """In this process, as `python SCRIPT FLAGS` runs it (a subprocess per case would
    spend most of its time importing torch): the test below runs a few as subprocesses."""
    script, flags, expected = CASES[case]
    module = importlib.import_module(script.removesuffix(".py"))
    monkeypatch.chdir(work)
    before = hashes(work)
    _, line = one_error_line(module, flags, capsys)
    assert expected in line, line
    assert hashes(work) == before


@pytest.mark.parametrize("case", ["negative lr", "save is the state file", "another script's state"])
def test_bad_input_from_the_command_line(work, case):
    script, flags, expected = CASES[case]
    before = hashes(work)
    out = run(script, *flags, cwd=work)
    assert out.returncode == 2 and out.stdout == "", (out.stdout, out.stderr)
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert expected in out.stderr and "Traceback" not in out.stderr
    assert hashes(work) == before


def test_a_second_run_with_the_same_outputs_refuses(work, tmp_path, monkeypatch, capsys):
    """Refused with one line that names the way out, --output-dir; which works."""
    lock = checks.OutputLock([work / "mlm_state.pt"])  # as a run still going holds it
    try:
        before = hashes(work)
        out = run("mlm_task.py", *DATA, *TINY, "--max-steps", "2", cwd=work)  # the same command
        assert out.returncode == 2
        assert (f"is an output of a run still going (PID {os.getpid()}); wait for it, or give "
                "this run another --output-dir") in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
        assert hashes(work) == before
        monkeypatch.chdir(work)
        module = importlib.import_module("mlm_task")
        with one_thread():
            mains.launch(module.main, cli.parse_args(module.get_parser(), [
                *DATA, *TINY, "--max-steps", "1", "--output-dir", str(tmp_path / "second")]))
        checks.release_outputs()
        assert "End of training" in capsys.readouterr().out
        assert hashes(work) == before
        assert {"mlm_state.pt", "mlm_bert.pt", "full_mlm_model.pt"} <= set(
            os.listdir(tmp_path / "second"))
    finally:
        lock.release()


def test_dataset_names_in_any_case(tmp_path, monkeypatch):
    parser = importlib.import_module("mlm_task").get_parser()
    monkeypatch.chdir(tmp_path)
    for given, read in (("wikitext2", "WikiText2"), ("WIKITEXT103", "WikiText103"),
                        ("enwik9", "EnWik9"), ("WikiText2", "WikiText2"), ("mine", "mine")):
        assert cli.parse_args(parser, ["--dataset", given]).dataset == read
    (tmp_path / "wikitext2").mkdir()  # a folder of that very name is the folder
    assert cli.parse_args(parser, ["--dataset", "wikitext2"]).dataset == "wikitext2"


def test_files_get_the_umasks_mode(tmp_path, monkeypatch):
    """Atomic writes and convert.py's folder (model.safetensors included, which the
    safetensors library writes 0600) get the mode the umask gives: 0640 and 0750 here."""
    from bertkit import transformers_format
    from bertkit.text.tokenizer import SPECIALS, Vocab
    from model import BertConfig, MLMTask

    umask = 0o027
    monkeypatch.setattr(files, "UMASK", umask)
    monkeypatch.setattr(transformers_format, "UMASK", umask)
    old = os.umask(umask)
    try:
        files.atomic_save({"x": torch.ones(2)}, tmp_path / "state.pt")
        files.atomic_write_text(tmp_path / "log.txt", "x")
        vocab = Vocab([*SPECIALS, "a", "b"])
        config = BertConfig(vocab_size=len(vocab), emsize=8, nhead=2, nhid=16, nlayers=1)
        ckpt = {"kind": "mlm", "model": MLMTask(config).state_dict(),
                "config": config.to_dict(), "vocab": vocab.itos, "tokenizer": vocab.state()}
        transformers_format.export(ckpt, str(tmp_path / "out"))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*tmp_path.iterdir(),
                                                        *(tmp_path / "out").iterdir()]}
    assert modes.pop("out") == 0o750
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


def test_log_lines_say_what_was_scored():
    from bertkit.training.logs import format_metrics

    assert format_metrics("valid", {"loss": 6.5, "ppl": 665.14, "tokens": 1234}) == (
        "valid loss  6.50000 | valid ppl   665.14 | scored 1234 masked tokens")
    assert format_metrics("test", {"accuracy": 75.0, "pairs": 8}) == (
        "test accuracy 75.00% | scored 8 pairs")


def test_leftover_temp_files_are_removed_at_the_next_start(tmp_path):
    (tmp_path / ".model.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".other.pt.abc123.tmp").write_bytes(b"someone else's")
    lock = checks.OutputLock([tmp_path / "model.pt"])
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.abc123.tmp"]


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    files.atomic_save({"x": torch.ones(3)}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(files.UserError, match=f"cannot write {path}: .*file write failed"):
        files.atomic_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_full_disk_error_is_still_an_oserror_for_optional_files(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(OSError, match="No space"):
        files.atomic_write_text(tmp_path / "cache.txt", "x")


@pytest.mark.parametrize("ddp", [False, True])
def test_ctrl_c_writes_the_state_and_exits_130(tmp_path, ddp):
    write_wikitext(tmp_path / "D", toy_lines(400, 0, 30), toy_lines(12, 1, 30),
                   toy_lines(12, 2, 30))
    flags = [*DATA, *TINY, "--log-interval", "2", "--epochs", "3"]
    if ddp:
        flags += ["--parallel", "DDP", "--world_size", "2"]
    proc = subprocess.Popen([sys.executable, str(REPO / "mlm_task.py"), *flags], cwd=tmp_path,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    for line in proc.stdout:  # Ctrl-C once training is under way, to the whole group
        if line.startswith("| epoch"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in err
    # From another folder than the script's: the script's path as it was started.
    assert f"Resume with: python {REPO / 'mlm_task.py'} --checkpoint mlm_state.pt" in out
    state = torch.load(tmp_path / "mlm_state.pt", weights_only=True)
    assert state["script"] == "mlm_task.py" and state["train_state"]["global_step"] > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_every_output_of_the_readme_commands_is_git_ignored():
    """After the README's commands, `git status` shows nothing new: each script's default
    outputs and the other files the README's commands write."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs git and a git checkout")
    outputs = {"predictions.json", "na_probs.json", "mlm_metrics.png", "curves.png",
               "qa-bert/config.json", "qa-bert/model.safetensors", "qa-bert/tokenizer.json",
               "runs/events.out.tfevents.1", "tensorboard/events.out.tfevents.1",
               "dev-v1.1.predictions.json", "dev-v2.0.na_probs.json", "runs/eval/mlm_metrics.jsonl",
               ".data/wikitext-2/wiki.train.tokens",
               ".data/.cache/train.0123456789abcdef.pt", "data/.cache/train.0123.pt",
               "normans-train.json", "normans-dev.json", ".mlm_state.pt.lock",
               ".mlm_state.pt.abc123.tmp", "mlm_state.pt.1", "bert-mlm-1234.out"}
    outputs |= {"glue_predictions_mm.tsv", "my_predictions.tsv", "RTE.tsv", "MNLI-m.tsv",
                "MNLI-mm.tsv", "AX.tsv", "glue_submission.zip", "glue/RTE/glue_model.pt",
                "glue/RTE/glue_predictions.tsv", "glue/RTE/RTE.tsv", "glue_hf/config.json"}
    for script in ("mlm_task", "ns_task", "qa_task", "glue_task"):
        parser = importlib.import_module(script).get_parser()
        outputs |= {action.default for action in parser._actions if action.dest in (
            "save", "state_file", "metrics_file", "save_vocab", "predictions")}
        outputs.add(f"{script[:script.index('_')]}_loss.txt")
    assert {"mlm_bert.pt", "ns_state.pt", "qa_metrics.jsonl", "bert_vocab.pt"} <= outputs
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sorted(outputs)], cwd=REPO,
                             capture_output=True, text=True).stdout.splitlines()
    assert sorted(outputs - set(ignored)) == []


# -- what a run writes, decided once -----------------------------------------------------


def test_log_lines_show_the_tasks_measure_and_where_max_steps_stopped(work):
    """--log-interval left out on a run of 2 steps: a line (and a metrics row) each step,
    with MLM's perplexity, NS's accuracy (no perplexity); --max-steps stopped both within
    their first epoch, which their validation line says, not "end of epoch"."""
    for script, measure in (("mlm_task.py", r"ppl +\d+\.\d\d"),
                            ("ns_task.py", r"accuracy +\d+\.\d\d%")):
        printed = PRINTED[script]
        steps = [line for line in printed.splitlines() if line.startswith("| epoch")]
        assert len(steps) == 2, printed
        assert all(re.search(rf"\| loss +\d+\.\d\d \| {measure}$", line) for line in steps), steps
        assert "end of epoch" not in printed
        assert "| step      2 | epoch   1 (--max-steps) | time:" in printed
    rows = [json.loads(line) for line in (work / "ns_metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert all(0 <= row["accuracy"] <= 100 for row in rows if "loss" in row)


def test_a_file_name_given_to_an_output_flag_goes_into_the_output_dir(tmp_path, monkeypatch):
    """--save my.pt under --output-dir runs/a writes runs/a/my.pt: two runs keep two
    models; a path with a folder is kept as typed; without --output-dir, as before."""
    import glue_task
    import mlm_task

    monkeypatch.chdir(tmp_path)
    parser = mlm_task.get_parser()
    placed = cli.parse_args(parser, ["--output-dir", "runs/a", "--save", "my.pt", "--metrics-file",
                                     "./m.jsonl", "--tensorboard", "tb"])
    assert (placed.save, placed.metrics_file, placed.tensorboard, placed.state_file) == (
        "runs/a/my.pt", "./m.jsonl", "runs/a/tb", "runs/a/mlm_state.pt")
    assert cli.parse_args(parser, ["--save", "my.pt"]).save == "my.pt"
    glue = cli.parse_args(glue_task.get_parser(), [
        "--output-dir", "o", "--test-file", "a.tsv", "b.tsv", "--test-predictions", "A.tsv",
        "./B.tsv"])
    assert glue.test_predictions == ["o/A.tsv", "./B.tsv"]


def test_a_run_replaces_its_own_models_and_another_runs_only_with_overwrite(
        work, tmp_path, monkeypatch, capsys):
    """The same command again replaces the models it wrote; a run of other settings is
    refused (the case above), and replaces them with --overwrite; its models record it."""
    import mlm_task

    folder = tmp_path / "again"
    shutil.copytree(work / "D", folder / "D")
    for name in ("mlm_bert.pt", "full_mlm_model.pt", "mlm_state.pt"):
        shutil.copy(work / name, folder / name)
    monkeypatch.chdir(folder)
    for flags in ([*DATA, *TINY, "--max-steps", "2"],  # the fixture's command
                  [*DATA, *TINY, "--max-steps", "2", "--emsize", "32", "--overwrite"]):
        with one_thread():
            mains.launch(mlm_task.main, cli.parse_args(mlm_task.get_parser(), flags))
        checks.release_outputs()
        assert "End of training" in capsys.readouterr().out
    saved = torch.load(folder / "mlm_bert.pt", weights_only=True)
    assert saved["config"]["emsize"] == 32 and saved["run"]["settings"]["emsize"] == 32
    assert saved["run"]["id"] == torch.load(folder / "mlm_state.pt", weights_only=True)["args"][
        "run_id"]


def test_evaluate_only_with_checkpoint_auto_beside_a_finished_run_evaluates(
        work, tmp_path, monkeypatch, capsys):
    import mlm_task

    monkeypatch.chdir(work)
    before = hashes(work)
    metrics = tmp_path / "eval.jsonl"
    with one_thread():
        mains.launch(mlm_task.main, cli.parse_args(mlm_task.get_parser(), [
            *DATA, *TINY, "--evaluate-only", "--bert-model", "full_mlm_model.pt", "--checkpoint",
            "auto", "--metrics-file", str(metrics)]))
    checks.release_outputs()
    out = capsys.readouterr().out
    assert "| evaluation | test loss" in out and "nothing to do" not in out
    assert [sorted(json.loads(line))[-1] for line in metrics.read_text().splitlines()] == [
        "valid_tokens", "test_tokens"]
    assert hashes(work) == before


def test_a_refused_run_leaves_no_output_dir_behind(work, monkeypatch, capsys, closed_url):
    """Refused after its outputs are locked (a damaged --bert-model; a failed download):
    the --output-dir made for the locks goes again, as the data folders of the download."""
    import dataclasses

    import ns_task
    import qa_task
    from bertkit.squad import dataset as squad

    monkeypatch.chdir(work)
    for split in ("train", "dev"):
        monkeypatch.setitem(squad.SQUAD, split, dataclasses.replace(
            squad.SQUAD[split], urls=(f"{closed_url}/{split}.json",)))
    before = hashes(work)
    for module, flags in ((ns_task, [*DATA, *TINY, "--bert-model", "model_list.pt"]),
                          (qa_task, [*TINY, "--bert-model", "mlm_bert.pt", "--data-dir", "D"])):
        with pytest.raises(SystemExit) as exit_info:
            mains.launch(module.main, cli.parse_args(module.get_parser(), [
                *flags, "--output-dir", "new/run"]))
        checks.release_outputs()
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert not (work / "new").exists() and not (work / "D" / "squad").exists()
    assert hashes(work) == before
