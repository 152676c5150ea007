"""--size's presets, --recipe laptop (its pretraining and fine-tuning settings, --dtype
auto's bf16 where the CPU has it natively), --from-scratch's architecture and vocabulary
of --bert-model with fresh weights, and one error line for each bad input."""

import subprocess
import sys

import pytest
import torch
from conftest import REPO

import glue_task
import mlm_task
import ns_task
import qa_task
import utils
from bertkit import flags as cli
from bertkit import presets, recipes
from bertkit.files import UserError
from model import BertConfig


def parse(script, *argv):
    return cli.parse_args(script.get_parser(), list(argv))


def shape(args):
    return args.nlayers, args.emsize, args.nhead, args.nhid


@pytest.mark.parametrize("size, expected", [
    ("tiny", (2, 128, 2, 512)), ("mini", (4, 256, 4, 1024)), ("small", (4, 512, 8, 2048)),
    ("medium", (8, 512, 8, 2048)), ("base", (12, 768, 12, 3072))])
def test_a_size_is_the_bert_miniatures_shape(size, expected):
    assert shape(parse(mlm_task, "--size", size)) == expected


def test_the_model_flags_given_win_over_the_size():
    args = parse(mlm_task, "--size", "mini", "--nlayers", "2", "--nhid", "512")
    assert shape(args) == (2, 256, 4, 512)
    assert shape(parse(mlm_task)) == (None, None, None, None)  # FRESH_MODEL's, as before


def test_recipe_laptop_sets_the_pretraining_settings():
    args = parse(mlm_task, "--recipe", "laptop")
    assert shape(args) == (4, 256, 4, 1024) and args.size == "mini"
    assert (args.tokenizer, args.vocab_size, args.dtype) == ("wordpiece", 8192, "auto")
    assert (args.optimizer, args.lr, args.weight_decay, tuple(args.betas), args.eps) == (
        "adamw", 1e-3, 0.01, (0.9, 0.98), 1e-6)
    assert (args.schedule, args.warmup, args.clip) == ("linear", 0.06, 0.5)
    assert (args.mask_frac, args.mask_mode, args.bptt, args.dropout) == (0.25, "bert", 128, 0.0)
    assert (args.eval_batches, args.epochs, args.time_budget) == (40, 1000, 3600)
    assert args.next_sentence is True
    recipes.split_global_batch(args, 1)
    assert (args.batch_size, args.grad_accum) == (32, 1)
    summary = recipes.recipe_summary(args, 1, 0.0)
    assert "--time-budget 60m" in summary and "--betas 0.9 0.98" in summary
    assert " --next-sentence " in summary
    # The line's flags are the script's own: given back, they make the same settings.
    shown = summary.split(": ", 1)[1].split(" (a global batch")[0].split()
    again = parse(mlm_task, *shown)
    for name in ("mask_frac", "lr", "betas", "bptt", "time_budget", "next_sentence",
                 "batch_size", "grad_accum", "vocab_size", "nlayers", "emsize"):
        value = getattr(args, name)
        assert getattr(again, name) == (list(value) if name == "betas" else value), name
    off = parse(mlm_task, "--recipe", "laptop", "--no-next-sentence")
    assert off.next_sentence is False
    assert " --no-next-sentence " in recipes.recipe_summary(off, 1, 0.0)


def test_recipe_laptop_flags_given_win():
    args = parse(mlm_task, "--recipe", "laptop", "--size", "tiny", "--time-budget", "90s",
                 "--dtype", "fp32", "--lr", "5e-4")
    assert (shape(args), args.time_budget, args.dtype, args.lr) == (
        (2, 128, 2, 512), 90, "fp32", 5e-4)


def test_recipe_laptop_from_a_bert_model_keeps_its_tokenizer_and_shape():
    args = parse(mlm_task, "--recipe", "laptop", "--bert-model", "mlm_bert.pt")
    assert (args.size, args.tokenizer, args.vocab_size, args.nlayers) == (None, None, 30522, None)
    assert args.optimizer == "adamw" and args.mask_frac == 0.25


@pytest.mark.parametrize("script, expected", [
    (glue_task, dict(lr=1e-4, epochs=5, bptt=128, dropout=0.1, warmup=0.1, clip=1.0)),
    (qa_task, dict(lr=1e-4, epochs=3, bptt=384, doc_stride=128, warmup=0.1)),
    (ns_task, dict(lr=1e-4, epochs=3, bptt=128))])
def test_recipe_laptop_sets_the_fine_tuning_settings(script, expected):
    args = parse(script, "--recipe", "laptop")
    assert {name: getattr(args, name) for name in expected} == expected
    assert (args.optimizer, args.weight_decay, args.schedule, args.dtype) == (
        "adamw", 0.01, "linear", "auto")
    assert args.global_batch == 32


@pytest.mark.parametrize("flags_, why", [
    ({"avx512f", "avx512_bf16"}, "bf16"), ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
    ({"avx2", "fma"}, "fp32"), (set(), "fp32")])
def test_dtype_auto_is_bf16_where_the_cpu_has_it_natively(monkeypatch, flags_, why):
    monkeypatch.setattr(utils, "cpu_flags", lambda: flags_)
    dtype, reason = utils.native_bf16(torch.device("cpu"))
    assert dtype == why and reason
    args, lines = parse(mlm_task, "--recipe", "laptop"), []
    args.compile = False
    presets.resolve_precision(args, torch.device("cpu"), lines.append)
    assert args.dtype == why and lines == [f"--dtype auto: {why} ({reason})"]


def test_recipe_laptop_on_a_gpu_says_what_changes(monkeypatch):
    monkeypatch.setattr(utils, "native_bf16", lambda device: ("bf16", "native"))
    args, lines = parse(mlm_task, "--recipe", "laptop"), []
    args.compile = True
    presets.resolve_precision(args, torch.device("cuda"), lines.append)
    assert args.dtype == "bf16" and len(lines) == 2
    assert lines[1].startswith("--recipe laptop on cuda: its CPU settings as they are, bf16")


def test_size_with_a_bert_model_is_refused():
    args = parse(mlm_task, "--bert-model", "x.pt")
    args.size = "mini"
    with pytest.raises(UserError, match="--size mini: --bert-model x.pt brings its architecture"):
        presets.apply_size(args, {"size", "bert_model"})


def test_from_scratch_takes_the_architecture_and_vocabulary_of_the_bert_model():
    config = BertConfig(vocab_size=50, emsize=32, nhead=2, nhid=64, nlayers=2, max_len=64,
                        trained_len=48)
    args, lines = parse(glue_task, "--bert-model", "b.pt", "--from-scratch"), []
    fresh = presets.from_scratch(config, args, lines.append)
    assert fresh.to_dict() == {**config.to_dict(), "trained_len": None}
    assert lines[0].startswith("--from-scratch: the architecture (2 layers, hidden 32) and "
                               "vocabulary of b.pt, fresh weights")
    args = parse(glue_task, "--bert-model", "b.pt", "--from-scratch", "--size", "tiny")
    assert presets.from_scratch(config, args, lines.append).emsize == 128
    assert presets.from_scratch(config, parse(glue_task), lines.append) is config
    assert presets.start_text(args) == "from scratch (b.pt's architecture and vocabulary)"


@pytest.mark.parametrize("script, argv, message", [
    ("mlm_task.py", ["--size", "huge"], "error: --size: invalid choice: 'huge'"),
    ("glue_task.py", ["--size", "huge"], "error: --size: invalid choice: 'huge'"),
    ("mlm_task.py", ["--recipe", "desktop"], "error: --recipe: invalid choice: 'desktop'"),
    ("glue_task.py", ["--recipe", "desktop"], "error: --recipe: invalid choice: 'desktop'"),
    ("glue_task.py", ["--from-scratch", "--task", "RTE"], "error: --from-scratch needs --bert-model"),
    ("qa_task.py", ["--from-scratch"], "error: --from-scratch needs --bert-model"),
    ("mlm_task.py", ["--size", "mini", "--bert-model", "m.pt"], "error: --size mini: --bert-model"),
])
def test_bad_input_is_one_error_line_before_any_work(tmp_path, script, argv, message):
    out = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), out.stderr
    assert out.stdout == "" and not list(tmp_path.iterdir())
