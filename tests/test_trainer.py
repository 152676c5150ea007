"""bertkit/training/trainer.py's optimizer, schedules and gradient accumulation; the metrics log, progress
bars and plot.py; the new flags' checks. In-process on tiny models where the Trainer can
be driven directly, mlm_task.py in a subprocess where the whole run is the point."""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, write_wikitext

import data
import mlm_task
import utils
from bertkit import checkpoint, files, mains
from bertkit import flags as cli
from bertkit.text import tokenizer
from bertkit.training import distributed, logs, optimizer, trainer
from model import BertConfig, MLMTask

CPU = torch.device("cpu")
VOCAB = tokenizer.Vocab(list(tokenizer.SPECIALS) + [f"w{i}" for i in range(35)])
# Tiny models gain nothing from a second thread (see tests/test_tasks.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _split(seed, n_tokens=480):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(VOCAB), (n_tokens,), generator=g, dtype=torch.int32)
    return data.TokenizedSplit(ids, torch.tensor([0, n_tokens]))


def _args(tmp_path, *extra):
    return cli.parse_args(mlm_task.get_parser(), [
        "--bptt", "9", "--batch_size", "4", "--dropout", "0", "--epochs", "1",
        "--state-file", str(tmp_path / "state.pt"), "--metrics-file", str(tmp_path / "m.jsonl"),
        *extra])


def _model():
    torch.manual_seed(0)
    return MLMTask(BertConfig(vocab_size=len(VOCAB), emsize=16, nhead=2, nhid=32, nlayers=1,
                              dropout=0.0, pad_id=tokenizer.PAD_ID))


def _trainer(args, monkeypatch, model=None, log=lambda *a: None):
    """A Trainer of the MLM task on random tokens; its SIGTERM handler not installed in
    the test process."""
    model = model or _model()
    task = mlm_task.MLM(args, VOCAB, {s: _split(i) for i, s in enumerate(data.SPLITS)},
                        model.bert_model.config, distributed.DistInfo(), CPU)
    monkeypatch.setattr(signal, "signal", lambda *a: None)
    return trainer.Trainer(task, model, cli.train_config(args), distributed.DistInfo(), CPU, log,
                           flags=vars(args))


# -- schedules -------------------------------------------------------------------


def _lrs(args, monkeypatch, n_steps):
    """The lr of each of the first n_steps optimizer steps, as the Trainer sets them."""
    loop = _trainer(args, monkeypatch)
    lrs = []
    for _ in range(n_steps):
        lrs.append(loop.optimizer.param_groups[0]["lr"])
        loop.optimizer.step()
        loop.scheduler.step()
    return lrs


@pytest.mark.parametrize("shape, expected", [
    # 100 steps, 10 of warmup: step 40 is 30/90 of the way down.
    ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 40: 2 / 3, 55: 0.5, 99: 1 / 90}),
    ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 40: 0.75, 55: 0.5, 99: 0.5 * (1 + math.cos(math.pi * 89 / 90))}),
])
def test_schedule_lr_at_chosen_steps_is_the_formula(tmp_path, monkeypatch, shape, expected):
    args = _args(tmp_path, "--optimizer", "adamw", "--lr", "0.002", "--schedule", shape,
                 "--warmup", "0.1", "--max-steps", "100", "--epochs", "1000")
    lrs = _lrs(args, monkeypatch, 100)
    for step, factor in expected.items():
        assert lrs[step] == pytest.approx(0.002 * factor, rel=1e-12, abs=1e-15), step


def test_total_steps_are_epochs_times_steps_per_epoch_or_max_steps(tmp_path, monkeypatch):
    # 480 tokens: 60 windows of 8, 15 batches of 4 an epoch, 8 optimizer steps of 2.
    args = _args(tmp_path, "--schedule", "linear", "--epochs", "3", "--grad-accum", "2")
    assert _trainer(args, monkeypatch).total_steps() == 24
    args.max_steps = 10
    assert _trainer(args, monkeypatch).total_steps() == 10


def test_warmup_starts_at_zero(tmp_path, monkeypatch):
    args = _args(tmp_path, "--optimizer", "adamw", "--lr", "0.01", "--schedule", "linear",
                 "--warmup", "0.5", "--weight-decay", "0.1")
    loop = _trainer(args, monkeypatch)
    before = {k: v.clone() for k, v in loop.model.state_dict().items()}
    batches = loop.task.train_batches(1)
    loop.step([batches[0]])
    assert loop.step_lr == 0.0
    # lr 0: neither the update nor the (lr-scaled) decoupled decay moved a weight.
    assert all(torch.equal(before[k], v) for k, v in loop.model.state_dict().items())
    loop.step([batches[1]])
    assert loop.step_lr > 0


def test_defaults_are_the_old_recipe(tmp_path, monkeypatch):
    loop = _trainer(_args(tmp_path), monkeypatch)
    assert type(loop.optimizer) is torch.optim.SGD and len(loop.optimizer.param_groups) == 1
    assert loop.optimizer.param_groups[0]["weight_decay"] == 0
    assert isinstance(loop.scheduler, torch.optim.lr_scheduler.StepLR)
    assert loop.scheduler.gamma == 0.1 and loop.config.grad_accum == 1


def test_a_state_file_resumes_only_under_its_own_optimizer_and_schedule(tmp_path, monkeypatch):
    _trainer(_args(tmp_path), monkeypatch).save_state()
    resume = ["--checkpoint", str(tmp_path / "state.pt")]
    with pytest.raises(files.UserError, match="saved with --optimizer sgd"):
        _trainer(_args(tmp_path, *resume, "--optimizer", "adamw"), monkeypatch)
    with pytest.raises(files.UserError, match="saved with --schedule plateau"):
        _trainer(_args(tmp_path, *resume, "--schedule", "cosine"), monkeypatch)
    with pytest.raises(files.UserError, match="does not fit --weight-decay 0.1"):
        _trainer(_args(tmp_path, *resume, "--weight-decay", "0.1"), monkeypatch)
    assert _trainer(_args(tmp_path, *resume), monkeypatch).state.global_step == 0


# -- weight decay ---------------------------------------------------------------


def test_weight_decay_skips_biases_and_layernorm(tmp_path, monkeypatch):
    args = _args(tmp_path, "--optimizer", "adamw", "--lr", "1", "--weight-decay", "0.5")
    loop = _trainer(args, monkeypatch)
    model = loop.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # AdamW's update is 0: only the decay moves a weight
    loop.optimizer.step()
    layer_norms = {f"{name}.weight" for name, m in model.named_modules()
                   if isinstance(m, torch.nn.LayerNorm)}
    assert "bert_model.bert_embed.norm.weight" in layer_norms and len(layer_norms) == 4
    for name, p in model.named_parameters():
        if name.endswith(".bias") or name in layer_norms:
            assert torch.equal(p, before[name]), name
        else:  # weight matrices and embeddings: p * (1 - lr * weight_decay)
            torch.testing.assert_close(p, before[name] * 0.5, msg=name)


# -- gradient accumulation ----------------------------------------------------------


def _halves(batch):
    n = len(batch["inputs"]) // 2
    n_targets = len(batch["targets"]) // 2
    return [{"inputs": batch["inputs"][rows], "masked_positions": batch["masked_positions"][rows],
             "targets": batch["targets"][targets]}
            for rows, targets in ((slice(0, n), slice(0, n_targets)),
                                  (slice(n, None), slice(n_targets, None)))]


def test_grad_accum_2_gives_the_gradients_of_a_double_batch(tmp_path, monkeypatch):
    # SGD at lr 1 without clipping: each weight moves by exactly minus its gradient.
    flags = ["--lr", "1", "--clip", "1e9"]
    double = _trainer(_args(tmp_path, *flags, "--batch_size", "8"), monkeypatch)
    accum = _trainer(_args(tmp_path, *flags, "--batch_size", "4", "--grad-accum", "2"),
                     monkeypatch)
    batch = double.task.train_batches(1)[0]
    start = {name: p.detach().clone() for name, p in double.model.named_parameters()}
    double.step([batch])
    accum.step(_halves(batch))
    other = dict(accum.model.named_parameters())
    for name, p in double.model.named_parameters():
        torch.testing.assert_close(start[name] - other[name], start[name] - p, atol=1e-6, rtol=0,
                                   msg=name)


class _CountsNoSync(torch.nn.Module):
    """Stands in for DDP: the model, and a no_sync context that counts its uses."""

    def __init__(self, module):
        super().__init__()
        self.module, self.no_sync_calls = module, 0

    def forward(self, *args):
        return self.module(*args)

    def no_sync(self):
        self.no_sync_calls += 1
        return torch.enable_grad()  # any context manager


def test_grad_accum_skips_the_all_reduce_on_all_but_the_last_batch(tmp_path, monkeypatch):
    loop = _trainer(_args(tmp_path, "--grad-accum", "3"), monkeypatch)
    loop.model = _CountsNoSync(loop.model)
    batches = loop.task.train_batches(1)
    loop.step([batches[i] for i in range(3)])
    assert loop.model.no_sync_calls == 2


# -- MLM evaluation masks -------------------------------------------------------------


def test_evaluation_masks_do_not_depend_on_the_training_masking(tmp_path, monkeypatch):
    tasks = [_trainer(_args(tmp_path, *flags), monkeypatch).task for flags in
             ([], ["--mask_frac", "0.4", "--mask-mode", "bert"], ["--mask_frac", "0.05"])]
    assert tasks[1].train_batches(1)[0]["targets"].numel() != tasks[0].train_batches(1)[0]["targets"].numel()
    for split in ("valid", "test"):
        reference = tasks[0].eval_batches(split)
        for task in tasks[1:]:
            batches = task.eval_batches(split)
            assert len(batches) == len(reference)
            for i in range(len(reference)):
                assert all(torch.equal(batches[i][k], reference[i][k]) for k in reference[i])
    first = tasks[0].eval_batches("valid")[0]
    # 15% of the 8 positions after <cls>, all <MASK>.
    assert first["masked_positions"].shape == (4, round(0.15 * 8))
    assert (first["inputs"].gather(1, first["masked_positions"]) == tokenizer.MASK_ID).all()


# -- flags ----------------------------------------------------------------------------


@pytest.mark.parametrize("flags, mentioned", [
    (["--optimizer", "adam"], "--optimizer"),
    (["--schedule", "step"], "--schedule"),
    (["--schedule", "linear", "--warmup", "1.5"], "--warmup"),
    (["--warmup", "0.1"], "--warmup 0.1: needs --schedule"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--optimizer", "adamw", "--betas", "0.9", "1.5"], "--betas"),
    (["--eps", "0"], "--eps"),
])
def test_bad_values_of_the_new_flags_give_one_error_line(flags, mentioned, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(mlm_task.get_parser(), flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and mentioned in err[0], err


def test_a_bad_flag_stops_the_script_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "mlm_task.py"), "--dataset", "NoSuchSet",
                             "--grad-accum", "0"], cwd=tmp_path, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: --grad-accum 0: must be at least 1"]
    assert os.listdir(tmp_path) == []


# -- progress bars and the metrics log -------------------------------------------------


def test_progress_bars_off_without_a_terminal_or_with_no_progress(monkeypatch):
    seen = []

    def main(args, info):
        seen.append(logs.progress(range(3)))

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    mains.launch(main, argparse.Namespace(parallel="None", no_progress=True))
    mains.launch(main, argparse.Namespace(parallel="None", no_progress=False))
    assert isinstance(seen[0], logs.NoProgress) and list(seen[0]) == [0, 1, 2]
    assert not isinstance(seen[1], logs.NoProgress)  # a tqdm bar
    seen[1].close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    mains.launch(main, argparse.Namespace(parallel="None", no_progress=False))
    assert isinstance(seen[2], logs.NoProgress)
    logs.set_progress(None)


@pytest.mark.parametrize("bars, seconds, expected_lines", [
    (False, 0, 3),  # no terminal, the time is up after every step: a line each step
    (False, 3600, 0),  # no terminal, the time never up: only --log-interval's lines
    (True, 0, 0),  # bars shown: they show the progress
])
def test_without_a_terminal_a_step_line_comes_every_few_seconds(
        tmp_path, monkeypatch, bars, seconds, expected_lines):
    monkeypatch.setattr(logs, "LOG_EVERY_SECONDS", seconds)
    logs.set_progress(bars)
    try:
        lines = []
        loop = _trainer(_args(tmp_path, "--log-interval", "1000", "--max-steps", "3"), monkeypatch,
                        log=lines.append)
        loop.train_epoch()
    finally:
        logs.set_progress(None)
    steps = [line for line in lines if line.startswith("| epoch   1 |")]
    assert len(steps) == expected_lines, lines
    assert [line.split("|")[2].split("/")[0].strip() for line in steps] == ["1", "2", "3"][:expected_lines]
    rows = [json.loads(line) for line in open(tmp_path / "m.jsonl")] if expected_lines else []
    assert [row["step"] for row in rows] == [1, 2, 3][:expected_lines]


def test_log_lines_are_formatted_from_the_numbers():
    assert logs.format_metrics("valid", {"loss": 6.5, "ppl": 665.1412}) == (
        "valid loss  6.50000 | valid ppl   665.14")
    assert logs.format_metrics("test", {"exact": 50, "f1": 61.2549}) == (
        "test exact 50.00% | test f1 61.25%")
    assert logs.format_metrics("test", {"accuracy": 55.5}) == "test accuracy 55.50%"


def test_the_lr_keeps_its_digits_in_a_fine_tuning_run():
    # The old example's five decimals for its lr 5.0 (and for 1e-3); a fine-tuning lr of 2e-5
    # in warmup would otherwise print as 0.00000.
    assert logs.lr_text(5.0, 5.0) == "5.00000"
    assert logs.lr_text(0.0005, 0.001) == "0.00050"
    assert logs.lr_text(2e-5, 2e-5) == "2.00e-05"
    assert logs.lr_text(1.3e-6, 3e-5) == "1.30e-06"


def zipf_lines(n_lines, seed, length=20):
    import random

    rng = random.Random(seed)
    words = [f"w{k}" for k in range(30)]
    weights = [1 / (k + 1) ** 1.5 for k in range(30)]
    return [" ".join(rng.choices(words, weights, k=length)) for _ in range(n_lines)]


TINY = ["--device", "cpu", "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--nhead", "2",
        "--bptt", "16", "--batch_size", "4", "--data-dir", "D", "--dataset", "WikiText2"]
# 60 lines of 20 tokens: 80 sequences, 20 batches an epoch, 10 optimizer steps of 2.
MODERN = ["--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.01", "--schedule",
          "linear", "--warmup", "0.2", "--grad-accum", "2", "--mask_frac", "0.3",
          "--mask-mode", "bert"]


def run_mlm(*flags, cwd):
    return subprocess.run([sys.executable, str(REPO / "mlm_task.py"), *flags], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def modern_run(tmp_path_factory):
    """mlm_task.py with AdamW, warmup and a linear decay, --grad-accum 2: (folder, result)."""
    work = tmp_path_factory.mktemp("modern")
    write_wikitext(work / "D", zipf_lines(60, 0), zipf_lines(20, 1), zipf_lines(20, 2))
    tensorboard = ["--tensorboard", "tb"] if importlib.util.find_spec("tensorboard") else []
    result = run_mlm(*TINY, *MODERN, "--epochs", "2", "--log-interval", "3", *tensorboard,
                     cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    return work, result


def test_metrics_log_has_a_row_per_log_interval_and_per_evaluation(modern_run):
    work, result = modern_run
    rows = [json.loads(line) for line in (work / "mlm_metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    # Logged at steps 3, 6, 9 of each 10-step epoch, as the old log lines.
    assert [row["step"] for row in train] == [3, 6, 9, 13, 16, 19]
    assert len(train) == result.stdout.count("| epoch ")
    for row in train:
        assert row.keys() == {"step", "epoch", "loss", "lr", "tokens_per_s", "ms_per_step"}
        # The lr of the row's last step (step - 1 counted from 0) of 20, 4 of warmup.
        assert row["lr"] == pytest.approx(0.003 * optimizer.lr_factor(row["step"] - 1, 20, 4, "linear"))
        assert row["tokens_per_s"] > 0 and math.isfinite(row["loss"])
    evaluations = [row for row in rows if "loss" not in row]
    assert [(row["step"], row["epoch"], sorted(row)) for row in evaluations] == [
        (10, 1, ["epoch", "step", "valid_loss", "valid_ppl", "valid_tokens"]),
        (20, 2, ["epoch", "step", "valid_loss", "valid_ppl", "valid_tokens"]),
        (20, 2, ["epoch", "step", "test_loss", "test_ppl", "test_tokens"])]
    # Unrounded: the numbers themselves, not the log line's 2 decimals.
    assert any(round(row["valid_ppl"], 2) != row["valid_ppl"] for row in evaluations[:2])


def test_the_run_ends_by_listing_every_file_it_wrote(modern_run):
    work, result = modern_run
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("wrote ")
    for name in ("mlm_bert.pt", "full_mlm_model.pt", "mlm_loss.txt", "bert_vocab.pt",
                 "mlm_state.pt", "mlm_metrics.jsonl"):
        assert name in last and (work / name).is_file(), name
    if (work / "tb").exists():
        assert "tb/ (TensorBoard)" in last
        assert any(name.startswith("events.") for name in os.listdir(work / "tb"))


def test_plot_writes_a_png(modern_run, tmp_path):
    pytest.importorskip("matplotlib")
    work, _ = modern_run
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, str(REPO / "plot.py"),
                             str(work / "mlm_metrics.jsonl"), "-o", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("given, expected", [
    ("checkpoint", "not text (a checkpoint?): give a metrics log"),
    ("itself", "is the metrics log itself: writing it would overwrite that input"),
    ("rows of lists", "line 1 is not a row of a metrics log"),
])
def test_plot_refuses_what_is_no_metrics_log_in_one_line(modern_run, tmp_path, given, expected,
                                                        capsys):
    import plot

    work, _ = modern_run
    metrics, out = work / "mlm_metrics.jsonl", tmp_path / "curves.png"
    if given == "checkpoint":
        metrics = work / "mlm_bert.pt"
    elif given == "itself":
        out = metrics
    else:
        metrics = tmp_path / "lists.jsonl"
        metrics.write_text("[1, 2]\n")
    before = {p.name: p.read_bytes() for p in (*work.iterdir(), *tmp_path.iterdir()) if p.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(metrics), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and expected in err, err
    assert len(err.splitlines()) == 1
    after = {p.name: p.read_bytes() for p in (*work.iterdir(), *tmp_path.iterdir()) if p.is_file()}
    assert after == before


def test_the_default_log_interval_gives_a_short_run_points_to_plot():
    """--log-interval left out: the script's, but at least LOG_POINTS lines and metrics
    rows over a short run (the laptop QA step's 500 steps: 50 rows, not 2)."""
    assert mlm_task.get_parser().parse_args([]).log_interval is None
    config = trainer.TrainConfig(lr=1.0, clip=1.0, epochs=1, batch_size=1, seed=0,
                                 log_interval=None, state_file="s.pt", metrics_file="m.jsonl",
                                 default_log_interval=200)
    assert (config.log_every(500), config.log_every(10**6), config.log_every(20)) == (10, 200, 1)
    config.log_interval = 7  # given: as given
    assert config.log_every(500) == 7


def test_plot_writes_plain_numbers_and_shows_a_single_valid_point():
    pytest.importorskip("matplotlib")
    import plot

    rows = [{"step": s, "epoch": 1, "loss": 698.4 / s, "lr": 1.0} for s in range(1, 80)]
    rows += [{"step": 79, "epoch": 1, "valid_loss": 9.0}, {"step": 79, "epoch": 1, "test_loss": 9.1}]
    fig = plot.figure(rows)
    try:
        fig.canvas.draw()
        loss_axis = fig.axes[0]
        labels = [t.get_text() for minor in (False, True)
                  for t in loss_axis.get_yticklabels(minor=minor) if t.get_text()]
        assert labels and not any("times" in text or "^" in text for text in labels), labels
        assert all(float(text) > 0 for text in labels)
        lines = {line.get_label(): line for line in loss_axis.get_lines()}
        valid, test = lines["valid_loss"], lines["test_loss"]
        assert valid.get_marker() != "None" and valid.get_zorder() > test.get_zorder()
        assert test.get_markerfacecolor() == "none" and test.get_markersize() > valid.get_markersize()
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def resume_and_load_best_models(full, part, model="MLMTask"):
    """Resume the stopped run in `part`: its "resumed from" line comes first, then the model
    line (no longer a "new" model before it); the best models of both runs' weights."""
    resumed = run_mlm("--checkpoint", "mlm_state.pt", cwd=part)
    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("resumed from"))
    assert lines[first + 1].startswith(f"{model} "), lines[:first + 2]
    return (torch.load(full / "full_mlm_model.pt", weights_only=True)["model"],
            torch.load(part / "full_mlm_model.pt", weights_only=True)["model"])


@pytest.mark.parametrize("extra, model", [([], "MLMTask"),
                                          (["--next-sentence"], "PreTrainingTask")])
def test_resume_is_bitwise_with_adamw_and_a_linear_schedule_across_epochs(tmp_path, extra,
                                                                         model):
    """Also with --next-sentence: its pairs, next-sentence head and pooler."""
    flags = [*TINY, *MODERN, "--epochs", "4", "--dropout", "0.1", "--log-interval", "2", *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    for folder in (full, part):
        write_wikitext(folder / "D", zipf_lines(60, 0), zipf_lines(20, 1), zipf_lines(20, 2))
    assert run_mlm(*flags, cwd=full).returncode == 0

    proc = subprocess.Popen([sys.executable, str(REPO / "mlm_task.py"), *flags], cwd=part,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # interrupt in the first epoch, at its first log line
        if line.startswith("| epoch   1"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 143 and "stopped by a signal (SIGTERM)" in rest, rest
    state = torch.load(part / "mlm_state.pt", weights_only=True)
    assert state["train_state"]["global_step"] < 30  # at least one epoch boundary to cross
    assert state["scheduler"]["last_epoch"] == state["train_state"]["global_step"]
    a, b = resume_and_load_best_models(full, part, model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_state = torch.load(full / "mlm_state.pt", weights_only=True)
    part_state = torch.load(part / "mlm_state.pt", weights_only=True)
    assert full_state["train_state"]["global_step"] == part_state["train_state"]["global_step"] == 40
    assert full_state["model"].keys() == part_state["model"].keys()
    assert all(torch.equal(v, part_state["model"][k]) for k, v in full_state["model"].items())
    if extra:  # the pooler the next-sentence head trained, in the best model too
        pooler = torch.load(part / "full_mlm_model.pt", weights_only=True)["pooler"]
        full_pooler = torch.load(full / "full_mlm_model.pt", weights_only=True)["pooler"]
        assert all(torch.equal(pooler[k], full_pooler[k]) for k in pooler)


# -- evaluation during an epoch ----------------------------------------------------


def _rows(folder):
    return [json.loads(line) for line in (folder / "mlm_metrics.jsonl").read_text().splitlines()]


def test_eval_every_validates_mid_epoch_and_a_resume_is_bitwise(tmp_path):
    """The old schedule (lr x0.1 when a validation does not improve) makes each mid-epoch
    validation change the training: a resume must validate at the same steps, including
    the one it was stopped at, and end with the same weights and rows."""
    flags = [*TINY, "--epochs", "2", "--dropout", "0.1", "--log-interval", "2", "--lr", "30",
             "--eval-every", "3", "--eval-batches", "2", "--max-steps", "24"]
    full, part = tmp_path / "full", tmp_path / "part"
    for folder in (full, part):
        write_wikitext(folder / "D", zipf_lines(60, 0), zipf_lines(20, 1), zipf_lines(20, 2))
    result = run_mlm(*flags, cwd=full)
    assert result.returncode == 0, result.stderr
    rows = _rows(full)
    valid = [row for row in rows if "valid_loss" in row]
    # 20 steps an epoch: every 3rd step, and the end of epoch 1 (step 20); at step 24,
    # --max-steps, once.
    assert [row["step"] for row in valid] == [3, 6, 9, 12, 15, 18, 20, 21, 24]
    assert [row["epoch"] for row in valid] == [1, 1, 1, 1, 1, 1, 1, 2, 2]
    # --eval-batches 2: 2 batches of 4 sequences, 15% of 15 positions masked: 2 each.
    assert {row["valid_tokens"] for row in valid} == {2 * 4 * 2}
    assert rows[-1]["test_tokens"] == 2 * 4 * 2 and (rows[-1]["step"], rows[-1]["epoch"]) == (24, 2)
    assert result.stdout.count("| step ") == 8 and result.stdout.count("| end of epoch") == 1

    proc = subprocess.Popen([sys.executable, str(REPO / "mlm_task.py"), *flags], cwd=part,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # interrupt at the first log line (step 2): stops at step 3
        if line.startswith("| epoch   1"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 143 and "stopped by a signal (SIGTERM)" in rest, rest
    a, b = resume_and_load_best_models(full, part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    evaluations = [row for row in rows if "loss" not in row]
    assert [row for row in _rows(part) if "loss" not in row] == evaluations


@pytest.mark.parametrize("flag", ["--eval-every", "--eval-batches"])
def test_eval_flags_refuse_negative_values(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(mlm_task.get_parser(), [flag, "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {flag} -1: must be at least 0" + (
        " (0: at epoch ends only)" if flag == "--eval-every" else " (0: every batch)")]


def test_compile_defaults_to_the_device(monkeypatch):
    parser = mlm_task.get_parser()
    assert parser.parse_args([]).compile is None
    assert parser.parse_args(["--no-compile"]).compile is False
    assert parser.parse_args(["--compile"]).compile is True
    args = parser.parse_args(["--device", "cpu"])
    mains.setup_device(args, distributed.DistInfo())
    assert args.compile is False
    monkeypatch.setattr(utils, "get_device", lambda name, rank: torch.device("cuda", 0))
    monkeypatch.setattr(utils, "check_precision", lambda device, dtype: None)
    args = parser.parse_args([])
    mains.setup_device(args, distributed.DistInfo())
    assert args.compile is True
    args = parser.parse_args(["--no-compile"])
    mains.setup_device(args, distributed.DistInfo())
    assert args.compile is False


def test_state_files_are_checked_against_every_field_of_the_training_state():
    assert set(checkpoint.TRAIN_STATE_TYPES) == {f.name for f in dataclasses.fields(trainer.TrainState)}
