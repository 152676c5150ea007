"""bertkit/text/corpus.py: datasets and downloads, folders and their splits, parallel tokenizing,
the token-id cache and the vocab file."""

import hashlib
import os
import random
import re
import urllib.request
from collections import Counter
from dataclasses import replace

import pytest
import torch
from conftest import REAL_VALID, make_zip, toy_lines, write_wikitext

import data
from bertkit.files import DataError
from bertkit.text import corpus, token_ids, tokenizer
from bertkit.text.tokenizer import Vocab

###############################################################################
# Datasets and downloads
###############################################################################


WIKITEXT_MEMBERS = {f"wikitext-2/wiki.{s}.tokens": " = Title = \n some text .\n"
                    for s in ("train", "valid", "test")}


def serve_archive(monkeypatch, folder, payload, urls, md5=None):
    """Put `payload` in the served folder and point WikiText2's archive at `urls`."""
    (folder / "wikitext-2-v1.zip").write_bytes(payload)
    spec = corpus.DATASETS["WikiText2"]
    archive = replace(spec.archive, md5=md5 or hashlib.md5(payload).hexdigest(), urls=tuple(urls))
    monkeypatch.setitem(corpus.DATASETS, "WikiText2", replace(spec, archive=archive))
    return archive


def test_download_extracts_and_removes_the_archive(tmp_path, http_root, monkeypatch):
    base, served = http_root
    serve_archive(monkeypatch, served, make_zip(WIKITEXT_MEMBERS), [f"{base}/wikitext-2-v1.zip"])
    data_dir = tmp_path / "data"
    files = corpus.dataset_files("WikiText2", data_dir, log=lambda *a: None)
    assert files["train"] == [data_dir / "wikitext-2" / "wiki.train.tokens"]
    assert files["train"][0].read_text() == WIKITEXT_MEMBERS["wikitext-2/wiki.train.tokens"]
    assert sorted(os.listdir(data_dir)) == ["wikitext-2"]  # no zip, no partial download


def test_download_tries_the_next_host(tmp_path, http_root, closed_url, monkeypatch):
    base, served = http_root
    urls = [f"{closed_url}/wikitext-2-v1.zip", f"{base}/missing.zip", f"{base}/wikitext-2-v1.zip"]
    serve_archive(monkeypatch, served, make_zip(WIKITEXT_MEMBERS), urls)
    logged = []
    files = corpus.dataset_files("WikiText2", tmp_path / "data", log=logged.append)
    assert files["valid"][0].is_file()
    assert sum("download failed" in line for line in logged) == 2


def test_bad_checksum_leaves_nothing_and_says_what_to_do(tmp_path, http_root, monkeypatch):
    base, served = http_root
    url = f"{base}/wikitext-2-v1.zip"
    archive = serve_archive(monkeypatch, served, make_zip(WIKITEXT_MEMBERS), [url], md5="0" * 32)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as error:
        corpus.dataset_files("WikiText2", data_dir, log=lambda *a: None)
    message = str(error.value)
    assert url in message and "MD5" in message
    assert f"place {archive.filename}" in message and str(data_dir) in message
    assert "wiki.train.tokens" in message  # the extracted files are the other way
    assert not data_dir.exists()  # not even the folder it made is left behind


def test_a_partial_dataset_folder_names_the_missing_file(tmp_path, closed_url, monkeypatch):
    """A WikiText folder without its valid split: no download, one line naming the file."""
    folder = tmp_path / "data" / "wikitext-2"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        (folder / f"wiki.{split}.tokens").write_text("a b c\n")
    monkeypatch.setattr(corpus.DATASETS["WikiText2"].archive, "urls", (f"{closed_url}/x.zip",))
    with pytest.raises(DataError, match=r"missing .*wiki\.valid\.tokens \(the other files"):
        corpus.dataset_files("WikiText2", tmp_path / "data", log=lambda *a: None)


def test_archive_placed_by_hand_is_used_offline(tmp_path, closed_url, monkeypatch):
    payload = make_zip(WIKITEXT_MEMBERS)
    served = tmp_path / "unused"
    served.mkdir()
    serve_archive(monkeypatch, served, payload, [f"{closed_url}/wikitext-2-v1.zip"])
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "wikitext-2-v1.zip").write_bytes(payload)  # what the error message asks for
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    files = corpus.dataset_files("WikiText2", data_dir, log=lambda *a: None)
    assert files["test"][0].is_file()
    assert not (data_dir / "wikitext-2-v1.zip").exists()


def test_zip_member_escaping_the_folder_is_refused(tmp_path, http_root, monkeypatch):
    base, served = http_root
    members = {**WIKITEXT_MEMBERS, "../escaped.txt": "owned", "wikitext-2/../../escaped2.txt": "x"}
    serve_archive(monkeypatch, served, make_zip(members), [f"{base}/wikitext-2-v1.zip"])
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="refusing to extract"):
        corpus.dataset_files("WikiText2", data_dir, log=lambda *a: None)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "escaped2.txt").exists()
    assert os.listdir(data_dir) == []  # nothing extracted, archive removed


def _no_network(*args, **kwargs):
    raise AssertionError("the network was touched")


def test_present_files_touch_no_network(wikitext_dir, closed_url, monkeypatch):
    spec = corpus.DATASETS["WikiText2"]
    archive = replace(spec.archive, urls=(f"{closed_url}/wikitext-2-v1.zip",))
    monkeypatch.setitem(corpus.DATASETS, "WikiText2", replace(spec, archive=archive))
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    files = corpus.dataset_files("WikiText2", wikitext_dir)
    assert all(p.is_file() for paths in files.values() for p in paths)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="unknown --dataset 'NoSuchSet'.*WikiText2"):
        corpus.dataset_files("NoSuchSet", tmp_path)


def test_folder_with_split_files(tmp_path):
    for split in data.SPLITS:
        (tmp_path / f"{split}.txt").write_text(f"{split} text\n")
    (tmp_path / "notes.txt").write_text("not a split\n")
    files = corpus.dataset_files(str(tmp_path), "unused")
    assert files == {s: [tmp_path / f"{s}.txt"] for s in data.SPLITS}


def test_folder_of_many_files_is_split_by_bytes_of_shuffled_files(tmp_path):
    for i in range(40):
        (tmp_path / f"book{i:02d}.txt").write_text(f"book {i}\n" * 10)
    (tmp_path / "README.md").write_text("not a book\n")
    files = corpus.dataset_files(str(tmp_path), "unused")
    books = sorted(tmp_path.glob("*.txt"))
    assert files["train"] == files["valid"] == files["test"] != books  # shuffled: no README
    assert sorted(files["train"]) == books
    assert files == corpus.dataset_files(str(tmp_path), "unused")  # a fixed seed
    ranges = corpus.dataset_ranges(str(tmp_path), "unused")
    sizes = {s: sum(end - start for _, start, end in ranges[s]) for s in data.SPLITS}
    total = sum(p.stat().st_size for p in books)
    assert sizes["valid"] == sizes["test"] == pytest.approx(total / 10, abs=8)  # whole lines
    assert sum(sizes.values()) == total


def test_folder_of_few_files_is_split_by_text(tmp_path):
    lines = [f"line {i} of the folder" for i in range(1000)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:300]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[300:]) + "\n")
    ranges = corpus.split_byte_ranges(corpus.dataset_files(str(tmp_path), "unused"))
    text = {}
    for split, parts in ranges.items():
        text[split] = ""
        for path, start, end in parts:
            with open(path, "rb") as f:
                f.seek(start)
                text[split] += f.read(end - start).decode()
    # Every line exactly once, in order, cut at line boundaries, about 80/10/10.
    assert (text["train"] + text["valid"] + text["test"]).splitlines() == lines
    sizes = [len(text[s].splitlines()) for s in data.SPLITS]
    assert sizes[0] == pytest.approx(800, abs=5) and sizes[1] == pytest.approx(100, abs=5)


def test_folder_without_txt_files_ignores_the_token_cache(tmp_path):
    # Regression: the .cache/ written beside the data was read as text on the second run.
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "corpus.text").write_text("\n".join(toy_lines(100)) + "\n")
    first = corpus.load_splits(str(folder), "unused", log=lambda *a: None)[1]
    assert list((folder / ".cache").iterdir())
    second = corpus.load_splits(str(folder), "unused", log=lambda *a: None)[1]
    for split in data.SPLITS:
        assert torch.equal(first[split].ids, second[split].ids)


def test_non_utf8_file_is_a_data_error(tmp_path):
    train = tmp_path / "data" / "wikitext-2" / "wiki.train.tokens"
    write_wikitext(tmp_path / "data", toy_lines(10), toy_lines(2), toy_lines(2))
    train.write_bytes(b"good line\n\xff\xfe bad bytes\n")
    with pytest.raises(DataError, match=f"{re.escape(str(train))} is not UTF-8"):
        corpus.load_splits("WikiText2", tmp_path / "data", log=lambda *a: None)


###############################################################################
# Token ids and their cache
###############################################################################


def naive_ids(lines, vocab):
    return [vocab[w] for line in lines for w in tokenizer.basic_english_normalize(line)]


def test_load_splits_ids_and_lines(wikitext_dir):
    vocab, splits = corpus.load_splits("WikiText2", wikitext_dir, log=lambda *a: None)
    folder = wikitext_dir / "wikitext-2"
    train_lines = (folder / "wiki.train.tokens").read_text().splitlines()
    assert vocab.itos == Vocab.build(Counter(w for line in train_lines for w in line.split())).itos
    for split in data.SPLITS:
        lines = (folder / f"wiki.{split}.tokens").read_text().splitlines()
        got = splits[split]
        assert got.ids.dtype == torch.int32
        assert got.ids.tolist() == naive_ids(lines, vocab)
        assert got.line_offsets.diff().tolist() == [len(line.split()) for line in lines]


def _count_calls(monkeypatch):
    calls = []
    real = token_ids._map_chunks

    def counting(fn, jobs, *args, **kwargs):
        calls.append(fn.__name__)
        return real(fn, jobs, *args, **kwargs)

    monkeypatch.setattr(token_ids, "_map_chunks", counting)
    return calls


def test_second_load_reads_the_cache(wikitext_dir, monkeypatch):
    vocab, first = corpus.load_splits("WikiText2", wikitext_dir, log=lambda *a: None)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(token_ids, "_map_chunks", no_tokenizing)
    _, second = corpus.load_splits("WikiText2", wikitext_dir, vocab=vocab)
    for split in data.SPLITS:
        assert torch.equal(first[split].ids, second[split].ids)
        assert torch.equal(first[split].line_offsets, second[split].line_offsets)
    cache = next((wikitext_dir / "wikitext-2" / ".cache").glob("train.*.ids"))
    assert token_ids.read_id_file(cache).ids.dtype == torch.int32


def test_cache_is_invalidated_when_a_file_changes(wikitext_dir, monkeypatch):
    vocab, _ = corpus.load_splits("WikiText2", wikitext_dir, log=lambda *a: None)
    calls = _count_calls(monkeypatch)
    valid = wikitext_dir / "wikitext-2" / "wiki.valid.tokens"
    valid.write_text("w1 w2 w3\nw4\n")
    _, splits = corpus.load_splits("WikiText2", wikitext_dir, vocab=vocab)
    assert calls == ["_numericalize_chunk"]  # only the changed split
    assert splits["valid"].ids.tolist() == [vocab[w] for w in "w1 w2 w3 w4".split()]


def test_unreadable_cache_is_rebuilt(wikitext_dir):
    vocab, first = corpus.load_splits("WikiText2", wikitext_dir, log=lambda *a: None)
    first_test = first["test"].ids.clone()  # the ids are mapped from the file overwritten here
    for cache in (wikitext_dir / "wikitext-2" / ".cache").iterdir():
        cache.write_bytes(b"truncated")
    _, second = corpus.load_splits("WikiText2", wikitext_dir, vocab=vocab)
    assert torch.equal(first_test, second["test"].ids)


def test_vocab_file_reused_or_rebuilt(wikitext_dir, tmp_path, monkeypatch):
    vocab_path = tmp_path / "bert_vocab.pt"
    vocab, _ = corpus.load_splits("WikiText2", wikitext_dir, vocab_path=vocab_path, log=lambda *a: None)
    assert tokenizer.load_vocab(vocab_path)[1] == {"dataset": "WikiText2", "min_freq": 1}
    calls = _count_calls(monkeypatch)
    logged = []
    again, _ = corpus.load_splits("WikiText2", wikitext_dir, vocab_path=vocab_path, log=logged.append)
    assert again.itos == vocab.itos and calls == [] and "using vocab" in logged[0]
    # Another min_freq (or dataset) rebuilds the vocab and overwrites the file.
    with open(wikitext_dir / "wikitext-2" / "wiki.train.tokens", "a") as f:
        f.write("rare\n")
    rebuilt, _ = corpus.load_splits("WikiText2", wikitext_dir, spec=tokenizer.TokenizerSpec(min_freq=2), vocab_path=vocab_path,
                                  log=logged.append)
    assert "rebuilding" in logged[-2] and calls[0] == "_count_chunk"
    assert "rare" not in rebuilt.stoi and rebuilt.itos == vocab.itos
    assert tokenizer.load_vocab(vocab_path)[1]["min_freq"] == 2
    folder = wikitext_dir / "wikitext-2"  # the same files as a folder: another dataset
    corpus.load_splits(str(folder), "unused", spec=tokenizer.TokenizerSpec(min_freq=2), vocab_path=vocab_path, log=logged.append)
    assert "rebuilding" in logged[-2]
    assert tokenizer.load_vocab(vocab_path)[1]["dataset"] == str(folder.resolve())


def varied_lines(n_lines, seed=0):
    """Text with words of many frequencies (some seen once, for min_freq), capitals,
    numbers and punctuation: a stand-in for real text when the real data is absent."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)] + ["The", "U.S.", "don't", "3.5", "@-@", "é"]
    marks = ["", "", "", ",", ".", ";", "?", "!", ":", '"']
    return [" ".join(rng.choice(words[:rng.randrange(1, len(words))]) + rng.choice(marks)
                     for _ in range(rng.randrange(0, 25)))
            for _ in range(n_lines)]


def test_parallel_tokenizing_equals_one_process(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    # Real text when there is some (else generated text), plus lines that end in \r\n,
    # other line breaks, quotes, punctuation and empty lines.
    lines = (REAL_VALID.read_text(encoding="utf-8").splitlines()[:400] if REAL_VALID.is_file()
             else varied_lines(700))
    lines += toy_lines(50) + [
        'a "b" c\r', "", "x\x0by\u2028z", "ΟΔΟΣ. <br />end", "(don't) stop: now; ok?!"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    ranges = [(str(path), 0, path.stat().st_size)]
    monkeypatch.setattr(token_ids, "_CHUNK_BYTES", 2000)  # many chunks, some cut mid-paragraph
    assert len(token_ids._chunks(ranges)) > 20
    vocab1, one = token_ids.count_and_numericalize(ranges, min_freq=2, workers=1)
    vocab2, two = token_ids.count_and_numericalize(ranges, min_freq=2, workers=2)
    assert vocab1.itos == vocab2.itos
    expected_lines = path.read_text(encoding="utf-8").splitlines()
    expected_counts = Counter(w for line in expected_lines for w in tokenizer.basic_english_normalize(line))
    assert vocab1.itos == Vocab.build(expected_counts, min_freq=2).itos
    expected_ids = naive_ids(expected_lines, vocab1)
    for split in (one, two, token_ids.numericalize(ranges, vocab1, workers=1),
                  token_ids.numericalize(ranges, vocab1, workers=2)):
        assert split.ids.tolist() == expected_ids
        assert split.line_offsets.diff().tolist() == [
            len(tokenizer.basic_english_normalize(line)) for line in expected_lines]
