"""--time-budget (bertkit/training/budget.py): durations, the steps that fit, the run that
measures them without changing what it trains, the state file that records them and the
resume that keeps them, the stop when steps run slow, and one error line for a bad or a
too-short budget. No timing is asserted beyond "it ended and recorded its steps"."""

import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, one_thread, toy_lines, write_wikitext

import mlm_task
from bertkit import checks, mains
from bertkit import flags as cli
from bertkit.files import UserError
from bertkit.training import budget, distributed

TINY = ["--device", "cpu", "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--nhead", "2",
        "--bptt", "16", "--batch_size", "4", "--no-progress", "--data-dir", "D", "--dataset",
        "WikiText2", "--optimizer", "adamw", "--schedule", "linear", "--warmup", "0.1",
        "--lr", "1e-3", "--dropout", "0.1", "--log-interval", "5", "--epochs", "100"]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("60m", 3600), ("2h", 7200),
                                           ("1.5h", 5400), ("45", 45), (".5m", 30)])
def test_durations(text, seconds):
    assert budget.duration(text) == seconds


@pytest.mark.parametrize("seconds, text", [(3600, "60m"), (90, "90s"), (5400, "90m"),
                                           (7200, "2h"), (9000, "2.5h"), (1.5, "1.5s")])
def test_durations_are_shown_as_written(seconds, text):
    assert budget.shown(seconds) == text


@pytest.mark.parametrize("argv", [["--time-budget", "0"], ["--time-budget=-5m"],
                                  ["--time-budget", "-5m"], ["--time-budget", "1x"],
                                  ["--time-budget", "inf"]])
def test_a_bad_budget_is_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(mlm_task.get_parser(), argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: --time-budget")


def stub(per_epoch=20, max_steps=0, epochs=100, eval_every=0, save_every=0):
    config = SimpleNamespace(max_steps=max_steps, epochs=epochs, eval_every=eval_every,
                             save_every=save_every)
    task = SimpleNamespace(train_batches=lambda epoch: range(per_epoch))
    return config, SimpleNamespace(task=task, steps_per_epoch=lambda n: n)


def a_budget(config, seconds, spent, lines):
    flags = {"time_budget": seconds, "launched_at": time.time() - spent}
    return budget.TimeBudget(config, flags, distributed.DistInfo(), torch.device("cpu"),
                             lines.append)


def test_the_steps_that_fit_leave_room_for_every_validation_save_and_the_test():
    """110 s, 10 spent, 1 s a step, 2 s a validation, 0.5 s a write, 20 steps an epoch: n
    steps, n // 20 validations (2.5 s with the best model's write) and state writes
    (0.5 s), then the final validation, test and writes (6 s), within 98.9 s: 80."""
    config, trainer = stub()
    lines = []
    assert a_budget(config, 110, 10, lines).fit(trainer, 1.0, 2.0, 0.5) == 80
    assert lines[0].startswith("--time-budget 110s: 80 optimizer steps fit, the warmup and "
                               "decay span 80 steps (1.000 s a step")
    for limits, fixed, flag in (({"max_steps": 50}, 50, "--max-steps"),
                                ({"epochs": 2}, 40, "--epochs")):
        config, trainer = stub(**limits)
        lines = []
        assert a_budget(config, 110, 10, lines).fit(trainer, 1.0, 2.0, 0.5) == fixed
        assert f"80 optimizer steps fit; {flag} ends it first, at {fixed}" in lines[0]


def test_the_steps_are_timed_for_a_share_of_the_budget():
    """An hour times its steps for 18 s (at least 5 steps, at most 50), so one slow step
    does not fix the schedule; 90 s times 5 steps."""
    config, _ = stub()
    hour, short = a_budget(config, 3600, 0, []), a_budget(config, 90, 0, [])
    cpu = torch.device("cpu")
    assert not hour._timed_enough([1.0] * 17, cpu) and hour._timed_enough([1.0] * 18, cpu)
    assert not hour._timed_enough([10.0] * 4, cpu) and hour._timed_enough([10.0] * 5, cpu)
    assert not hour._timed_enough([0.01] * 49, cpu) and hour._timed_enough([0.01] * 50, cpu)
    assert short._timed_enough([0.5] * 5, cpu) and not short._timed_enough([0.5] * 4, cpu)


def test_a_budget_shorter_than_one_step_is_an_error():
    config, trainer = stub()
    with pytest.raises(UserError, match=r"^--time-budget 12s: shorter than one step of this "
                                        r"run: a step takes 1.00 s"):
        a_budget(config, 12, 10, []).fit(trainer, 1.0, 2.0, 0.5)


def test_steps_slower_than_measured_stop_the_run_in_time():
    config, _ = stub()
    lines = []
    late = a_budget(config, 10, 9.5, lines)
    late.steps, late.final = 100, 1.0
    assert not late.out_of_time(100)  # the last step: the run ends anyway
    assert late.out_of_time(5) and config.max_steps == 5 and late.state()["stop"] == 5
    assert lines == ["--time-budget 10s: the steps ran slower than measured; training stops "
                     "at step 5 of 100 to leave its final validation, test and saves inside "
                     "the budget"]
    on_time = a_budget(stub()[0], 100, 1, [])
    on_time.steps, on_time.final = 100, 1.0
    assert not on_time.out_of_time(5)
    assert budget.TimeBudget(config, {}, None, None, None).state() is None  # no budget


# -- runs ---------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    write_wikitext(tmp_path / "D", toy_lines(100, 0), toy_lines(20, 1), toy_lines(20, 2))
    return tmp_path


def train(folder, monkeypatch, *argv):
    """mlm_task.py in this process, in `folder`: its printed lines."""
    monkeypatch.chdir(folder)
    lines = []
    monkeypatch.setattr(mlm_task.logs, "make_logger",
                        lambda info: lambda *parts: lines.append(" ".join(map(str, parts))))
    with one_thread():
        try:
            mains.launch(mlm_task.main, cli.parse_args(mlm_task.get_parser(),
                                                       [*TINY, *argv]))
        finally:
            checks.release_outputs()
    return lines


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_the_measurement_leaves_the_training_as_max_steps_would_give_it(corpus, tmp_path,
                                                                      monkeypatch):
    """A budget capped by --max-steps 12 trains what --max-steps 12 alone trains, bitwise:
    the measured steps are thrown away (weights, optimizer and random streams put back)."""
    plain, timed = tmp_path / "plain", tmp_path / "timed"
    for folder in (plain, timed):
        shutil.copytree(corpus / "D", folder / "D")
    train(plain, monkeypatch, "--max-steps", "12")
    lines = train(timed, monkeypatch, "--max-steps", "12", "--time-budget", "10m")
    fixed = [line for line in lines if line.startswith("--time-budget 10m: ")]
    assert len(fixed) == 1 and "--max-steps ends it first, at 12" in fixed[0], lines
    for name in ("mlm_bert.pt", "full_mlm_model.pt", "mlm_state.pt"):
        a, b = weights(plain / name), weights(timed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = torch.load(timed / "mlm_state.pt", weights_only=True)
    assert state["train_state"]["budget"]["steps"] == 12 and state["finished"] is True
    assert torch.load(plain / "mlm_state.pt", weights_only=True)["train_state"]["budget"] is None


def test_a_resume_keeps_the_steps_of_its_state_file(corpus, monkeypatch):
    """A state that records 16 steps resumes to 16 (the schedule fixed at the start),
    measuring nothing, whatever --max-steps the run was started with."""
    train(corpus, monkeypatch, "--max-steps", "12", "--time-budget", "10m", "--save-every", "4",
          "--keep-states", "4")
    older = [p for p in sorted(corpus.glob("mlm_state.pt.*"))
             if torch.load(p, weights_only=True)["train_state"]["global_step"] < 12][0]
    state = torch.load(older, weights_only=True)
    state["train_state"]["budget"]["steps"] = 16
    torch.save(state, older)

    def no_measurement(self, trainer):
        raise AssertionError("a resumed run measured its steps again")

    monkeypatch.setattr(budget.TimeBudget, "measure", no_measurement)
    lines = train(corpus, monkeypatch, "--checkpoint", older.name)
    assert any(line.startswith("--time-budget 10m: continuing the schedule of 16 optimizer "
                               "steps") for line in lines), lines
    final = torch.load(corpus / "mlm_state.pt", weights_only=True)["train_state"]
    assert final["global_step"] == 16 and final["budget"]["steps"] == 16


def test_a_resume_of_a_run_without_a_budget_refuses_one(corpus, monkeypatch, capsys):
    train(corpus, monkeypatch, "--max-steps", "4", "--save-every", "2", "--keep-states", "3")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        train(corpus, monkeypatch, "--checkpoint", "mlm_state.pt.1", "--time-budget", "60m")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --time-budget 60m: the run at mlm_state.pt.1 was started "
                             "without one")


def run(folder, *argv):
    return subprocess.run([sys.executable, str(REPO / "mlm_task.py"), *TINY, *argv], cwd=folder,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_budget_run_ends_and_its_state_records_the_steps(corpus):
    out = run(corpus, "--time-budget", "8s")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "optimizer steps fit" in out.stdout and "End of training" in out.stdout
    state = torch.load(corpus / "mlm_state.pt", weights_only=True)
    steps = state["train_state"]["budget"]["steps"]
    assert state["finished"] is True and steps > 0
    assert 0 < state["train_state"]["global_step"] <= steps


def test_a_budget_shorter_than_one_step_says_so_in_one_line(corpus):
    out = run(corpus, "--time-budget", "0.1s")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("error: --time-budget 0.1s: shorter than one step of this run")
    assert not (corpus / "mlm_state.pt").exists()
