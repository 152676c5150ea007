"""Distributed training, exact resume, preemption, NaN stop and atomic checkpoints (CPU, gloo)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import end_spawned_rank
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from bertkit import files
from bertkit.text import tokenizer
from bertkit.text.corpus import load_splits
from bertkit.training import distributed
from mlm_task import MLM
from model import BertConfig, MLMTask

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--nhead", "2",
        "--bptt", "16", "--batch_size", "4", "--log-interval", "5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small WikiText-2-layout folder of synthetic text with long lines (for ns)."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "wikitext-2"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(60)]
    for split, n_lines in (("train", 120), ("valid", 20), ("test", 20)):
        lines = []
        for _ in range(n_lines):
            idx = torch.randint(0, len(words), (40,), generator=g).tolist()
            lines.append(" ".join(words[i] for i in idx) + " .")
        (folder / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n")
    return root


def run(script, *flags, cwd, check=True, env=None):
    result = subprocess.run([sys.executable, str(REPO / script), *flags], cwd=cwd,
                            capture_output=True, text=True, timeout=300, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def data_flags(corpus):
    return ["--data-dir", str(corpus), "--dataset", "WikiText2"]


# -- SLURM -------------------------------------------------------------------


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[9-11],cpu5", ["gpu9", "gpu10", "gpu11", "cpu5"]),
    ("a[1,3],b[08-09]", ["a1", "a3", "b08", "b09"]),
    ("n-1,n-2", ["n-1", "n-2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert distributed.expand_nodelist(nodelist) == hosts


def test_slurm_one_task_per_node_spawns_per_gpu():
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "node[04-05]", "SLURM_JOB_ID": "123456"}
    per_task, first_rank, world, addr, port = distributed.slurm_env(env, gpus_per_node=8)
    assert (per_task, first_rank, world, addr) == (8, 8, 16, "node04")
    assert port == 10000 + 123456 * 16 % 50000


def test_slurm_one_task_per_gpu_uses_the_tasks():
    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[1-2]", "SLURM_JOB_ID": "7", "MASTER_PORT": "29511"}
    assert distributed.slurm_env(env, gpus_per_node=8) == (1, 9, 16, "gpu1", 29511)


def test_slurm_job_step_uses_its_own_nodes_and_port():
    """A step on a subset of the job's nodes meets on its own first node, and two steps
    of one job (run at once) get different ports."""
    job = {"SLURM_JOB_NODELIST": "gpu[1-4]", "SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS": "16",
           "SLURM_JOB_ID": "4242", "SLURM_PROCID": "1"}
    step = {**job, "SLURM_STEP_NODELIST": "gpu[3-4]", "SLURM_STEP_NUM_NODES": "2",
            "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_ID": "1"}
    per_task, first_rank, world, addr, port = distributed.slurm_env(step, gpus_per_node=4)
    assert (per_task, first_rank, world, addr) == (1, 1, 8, "gpu3")
    other = distributed.slurm_env({**step, "SLURM_STEP_ID": "2"}, gpus_per_node=4)[4]
    assert port != other


# -- DDP gradients equal a single-process step on the union of the batches ---


def _tiny_model():
    torch.manual_seed(0)
    return MLMTask(BertConfig(vocab_size=50, emsize=16, nhead=2, nhid=32, nlayers=2, dropout=0.0))


def _batch(rows):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, 50, (8, 12), generator=g)
    tokens[:, 0] = tokenizer.CLS_ID
    inputs, targets, masked_positions = data.mask_tokens(
        tokens, data.Masking(0.25, "mask", tokenizer.MASK_ID, torch.arange(5, 50)), generator=g)
    return {"inputs": inputs[rows], "masked_positions": masked_positions[rows],
            "targets": tokens[rows].gather(1, masked_positions[rows]).flatten()}


def _ddp_grads(rank, world_size, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    model = DDP(_tiny_model())
    rows = slice(rank * 4, (rank + 1) * 4)
    MLM.mlm_loss(model, _batch(rows)).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out)
    end_spawned_rank()


def test_ddp_gradients_equal_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_grads, args=(2, distributed._free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    model = _tiny_model()
    MLM.mlm_loss(model, _batch(slice(0, 8))).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp[name], p.grad, atol=1e-6, rtol=0, msg=name)


# -- two-process runs of the task scripts ---------------------------------------


def test_mlm_and_ns_two_processes(corpus, tmp_path):
    out = run("mlm_task.py", *data_flags(corpus), *TINY, "--epochs", "1", "--max-steps", "12",
              "--parallel", "DDP", "--world_size", "2", cwd=tmp_path)
    assert out.stdout.count("End of training") == 1
    ns = run("ns_task.py", "--bert-model", "mlm_bert.pt", *data_flags(corpus), *TINY,
             "--min_sentence_len", "10", "--epochs", "1", "--max-steps", "6",
             "--parallel", "DDP", "--world_size", "2", cwd=tmp_path)
    assert ns.stdout.count("End of training") == 1
    assert (tmp_path / "ns_bert.pt").exists()


def test_sharded_evaluation_equals_single_process(corpus, tmp_path):
    """The valid loss of a 2-rank run equals a 1-process evaluation of its saved model."""
    out = run("mlm_task.py", *data_flags(corpus), *TINY, "--epochs", "1", "--max-steps", "4",
              "--parallel", "DDP", "--world_size", "2", cwd=tmp_path)
    printed = float(out.stdout.split("valid loss")[1].split("|")[0])
    args = __import__("mlm_task").get_parser().parse_args([*data_flags(corpus), *TINY])
    vocab, splits = load_splits("WikiText2", str(corpus), vocab_path=str(tmp_path / "bert_vocab.pt"),
                                log=lambda *a: None)
    ckpt = torch.load(tmp_path / "full_mlm_model.pt", weights_only=True)
    config = BertConfig.from_dict(ckpt["config"])
    model = MLMTask(config)
    model.load_state_dict(ckpt["model"])
    task = MLM(args, vocab, splits, config, distributed.DistInfo(), torch.device("cpu"))
    loss = task.evaluate(model, "valid")["loss"]
    assert abs(loss - printed) < 1e-4


# -- resume, preemption --------------------------------------------------------


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("budget", [[], ["--time-budget", "10m"]], ids=["steps", "time-budget"])
def test_sigterm_then_resume_is_bitwise_equal(corpus, tmp_path, budget):
    """Also under --time-budget: each run measures its steps (capped here by --max-steps, so
    both fix 70), the resume keeps the schedule of its state file and measures nothing."""
    flags = [*data_flags(corpus), *TINY, "--epochs", "2", "--dropout", "0.1", "--save-every", "7",
             "--max-steps", "70", *budget]
    full = tmp_path / "full"
    full.mkdir()
    run("mlm_task.py", *flags, cwd=full)

    part = tmp_path / "part"
    part.mkdir()
    proc = subprocess.Popen([sys.executable, str(REPO / "mlm_task.py"), *flags], cwd=part,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # interrupt once training is under way
        if line.startswith("| epoch"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 143  # 128 + SIGTERM: stopped, not finished
    assert "stopped by a signal" in rest and "End of training" not in rest
    resumed = run("mlm_task.py", "--checkpoint", "mlm_state.pt", cwd=part)
    assert "resumed from mlm_state.pt" in resumed.stdout
    if budget:
        assert "--time-budget 10m: continuing the schedule of 70 optimizer steps" in resumed.stdout
        assert "steps fit" not in resumed.stdout
        state = torch.load(part / "mlm_state.pt", weights_only=True)["train_state"]
        assert state["budget"]["steps"] == 70 and state["global_step"] == 70
    a, b = _weights(full / "full_mlm_model.pt"), _weights(part / "full_mlm_model.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _weights(full / "mlm_bert.pt").keys() == _weights(part / "mlm_bert.pt").keys()


def test_nan_loss_stops_and_keeps_last_good_state(corpus, tmp_path):
    flags = [*data_flags(corpus), *TINY, "--epochs", "1", "--save-every", "1",
             "--lr", "1e25", "--clip", "1e30"]
    out = run("mlm_task.py", *flags, cwd=tmp_path, check=False)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "NaN or infinite at step" in errors[0]
    step = int(errors[0].split("at step ")[1].split(";")[0])
    state = torch.load(tmp_path / "mlm_state.pt", weights_only=True)
    assert state["train_state"]["global_step"] == step - 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_checkpoint_flag_rejects_other_files(corpus, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    out = run("mlm_task.py", "--checkpoint", "junk.pt", cwd=tmp_path, check=False)
    assert out.returncode != 0 and out.stderr.startswith("error: --checkpoint junk.pt")
    assert "Traceback" not in out.stderr


# -- atomic writes -------------------------------------------------------------


def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    files.atomic_save({"x": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if killed in the middle

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_save({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_sigkill_during_writes_leaves_a_loadable_file(tmp_path):
    path = tmp_path / "state.pt"
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from bertkit import files\n"
        "files.atomic_save({'step': 0, 'w': torch.zeros(1)}, sys.argv[2])\n"
        "print('ready', flush=True)\n"
        "for step in range(1, 10**9):\n"
        "    files.atomic_save({'step': step, 'w': torch.full((1 << 20,), float(step))}, sys.argv[2])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(REPO), str(path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # let it write a number of files, then kill it mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 0 or torch.equal(ckpt["w"], torch.full((1 << 20,), float(ckpt["step"])))


# -- failures in one rank ---------------------------------------------------------


def _fails_on_rank_1(info):
    dist.barrier()
    if info.rank == 1:
        raise RuntimeError("boom on rank 1")
    dist.barrier()  # rank 0 would wait here forever if rank 1's failure were not seen


def _bad_input_on_every_rank(info):
    raise files.UserError("the same bad input on every rank")


def _ddp_launch():
    return distributed.Launch(parallel="DDP", world_size=2, device="cpu")


def test_a_failing_rank_stops_every_rank(capfd):
    with pytest.raises(SystemExit) as exit_info:
        distributed.launch(_fails_on_rank_1, _ddp_launch())
    assert exit_info.value.code != 0
    err = capfd.readouterr().err
    assert "RuntimeError: boom on rank 1" in err and err.count("[rank 1] Traceback") == 1
    assert "[rank 0] Traceback" not in err  # the other rank only notes that it stopped


def test_bad_input_is_reported_once(capfd):
    with pytest.raises(SystemExit) as exit_info:
        distributed.launch(_bad_input_on_every_rank, _ddp_launch())
    assert exit_info.value.code != 0
    err = capfd.readouterr().err
    assert err.count("error: the same bad input on every rank") == 1
