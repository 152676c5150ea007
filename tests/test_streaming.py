"""bertkit/text/corpus.py at scale: ids streamed to the cache file, .txt.gz and .jsonl folders, and
held-out sets of bounded size."""

import gzip
import json
import os
from multiprocessing.reduction import ForkingPickler  # torch adds its tensor reducers
from pathlib import Path

import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the reducers DataLoader workers use)
from conftest import toy_lines

import data
from bertkit.files import DataError
from bertkit.text import corpus, token_ids, tokenizer


def quiet(*args):
    pass


def naive_ids(lines, vocab):
    return [vocab[w] for line in lines for w in tokenizer.basic_english_normalize(line)]


def naive_lengths(lines):
    return [len(tokenizer.basic_english_normalize(line)) for line in lines]


# Lines with what tokenizing must keep apart across chunk and record boundaries: empty
# lines, \r\n, other line breaks, quotes and punctuation, non-ASCII words.
ODD_LINES = ['a "b" c\r', "", "x\x0by\u2028z", "ΟΔΟΣ. <br />end", "(don't) stop: now; ok?!"]


def write_mixed_folder(folder, n_lines=60):
    """A .txt, a .txt.gz and a .jsonl file; returns the lines of each, in file order."""
    folder.mkdir(parents=True, exist_ok=True)
    txt = toy_lines(n_lines, 1) + ODD_LINES
    (folder / "a.txt").write_text("\n".join(txt) + "\n", encoding="utf-8", newline="")
    gz = ODD_LINES + toy_lines(n_lines, 2)
    with gzip.open(folder / "b.txt.gz", "wt", encoding="utf-8", newline="") as f:
        f.write("\n".join(gz) + "\n")
    # Records whose text holds several lines, one empty text, one ending in a line break.
    texts = ["\n".join(toy_lines(3, seed)) for seed in range(n_lines // 3)]
    texts += ["", "one line\n", "\n".join(ODD_LINES), "last\r\nrecord"]
    with open(folder / "c.jsonl", "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"id": len(text), "text": text}) + "\n")
    jsonl = [line for text in texts for line in text.splitlines()]
    # The lines as str.splitlines finds them: \r\n is one break, \x0b and \u2028 are breaks.
    return {"a.txt": "\n".join(txt).splitlines(), "b.txt.gz": "\n".join(gz).splitlines(),
            "c.jsonl": jsonl}


def whole_file_ranges(folder, names):
    return [(str(folder / name), 0, os.path.getsize(folder / name)) for name in names]


@pytest.mark.parametrize("workers", [1, 2])
def test_txt_gz_and_jsonl_ids_equal_a_naive_tokenization(tmp_path, monkeypatch, workers):
    lines_of = write_mixed_folder(tmp_path)
    monkeypatch.setattr(token_ids, "_CHUNK_BYTES", 700)  # chunks cut inside every file
    ranges = whole_file_ranges(tmp_path, lines_of)
    assert len(list(token_ids._jobs(ranges))) > 3 * len(lines_of)
    lines = [line for name in lines_of for line in lines_of[name]]
    vocab, counted = token_ids.count_and_numericalize(ranges, workers=workers)
    for split in (counted, token_ids.numericalize(ranges, vocab, workers=workers)):
        assert split.ids.tolist() == naive_ids(lines, vocab)
        assert split.line_offsets.diff().tolist() == naive_lengths(lines)


def test_load_splits_streams_ids_to_the_cache_and_reads_them_back(tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    lines_of = write_mixed_folder(folder)
    monkeypatch.setattr(token_ids, "_CHUNK_BYTES", 700)
    monkeypatch.setattr(token_ids, "_SPOOL_BLOCK_IDS", 500)
    writes = []
    real_write = token_ids.IdFile.write

    def recording_write(self, ids=None, lengths=None):
        writes.append(0 if ids is None else len(ids))
        return real_write(self, ids, lengths)

    # Structurally: the on-disk path never gathers the ids in memory, and the file gets
    # them a chunk (or a block of the count's second pass) at a time.
    monkeypatch.setattr(token_ids.IdFile, "write", recording_write)
    monkeypatch.setattr(token_ids, "_MemoryIds", None)
    monkeypatch.setattr(token_ids, "_cat", None)
    vocab, splits = corpus.load_splits(str(folder), "unused", log=quiet)
    lines = [line for name in lines_of for line in lines_of[name]]
    got = torch.cat([splits[s].ids for s in data.SPLITS])
    assert got.tolist() == naive_ids(lines, vocab)
    assert sum(len(splits[s].line_offsets) - 1 for s in data.SPLITS) == len(lines)
    assert len([w for w in writes if w]) >= 10 and max(writes) <= 500
    cache = folder / ".cache"
    assert sorted(p.suffix for p in cache.iterdir()) == [".ids"] * 3  # no temporary file left

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(token_ids, "_map_chunks", no_tokenizing)
    _, again = corpus.load_splits(str(folder), "unused", vocab=vocab, log=quiet)
    for split in data.SPLITS:
        assert torch.equal(again[split].ids, splits[split].ids)
        assert torch.equal(again[split].line_offsets, splits[split].line_offsets)


def test_cached_ids_can_be_sent_to_dataloader_workers(wikitext_dir):
    """DataLoader workers get the windows through torch.multiprocessing's pickler: it must
    be able to share a split read back from its cache file."""
    corpus.load_splits("WikiText2", wikitext_dir, vocab_path=wikitext_dir / "v.pt", log=quiet)
    _, splits = corpus.load_splits("WikiText2", wikitext_dir, vocab_path=wikitext_dir / "v.pt",
                                   log=quiet)
    window = data.mlm_windows(splits["train"], 64)[3:5]
    sent = ForkingPickler.loads(ForkingPickler.dumps(window))
    assert torch.equal(sent, window) and sent.dtype == torch.int32


def test_a_truncated_cache_file_is_rebuilt(wikitext_dir, monkeypatch):
    vocab, first = corpus.load_splits("WikiText2", wikitext_dir, log=quiet)
    # Copies: the ids are mapped from the files this test truncates in place.
    first = {s: data.TokenizedSplit(first[s].ids.clone(), first[s].line_offsets.clone())
             for s in data.SPLITS}
    for cache in (wikitext_dir / "wikitext-2" / ".cache").iterdir():
        with open(cache, "r+b") as f:
            f.truncate(os.path.getsize(cache) - 8)  # only the last line offset is gone
    calls = []
    real = token_ids._map_chunks
    monkeypatch.setattr(token_ids, "_map_chunks", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    _, second = corpus.load_splits("WikiText2", wikitext_dir, vocab=vocab)
    assert len(calls) == 3
    for split in data.SPLITS:
        assert torch.equal(first[split].ids, second[split].ids)
        assert torch.equal(first[split].line_offsets, second[split].line_offsets)


def test_without_a_writable_cache_folder_it_tokenizes_in_memory(tmp_path):
    folder = tmp_path / "corpus"
    lines_of = write_mixed_folder(folder)
    (folder / ".cache").write_text("a file where the cache folder would be")
    logged = []
    vocab, splits = corpus.load_splits(str(folder), "unused", log=logged.append)
    assert any("could not write the token cache" in line for line in logged)
    lines = [line for name in lines_of for line in lines_of[name]]
    assert torch.cat([splits[s].ids for s in data.SPLITS]).tolist() == naive_ids(lines, vocab)
    assert sorted(os.listdir(folder)) == [".cache", "a.txt", "b.txt.gz", "c.jsonl"]


def test_the_cache_key_changes_with_a_gz_file(tmp_path):
    folder = tmp_path / "corpus"
    write_mixed_folder(folder)
    vocab, _ = corpus.load_splits(str(folder), "unused", log=quiet)
    gz = folder / "b.txt.gz"
    with gzip.open(gz, "wt") as f:
        f.write("w1 w2 w3\nw4\n")
    ranges = [(str(gz), 0, os.path.getsize(gz))]
    cached = corpus._numericalize_cached(ranges, vocab, "train", folder / ".cache")
    assert cached.ids.tolist() == [vocab[w] for w in "w1 w2 w3 w4".split()]


@pytest.mark.parametrize("name, compress", [("bad.jsonl", False), ("bad.jsonl.gz", True)])
@pytest.mark.parametrize("record, problem", [
    (b"{not json}", "not JSON"),
    (b'{"txt": "a misspelt key"}', 'no "text" string'),
    (b'{"text": 3}', 'no "text" string'),
    (b'["text"]', 'no "text" string'),
])
def test_a_bad_jsonl_record_names_its_file_and_line(tmp_path, monkeypatch, name, compress,
                                                    record, problem):
    folder = tmp_path / "corpus"
    folder.mkdir()
    # The train split's text first: a .gz file is held out whole.
    (folder / "a.txt").write_text("\n".join(toy_lines(300)) + "\n")
    good = [json.dumps({"text": line}).encode() for line in toy_lines(40)]
    payload = b"\n".join(good[:31] + [b"", record] + good[31:]) + b"\n"  # line 33
    (folder / name).write_bytes(gzip.compress(payload) if compress else payload)
    monkeypatch.setattr(token_ids, "_CHUNK_BYTES", 500)  # the bad line is in a later chunk
    with pytest.raises(DataError, match=f"{folder / name}, line 33: {problem}"):
        corpus.load_splits(str(folder), "unused", workers=1, log=quiet)
    # Nothing half-written is left: no temporary file, no cache of the split that failed.
    assert sorted(p.name.split(".")[0] for p in (folder / ".cache").iterdir()) == ["train", "valid"]


def test_a_corrupt_gz_file_is_a_data_error(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    payload = gzip.compress(("\n".join(toy_lines(300)) + "\n").encode())
    (folder / "a.txt.gz").write_bytes(payload[:len(payload) // 2])
    (folder / "b.txt").write_text("\n".join(toy_lines(30)) + "\n")
    with pytest.raises(DataError, match=r"a\.txt\.gz is not a readable gzip file"):
        corpus.load_splits(str(folder), "unused", workers=1, log=quiet)


###############################################################################
# Held-out sets
###############################################################################


def split_texts(ranges):
    texts = {}
    for split, parts in ranges.items():
        texts[split] = b""
        for path, start, end in parts:
            texts[split] += Path(path).read_bytes()[start:end]
    return texts


@pytest.mark.parametrize("n_files", [3, 25])
def test_held_out_sets_are_bounded(tmp_path, monkeypatch, n_files):
    lines = toy_lines(3000)  # about 280 kB
    per_file = len(lines) // n_files
    for i in range(n_files):
        chunk = lines[i * per_file:(i + 1) * per_file]
        (tmp_path / f"part{i:02d}.txt").write_text("\n".join(chunk) + "\n")
    bound = 5000  # far below 10% of the text
    monkeypatch.setattr(corpus, "HELD_OUT_MAX_BYTES", bound)
    ranges = corpus.dataset_ranges(str(tmp_path), "unused")
    texts = split_texts(ranges)
    longest_line = max(len(line) for line in lines) + 1
    for split in ("valid", "test"):
        assert bound - longest_line < len(texts[split]) <= bound
        assert texts[split].endswith(b"\n")  # cut at line boundaries
    # Every line exactly once, in the (seeded) order of the files.
    files = corpus.dataset_files(str(tmp_path), "unused")["train"]
    every = b"".join(p.read_bytes() for p in files)
    assert texts["train"] + texts["valid"] + texts["test"] == every
    assert ranges == corpus.dataset_ranges(str(tmp_path), "unused")  # deterministic


def test_small_folders_keep_ten_percent_and_named_datasets_their_splits(tmp_path, wikitext_dir):
    (tmp_path / "a.txt").write_text("\n".join(toy_lines(200)) + "\n")
    texts = split_texts(corpus.dataset_ranges(str(tmp_path), "unused"))
    total = sum(map(len, texts.values()))
    assert len(texts["valid"]) == pytest.approx(total / 10, abs=200)
    ranges = corpus.dataset_ranges("WikiText2", wikitext_dir)
    folder = wikitext_dir / "wikitext-2"
    assert ranges["valid"] == [(str(folder / "wiki.valid.tokens"), 0,
                                os.path.getsize(folder / "wiki.valid.tokens"))]


def test_gz_files_are_held_out_whole(tmp_path, monkeypatch):
    for i in range(4):
        with gzip.open(tmp_path / f"part{i}.txt.gz", "wt") as f:
            f.write("\n".join(toy_lines(100, i)) + "\n")
    monkeypatch.setattr(corpus, "HELD_OUT_MAX_BYTES", 10)  # less than a file: one each
    ranges = corpus.dataset_ranges(str(tmp_path), "unused")
    assert [Path(p).name for p, _, _ in ranges["test"]] == ["part3.txt.gz"]
    assert [Path(p).name for p, _, _ in ranges["valid"]] == ["part2.txt.gz"]
    for path, start, end in ranges["train"] + ranges["valid"] + ranges["test"]:
        assert (start, end) == (0, os.path.getsize(path))
    for path in tmp_path.glob("part[123].txt.gz"):
        path.unlink()
    with pytest.raises(DataError, match="a .gz file is never cut"):
        corpus.dataset_ranges(str(tmp_path), "unused")


def test_gz_held_out_sets_take_the_whole_files_that_fit_the_bound(tmp_path, monkeypatch):
    for i in range(30):
        with gzip.open(tmp_path / f"part{i:02d}.txt.gz", "wt") as f:
            f.write("\n".join(toy_lines(100, i)) + "\n")
    size = max(p.stat().st_size for p in tmp_path.iterdir())
    monkeypatch.setattr(corpus, "HELD_OUT_MAX_BYTES", int(2.5 * size))
    ranges = corpus.dataset_ranges(str(tmp_path), "unused")
    for split in ("valid", "test"):
        assert len(ranges[split]) == 2
        assert sum(end for _, _, end in ranges[split]) <= 2.5 * size
    every = sorted(Path(p) for s in data.SPLITS for p, _, _ in ranges[s])
    assert every == sorted(tmp_path.iterdir())
