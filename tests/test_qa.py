"""qa_task.py: character spans, windows, decoding, the loss, and whole runs of the script."""

import argparse
import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import NORMANS, NOTRE_DAME, end_spawned_rank, needs_real, one_thread

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import metrics  # noqa: E402
import qa_task  # noqa: E402
from bertkit import files, mains  # noqa: E402
from bertkit import flags as cli  # noqa: E402
from bertkit.squad import answers as qa_answers  # noqa: E402
from bertkit.squad import dataset as squad  # noqa: E402
from bertkit.squad import windows as qa_windows  # noqa: E402
from bertkit.squad.dataset import Question  # noqa: E402
from bertkit.squad.windows import Windowing  # noqa: E402
from bertkit.text import (  # noqa: E402
    corpus,  # noqa: E402
    tokenizer,  # noqa: E402
)
from bertkit.text.tokenizer import CLS_ID, PAD_ID, SEP_ID  # noqa: E402
from bertkit.training import distributed  # noqa: E402
from model import BertConfig, QuestionAnswerTask  # noqa: E402

# One real SQuAD v1.1 train article; one real SQuAD v2.0 dev article: 39 paragraphs, 208
# questions, 112 without an answer (conftest: where real data is looked for).
needs_notre_dame = needs_real(NOTRE_DAME)
needs_normans = needs_real(NORMANS)

TRICKY_CONTEXTS = [
    'He said "Hello, World!" and left.',
    'The "quoted"word, (in brackets) isn\'t split; a:b <br />NEXT line.',
    "Ünïcödé İstanbul — 1854–1855, a 14-story tower; $80,795.",
    '""" only quotes "" and words " x',
    "",
]


def vocab_of(texts):
    counter = Counter()
    for text in texts:
        counter.update(tokenizer.basic_english_normalize(text))
    return tokenizer.Vocab.build(counter)


def tiny_model(vocab_size, seed=0, max_len=512):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, emsize=16, nhead=2, nhid=32, nlayers=1,
                        dropout=0.0, max_len=max_len)
    return QuestionAnswerTask(config).eval()


###############################################################################
# Character spans and answers
###############################################################################


def contexts_to_check():
    contexts = list(TRICKY_CONTEXTS)
    if NOTRE_DAME.exists():
        questions, _ = squad.read_squad(NOTRE_DAME)
        contexts += sorted({q.context for q in questions})
    return contexts


def test_every_context_token_maps_back_to_its_characters():
    for context in contexts_to_check():
        questions = [Question("q", "what?", context, [])]
        windows = qa_windows.make_windows(questions, vocab_of([context]), Windowing())
        tokens = tokenizer.basic_english_normalize(context)
        spans = windows.context_spans[0]
        assert len(spans) == len(tokens)
        for token, (start, end) in zip(tokens, spans):
            # The tokenizer drops `"` and lower-cases; nothing else differs.
            assert context[start:end].replace('"', "").lower() == token


def test_answer_token_span_places_answers_and_rejects_mismatches():
    context = 'The "Golden Dome" was built in 1882, by Father Sorin.'
    spans = [(s, e) for _, s, e in tokenizer.tokenize_with_spans(context)]
    tokens = tokenizer.basic_english_normalize(context)

    def answer(text, start=None):
        start = context.index(text) if start is None else start
        first_last = qa_windows.answer_token_span(context, spans, text, start)
        return first_last and tokens[first_last[0]:first_last[1] + 1]

    assert answer("Golden Dome") == ["golden", "dome"]
    assert answer('"Golden Dome"') == ["golden", "dome"]
    assert answer("1882") == ["1882"]
    assert answer("Father Sorin.") == ["father", "sorin", "."]
    assert answer("olden") == ["golden"]  # part of a token: the whole token
    assert answer("Golden Dome", start=0) is None  # text not at answer_start
    assert answer("Golden", start=None) == ["golden"]
    assert qa_windows.answer_token_span(context, spans, "1882", None) is None
    assert qa_windows.answer_token_span(context, spans, "Sorin", -6) is None  # not from the end
    assert qa_windows.answer_token_span(context, spans, '"', context.index('"')) is None
    assert qa_windows.answer_token_span(context, spans, "", 0) is None


@needs_notre_dame
def test_notre_dame_answers_all_found_and_recovered_as_text():
    questions, _ = squad.read_squad(NOTRE_DAME)
    windows = qa_windows.make_windows(questions, vocab_of([q.context for q in questions]),
                                   Windowing(), training=True)
    assert windows.unusable_answers == []
    assert len(set(windows.question.tolist())) == len(questions) == 269
    exact = 0
    for i, q in enumerate(questions):
        text, start = q.answers[0]
        first, last = qa_windows.answer_token_span(q.context, windows.context_spans[i], text, start)
        cut = q.context[windows.context_spans[i][first][0]:windows.context_spans[i][last][1]]
        assert text in cut or metrics.exact_match_score(cut, text)
        exact += metrics.exact_match_score(cut, text)
    # Whole-word tokens cannot cut "1854" out of "1854–1855": the 3 misses of this article.
    assert exact >= 266


###############################################################################
# Windows
###############################################################################


def random_question(rng, n_context, n_question):
    words = [f"w{rng.randrange(50)}" for _ in range(n_context)]
    return Question("q", " ".join(f"x{i}" for i in range(n_question)), " ".join(words), [])


@pytest.mark.parametrize("seed", range(6))
def test_windows_cover_the_context_and_hold_every_short_span(seed):
    rng = random.Random(seed)
    windowing = Windowing(bptt=rng.choice([16, 24, 40]), doc_stride=rng.choice([1, 3, 8, 64]),
                          max_query_len=rng.choice([0, 4, 10]),
                          max_answer_len=rng.choice([1, 4, 30]))
    n_context, n_question = rng.randrange(0, 120), rng.randrange(0, 15)
    question = random_question(rng, n_context, n_question)
    vocab = vocab_of([question.context, question.text])
    windows = qa_windows.make_windows([question], vocab, windowing)
    context_ids = vocab.lookup_indices(tokenizer.basic_english_normalize(question.context))
    query_ids = vocab.lookup_indices(tokenizer.basic_english_normalize(question.text))
    query_ids = query_ids[:windowing.max_query_len]
    assert len(windows) >= 1
    covered = []
    for w in range(len(windows)):
        row = windows.tokens[w].tolist()
        length, offset = int(windows.lengths[w]), int(windows.context_offset[w])
        start = int(windows.context_start[w])
        assert row[:offset] == [CLS_ID, *query_ids, SEP_ID]
        assert row[length - 1] == SEP_ID and set(row[length:]) <= {PAD_ID}
        piece = row[offset:length - 1]
        assert piece == context_ids[start:start + len(piece)]
        covered.append(range(start, start + len(piece)))
        batch = qa_windows.collate(windows, torch.tensor([w]))
        types = batch["token_types"][0].tolist()
        assert types == [0] * offset + [1] * (length - offset)
    assert sorted({i for r in covered for i in r}) == list(range(len(context_ids)))
    window_len = windowing.bptt - len(query_ids) - 3
    for length in range(1, min(windowing.max_answer_len, window_len, len(context_ids)) + 1):
        for first in range(len(context_ids) - length + 1):
            assert any(first in r and first + length - 1 in r for r in covered)


def test_training_windows_without_the_answer_target_cls():
    """The documented choice: kept, with both targets at <cls> (position 0)."""
    words = [f"w{i}" for i in range(200)]
    context = " ".join(words)
    answer_text = "w150 w151 w152"
    question = Question("q", "where?", context, [(answer_text, context.index(answer_text))])
    vocab = vocab_of([context, "where?"])
    windowing = Windowing(bptt=48, doc_stride=16, max_query_len=8, max_answer_len=10)
    windows = qa_windows.make_windows([question], vocab, windowing, training=True)
    answer_ids = vocab.lookup_indices(answer_text.split())
    with_answer = 0
    for w in range(len(windows)):
        start, end = int(windows.start_positions[w]), int(windows.end_positions[w])
        first_context = int(windows.context_start[w])
        n_context = int(windows.lengths[w] - windows.context_offset[w]) - 1
        piece = range(first_context, first_context + n_context)
        if 150 in piece and 152 in piece:
            with_answer += 1
            assert windows.tokens[w, start:end + 1].tolist() == answer_ids
        else:
            assert (start, end) == (0, 0)
    assert with_answer >= 1 and len(windows) - with_answer >= 1


def test_unusable_answers_are_counted_and_skipped_for_training_only():
    context = "Paris is the capital of France."
    good = Question("good", "capital?", context, [("Paris", 0)])
    wrong_start = Question("bad", "country?", context, [("France", 3)])
    no_start = Question("none", "what?", context, [("France", None)])
    vocab = vocab_of([context])
    train = qa_windows.make_windows([good, wrong_start, no_start], vocab, Windowing(), training=True)
    assert train.unusable_answers == ["bad", "none"]
    assert set(train.question.tolist()) == {0}
    dev = qa_windows.make_windows([good, wrong_start, no_start], vocab, Windowing())
    assert set(dev.question.tolist()) == {0, 1, 2}  # no dev question is dropped
    # <cls> capital ? <sep> paris: 4; -1: not in the valid loss.
    assert dev.start_positions.tolist() == [4, -1, -1]


###############################################################################
# Decoding and the loss
###############################################################################


def brute_force_best_span(start_logits, end_logits, context, max_answer_len):
    best = (float("-inf"), 0, 0)
    for i in range(len(start_logits)):
        for j in range(i, min(i + max_answer_len, len(end_logits))):
            if context[i] and context[j]:
                score = float(start_logits[i] + end_logits[j])
                if score > best[0]:
                    best = (score, i, j)
    return best


@pytest.mark.parametrize("max_answer_len", [1, 2, 5, 40])
def test_best_spans_match_brute_force(max_answer_len):
    generator = torch.Generator().manual_seed(max_answer_len)
    batch, seq_len = 24, 20
    start_logits = torch.randn(batch, seq_len, generator=generator) * 3
    end_logits = torch.randn(batch, seq_len, generator=generator) * 3
    position = torch.arange(seq_len)
    first = torch.randint(0, seq_len, (batch,), generator=generator)
    last = first + torch.randint(0, seq_len, (batch,), generator=generator)
    context = (position >= first[:, None]) & (position < last[:, None])
    context[0] = False  # a row without context
    score, start, end = qa_answers.best_spans(start_logits, end_logits, context, max_answer_len)
    for b in range(batch):
        expected = brute_force_best_span(start_logits[b], end_logits[b], context[b], max_answer_len)
        if expected[0] == float("-inf"):
            assert score[b] == float("-inf")
            continue
        assert (float(score[b]), int(start[b]), int(end[b])) == pytest.approx(expected)
        assert start[b] <= end[b] < start[b] + max_answer_len
        assert context[b, start[b]] and context[b, end[b]]


def test_trimmed_batches_give_the_same_loss_and_spans_as_full_padding():
    rng = random.Random(0)
    questions = [random_question(rng, rng.randrange(5, 40), rng.randrange(1, 8)) for _ in range(6)]
    for i, q in enumerate(questions):
        words = q.context.split()
        questions[i] = Question(f"q{i}", q.text, q.context, [(words[2], q.context.index(words[2]))])
    vocab = vocab_of([q.context + " " + q.text for q in questions])
    windows = qa_windows.make_windows(questions, vocab, Windowing(bptt=64, max_query_len=8,
                                                               max_answer_len=5))
    model = tiny_model(len(vocab))
    indices = torch.arange(len(windows))
    trimmed = qa_windows.collate(windows, indices)
    assert trimmed["inputs"].shape[1] == int(windows.lengths.max()) < 64
    assert torch.equal(trimmed["padding_mask"], trimmed["inputs"] != PAD_ID)  # True at tokens
    full = qa_windows.collate(windows, indices, seq_len=64)  # as --compile pads them
    assert full["inputs"].shape[1] == 64 and not full["padding_mask"][:, 63].any()
    with torch.no_grad():
        results = []
        for batch in (trimmed, full):
            start_logits, end_logits = qa_answers.span_logits(model, batch)
            loss = qa_answers.span_loss(start_logits, end_logits, batch)
            results.append((loss, *qa_answers.best_spans(start_logits, end_logits,
                                                      batch["context_mask"], 5)))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)
    assert torch.equal(results[0][2], results[1][2]) and torch.equal(results[0][3], results[1][3])


class PointingModel(torch.nn.Module):
    """Start logits high on token `start_id`, end logits high on `end_id`."""

    def __init__(self, start_id, end_id):
        super().__init__()
        self.start_id, self.end_id = start_id, end_id

    def forward(self, src, token_type_input=None, padding_mask=None):
        return (src == self.start_id).float() * 5, (src == self.end_id).float() * 5


def test_predict_answers_returns_original_text_from_the_best_window():
    filler = " ".join(f"filler{i}." for i in range(80))
    context = f'{filler} It was founded by "Father Edward Sorin", C.S.C., in 1842. {filler}'
    sorin_only = "Sorin is not a founder here."
    questions = [Question("a", "Who founded it?", context, []),
                 Question("b", "Who?", sorin_only, []),
                 Question("c", "Nothing?", '""', [])]
    vocab = vocab_of([context, sorin_only])
    model = PointingModel(vocab["father"], vocab["sorin"])
    windowing = Windowing(bptt=40, doc_stride=10, max_query_len=8, max_answer_len=5)
    answers = qa_answers.predict_answers(model, questions, vocab, windowing, batch_size=7)
    assert list(answers) == ["a", "b", "c"]
    assert answers["a"][0] == "Father Edward Sorin"
    assert answers["a"][1] == pytest.approx(10.0)
    assert answers["b"][0] in sorin_only and answers["b"][0]  # some span, never outside
    assert answers["c"] == ("", float("-inf"))  # a context without tokens: no span at all


def _ddp_eval_rank(rank, port, questions, vocab, windowing, state, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=2)
    model = QuestionAnswerTask(BertConfig(**state["config"]))
    model.load_state_dict(state["model"])
    info = distributed.DistInfo(rank, 2)
    answers, null_scores, loss = qa_answers.evaluate_all(model, questions, vocab, windowing, 3,
                                                         torch.device("cpu"), "fp32", info)
    torch.save({"answers": answers, "null_scores": null_scores, "loss": loss},
               Path(out_dir) / f"rank{rank}.pt")
    end_spawned_rank()


def answered_questions(seed, n, longest):
    """(questions, vocab, windowing, model): `n` random questions of contexts up to `longest`
    words, each answered by its context's second word, in windows of 32 tokens; a tiny model."""
    rng = random.Random(seed)
    questions = []
    for i in range(n):
        q = random_question(rng, rng.randrange(3, longest), rng.randrange(1, 6))
        word = q.context.split()[1]
        questions.append(Question(f"q{i}", q.text, q.context, [(word, q.context.index(word))]))
    vocab = vocab_of([q.context + " " + q.text for q in questions])
    windowing = Windowing(bptt=32, doc_stride=8, max_query_len=6, max_answer_len=5)
    return questions, vocab, windowing, tiny_model(len(vocab), max_len=32)


def test_distributed_evaluation_equals_one_process(tmp_path):
    questions, vocab, windowing, model = answered_questions(1, 9, 70)
    single, single_null, single_loss = qa_answers.evaluate_all(model, questions, vocab, windowing,
                                                            3, torch.device("cpu"), "fp32",
                                                            distributed.DistInfo())
    state = {"config": model.bert_model.config.to_dict(), "model": model.state_dict()}
    torch.multiprocessing.spawn(_ddp_eval_rank, args=(distributed._free_port(), questions, vocab,
                                                      windowing, state, tmp_path), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert list(result["answers"]) == list(single)
        texts = {qid: answer[0] for qid, answer in result["answers"].items()}
        assert texts == {qid: answer[0] for qid, answer in single.items()}
        assert result["loss"] == pytest.approx(single_loss, rel=1e-5)
        assert result["null_scores"] == pytest.approx(single_null, abs=1e-4)


def test_a_failed_squad_download_names_the_flags_that_replace_it(tmp_path, monkeypatch):
    archive = dataclasses.replace(squad.SQUAD["dev"], urls=(f"file://{tmp_path}/none.json",))
    monkeypatch.setitem(squad.SQUAD, "dev", archive)
    with pytest.raises(files.DataError) as error:
        squad.squad_file(None, "dev", tmp_path / "data", lambda *a: None)
    message = str(error.value)
    assert "could not download dev-v1.1.json" in message and "place dev-v1.1.json" in message
    assert "with --dev-file PATH (--train-file and --dev-file)" in message
    assert not (tmp_path / "data").exists()


def test_squad_files_are_downloaded_only_when_absent(tmp_path, monkeypatch):
    fetched = []

    def fake_download(archive, folder, log, expected=()):
        fetched.append((archive.filename, archive.md5, archive.urls[0], Path(folder)))
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / archive.filename).write_text("{}")

    monkeypatch.setattr(corpus, "download_archive", fake_download)
    path = squad.squad_file(None, "dev", tmp_path, print)
    assert path == tmp_path / "squad" / "dev-v1.1.json" and path.exists()
    assert fetched == [("dev-v1.1.json", "3e85deb501d4e538b6bc56f786231552",
                        "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",
                        tmp_path / "squad")]
    assert squad.squad_file(None, "dev", tmp_path, print) == path and len(fetched) == 1
    assert squad.SQUAD["train"].md5 == "981b29407e0affa3b1b156f72073b945"
    with pytest.raises(files.UserError, match="--train-file nope.json: no such file"):
        squad.squad_file("nope.json", "train", tmp_path, print)


###############################################################################
# The script, end to end
###############################################################################

RIVERS = ["Amber", "Birch", "Cedar", "Delta", "Elm", "Fern", "Gale", "Heron", "Iris", "Juniper"]
CITIES = ["Lyon", "Oslo", "Quito", "Porto", "Turin", "Perth", "Dakar", "Hanoi", "Lima", "Riga"]


def write_rivers_squad(path, seed, n_paragraphs, break_one_answer=False):
    """SQuAD-layout paragraphs about rivers; some longer than one window."""
    rng = random.Random(seed)
    paragraphs = []
    for p in range(n_paragraphs):
        river, city = rng.choice(RIVERS), rng.choice(CITIES)
        year = str(rng.randrange(1100, 1999))
        filler = " ".join(f"It is {rng.choice(['wide', 'calm', 'cold', 'old'])}." for _ in range(
            rng.choice([2, 40])))
        context = (f"{filler} The {river} river flows through {city}, where a bridge was "
                   f'built in {year}. Locals call it "the {river.lower()}". {filler}')
        qas = [
            {"id": f"p{p}-city", "question": f"Which city does the {river} river flow through?",
             "answers": [{"text": city, "answer_start": context.index(city)}]},
            {"id": f"p{p}-year", "question": f"When was the bridge over the {river} built?",
             "answers": [{"text": year, "answer_start": context.index(year)},
                         {"text": f"in {year}", "answer_start": context.index(f"in {year}")}]},
        ]
        paragraphs.append({"context": context, "qas": qas})
    if break_one_answer:
        paragraphs[0]["qas"][0]["answers"][0]["answer_start"] += 3
    path.write_text(json.dumps({"data": [{"title": "Rivers", "paragraphs": paragraphs}]}))
    return path


def run(args, cwd, script="qa_task.py"):
    # One thread: tiny models gain nothing from more, and on a busy machine spinning
    # OpenMP threads can make a run many times slower.
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny mlm_task.py run on a WikiText-layout folder; returns its folder."""
    folder = tmp_path_factory.mktemp("pretrain")
    texts = [json.loads(write_rivers_squad(folder / "text.json", 0, 20).read_text())]
    texts += [json.loads(path.read_text()) for path in (NOTRE_DAME, NORMANS) if path.exists()]
    lines = [" ".join([p["context"], *(qa["question"] for qa in p["qas"])])
             for t in texts for a in t["data"] for p in a["paragraphs"]]
    corpus = folder / "wikitext-2"
    corpus.mkdir()
    n = len(lines)
    for split, part in (("train", lines[:n * 8 // 10]), ("valid", lines[n * 8 // 10:n * 9 // 10]),
                        ("test", lines[n * 9 // 10:])):
        (corpus / f"wiki.{split}.tokens").write_text("\n".join(part) + "\n")
    result = run(["--data-dir", folder, "--dataset", "WikiText2", "--device", "cpu", "--emsize", 32,
                  "--nhid", 64, "--nlayers", 2, "--nhead", 2, "--bptt", 32, "--batch_size", 8,
                  "--epochs", 1, "--max-steps", 20], folder, "mlm_task.py")
    assert result.returncode == 0, result.stderr
    assert (folder / "mlm_bert.pt").exists()
    return folder


def end_of_training(stdout):
    match = re.search(r"\| End of training \| test loss +\S+ \| test exact (\S+)% \| test f1 (\S+)%", stdout)
    assert match, stdout
    return float(match[1]), float(match[2])


def check_predictions(dev_path, predictions_path, stdout, cwd):
    dev = json.loads(Path(dev_path).read_text())
    predictions = json.loads(Path(predictions_path).read_text())
    contexts = {qa["id"]: p["context"] for a in dev["data"] for p in a["paragraphs"]
                for qa in p["qas"]}
    assert list(predictions) == list(contexts)  # every dev question, in the file's order
    for qid, answer in predictions.items():
        assert answer and answer in contexts[qid]
    official = run([dev_path, predictions_path], cwd, "metrics.py")
    assert official.returncode == 0, official.stderr
    scores = json.loads(official.stdout)
    assert end_of_training(stdout) == (round(scores["exact_match"], 2), round(scores["f1"], 2))


@pytest.fixture(scope="module")
def fine_tuned(pretrained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    train = write_rivers_squad(folder / "train.json", 1, 24, break_one_answer=True)
    dev = write_rivers_squad(folder / "dev.json", 2, 6)
    result = run(["--bert-model", pretrained / "mlm_bert.pt", "--device", "cpu", "--emsize", 32,
                  "--epochs", 2, "--batch_size", 8, "--train-file", train, "--dev-file", dev,
                  "--predictions", "preds.json"], folder)
    assert result.returncode == 0, result.stderr
    return folder, train, dev, result


def test_fine_tune_end_to_end(fine_tuned):
    folder, train, dev, result = fine_tuned
    assert "Traceback" not in result.stderr
    epoch_lines = re.findall(r"\| end of epoch +(\d+) \| time: +[\d.]+s \| valid loss +[\d.]+ \| "
                             r"valid exact [\d.]+% \| valid f1 [\d.]+%", result.stdout)
    assert epoch_lines == ["1", "2"]
    assert result.stdout.count("not at their answer_start") == 1  # reported once, no crash
    check_predictions(dev, folder / "preds.json", result.stdout, folder)
    ckpt = torch.load(folder / "qa_model.pt", weights_only=True)
    assert ckpt["kind"] == "qa" and {"model", "config", "vocab"} <= ckpt.keys()
    assert ckpt["squad_v2"] is False
    assert "test loss" in (folder / "qa_loss.txt").read_text()
    assert not (folder / "na_probs.json").exists()  # SQuAD v1.1: no no-answer values
    assert "SQuAD v2.0" not in result.stdout and "unanswerable" not in result.stdout


@needs_notre_dame
def test_fine_tune_on_real_squad_paragraphs(pretrained, tmp_path):
    article = json.loads(NOTRE_DAME.read_text())["data"][0]
    every = article["paragraphs"]
    for name, paragraphs in (("train", every[:45]), ("dev", every[45:])):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"data": [{"title": article["title"], "paragraphs": paragraphs}]}))
    result = run(["--bert-model", pretrained / "mlm_bert.pt", "--device", "cpu", "--epochs", 1,
                  "--max-steps", 10, "--batch_size", 16, "--train-file", "train.json",
                  "--dev-file", "dev.json", "--predictions", "preds.json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train: 219 questions" in result.stdout and "dev: 50 questions" in result.stdout
    check_predictions(tmp_path / "dev.json", tmp_path / "preds.json", result.stdout, tmp_path)


def test_predict_one_question(fine_tuned, tmp_path):
    folder = fine_tuned[0]
    context = "The Birch river flows through Oslo, where a bridge was built in 1503."
    result = run(["--predict", "--qa-model", folder / "qa_model.pt", "--context", context,
                  "--question", "Which city does the Birch river flow through?"], tmp_path)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert line["answer"] and line["answer"] in context and isinstance(line["score"], float)
    assert list(line) == ["answer", "score"]  # a SQuAD v1.1 model: as before v2.0 support


def test_predict_files(fine_tuned, tmp_path, monkeypatch, capsys):
    folder, _, dev, _ = fine_tuned
    monkeypatch.chdir(tmp_path)
    context = "The Birch river flows through Oslo, where a bridge was built in 1503."
    Path("questions.json").write_text(json.dumps(
        [{"id": "x", "context": context, "question": "When?"},
         {"context": "Short.", "question": "What?"}]))
    model = ["--predict", "--qa-model", str(folder / "qa_model.pt"), "--device", "cpu"]
    mains.launch(qa_task.main, qa_task.get_parser().parse_args(
        [*model, "--predict-file", "questions.json"]))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [list(line) for line in lines] == [["id", "answer", "score"]] * 2
    assert [line["id"] for line in lines] == ["x", "1"]
    assert lines[0]["answer"] in context and lines[1]["answer"] in "Short."

    # A SQuAD-layout file: the same predictions as at the end of training.
    mains.launch(qa_task.main, qa_task.get_parser().parse_args(
        [*model, "--predict-file", str(dev), "--predictions", "again.json", "--batch_size", "5"]))
    assert "exact" in capsys.readouterr().out
    assert json.loads(Path("again.json").read_text()) == json.loads(
        (folder / "preds.json").read_text())


###############################################################################
# Bad input: one line, non-zero exit, nothing half-written
###############################################################################


def run_in_process(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mains.launch(qa_task.main, cli.parse_args(qa_task.get_parser(), [str(a) for a in argv]))
    err = capsys.readouterr().err
    return exit_info.value.code, err


@pytest.fixture
def bad_input_dir(fine_tuned, tmp_path, monkeypatch):
    folder, train, dev, _ = fine_tuned
    monkeypatch.chdir(tmp_path)
    (tmp_path / "predictions.json").write_text("old")
    (tmp_path / "malformed.json").write_text('{"data": [')
    (tmp_path / "no_context.json").write_text(json.dumps(
        {"data": [{"paragraphs": [{"qas": []}]}]}))
    (tmp_path / "empty.json").write_text(json.dumps({"data": []}))
    (tmp_path / "not_a_model.pt").write_bytes(b"\x00 not a checkpoint")
    (tmp_path / "v2.json").write_text(json.dumps(rollo_v2()))
    contradicting = rollo_v2()
    contradicting["data"][0]["paragraphs"][0]["qas"][1]["answers"] = [
        {"text": "Rollo", "answer_start": 0}]
    (tmp_path / "v2_bad.json").write_text(json.dumps(contradicting))
    return {"qa_model": folder / "qa_model.pt", "train": train, "dev": dev}


def bad_cases(paths, bert):
    common = ["--device", "cpu", "--epochs", 1, "--batch_size", 8]
    train, dev = ["--train-file", paths["train"]], ["--dev-file", paths["dev"]]
    return {
        "malformed JSON": (["--bert-model", bert, "--train-file", "malformed.json", *dev],
                           "malformed JSON"),
        "missing key": (["--bert-model", bert, *train, "--dev-file", "no_context.json"],
                        "no 'context' key"),
        "empty dataset": (["--bert-model", bert, "--train-file", "empty.json", *dev],
                          "no questions"),
        "missing train file": (["--bert-model", bert, "--train-file", "nope.json", *dev],
                               "no such file"),
        "missing bert model": (["--bert-model", "nope.pt", *train, *dev], "no such file"),
        "bert model not a checkpoint": (["--bert-model", "not_a_model.pt", *train, *dev],
                                        "not a checkpoint"),
        "contradicting --emsize": (["--bert-model", bert, "--emsize", 64, *train, *dev],
                                   "--emsize 64 does not fit"),
        "bptt too long": (["--bert-model", bert, "--bptt", 1000, *train, *dev], "positions"),
        "qa model is an encoder": (["--predict", "--qa-model", bert, "--context", "a b",
                                    "--question", "a?"], "not a question-answering model"),
        "predict without question": (["--predict", "--qa-model", paths["qa_model"],
                                      "--context", "a b"], "--question"),
        "v2 answers on an impossible question": (["--bert-model", bert, "--train-file",
                                                  "v2_bad.json", *dev],
                                                 "'is_impossible' true but 1 answer(s)"),
        "null threshold not finite": (["--bert-model", bert, *train, *dev, "--null-threshold",
                                       "nan"], "--null-threshold nan: must be a finite number"),
        "na-probs is --predictions": (["--bert-model", bert, *train, "--dev-file", "v2.json",
                                       "--na-probs", "predictions.json"],
                                      "is also --predictions"),
        "na-probs is the dev file": (["--bert-model", bert, *train, "--dev-file", "v2.json",
                                      "--na-probs", "v2.json"], "is also --dev-file"),
    }, common


@pytest.mark.parametrize("case", ["malformed JSON", "missing key", "empty dataset",
                                  "missing train file", "missing bert model",
                                  "bert model not a checkpoint", "contradicting --emsize",
                                  "bptt too long", "qa model is an encoder",
                                  "predict without question",
                                  "v2 answers on an impossible question",
                                  "null threshold not finite", "na-probs is --predictions",
                                  "na-probs is the dev file"])
def test_bad_input_is_one_error_line(case, bad_input_dir, pretrained, capsys):
    cases, common = bad_cases(bad_input_dir, pretrained / "mlm_bert.pt")
    argv, expected = cases[case]
    code, err = run_in_process([*common, *argv], capsys)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert Path("predictions.json").read_text() == "old"
    assert not Path("qa_model.pt").exists() and not Path("qa_loss.txt").exists()


def test_bad_input_from_the_command_line(pretrained, tmp_path):
    (tmp_path / "train.json").write_text('{"data": [{"paragraphs": [}')
    result = run(["--bert-model", pretrained / "mlm_bert.pt", "--device", "cpu",
                  "--train-file", "train.json", "--dev-file", "train.json"], tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.json"]  # nothing written


def bert_window_starts(n_context, window_len, stride):
    """The loop of Google BERT's run_squad.py, written out as it is there."""
    starts, start = [], 0
    while start < n_context:
        starts.append(start)
        if start + min(window_len, n_context - start) == n_context:
            break
        start += min(window_len, stride)
    return starts or [0]


@pytest.mark.parametrize("window_len", [1, 5, 16, 112])
def test_window_starts_are_berts(window_len):
    for n_context in range(0, 3 * window_len + 7):
        for stride in range(1, window_len + 1):
            starts = qa_windows.window_starts(n_context, window_len, stride)
            assert starts == bert_window_starts(n_context, window_len, stride)
            # The last window ends with the context (and is shorter when that comes early).
            assert min(starts[-1] + window_len, n_context) == n_context




###############################################################################
# SQuAD v2.0: questions without an answer
###############################################################################


def rollo_v2():
    """A SQuAD v2.0 file's content: one answerable question, two without an answer."""
    context = "Rollo led the Normans to Normandy."
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{
        "context": context,
        "qas": [{"id": "a", "question": "Who led?", "is_impossible": False,
                 "answers": [{"text": "Rollo", "answer_start": 0}]},
                {"id": "b", "question": "Who followed?", "is_impossible": True, "answers": [],
                 "plausible_answers": [{"text": "Normans", "answer_start": 14}]},
                {"id": "c", "question": "When?", "is_impossible": True, "answers": []}],
    }]}]}


def test_read_squad_marks_unanswerable_questions(tmp_path):
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(rollo_v2()))
    questions, dataset = squad.read_squad(path)
    assert metrics.has_unanswerable(dataset)
    assert [(q.qid, q.unanswerable, q.answers) for q in questions] == [
        ("a", False, [("Rollo", 0)]), ("b", True, []), ("c", True, [])]  # plausible: unread


def test_the_version_a_file_says_is_kept(tmp_path):
    """A v1.1 file with an unanswerable question is refused, naming it (it would have made
    the run SQuAD v2.0 silently); a file without a version is read by its content, said in
    one line; a v2.0 file is read as it says, silently."""
    content = rollo_v2()
    content["version"] = "1.1"
    (tmp_path / "v1.json").write_text(json.dumps(content))
    with pytest.raises(files.UserError, match=r"v1.json: question id 'b' has no answer, but the "
                                              r"file says \"version\": '1.1' \(SQuAD v1.1"):
        squad.read_squad(tmp_path / "v1.json")
    with pytest.raises(metrics.SquadFormatError, match="question id 'b' has no answer"):
        metrics.load_squad_json(tmp_path / "v1.json")  # metrics.py refuses it too
    del content["version"]
    (tmp_path / "none.json").write_text(json.dumps(content))
    logged = []
    questions, _ = squad.read_squad(tmp_path / "none.json", logged.append)
    assert logged == [f"{tmp_path / 'none.json'}: it has no \"version\"; read as SQuAD v2.0 by "
                      "its content (2 questions without an answer)"]
    assert [q.unanswerable for q in questions] == [False, True, True]
    content["version"] = "v2.0"
    (tmp_path / "v2.json").write_text(json.dumps(content))
    logged.clear()
    squad.read_squad(tmp_path / "v2.json", logged.append)
    assert logged == []


def test_evaluation_in_chunks_of_windows_is_the_same(monkeypatch):
    """Windows cut a chunk of questions at a time (a few windows each here) give the
    answers, no-answer scores and loss of all windows at once."""
    questions, vocab, windowing, model = answered_questions(3, 12, 90)
    whole = qa_answers.evaluate_questions(model, questions, vocab, windowing, 4, torch.device("cpu"))
    monkeypatch.setattr(qa_windows, "CHUNK_WINDOWS", 5)
    chunks = list(qa_windows.window_chunks(questions, vocab, windowing))
    assert len(chunks) > 3  # each question in one chunk, in order
    assert [q.qid for c in chunks for q in c.questions] == [q.qid for q in questions]
    chunked = qa_answers.evaluate_questions(model, questions, vocab, windowing, 4,
                                            torch.device("cpu"))
    # Other batches, so float sums in another order: equal texts, scores to rounding.
    assert {qid: text for qid, (text, _) in chunked[0].items()} == {
        qid: text for qid, (text, _) in whole[0].items()}
    assert {qid: score for qid, (_, score) in chunked[0].items()} == pytest.approx(
        {qid: score for qid, (_, score) in whole[0].items()}, abs=1e-5)
    assert chunked[1] == pytest.approx(whole[1], abs=1e-5)
    assert chunked[2] == pytest.approx(whole[2], rel=1e-5) and chunked[3] == whole[3]


def test_the_dev_set_is_scored_once_at_the_end(pretrained, tmp_path, monkeypatch, capsys):
    """Two epochs: two passes over the dev questions, the validations; the test reuses the
    best one's answers, which are what a fresh --predict of the best model gives. With
    --eval-batches the validations score a sample, and the test all once. --predict
    --predict-file writes its own predictions file, not the training run's."""
    train = write_rivers_squad(tmp_path / "train.json", 1, 24)
    dev = write_rivers_squad(tmp_path / "dev.json", 2, 6)
    passes, evaluate_all = [], qa_answers.evaluate_all
    monkeypatch.setattr(qa_answers, "evaluate_all",
                        lambda model, questions, *rest: passes.append(len(questions))
                        or evaluate_all(model, questions, *rest))
    monkeypatch.chdir(tmp_path)
    common = ["--bert-model", pretrained / "mlm_bert.pt", "--device", "cpu", "--batch_size", 8,
              "--train-file", train, "--dev-file", dev, "--no-progress"]

    def qa(*argv):
        with one_thread():
            mains.launch(qa_task.main, cli.parse_args(qa_task.get_parser(),
                                                            [str(a) for a in (*common, *argv)]))
        return capsys.readouterr().out

    qa("--epochs", 2)
    assert passes == [12, 12]
    trained = Path("predictions.json").read_bytes()
    out = qa("--predict", "--predict-file", dev)
    assert "wrote dev.predictions.json: 12 answers" in out
    assert Path("predictions.json").read_bytes() == trained
    assert json.loads(Path("dev.predictions.json").read_text()) == json.loads(trained)
    passes.clear()
    qa("--epochs", 2, "--eval-batches", 1, "--output-dir", "sampled")
    assert passes == [8, 8, 12]

    words = [f"w{i}" for i in range(200)]
    context = " ".join(words)
    answer_text = "w150 w151"
    answerable = Question("yes", "where?", context, [(answer_text, context.index(answer_text))])
    unanswerable = Question("no", "where not?", context, [], unanswerable=True)
    unusable = Question("bad", "where else?", context, [(answer_text, 3)])
    vocab = vocab_of([context, "where not else?"])
    windowing = Windowing(bptt=48, doc_stride=16, max_query_len=8, max_answer_len=10)
    alone = qa_windows.make_windows([answerable], vocab, windowing, training=True)
    for training in (True, False):
        windows = qa_windows.make_windows([answerable, unanswerable, unusable], vocab, windowing,
                                       training=training)
        targets = torch.stack([windows.start_positions, windows.end_positions], 1)
        per_question = {i: targets[windows.question == i] for i in range(3)}
        assert len(per_question[1]) > 3  # a long context: many windows, all at <cls>
        assert per_question[1].eq(0).all()
        assert torch.equal(per_question[0], torch.stack([alone.start_positions,
                                                         alone.end_positions], 1))
        # Answers that are all unusable: skipped for training, out of the dev loss.
        assert len(per_question[2]) == 0 if training else per_question[2].eq(-1).all()
        assert windows.unusable_answers == ["bad"]


class NullModel(torch.nn.Module):
    """Start logits 5 on token `start_id`, end logits 5 on `end_id`, 0 elsewhere; at <cls>
    both are the number of `marker_id` tokens in the window, so that each window of a
    question has its own no-answer score."""

    def __init__(self, start_id, end_id, marker_id):
        super().__init__()
        self.start_id, self.end_id, self.marker_id = start_id, end_id, marker_id

    def forward(self, src, token_type_input=None, padding_mask=None):
        start, end = (src == self.start_id).float() * 5, (src == self.end_id).float() * 5
        markers = (src == self.marker_id).sum(1).float()
        start[:, 0], end[:, 0] = markers, markers
        return start, end


def test_no_answer_score_is_the_lowest_cls_score_and_decides_empty_answers():
    dense = " ".join("mark" if i % 2 else f"w{i}" for i in range(60))
    sparse = " ".join(f"v{i}" for i in range(60))
    questions = [Question("a", "Who founded it?", f"{dense} founded by Father Sorin. {sparse}", []),
                 Question("b", "Who?", "mark mark nobody here", []),
                 Question("c", "Nothing?", '""', [])]
    vocab = vocab_of([q.context for q in questions])
    model = NullModel(vocab["father"], vocab["sorin"], vocab["mark"])
    windowing = Windowing(bptt=40, doc_stride=10, max_query_len=8, max_answer_len=5)
    answers, null_scores = qa_answers.score_questions(model, questions, vocab, windowing,
                                                   batch_size=3)
    windows = qa_windows.make_windows(questions, vocab, windowing)
    for i, q in enumerate(questions):
        markers = (windows.tokens[windows.question == i] == vocab["mark"]).sum(1)
        assert null_scores[q.qid] == 2 * markers.min()  # start + end, lowest window
    marks_a = (windows.tokens[windows.question == 0] == vocab["mark"]).sum(1)
    assert marks_a.min() == 0 < marks_a.max()  # the min differs from other windows' scores
    assert answers["a"] == ("Father Sorin", 10.0) and answers["c"] == ("", -math.inf)
    assert answers["b"][1] == 0.0 and null_scores["b"] == 4.0

    odds = qa_answers.no_answer_odds(answers, null_scores)
    assert odds == {"a": -10.0, "b": 4.0, "c": sys.float_info.max}  # finite: JSON has no inf

    def predicted(threshold):
        return qa_answers.to_predictions(answers, null_scores, threshold)

    assert predicted(0.0) == {"a": "Father Sorin", "b": "", "c": ""}
    assert predicted(-10.0)["a"] == "Father Sorin"  # not above the threshold: the span
    assert predicted(-10.5)["a"] == ""
    assert predicted(4.0)["b"] == answers["b"][0] != ""
    assert predicted(None) == {qid: text for qid, (text, _) in answers.items()}  # v1.1 models


def test_written_na_probs_and_scores_are_the_official_ones(tmp_path):
    dataset = rollo_v2()["data"]
    answers = {"a": ("Rollo", 3.0), "b": ("the Normans", 1.0), "c": ("led", 2.5)}
    null_scores = {"a": 1.0, "b": 2.0, "c": 2.0}
    args = argparse.Namespace(predictions=str(tmp_path / "out" / "preds.json"), na_probs=None)
    paths = {"--predictions": args.predictions, "--na-probs": qa_task.na_probs_path(args)}
    scores, written = qa_answers.write_predictions(paths, dataset, answers, null_scores, 0.0)
    exact, f1, line = scores["exact"], scores["f1"], qa_answers.v2_summary(scores)
    assert written == [args.predictions, str(tmp_path / "out" / "na_probs.json")]
    predictions = json.loads((tmp_path / "out" / "preds.json").read_text())
    na_probs = metrics.load_na_probs(tmp_path / "out" / "na_probs.json")  # beside --predictions
    assert predictions == {"a": "Rollo", "b": "", "c": "led"}
    assert na_probs == {"a": -2.0, "b": 1.0, "c": -0.5}  # null - best span, every question
    official = metrics.evaluate_v2(dataset, predictions, na_probs)
    assert (exact, f1) == (official["exact"], official["f1"]) == pytest.approx((200 / 3, 200 / 3))
    # By rising value: a (answered right) raises the score from the 2 unanswerable ones to 3;
    # c (answered "led" where there is no answer) lowers it again.
    assert official["best_exact"] == 100.0 and official["best_exact_thresh"] == -2.0
    assert line == ('| SQuAD v2.0 | 1 of 3 answered "" | HasAns exact 100.00% f1 100.00% (1) | '
                    "NoAns exact 50.00% f1 50.00% (2) | best exact 100.00% at -2.0000, "
                    "best f1 100.00% at -2.0000")

    v1 = [{"paragraphs": [{"context": "Rollo led.", "qas": [
        {"id": "a", "question": "Who?", "answers": [{"text": "Rollo", "answer_start": 0}]}]}]}]
    args = argparse.Namespace(predictions=str(tmp_path / "v1" / "preds.json"), na_probs=None)
    paths = {"--predictions": args.predictions, "--na-probs": qa_task.na_probs_path(args)}
    assert qa_answers.write_predictions(paths, v1, {"a": ("Rollo", 1.0)}, {"a": 9.0}, None) == (
        {"exact": 100.0, "f1": 100.0}, [args.predictions])
    assert sorted(p.name for p in (tmp_path / "v1").iterdir()) == ["preds.json"]


def v2_line_scores(stdout):
    """The numbers of the | SQuAD v2.0 | log line."""
    match = re.search(r"\| SQuAD v2\.0 \| (\d+) of (\d+) answered \"\" \| HasAns exact (\S+)% "
                      r"f1 (\S+)% \((\d+)\) \| NoAns exact (\S+)% f1 (\S+)% \((\d+)\) \| "
                      r"best exact (\S+)% at (\S+), best f1 (\S+)% at (\S+)", stdout)
    assert match, stdout
    return [float(x) for x in match.groups()]


def write_normans_split(folder):
    """The Normans article as a train part (its first 30 paragraphs) and a dev part."""
    article = json.loads(NORMANS.read_text())["data"][0]
    for name, paragraphs in (("train", article["paragraphs"][:30]),
                             ("dev", article["paragraphs"][30:])):
        (folder / f"{name}.json").write_text(json.dumps(
            {"version": "v2.0", "data": [{"title": article["title"], "paragraphs": paragraphs}]}))
    return folder / "train.json", folder / "dev.json"


@needs_normans
def test_squad_v2_end_to_end_on_the_normans(pretrained, tmp_path, monkeypatch, capsys):
    train, dev = write_normans_split(tmp_path)
    result = run(["--bert-model", pretrained / "mlm_bert.pt", "--device", "cpu", "--epochs", 1,
                  "--max-steps", 10, "--batch_size", 16, "--train-file", train, "--dev-file",
                  dev, "--predictions", "preds.json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train: 167 questions (91 unanswerable)" in result.stdout
    assert "dev: 41 questions (21 unanswerable)" in result.stdout
    predictions = json.loads((tmp_path / "preds.json").read_text())
    na_probs = json.loads((tmp_path / "na_probs.json").read_text())
    contexts = {qa["id"]: p["context"] for a in json.loads(dev.read_text())["data"]
                for p in a["paragraphs"] for qa in p["qas"]}
    assert list(predictions) == list(na_probs) == list(contexts)
    for qid, answer in predictions.items():
        assert (answer == "") == (na_probs[qid] > qa_answers.DEFAULT_NULL_THRESHOLD)
        assert answer in contexts[qid]
    # What it printed is what the official metric says of the files it wrote.
    official = run([dev, "preds.json", "--na-prob-file", "na_probs.json"], tmp_path, "metrics.py")
    assert official.returncode == 0, official.stderr
    scores = json.loads(official.stdout)
    assert end_of_training(result.stdout) == (round(scores["exact"], 2), round(scores["f1"], 2))
    n_empty, total, *rest = v2_line_scores(result.stdout)
    assert (n_empty, total) == (sum(not a for a in predictions.values()), 41)
    keys = ["HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1", "NoAns_total",
            "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    assert rest == pytest.approx([round(scores[k], 4 if "thresh" in k else 2) for k in keys])
    assert torch.load(tmp_path / "qa_model.pt", weights_only=True)["squad_v2"] is True

    # --predict with the v2.0 model: a threshold in the middle of the values answers "" for
    # half of the questions and a span of the context for the others.
    monkeypatch.chdir(tmp_path)
    threshold = sorted(na_probs.values())[len(na_probs) // 2]
    model = ["--predict", "--device", "cpu", "--null-threshold", str(threshold)]
    mains.launch(qa_task.main, qa_task.get_parser().parse_args(
        [*model, "--predict-file", str(dev), "--predictions", "again.json", "--na-probs",
         "again_na.json"]))
    out = capsys.readouterr().out
    again = json.loads(Path("again.json").read_text())
    assert json.loads(Path("again_na.json").read_text()) == pytest.approx(na_probs, abs=1e-4)
    assert 0 < sum(not a for a in again.values()) < len(again)
    assert all(a in contexts[qid] for qid, a in again.items())
    scores = metrics.evaluate_v2(json.loads(dev.read_text())["data"], again)
    assert f"exact {scores['exact']:.2f}% | f1 {scores['f1']:.2f}%" in out and "| SQuAD v2.0 |" in out

    context = contexts[next(iter(contexts))]
    for threshold, no_answer in ((1e6, False), (-1e6, True)):
        mains.launch(qa_task.main, qa_task.get_parser().parse_args(
            ["--predict", "--device", "cpu", "--null-threshold", str(threshold), "--context",
             context, "--question", "Who ruled Normandy?"]))
        line = json.loads(capsys.readouterr().out)
        assert list(line) == ["answer", "no_answer", "score", "null_score"]
        assert line["no_answer"] is no_answer and (line["answer"] == "") is no_answer
        assert line["answer"] in context and isinstance(line["null_score"], float)


def test_metrics_logs_end_with_a_test_row_in_the_epoch_of_the_last_step(pretrained, tmp_path):
    """--max-steps stops inside epoch 1: the test row, the last of the mlm and qa metrics
    logs, says epoch 1 (not the epoch the loop would have started next). The loss log
    names the tokenizer and vocabulary size the model has, not the flags' defaults."""
    mlm_rows = [json.loads(line) for line in (pretrained / "mlm_metrics.jsonl").open()]
    assert "test_loss" in mlm_rows[-1] and mlm_rows[-1]["epoch"] == 1
    vocab = torch.load(pretrained / "mlm_bert.pt", weights_only=True)["vocab"]
    loss_log = (pretrained / "mlm_loss.txt").read_text().splitlines()
    assert "tokenizer:    basic_english" in loss_log and f"vocab_size:    {len(vocab)}" in loss_log
    train = write_rivers_squad(tmp_path / "train.json", 1, 24)
    dev = write_rivers_squad(tmp_path / "dev.json", 2, 4)
    result = run(["--bert-model", pretrained / "mlm_bert.pt", "--device", "cpu", "--epochs", 3,
                  "--max-steps", 2, "--batch_size", 4, "--train-file", train, "--dev-file", dev],
                 tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "qa_metrics.jsonl").open()]
    assert {"test_exact", "test_f1"} <= rows[-1].keys(), rows
    assert (rows[-1]["step"], rows[-1]["epoch"]) == (2, 1)
    assert not any("test_f1" in row for row in rows[:-1])


@needs_normans
def test_the_readme_commands_make_the_normans_files(tmp_path):
    """docs/squad.rst, SQuAD v2.0: its two python -c commands make normans-train.json and
    normans-dev.json from the official dev-v2.0.json (here its Normans article alone), and
    the WikiText-2-layout folder from wiki.valid.tokens."""
    doc = (REPO / "docs/squad.rst").read_text(encoding="utf-8")
    section = doc[doc.index("commands make the files::"):]
    commands = re.findall(r'^    python -c "\n(.*?)"$', section, re.S | re.M)[:2]
    assert len(commands) == 2
    (tmp_path / "dev-v2.0.json").write_text(NORMANS.read_text())
    (tmp_path / ".data/wikitext-2").mkdir(parents=True)
    (tmp_path / ".data/wikitext-2/wiki.valid.tokens").write_text(
        "".join(f"line {i}\n" for i in range(100)))
    for command in commands:
        code = "\n".join(line.removeprefix("    ") for line in command.splitlines())
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)
    for name, questions, unanswerable in (("normans-train.json", 167, 91),
                                          ("normans-dev.json", 41, 21)):
        qas = [qa for article in json.loads((tmp_path / name).read_text())["data"]
               for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
        assert (len(qas), sum(qa["is_impossible"] for qa in qas)) == (questions, unanswerable)
        squad.read_squad(tmp_path / name)  # a file qa_task.py reads
    sizes = [len((tmp_path / f"data/wikitext-2/wiki.{split}.tokens").read_text().splitlines())
             for split in ("train", "valid", "test")]
    assert sizes == [80, 10, 10]
