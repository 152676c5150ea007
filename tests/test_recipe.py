"""--recipe: the published fine-tuning settings one flag away (recipes.RECIPES), the flags
given on the command line winning, a global batch split over the processes, and a resume
that keeps them."""

import pytest
import torch

import ns_task
import qa_task
from bertkit import flags as cli
from bertkit import recipes
from bertkit.files import UserError


def parse(script, *argv):
    return cli.parse_args(script.get_parser(), list(argv))


def test_recipe_bert_sets_the_published_settings():
    args = parse(qa_task, "--recipe", "bert")
    assert (args.optimizer, args.lr, args.weight_decay, args.schedule, args.warmup,
            args.clip, args.epochs) == ("adamw", 3e-5, 0.01, "linear", 0.1, 1.0, 2)
    assert (args.bptt, args.doc_stride, args.span_loss) == (384, 128, "bert")
    assert args.dropout is None  # the checkpoint's
    assert args.global_batch == 32
    ns = parse(ns_task, "--recipe", "bert")
    assert (ns.optimizer, ns.lr, ns.clip, ns.epochs, ns.bptt) == ("adamw", 3e-5, 1.0, 3, 128)


def test_flags_given_on_the_command_line_win():
    args = parse(qa_task, "--recipe", "bert", "--lr", "5e-5", "--epochs", "3",
                 "--span_loss", "masked", "--dropout", "0.1")
    assert (args.lr, args.epochs, args.span_loss, args.dropout) == (5e-5, 3, "masked", 0.1)
    assert args.optimizer == "adamw" and args.clip == 1.0
    summary = recipes.recipe_summary(args, 1, 0.1)
    assert "--lr 5e-05" in summary and "--clip 1.0" in summary
    assert "dropout 0.1 (--dropout)" in summary
    assert "given on the command line: --dropout, --epochs, --lr, --span-loss" in summary


def test_without_a_recipe_the_old_defaults_stay():
    qa, ns = parse(qa_task), parse(ns_task)
    assert (qa.optimizer, qa.lr, qa.clip, qa.schedule, qa.bptt, qa.span_loss) == (
        "sgd", 5.0, 0.1, "plateau", 128, "masked")
    assert (ns.optimizer, ns.lr, ns.clip) == ("sgd", 0.25, 0.1)
    assert not hasattr(qa, "global_batch")
    recipes.split_global_batch(qa, 4)  # nothing to split
    assert (qa.batch_size, qa.grad_accum) == (72, 1)


@pytest.mark.parametrize("given, world_size, expected", [
    ((), 1, (32, 1)),
    ((), 4, (8, 1)),
    (("--grad-accum", "4"), 2, (4, 4)),
    (("--batch_size", "8"), 2, (8, 2)),
    (("--batch_size", "5", "--grad-accum", "3"), 2, (5, 3)),  # both given: as given
])
def test_the_global_batch_is_32_whatever_the_processes(given, world_size, expected):
    args = parse(qa_task, "--recipe", "bert", *given)
    recipes.split_global_batch(args, world_size)
    assert (args.batch_size, args.grad_accum) == expected
    if len(given) < 4:
        assert args.batch_size * args.grad_accum * world_size == 32


@pytest.mark.parametrize("given, world_size", [((), 3), (("--batch_size", "12"), 1),
                                               (("--grad-accum", "3"), 1)])
def test_a_global_batch_that_does_not_divide_is_one_error(given, world_size):
    args = parse(qa_task, "--recipe", "bert", *given)
    with pytest.raises(UserError, match="--recipe bert: its global batch of 32 sequences"):
        recipes.split_global_batch(args, world_size)


def test_a_resume_keeps_the_recipe_and_splits_its_batch_again(tmp_path):
    args = parse(qa_task, "--recipe", "bert", "--lr", "5e-5")
    recipes.split_global_batch(args, 1)
    state = tmp_path / "qa_state.pt"
    torch.save({"kind": "state", "args": vars(args), "script": "qa_task.py"}, state)
    resumed = parse(qa_task, "--checkpoint", str(state))
    assert (resumed.lr, resumed.optimizer, resumed.bptt, resumed.span_loss) == (
        5e-5, "adamw", 384, "bert")
    recipes.split_global_batch(resumed, 4)  # resumed on 4 processes: still 32 a step
    assert (resumed.batch_size, resumed.grad_accum) == (8, 1)
    resumed = parse(qa_task, "--checkpoint", str(state), "--batch_size", "4")
    recipes.split_global_batch(resumed, 4)
    assert (resumed.batch_size, resumed.grad_accum) == (4, 2)


def test_a_resume_refuses_a_recipe(tmp_path, capsys):
    args = parse(qa_task)
    state = tmp_path / "qa_state.pt"
    torch.save({"kind": "state", "args": vars(args), "script": "qa_task.py"}, state)
    with pytest.raises(SystemExit) as exit_info:
        parse(qa_task, "--checkpoint", str(state), "--recipe", "bert")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --recipe bert: a resumed run keeps")
