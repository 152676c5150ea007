"""WordPiece beside basic_english: the same ids and offsets as transformers' BertTokenizerFast,
stored in checkpoints, and used end to end (mlm -> ns -> qa)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    BERT_VOCAB,
    REAL_DATA,
    REPO,
    absent_reason,
    real_data_skip,
    toy_lines,
    write_wikitext,
)

import data
from bertkit import checkpoint, files
from bertkit.text import corpus
from bertkit.text import tokenizer as tok
from model import QuestionAnswerTask

SQUAD_FILES = sorted((REAL_DATA / "squad").glob("*.json"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def bert_vocab():
    real_data_skip(BERT_VOCAB)
    return BERT_VOCAB


def squad_texts():
    if not SQUAD_FILES:
        pytest.skip(absent_reason(REAL_DATA / "squad" / "*.json"))
    texts = []
    for path in SQUAD_FILES:
        for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
            for paragraph in article["paragraphs"]:
                texts.append(paragraph["context"])
                texts += [qa["question"] for qa in paragraph["qas"]]
    return texts


def test_ids_and_offsets_equal_bert_tokenizer_fast():
    """Every context and question of the shared SQuAD files, through the real
    bert-base-uncased vocab.txt: ours and transformers' give the same ids and spans."""
    transformers = pytest.importorskip("transformers")
    ours = tok.load_tokenizer(bert_vocab())
    theirs = transformers.BertTokenizerFast.from_pretrained(str(bert_vocab().parent))
    texts = squad_texts()
    assert len(texts) > 500
    for text in texts:
        ids, spans = ours.encode_with_spans(text)
        expected = theirs(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == expected["input_ids"], text
        assert spans == [tuple(span) for span in expected["offset_mapping"]], text


def test_bert_base_special_ids_come_from_the_tokenizer():
    tokenizer = tok.load_tokenizer(bert_vocab())
    assert len(tokenizer) == 30522 and tokenizer.kind == "wordpiece"
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id, tokenizer.sep_id,
            tokenizer.mask_id) == (0, 100, 101, 102, 103)
    assert not set(tokenizer.word_ids.tolist()) & {0, 100, 101, 102, 103}


def test_folder_and_tokenizer_json_load_the_same_tokenizer(tmp_path):
    tokenizer = tok.load_tokenizer(bert_vocab())
    files = tokenizer.save_transformers(tmp_path)
    assert {"tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= set(files)
    for source in (tmp_path, tmp_path / "tokenizer.json", tmp_path / "vocab.txt"):
        again = tok.load_tokenizer(source)
        assert again.itos == tokenizer.itos
        assert again.encode("Héllo, WORLD of tokenizers!") == tokenizer.encode(
            "Héllo, WORLD of tokenizers!")


def test_a_cased_folder_keeps_its_case(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "world"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert tok.load_tokenizer(tmp_path).encode("Hello world") == [5, 7]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    assert tok.load_tokenizer(tmp_path).encode("Hello world") == [6, 7]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ('{"model": {"type": "BPE"}}', "a BPE tokenizer, not BERT's WordPiece"),
    ("not json", "not a usable tokenizer"),
])
def test_bad_tokenizer_paths_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(files.DataError, match=message):
        tok.load_tokenizer(path)


def test_trained_wordpiece_has_bert_specials_and_round_trips_through_a_checkpoint():
    lines = toy_lines(300, 0) + ["Unusual Words like Zebrafish and Naïve café."] * 20
    tokenizer = tok.train_wordpiece(lines, vocab_size=120)
    assert tokenizer.itos[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(tokenizer) <= 120
    # Uncased, accents stripped: the same ids whatever the case and accents.
    assert tokenizer.encode("NAIVE Cafe") == tokenizer.encode("naïve café")
    ckpt = {"vocab": tokenizer.itos, "tokenizer": tokenizer.state()}
    again = tok.tokenizer_from_checkpoint(ckpt)
    assert again.encode("zebrafish w1 w2") == tokenizer.encode("zebrafish w1 w2")
    # Files from before WordPiece have no tokenizer entry: basic_english.
    old = tok.tokenizer_from_checkpoint({"vocab": list(tok.SPECIALS) + ["a"]})
    assert old.kind == "basic_english" and old.encode("A b") == [5, 0]


def test_random_replacements_are_never_special():
    tokenizer = tok.load_tokenizer(bert_vocab())
    masking = data.Masking.of(tokenizer, 0.5, "bert")
    tokens = torch.randint(1000, 30522, (200, 64))
    inputs, targets, positions = data.mask_tokens(tokens, masking, torch.Generator().manual_seed(0))
    replaced = inputs.gather(1, positions).flatten()
    random_words = replaced[(replaced != tokenizer.mask_id) & (replaced != targets)]
    assert len(random_words) > 300
    assert not set(random_words.tolist()) & {0, 100, 101, 102, 103}


def test_corpus_with_wordpiece_is_cached_per_tokenizer(tmp_path):
    folder = write_wikitext(tmp_path / "d", toy_lines(200, 0), toy_lines(20, 1),
                            toy_lines(20, 2))
    quiet = lambda *a: None  # noqa: E731
    vocab, splits = corpus.load_splits("WikiText2", folder, spec=tok.TokenizerSpec("wordpiece", 80), vocab_path=tmp_path / "v.pt", log=quiet)
    assert vocab.kind == "wordpiece"
    lines = (folder / "wikitext-2" / "wiki.valid.tokens").read_text().splitlines()
    expected = [vocab.encode(line) for line in lines]
    valid = splits["valid"]
    assert valid.ids.tolist() == [i for ids in expected for i in ids]
    assert (valid.line_offsets.diff() == torch.tensor([len(ids) for ids in expected])).all()
    # The vocab file is reused, the caches are per tokenizer.
    again, _ = corpus.load_splits("WikiText2", folder, spec=tok.TokenizerSpec("wordpiece", 80),
                                  vocab_path=tmp_path / "v.pt", log=quiet)
    assert again.itos == vocab.itos
    corpus.load_splits("WikiText2", folder, vocab_path=tmp_path / "b.pt", log=quiet)
    caches = sorted(p.name for p in (folder / "wikitext-2" / ".cache").iterdir())
    assert len(caches) == 6, caches  # three splits for each tokenizer


TINY = ["--device", "cpu", "--emsize", "32", "--nhid", "64", "--nlayers", "2", "--nhead", "2",
        "--bptt", "48", "--batch_size", "8", "--epochs", "1", "--log-interval", "5"]


def run(script, *flags, cwd):
    result = subprocess.run([sys.executable, str(REPO / script), *flags], cwd=cwd, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def squad_file(path, lines):
    paragraphs = []
    for i, line in enumerate(lines):
        words = line.split()
        answer = " ".join(words[4:6])
        paragraphs.append({"context": line, "qas": [{
            "id": f"q{i}", "question": f"What comes after {words[3]}?",
            "answers": [{"text": answer, "answer_start": line.index(answer)}]}]})
    path.write_text(json.dumps({"data": [{"title": "toy", "paragraphs": paragraphs}]}))
    return path


@pytest.mark.parametrize("tokenizer", ["wordpiece", "vocab.txt"])
def test_wordpiece_end_to_end_mlm_ns_qa_predict(tmp_path, tokenizer):
    write_wikitext(tmp_path / "D", toy_lines(300, 0, 40), toy_lines(30, 1, 40),
                   toy_lines(30, 2, 40))
    data_flags = ["--data-dir", "D", "--dataset", "WikiText2"]
    flag = ["--tokenizer", "wordpiece", "--vocab-size", "100"]
    if tokenizer == "vocab.txt":
        flag = ["--tokenizer", str(bert_vocab())]
    out = run("mlm_task.py", *data_flags, *TINY, *flag, "--max-steps", "20", cwd=tmp_path)
    assert "End of training" in out
    saved = checkpoint.load_checkpoint(str(tmp_path / "mlm_bert.pt"), "--bert-model")
    assert saved["tokenizer"]["kind"] == "wordpiece"
    pretrained = tok.tokenizer_from_checkpoint(saved)
    if tokenizer == "vocab.txt":
        assert pretrained.itos == tok.load_tokenizer(bert_vocab()).itos
    run("ns_task.py", "--bert-model", "mlm_bert.pt", *data_flags, *TINY, "--max-steps", "10",
        "--min_sentence_len", "20", cwd=tmp_path)
    squad = squad_file(tmp_path / "squad.json", toy_lines(30, 3, 30))
    out = run("qa_task.py", "--bert-model", "ns_bert.pt", "--train-file", str(squad),
              "--dev-file", str(squad), *TINY, "--max-steps", "10", "--max-query-len", "12",
              cwd=tmp_path)
    assert "End of training" in out
    qa = checkpoint.load_checkpoint(str(tmp_path / "qa_model.pt"), "--qa-model")
    assert tok.tokenizer_from_checkpoint(qa).itos == pretrained.itos
    context = toy_lines(1, 5, 30)[0]
    out = run("qa_task.py", "--predict", "--context", context, "--question", "What comes?",
              "--device", "cpu", cwd=tmp_path)
    answer = json.loads(out.strip().splitlines()[-1])["answer"]
    assert answer and answer in context  # a span of the original text, WordPiece offsets
    if tokenizer == "wordpiece":
        exported_answers_equal_ours(tmp_path, context)


def exported_answers_equal_ours(folder, context):
    """convert.py's folder of the QA model: transformers loads every weight and its
    tokenizer, and gives our start and end logits on the same text."""
    transformers = pytest.importorskip("transformers")
    run("convert.py", "qa_model.pt", "exported", cwd=folder)
    theirs, info = transformers.AutoModelForQuestionAnswering.from_pretrained(
        folder / "exported", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "exported")
    ours = checkpoint.load_task_model(QuestionAnswerTask, "qa", str(folder / "qa_model.pt"),
                                      "--qa-model", "a QA model")[0].eval()
    inputs = their_tokenizer("What comes?", context, return_tensors="pt")
    with torch.no_grad():
        expected = theirs.eval()(**inputs)
        start, end = ours(inputs["input_ids"], inputs["token_type_ids"],
                          inputs["attention_mask"].bool())
    torch.testing.assert_close(start, expected.start_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(end, expected.end_logits, atol=1e-5, rtol=0)


def test_continue_pretraining_from_a_checkpoint(tmp_path):
    write_wikitext(tmp_path / "D", toy_lines(300, 0, 40), toy_lines(30, 1, 40),
                   toy_lines(30, 2, 40))
    data_flags = ["--data-dir", "D", "--dataset", "WikiText2"]
    run("mlm_task.py", *data_flags, *TINY, "--tokenizer", "wordpiece", "--vocab-size", "100",
        "--max-steps", "10", cwd=tmp_path)
    # Continuing from the file a run writes as its best model is refused: copy it first.
    (tmp_path / "first.pt").write_bytes((tmp_path / "full_mlm_model.pt").read_bytes())
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    # Its best model replaces the first run's full_mlm_model.pt: told so (--overwrite).
    out = run("mlm_task.py", *data_flags, "--bert-model", "first.pt", "--device", "cpu",
              "--bptt", "48", "--batch_size", "8", "--epochs", "1", "--max-steps", "1",
              "--lr", "1e-9", "--save", "again.pt", "--overwrite", cwd=tmp_path)
    assert "End of training" in out
    again = torch.load(tmp_path / "full_mlm_model.pt", weights_only=True)
    assert again["tokenizer"] == first["tokenizer"]
    # One step at lr 1e-9 from the loaded model: the head came along, not a fresh one.
    for key, value in first["model"].items():
        torch.testing.assert_close(again["model"][key], value, atol=1e-6, rtol=0)


def test_a_vocabulary_smaller_than_asked_says_so_and_why(tmp_path):
    """--vocab-size 30522 on a small text learns fewer tokens: the log says how many and why."""
    text = SimpleNamespace(sample_lines=lambda: toy_lines(50, 0, 20))  # as corpus.TrainText
    said = []
    vocab = tok.choose_vocab(tok.TokenizerSpec("wordpiece", 30522), "D", None, text, said.append)
    assert len(vocab) < 30522
    assert said == [f"trained a WordPiece vocabulary of {len(vocab)} tokens on the train split, "
                    "fewer than --vocab-size 30522: its text has no more pieces to merge (every "
                    "word it holds is already one token); more text gives more"]
    said.clear()
    tok.choose_vocab(tok.TokenizerSpec("wordpiece", len(vocab)), "D", None, text, said.append)
    assert "fewer than" not in said[0]
