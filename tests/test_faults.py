"""Runs that survive crashes and restarts on their own (README, "Surviving failures"):
kill -9 of a rank under torchrun --max-restarts, and a killed run whose newest state was
then truncated, both end bitwise equal to an uninterrupted run with the same metrics log;
a finished run is left untouched; an unfinished one is never replaced; SLURM's requeue;
the pieces (kept states, the log cut, the start token of a restart) in-process."""

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import REPO, hashes, one_error_line, toy_lines, write_wikitext

import glue_task
import mlm_task
import qa_task
from bertkit import checks, recipes
from bertkit import flags as cli
from bertkit.files import UserError
from bertkit.training import distributed, logs, states

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
for name in [n for n in ENV if n.startswith(("SLURM_", "TORCHELASTIC_"))] + ["RANK"]:
    ENV.pop(name, None)  # a test run under SLURM or torchrun: the scripts must not see it
# Steps slow enough (tens of ms) for a kill to land between a state write and the end.
MODEL = ["--device", "cpu", "--emsize", "64", "--nhid", "128", "--nlayers", "2", "--nhead",
         "2", "--bptt", "32", "--batch_size", "8", "--dropout", "0.1", "--no-progress",
         "--data-dir", "D", "--dataset", "WikiText2"]
TIMINGS = ("tokens_per_s", "ms_per_step")


def corpus(folder, n_lines=200):
    write_wikitext(folder / "D", toy_lines(n_lines, 0, 30), toy_lines(20, 1, 30),
                   toy_lines(20, 2, 30))


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_bitwise(a_folder, b_folder):
    for name in ("mlm_state.pt", "full_mlm_model.pt", "mlm_bert.pt"):
        a, b = weights(a_folder / name), weights(b_folder / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def rows(folder):
    """The metrics log's rows without their timings: what must equal the reference's."""
    lines = (folder / "mlm_metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def start(command, cwd, env=ENV):
    """The command started in `cwd`, its output going to a file beside that folder."""
    log = cwd.parent / f"{cwd.name}-{time.monotonic_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def output(proc):
    return proc.log.read_text()


def wait_for(condition, proc, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}:\n{output(proc)}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def loads(path):
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # absent, or truncated: not (yet) a state
        return None


def mlm(*flags):
    return [sys.executable, str(REPO / "mlm_task.py"), *MODEL, *flags]


# -- a single process: SIGKILL twice, the newest state truncated in between -----------


SINGLE = ["--epochs", "2", "--max-steps", "40", "--save-every", "3", "--log-interval", "1"]


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    """An uninterrupted run (ref/, alongside) and the same command with --checkpoint auto
    killed twice (run/): once it has two states (the newest then truncated, as by a dying
    node's filesystem), and once the restart wrote a state of its own; then run to its
    end. Its first state file, unfinished, is kept for the refusal test."""
    ref, run, kept = (tmp_path_factory.mktemp(name) for name in ("ref", "run", "kept"))
    for folder in (ref, run):
        corpus(folder)
    command = mlm(*SINGLE, "--checkpoint", "auto")
    reference = start(command, ref)

    first = start(command, run)
    wait_for(lambda: (run / "mlm_state.pt.1").exists(), first, "a second state")
    first.kill()
    first.wait()
    assert (run / ".mlm_state.pt.lock").exists()  # a dead process's lock: not held
    (run / ".mlm_state.pt.k1ll3d.tmp").write_bytes(b"half a state")  # as a killed write leaves
    newest = run / "mlm_state.pt"
    (kept / "mlm_state.pt").write_bytes(newest.read_bytes())
    newest.write_bytes(newest.read_bytes()[:newest.stat().st_size // 2])

    second = start(command, run)  # falls back to mlm_state.pt.1
    wait_for(lambda: loads(newest) is not None, second, "a state of the restarted run")
    second.kill()
    second.wait()
    third = subprocess.run(command, cwd=run, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert reference.wait(timeout=300) == 0, output(reference)
    return argparse.Namespace(ref=ref, run=run, kept=kept, command=command,
                              second=output(second), third=third)


def test_a_killed_run_falls_back_to_the_previous_state_and_ends_bitwise_equal(recovered):
    r = recovered
    assert r.third.returncode == 0, r.third.stdout + r.third.stderr
    fallback = [line for line in r.second.splitlines() if "did not load" in line]
    assert len(fallback) == 1 and "mlm_state.pt (truncated or damaged" in fallback[0]
    assert re.search(r"resuming from the state before, mlm_state.pt.1 \(step [36]\)$",
                     fallback[0]), fallback[0]
    assert "resumed from mlm_state.pt at" in r.third.stdout
    assert_bitwise(r.ref, r.run)
    final = torch.load(r.run / "mlm_state.pt", weights_only=True)
    assert final["finished"] is True and final["train_state"]["global_step"] == 40
    older = torch.load(r.run / "mlm_state.pt.1", weights_only=True)  # --keep-states 2
    assert older["train_state"]["global_step"] < 40 and "finished" not in older
    assert not list(r.run.glob(".*.lock")) and not list(r.run.glob(".*.tmp"))
    # The old example's loss log comes from the state: the same epochs, the same losses.
    def losses(folder):
        return [line for line in (folder / "mlm_loss.txt").read_text().splitlines()
                if line.startswith(("epoch ", "test loss"))]
    assert losses(r.run) == losses(r.ref) and len(losses(r.ref)) == 5


def test_the_metrics_log_after_two_restarts_has_each_step_once(recovered):
    """Both killed attempts wrote rows past their last state; each restart removed them."""
    ref_rows, run_rows = rows(recovered.ref), rows(recovered.run)
    assert run_rows == ref_rows  # the same rows, in order, with bitwise equal losses
    steps = [row["step"] for row in run_rows if "loss" in row]
    assert steps == list(range(1, 41))
    assert [row["step"] for row in run_rows if "valid_loss" in row] == [24, 40]


def test_a_new_run_over_an_unfinished_state_refuses(recovered, monkeypatch, capsys):
    """The killed run's command without --checkpoint auto would start over: refused."""
    monkeypatch.chdir(recovered.kept)
    before = hashes(recovered.kept)
    out, line = one_error_line(mlm_task, [*MODEL, *SINGLE], capsys)
    assert out == "" and hashes(recovered.kept) == before
    assert re.match(r"error: --state-file mlm_state.pt holds the state of an unfinished run "
                    r"\(step [69]\):", line), line
    assert "--checkpoint auto" in line and "another --state-file" in line


def test_a_finished_run_with_checkpoint_auto_exits_0_and_changes_nothing(recovered):
    before = hashes(recovered.run)
    out = subprocess.run(recovered.command, cwd=recovered.run, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "--checkpoint auto: mlm_state.pt: this run finished (step 40, every output written); "
        "nothing to do. To train again, give another --state-file or remove mlm_state.pt"]
    assert hashes(recovered.run) == before  # no lock file made either


def test_a_run_stopped_while_writing_its_outputs_writes_them_once_more(recovered, tmp_path):
    """Stopped after its last state, before the finished mark (its test, its outputs), and
    its newest state truncated: the restart resumes the final state before it, trains no
    more, writes the outputs and marks the state at --state-file; the test row once."""
    run = tmp_path / "run"
    shutil.copytree(recovered.ref, run)
    final = torch.load(run / "mlm_state.pt", weights_only=True)
    del final["finished"]
    torch.save(final, run / "mlm_state.pt.1")
    (run / "mlm_state.pt").write_bytes(b"")
    (run / "mlm_bert.pt").unlink()
    out = subprocess.run(recovered.command, cwd=run, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resuming from the state before, mlm_state.pt.1 (step 40)" in out.stdout
    assert "| epoch" not in out.stdout and out.stdout.count("End of training") == 1
    assert_bitwise(recovered.ref, run)
    assert rows(run) == rows(recovered.ref)
    assert torch.load(run / "mlm_state.pt", weights_only=True)["finished"] is True


# -- torchrun: kill -9 of a rank, torchrun restarts every rank ----------------------


def children(pid):
    """{rank: pid} of the processes whose parent is `pid` (torchrun's workers)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                environ = (entry / "environ").read_bytes().split(b"\0")
                rank = next(int(e[5:]) for e in environ if e.startswith(b"RANK="))
                found[rank] = int(entry.name)
        except (OSError, StopIteration, ValueError):  # gone, or not a worker
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
def test_torchrun_restarts_after_kill_9_of_a_rank_and_ends_bitwise_equal(tmp_path):
    """torchrun --max-restarts with --checkpoint auto: rank 1 killed after a state write,
    torchrun restarts both ranks; they meet again (a fresh store namespace: torch 2.13's
    restarted group otherwise met the dead ranks' addresses) and resume."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    flags = ["--parallel", "DDP", "--epochs", "1", "--max-steps", "16", "--save-every", "4",
             "--log-interval", "2", "--checkpoint", "auto"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    for folder in (ref, run):
        folder.mkdir()
        corpus(folder, n_lines=400)
    reference = start([*torchrun, *mlm(*flags)[1:]], ref)
    proc = start([*torchrun, "--max-restarts", "3", *mlm(*flags)[1:]], run)
    wait_for(lambda: (run / "mlm_state.pt").exists(), proc, "a state file")
    os.kill(children(proc.pid)[1], signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, output(proc)
    assert reference.wait(timeout=300) == 0, output(reference)
    out = output(proc)
    assert "connectFullMesh" not in out
    assert out.count("resumed from mlm_state.pt at") == 1, out
    assert_bitwise(ref, run)
    assert rows(run) == rows(ref)
    assert not list(run.glob(".*.lock")) and not list(run.glob(".*.tmp"))


def test_the_start_token_is_fresh_and_shared_whatever_an_earlier_start_left():
    """torchrun's store outlives the ranks: an earlier start's hello and answer are there
    when the ranks of the next start ask; they agree on a new token all the same."""
    port = distributed._free_port()
    master = dist.TCPStore("127.0.0.1", port, 3, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=30))
    master.set("bert/hello/1", "old")
    master.set("bert/answer/old", "an earlier start's token")
    master.set("bert/hello/2", "older")
    tokens = {}

    def rank(r):
        store = dist.TCPStore("127.0.0.1", port, 3, is_master=False,
                              timeout=timedelta(seconds=30))
        tokens[r] = distributed.start_token(store, distributed.DistInfo(r, 3),
                                            timedelta(seconds=30))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (2, 1, 0)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)  # the other ranks ask before rank 0 is there
    for thread in threads:
        thread.join(timeout=60)
    assert len(set(tokens.values())) == 1 and len(tokens) == 3
    assert tokens[0] != "an earlier start's token"
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] did not join"):
        distributed.start_token(master, distributed.DistInfo(0, 2), timedelta(seconds=0.3))


# -- SLURM: requeue after the state is written ---------------------------------------


@pytest.mark.parametrize("ddp, scontrol_works", [(False, True), (True, False)])
def test_slurm_requeue_after_sigusr1(tmp_path, ddp, scontrol_works):
    """SIGUSR1 under SLURM with --slurm-requeue: the state is written, then rank 0 (once)
    runs `scontrol requeue JOB` and every process exits 0; if scontrol fails, 138 (128 +
    SIGUSR1), the spawning parent reporting its ranks' code."""
    corpus(tmp_path, n_lines=400)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "$* SLURM_JOB_ID=$SLURM_JOB_ID" >> {shlex.quote(str(record))}\n'
        f"exit {0 if scontrol_works else 1}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{ENV['PATH']}", "SLURM_JOB_ID": "4242"}
    flags = ["--epochs", "3", "--log-interval", "2", "--checkpoint", "auto", "--slurm-requeue"]
    if ddp:
        flags += ["--parallel", "DDP", "--world_size", "2"]
    proc = start(mlm(*flags), tmp_path, env)
    wait_for(lambda: "| epoch" in output(proc), proc, "a training step")
    proc.send_signal(signal.SIGUSR1)
    code = proc.wait(timeout=120)
    out = output(proc)
    assert code == (0 if scontrol_works else 138), out
    assert "stopped by a signal (SIGUSR1)" in out and "Traceback" not in out
    assert record.read_text().splitlines() == ["requeue 4242 SLURM_JOB_ID=4242"]
    assert ("requeued SLURM job 4242" in out) == scontrol_works
    state = torch.load(tmp_path / "mlm_state.pt", weights_only=True)
    assert state["train_state"]["global_step"] > 0 and "finished" not in state
    assert "slurm_requeue" in state["args"]


def test_the_first_signal_decides_the_exit_code_and_a_second_ctrl_c_still_quits(monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # no handler in the test process
    preemption = distributed.Preemption()
    preemption._handle(signal.SIGUSR1, None)
    preemption._handle(signal.SIGINT, None)
    assert preemption.signal == signal.SIGUSR1  # 138 unless requeued
    with pytest.raises(KeyboardInterrupt):
        preemption._handle(signal.SIGINT, None)


def test_the_job_to_requeue_is_the_array_tasks_own():
    assert distributed.slurm_job_id({"SLURM_JOB_ID": "77"}) == "77"
    assert distributed.slurm_job_id({"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70",
                                     "SLURM_ARRAY_TASK_ID": "3"}) == "70_3"
    assert distributed.slurm_job_id({}) is None


def test_the_sbatch_script_requeues_and_its_flags_parse():
    script = (REPO / "slurm" / "pretrain.sbatch").read_text()
    options = [line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")]
    assert {"--requeue", "--signal=USR1@120", "--open-mode=append"} <= set(options)
    command = shlex.split(script[script.index("\nsrun "):].replace("\\\n", " "))
    assert command[command.index("python") + 1] == "mlm_task.py"
    args = mlm_task.get_parser().parse_args(command[command.index("python") + 2:])
    assert (args.parallel, args.checkpoint, args.slurm_requeue) == ("DDP", "auto", True)
    assert args.save_every > 0  # a node lost without a signal costs the steps since a state


# -- the pieces, in-process ------------------------------------------------------------


def test_kept_states_rotate_and_only_the_newest_k_stay(tmp_path):
    path = str(tmp_path / "s.pt")

    def save(step, keep, continues):
        states.save({"kind": "state", "train_state": {"global_step": step}}, path, keep,
                    continues)

    def steps():
        return [states.step_of(torch.load(p, weights_only=True)) for _, p in states.family(path)]

    save(1, 3, None)
    save(2, 3, 0)
    save(3, 3, 0)
    save(4, 3, 0)
    assert steps() == [4, 3, 2]
    Path(path).write_bytes(b"half a state")  # resumed from s.pt.1, the one that loads:
    assert states.slot(states.resumable(path)[0], path) == 1
    save(5, 3, 1)  # ... the state that did not load goes, the older ones stay
    assert steps() == [5, 3, 2]
    save(6, 1, 0)  # --keep-states 1: one file, as before kept states
    assert steps() == [6]
    save(7, 2, None)  # a new run: no state of the run before stays beside its own
    save(8, 2, 0)
    assert steps() == [8, 7]
    for _, p in states.family(path):
        Path(p).write_bytes(b"")
    with pytest.raises(UserError, match=r"no state file at .*s.pt loads: .*s.pt \(truncated"):
        states.resumable(path)


def test_a_crash_between_the_moves_and_the_new_state_leaves_the_one_before(tmp_path,
                                                                          monkeypatch):
    path = str(tmp_path / "s.pt")
    for step, continues in ((1, None), (2, 0)):
        states.save({"kind": "state", "train_state": {"global_step": step}}, path, 3, continues)
    replace = os.replace

    def dies_naming_the_new_state(source, target):
        if target == path and source.endswith(".tmp"):
            raise KeyboardInterrupt  # as if killed there
        replace(source, target)

    monkeypatch.setattr(os, "replace", dies_naming_the_new_state)
    with pytest.raises(KeyboardInterrupt):
        states.save({"kind": "state", "train_state": {"global_step": 3}}, path, 3, 0)
    monkeypatch.undo()
    resumed, state, notes = states.resumable(path)
    assert (resumed, states.step_of(state), notes) == (f"{path}.1", 2, [])
    assert sorted(os.listdir(tmp_path)) == ["s.pt.1", "s.pt.2"]  # no temporary file left


def test_a_resumed_metrics_log_keeps_the_rows_of_its_state(tmp_path, monkeypatch):
    log_path = tmp_path / "m.jsonl"
    written = [{"step": s, "loss": 1.0} for s in (1, 2, 3)] + [{"step": 3, "valid_loss": 2.0}]
    log_path.write_text("".join(json.dumps(r) + "\n" for r in written) + '{"step": 4, "lo')
    writers = []

    class Writer:  # torch's SummaryWriter, as far as MetricsLog uses it
        def __init__(self, folder, purge_step=None):
            self.purge_step, self.scalars = purge_step, []
            writers.append(self)

        def add_scalar(self, name, value, step):
            self.scalars.append((name, step))

        flush = close = lambda self: None

    monkeypatch.setattr(logs, "tensorboard_writer", Writer)
    metrics = logs.MetricsLog(str(log_path), tensorboard_dir="tb")
    metrics.resume(step=3, rows=2)  # the state was written after the second row
    assert metrics.rows == 2
    metrics.write({"step": 3, "valid_loss": 2.5})
    assert [json.loads(line) for line in log_path.read_text().splitlines()] == [
        *written[:2], {"step": 3, "valid_loss": 2.5}]
    assert writers[0].purge_step == 4 and writers[0].scalars == [("valid_loss", 3)]
    assert metrics.rows == 3
    # A state file without the row count: the rows of later steps go.
    log_path.write_text("".join(json.dumps(r) + "\n" for r in written))
    logs.MetricsLog(str(log_path)).resume(step=2)
    assert [json.loads(line)["step"] for line in log_path.read_text().splitlines()] == [1, 2]


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_path, events = str(tmp_path / "m.jsonl"), str(tmp_path / "tb")
    stopped = logs.MetricsLog(log_path, events)
    for step in (1, 2, 3, 4):
        stopped.write({"step": step, "loss": float(step)})
    stopped.close()
    resumed = logs.MetricsLog(log_path, events)  # from a state written at step 2
    resumed.resume(step=2, rows=2)
    for step in (3, 4):
        resumed.write({"step": step, "loss": 10.0 + step})
    resumed.close()
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [
        (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_a_resume_never_writes_over_the_state_it_resumes(tmp_path):
    args = cli.parse_args(mlm_task.get_parser(), ["--state-file", str(tmp_path / "s.pt")])
    config = cli.train_config(args)
    assert "--keep-states 2 (older state 1)" in checks.run_outputs(mlm_task.outputs(args), config)
    other = tmp_path / "other.pt"
    other.write_bytes(b"a state from elsewhere")
    config.checkpoint = str(other)
    args.save = str(other)
    with pytest.raises(UserError, match="--save .*other.pt is also --checkpoint"):
        checks.run_outputs(mlm_task.outputs(args), config)


def test_auto_resumes_the_command_that_started_the_run(tmp_path, monkeypatch, capsys):
    """The same command again: its --recipe is the saved one (any other is refused); a
    state file written under --slurm-requeue resumes outside SLURM without it."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    state = tmp_path / "qa_state.pt"
    command = ["--recipe", "bert", "--lr", "5e-5", "--state-file", str(state)]
    args = cli.parse_args(qa_task.get_parser(), command)
    recipes.split_global_batch(args, 1)
    args.slurm_requeue = True
    torch.save({"kind": "state", "args": vars(args), "script": "qa_task.py",
                "train_state": {"global_step": 7}}, state)
    resumed = cli.parse_args(qa_task.get_parser(), [*command, "--checkpoint", "auto"])
    assert (resumed.checkpoint, resumed.optimizer, resumed.lr, resumed.span_loss) == (
        str(state), "adamw", 5e-5, "bert")
    assert resumed.slurm_requeue is False and capsys.readouterr().out == ""
    args = cli.parse_args(qa_task.get_parser(), ["--state-file", str(state)])
    torch.save({"kind": "state", "args": vars(args), "script": "qa_task.py"}, state)
    with pytest.raises(SystemExit):
        cli.parse_args(qa_task.get_parser(), [*command, "--checkpoint", "auto"])
    assert capsys.readouterr().err.strip() == (
        f"error: --recipe bert: the run at {state} was started with --recipe None; a resumed "
        "run keeps it")


def glue_state(folder, finished, *flags, script="glue_task.py", task="RTE"):
    """A state file of a glue_task.py (or `script`) run of `flags` at folder/glue_state.pt,
    as the Trainer writes it, as far as --checkpoint auto reads it."""
    parser = importlib.import_module(script.removesuffix(".py")).get_parser()
    args = vars(cli.parse_args(parser, [*flags, "--state-file", str(folder / "glue_state.pt")]))
    state = {"kind": "state", "args": args, "script": script, "task": task,
             "config": {"emsize": 16, "nhid": 32, "nlayers": 1, "nhead": 2},
             "train_state": {"global_step": 7}}
    torch.save({**state, **({"finished": True} if finished else {})}, folder / "glue_state.pt")


RTE = ["--bert-model", "ns_bert.pt", "--task", "RTE", "--recipe", "bert"]


@pytest.mark.parametrize("finished", [True, False])
@pytest.mark.parametrize("case, flags, expected", [
    # the README's loop over GLUE's tasks without --output-dir: CoLA finds RTE's state
    ("another task", ["--task", "CoLA"], "the state of another run (RTE: --task RTE, not CoLA)"),
    ("other data", ["--train-file", "own.tsv"], "(RTE: --train-file none, not own.tsv)"),
    ("another model", ["--bert-model", "mlm_bert.pt"],
     "(RTE: --bert-model ns_bert.pt, not mlm_bert.pt)"),
    ("other sizes", ["--nlayers", "3"], "(RTE: --nlayers 1, not 3)"),
])
def test_auto_refuses_the_state_of_another_run_finished_or_not(
        tmp_path, monkeypatch, capsys, finished, case, flags, expected):
    """Before "finished; nothing to do" or a resume, --checkpoint auto compares the state's
    run with the command's: another task, other data, another starting model or other
    sizes given is one error line, exit 2, nothing touched."""
    monkeypatch.chdir(tmp_path)
    glue_state(tmp_path, finished, *RTE)
    before = hashes(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(glue_task.get_parser(), [*RTE, *flags, "--checkpoint", "auto"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and out == "", (out, err)
    (line,) = err.strip().splitlines()
    assert line.startswith("error: --checkpoint auto: glue_state.pt: the state of another run (")
    assert expected in line and line.endswith(
        "; give this run another --output-dir or --state-file (or remove glue_state.pt and the "
        "states beside it)")
    assert hashes(tmp_path) == before


def test_auto_goes_on_with_the_state_of_its_own_run(tmp_path, monkeypatch, capsys):
    """The same task in transformers' spelling is the same run: finished, nothing to do;
    unfinished, resumed. --evaluate-only and --predict resume nothing: they do their work."""
    monkeypatch.chdir(tmp_path)
    glue_state(tmp_path, True, *RTE)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(glue_task.get_parser(), [*RTE[:3], "rte", "--checkpoint", "auto"])
    assert exit_info.value.code == 0 and "this run finished" in capsys.readouterr().out
    predict = cli.parse_args(glue_task.get_parser(), [
        "--predict", "--sentence", "a", "--checkpoint", "auto"])
    assert predict.checkpoint == "None" and capsys.readouterr().out == ""
    glue_state(tmp_path, False, *RTE)
    resumed = cli.parse_args(glue_task.get_parser(), [*RTE[:3], "rte", "--checkpoint", "auto"])
    assert resumed.checkpoint == "glue_state.pt" and resumed.task == "rte"


def test_auto_refuses_a_finished_state_of_another_script(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    glue_state(tmp_path, True, script="qa_task.py", task="SQuAD v1.1")
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(glue_task.get_parser(), [
            *RTE, "--state-file", "glue_state.pt", "--checkpoint", "auto"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err == (
        "error: --checkpoint auto: glue_state.pt: a state file of qa_task.py; resume it with "
        "python qa_task.py --checkpoint glue_state.pt")


@pytest.fixture
def data_folder(tmp_path, monkeypatch):
    corpus(tmp_path, n_lines=40)
    (tmp_path / "a_folder").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    return tmp_path


BAD = {
    "keep no state": (["--keep-states", "0"], "--keep-states 0: must be at least 1"),
    "auto with a folder": (["--checkpoint", "auto", "--state-file", "a_folder"],
                           "--state-file a_folder: is a folder; --checkpoint auto"),
    "requeue outside SLURM": (["--slurm-requeue"], "--slurm-requeue: not running under SLURM"),
    "metrics over the training text": (["--metrics-file", "D/wikitext-2/wiki.train.tokens"],
                                       "--metrics-file D/wikitext-2/wiki.train.tokens is also "
                                       "--dataset WikiText2's train file"),
    "save into the token cache": (["--save", "D/wikitext-2/.cache/train.0123.ids"],
                                  "is inside D/wikitext-2/.cache (the token-id cache of --dataset WikiText2)"),
    "loss log into a folder dataset": (["--dataset", "."], "mlm_bert.pt is inside . (--dataset)"),
    "save over a file of a folder dataset": (
        ["--dataset", "D/wikitext-2", "--save", "D/wikitext-2/wiki.valid.tokens"],
        "--save D/wikitext-2/wiki.valid.tokens is inside D/wikitext-2 (--dataset)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_before_any_work(data_folder, case, capsys):
    flags, expected = BAD[case]
    before = hashes(data_folder)
    _, line = one_error_line(mlm_task, [*MODEL, *flags], capsys)
    assert expected in line, line
    assert hashes(data_folder) == before


def test_requeue_without_scontrol_is_refused(data_folder, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("PATH", str(data_folder / "a_folder"))
    with pytest.raises(SystemExit):
        cli.parse_args(mlm_task.get_parser(), ["--slurm-requeue"])
    assert capsys.readouterr().err.strip() == (
        "error: --slurm-requeue: scontrol is not on the PATH, so the job cannot be requeued")
