"""bench.py's pieces on a tiny config on the CPU: each runs, and what it compares is the
same math in ours and transformers'. transformers is a dev dependency: skipped without it.
"""

import pytest
import torch

pytest.importorskip("transformers")

import bench  # noqa: E402
from bertkit.squad import answers, windows  # noqa: E402
from bertkit.squad import dataset as squad  # noqa: E402
from model import BertConfig, MLMTask  # noqa: E402

TINY = dict(emsize=32, nlayers=2, nhead=2, nhid=64)
CPU = torch.device("cpu")


def tiny_mlm_config(dropout=0.0):
    return BertConfig(vocab_size=300, max_len=bench.SEQ_LEN, dropout=dropout, **TINY)


def test_mlm_batch_masks_sorted_distinct_positions_with_matching_labels():
    src, masked_positions, labels = bench.mlm_batch(4, 20, 5, 100, torch.Generator().manual_seed(0))
    assert masked_positions.shape == (4, 5) and masked_positions.dtype == torch.int64
    assert (masked_positions.diff(dim=1) > 0).all()  # sorted, none twice
    masked = torch.zeros_like(src, dtype=torch.bool).scatter_(1, masked_positions, True)
    assert torch.equal(labels[masked], src[masked]) and (labels[~masked] == -100).all()
    assert (src >= 5).all()  # no special tokens, no padding


def test_mlm_steps_compute_the_same_loss_in_both_models():
    # Same weights and batch, no dropout: ours (logits at the masked positions, gathered
    # in row-major order) and theirs (labels -100 elsewhere) are the same loss.
    steps = bench.mlm_steps(tiny_mlm_config(), 3, CPU, "fp32", seed=0)
    torch.testing.assert_close(steps["ours"](), steps["theirs"](), atol=1e-5, rtol=0)


def test_bench_mlm_times_both_models_and_the_calls_it_is_given():
    ours_tps, theirs_tps, seconds = bench.bench_mlm(
        tiny_mlm_config(dropout=0.1), 2, rounds=1, steps=1, device=CPU,
        also_time={"nothing": lambda: None})
    assert ours_tps > 0 and theirs_tps > 0
    assert set(seconds) == {"nothing"} and seconds["nothing"] >= 0


def test_matmul_calls_compute_the_product_they_count():
    calls = {name: call for name, call in bench.matmul_calls(CPU, "fp32", (8, 4, 6)).items()
             if name.startswith("ffn")}  # the 2048-cube is only timed
    assert calls and all(flops == 2 * 8 * 4 * 6 for flops, _ in calls.values())
    a, b = calls["ffn 8x4x6 torch.mm"][1].args
    for _, fn in calls.values():
        torch.testing.assert_close(fn(), a @ b)


def test_their_qa_answers_agree_with_ours_on_synthetic_squad(tmp_path):
    path, what, count = bench.squad_for_bench(tmp_path, 10)
    assert what == "synthetic text" and count == 10
    questions, _ = squad.read_squad(path)
    vocab = bench.qa_vocab(questions)
    ours, theirs = bench.qa_models(TINY, len(vocab), CPU, seed=0)
    windowing = windows.Windowing()
    # Ours one window per forward, so without padding: this checks bench's transformers
    # path (padded to --bptt, batched), not qa_task's own padding (tests/test_qa.py).
    with torch.inference_mode():
        mine = answers.predict_answers(ours, questions, vocab, windowing, batch_size=1)
    their = bench.their_qa_answers(theirs, path, vocab, windowing, batch_size=3, device=CPU)
    assert set(mine) == set(their) == {q.qid for q in questions}
    for qid, (text, score) in mine.items():
        # Ours checks every span, theirs only the 20 best starts and ends: ours never
        # scores lower, and the same answer has the same score.
        assert score >= their[qid][1] - 1e-4
        if text == their[qid][0]:
            assert score == pytest.approx(their[qid][1], abs=1e-4)
    agree, n_differ, higher = bench.answer_agreement(mine, their)
    assert agree > 0 and higher <= n_differ


def test_bench_qa_runs_on_synthetic_squad():
    ratio = bench.bench_qa(TINY, 4, CPU, squad_file=None, n_questions=5, rounds=1)
    assert ratio > 0


def test_a_missing_squad_file_is_an_error(tmp_path):
    with pytest.raises(SystemExit):
        bench.parse_args(["--squad-file", str(tmp_path / "absent.json")])


def test_bf16_runs_both_models_under_autocast_and_ours_keeps_the_masked_only_head():
    # Same weights and batch in bf16: the losses agree to bf16's precision, not fp32's.
    steps = bench.mlm_steps(tiny_mlm_config(), 3, CPU, "bf16", seed=0)
    fp32 = bench.mlm_steps(tiny_mlm_config(), 3, CPU, "fp32", seed=0)["ours"]()
    ours, theirs = steps["ours"](), steps["theirs"]()
    torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0)
    assert ours.dtype == theirs.dtype == torch.float32 and ours != fp32  # computed in bf16
    model = MLMTask(tiny_mlm_config()).train()
    rows = []
    model.mlm_head.register_forward_hook(lambda module, inputs, output: rows.append(output))
    src, masked_positions, _ = bench.mlm_batch(3, bench.SEQ_LEN, bench.N_MASKED, 300,
                                               torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(src, masked_positions)
    assert rows[0].shape == (3 * bench.N_MASKED, 300) and rows[0].dtype == torch.bfloat16


def test_dtype_flag():
    assert bench.parse_args(["--device", "cpu", "--dtype", "bf16"]).dtype == "bf16"
    assert bench.parse_args(["--device", "cpu"]).dtype == "auto"


def test_bench_loop_times_the_trainer_and_its_bare_step(capsys):
    loop_tps, bare_tps = bench.bench_loop(tiny_mlm_config(0.1), 2, rounds=2, steps=3,
                                          device=CPU)
    assert loop_tps > 0 and bare_tps > 0
    out = capsys.readouterr().out
    assert "the trainer's loop" in out and "its bare step" in out


def test_loop_task_batches_are_mlm_task_batches():
    """The loop's batches are made by data.mlm_batch as mlm_task.py's: <cls> first, 15% of
    the other positions masked, targets the original tokens there."""
    task = bench.LoopTask(tiny_mlm_config(), 4, seed=0, n_windows=8)
    batch = task.train_batches(1)[0]
    assert batch["inputs"].shape == (4, bench.SEQ_LEN)
    assert (batch["inputs"][:, 0] == task.vocab.cls_id).all()
    assert batch["masked_positions"].shape == (4, round(0.15 * (bench.SEQ_LEN - 1)))
    assert (batch["masked_positions"] > 0).all()
    assert bench.batch_build_ms(tiny_mlm_config(), seed=0, batch_size=4, n=3) > 0


###############################################################################
# --glue
###############################################################################


def test_glue_bench_compares_the_same_loss_and_labels_and_prints_four_ratios(capsys):
    """bench_glue on a tiny model and synthetic SST-2-like text: ours and theirs compute the
    same loss on a batch padded to its longest pair and to 128 (dropout 0), the same dev
    labels in all three evaluations; the last line has the four ratios."""
    import re

    from bertkit.bench import glue as bench_glue
    from bertkit.glue import tasks as glue
    from bertkit.glue.classifier import Rows

    train, dev, what = bench_glue.bench_text(None, seed=0)
    assert what == "synthetic SST-2-like text" and train.texts_b is None
    words = [len(text.split()) for text in dev.texts_a]
    assert 15 < sum(words) / len(words) < 24 and max(words) <= 52  # SST-2's dev: 19, 2-52
    vocab = bench_glue.bench_vocab((train, dev), None)
    labels = glue.sorted_labels(train.labels)
    rows = Rows.of(dev, vocab, bench_glue.SEQ_LEN, labels)
    ours, theirs = bench_glue.glue_models(TINY, vocab, 2, 0.0, CPU, seed=0)
    batches, tokens = bench_glue.training_batches(rows, vocab.pad_id, 4, 2, 0, CPU)
    assert tokens == sum(int(b["padding_mask"].sum()) for b in batches["ours"])
    assert batches["padded"][0]["input_ids"].shape == (4, 128)
    with torch.no_grad():
        ours.eval(), theirs.eval()
        for i in range(2):
            expected = bench_glue.our_loss(ours, batches["ours"][i])
            for mode in ("padded", "dynamic"):
                torch.testing.assert_close(bench_glue.their_loss(theirs, batches[mode][i]),
                                           expected, atol=1e-5, rtol=0)
    found = {name: fn() for name, fn in bench_glue.eval_calls(
        ours, theirs, Rows.of(glue.Examples("d", dev.texts_a[:30], None, dev.labels[:30],
                                            dev.indices[:30]), vocab, 128, labels),
        vocab.pad_id, 8, CPU).items()}
    assert torch.equal(found["ours"], found["padded"]) and torch.equal(found["ours"],
                                                                       found["dynamic"])
    train_ratios, eval_ratios = bench_glue.bench_glue(TINY, 4, rounds=1, steps=1, device=CPU,
                                                      rte_dir=None, vocab_file=None, n_eval=16)
    line = bench_glue.summary(train_ratios, eval_ratios)
    assert re.fullmatch(r"glue_train_padded [\d.]+ glue_train_dynamic [\d.]+ glue_eval_padded "
                        r"[\d.]+ glue_eval_dynamic [\d.]+", line), line
    assert all(r > 0 for r in (*train_ratios.values(), *eval_ratios.values()))
    assert "glue eval: ours" in capsys.readouterr().out


def test_glue_flag():
    assert bench.parse_args(["--glue"]).glue


def test_bench_pretrain_times_each_size_and_precision_and_sums_up():
    from bertkit.bench import pretrain

    results = pretrain.bench_pretrain(("tiny",), ("fp32", "bf16"), batch_size=2, rounds=1,
                                      steps=1, device=CPU, vocab_size=300, seq_len=16)
    assert set(results) == {("tiny", "fp32"), ("tiny", "bf16")}
    assert all(tokens > 0 and flops > 0 for tokens, flops in results.values())
    line = pretrain.summary(results).split()
    assert line[0] == "pretrain_tokens_per_s" and line[1:5:2] == ["tiny_fp32", "tiny_bf16"]
    assert line[5] == "pretrain_gflops" and line[6:10:2] == ["tiny_fp32", "tiny_bf16"]
    config = pretrain.size_config("mini")
    assert (config.nlayers, config.emsize, config.nhead, config.nhid, config.vocab_size) == (
        4, 256, 4, 1024, 8192)
