"""The parts of the GPU code paths that a CPU can check.

NCCL has no collectives for CPU tensors: every tensor handed to a collective must live on
the training device. The CPU tests run gloo, which accepts any, so here the device is
`meta` and torch.distributed is mocked: a tensor built on the CPU by mistake shows up.
"""

import argparse
import functools

import pytest
import torch
import torch.distributed as dist
from conftest import end_spawned_rank

import data
import mlm_task
import utils
from bertkit import files
from bertkit import flags as cli
from bertkit.squad import dataset as squad
from bertkit.squad import windows as qa_windows
from bertkit.text import tokenizer
from bertkit.training import distributed, trainer
from mlm_task import MLM
from model import BertConfig, MLMTask, NextSentenceTask
from ns_task import NextSentence

META = torch.device("meta")
TWO_RANKS = distributed.DistInfo(rank=0, world_size=2)


class CollectiveCalled(Exception):
    pass


@pytest.fixture
def collectives(monkeypatch):
    """Records the device of every tensor handed to all_reduce, then stops the caller
    (a meta tensor has no value to read back)."""
    devices = []

    def all_reduce(tensor, op=None, **kwargs):
        devices.append(tensor.device)
        raise CollectiveCalled

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    return devices


def test_stop_flags_are_reduced_on_the_training_device(collectives):
    first_bad_step = torch.full((), -1, device=META)
    with pytest.raises(CollectiveCalled):
        distributed.sync_stop_flags(first_bad_step, True, TWO_RANKS)
    assert collectives == [META]


def test_stop_flags_agree_across_ranks(monkeypatch):
    """What the reduction computes: a signal on any rank stops all; the earliest
    non-finite step of any rank is reported."""
    other_rank = torch.tensor([0.0, -3.0])  # not signalled, NaN at step 3

    def all_reduce(tensor, op=None):
        assert op == dist.ReduceOp.MAX
        torch.maximum(tensor, other_rank, out=tensor)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    assert distributed.sync_stop_flags(torch.tensor(-1), True, TWO_RANKS) == (3, True)
    assert distributed.sync_stop_flags(torch.tensor(5), False, TWO_RANKS) == (3, False)
    other_rank = torch.tensor([0.0, -float("inf")])
    assert distributed.sync_stop_flags(torch.tensor(-1), False, TWO_RANKS) == (-1, False)
    # Alone, no collective at all.
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: pytest.fail("collective"))
    assert distributed.sync_stop_flags(torch.tensor(7), True, distributed.DistInfo()) == (7, True)


def _tiny_config():
    return BertConfig(vocab_size=40, emsize=16, nhead=2, nhid=32, nlayers=1, dropout=0.0,
                      pad_id=tokenizer.PAD_ID)


def _split(n_lines=20, length=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 40, (n_lines * length,), generator=g, dtype=torch.int32)
    return data.TokenizedSplit(ids, torch.arange(0, n_lines * length + 1, length))


def _args(**overrides):
    fields = dict(bptt=8, batch_size=2, mask_frac=0.25, mask_mode="mask", seed=1, dtype="fp32",
                  dataset="toy", min_sentence_len=4, frac_ns=0.5, save="e.pt", save_vocab="v.pt",
                  eval_batches=0, next_sentence=False)
    return argparse.Namespace(**{**fields, **overrides})


@pytest.mark.parametrize("task_name", ["mlm", "ns"])
def test_evaluation_sums_are_reduced_on_the_training_device(task_name, collectives):
    splits = {split: _split() for split in data.SPLITS}
    vocab = tokenizer.Vocab(list(tokenizer.SPECIALS) + [f"w{i}" for i in range(35)])
    config = _tiny_config()
    if task_name == "mlm":
        task = MLM(_args(), vocab, splits, config, TWO_RANKS, META)
        model = MLMTask(config)
    else:
        task = NextSentence(_args(), vocab, splits, config, TWO_RANKS, META)
        model = NextSentenceTask(config)
    with pytest.raises(CollectiveCalled):
        task.evaluate(model.to(META), "valid")
    assert collectives == [META]


def test_local_rank_wraps_around_the_visible_gpus(monkeypatch):
    """srun --gpus-per-task=1: every task sees one GPU, index 0, whatever SLURM_LOCALID."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    assert utils.get_device("cuda", local_rank=3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert utils.get_device("cuda", local_rank=6) == torch.device("cuda", 2)
    assert chosen == [torch.device("cuda", 0), torch.device("cuda", 2)]


def test_bf16_is_refused_where_it_would_be_emulated(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(files.UserError, match="V100 has no native bf16"):
        utils.check_precision(torch.device("cuda", 0), "bf16")
    utils.check_precision(torch.device("cuda", 0), "fp16")
    with pytest.raises(files.UserError, match="fp16 needs a GPU"):
        utils.check_precision(torch.device("cpu"), "fp16")
    utils.check_precision(torch.device("cpu"), "bf16")


def test_a_failing_collective_prints_its_own_error(capfd):
    """An error raised inside torch.distributed (here: no process group) names itself on
    every rank, instead of only blaming another rank."""
    try:
        dist.all_reduce(torch.zeros(1))
    except Exception as e:  # what torch raises here varies between versions
        error = e
    distributed._report_rank_failure(error, distributed.DistInfo(rank=1, world_size=2))
    err = capfd.readouterr().err
    assert err.startswith("[rank 1] stopped: a collective failed: ")
    assert str(error).split()[0] in err


def _two_rank_state(rank, port, folder):
    """Two gloo ranks save a state file; returns nothing, rank 0 writes it."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    info = distributed.DistInfo(rank, 2)
    args = mlm_task.get_parser().parse_args(["--seed", "7", "--lr", "0.1", "--state-file",
                                             str(folder / "state.pt")])
    task = argparse.Namespace(config=_tiny_config(), vocab=tokenizer.Vocab(list(tokenizer.SPECIALS)))
    torch.manual_seed(args.seed)
    loop = trainer.Trainer(task, MLMTask(_tiny_config()), cli.train_config(args),
                           info, torch.device("cpu"), lambda *a: None, flags=vars(args))
    torch.save(torch.rand(4), folder / f"draw{rank}.pt")  # each rank's next random numbers
    loop.save_state()
    end_spawned_rank()


def test_each_rank_has_its_own_rng_and_the_state_keeps_each(tmp_path):
    torch.multiprocessing.spawn(_two_rank_state, args=(distributed._free_port(), tmp_path), nprocs=2)
    draws = [torch.load(tmp_path / f"draw{rank}.pt") for rank in range(2)]
    assert not torch.equal(*draws)  # different dropout masks on each rank
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_qa_batches_under_compile_have_one_shape():

    questions = [squad.Question(str(i), "what is it", " ".join(["word"] * (5 + 7 * i)), [])
                 for i in range(4)]
    vocab = tokenizer.Vocab(list(tokenizer.SPECIALS) + ["word", "what", "is", "it"])
    windows = qa_windows.make_windows(questions, vocab, qa_windows.Windowing(bptt=24, max_query_len=4,
                                                                       doc_stride=8))
    order = torch.arange(len(windows))
    trimmed = data.Batches(functools.partial(qa_windows.window_batch, windows, None), order, 2)
    fixed = data.Batches(functools.partial(qa_windows.window_batch, windows, 24), order, 2)
    trimmed, fixed = ([batches[i] for i in range(len(batches))] for batches in (trimmed, fixed))
    assert len({batch["inputs"].shape[1] for batch in trimmed}) > 1
    assert {batch["inputs"].shape[1] for batch in fixed} == {24}
    for short, full in zip(trimmed, fixed, strict=True):
        length = short["inputs"].shape[1]
        assert torch.equal(full["inputs"][:, :length], short["inputs"])
        assert not full["padding_mask"][:, length:].any()
