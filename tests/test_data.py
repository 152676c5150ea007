"""data.py: tokenizer, vocab, datasets and downloads, token-id cache, MLM masking, NS pairs."""

import hashlib
import io
import math
import os
import re
import urllib.request
import zipfile
from collections import Counter
from dataclasses import replace

import pytest
import torch
from conftest import REAL_VALID, toy_lines, write_wikitext

import data
from data import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIALS, UNK_ID, DataError, Vocab

###############################################################################
# Tokenizer
###############################################################################

# torchtext's basic_english, from its definition: lower-case, then these substitutions in
# this order, then split on white space.
_REFERENCE_SUBSTITUTIONS = [
    (r"\'", " '  "), (r"\"", ""), (r"\.", " . "), (r"<br \/>", " "), (r",", " , "),
    (r"\(", " ( "), (r"\)", " ) "), (r"\!", " ! "), (r"\?", " ? "), (r"\;", " "),
    (r"\:", " "), (r"\s+", " "),
]


def reference_basic_english(line):
    line = line.lower()
    for pattern, replacement in _REFERENCE_SUBSTITUTIONS:
        line = re.sub(pattern, replacement, line)
    return line.split()


TRICKY = [
    "", "   ", "Hello, World!", "don't stop", "rock 'n' roll", 'He said "hi" twice',
    'ab"c', '"quoted"', "a<br />b", "A<BR />B", "x<br/>y", "x<br  />y", '<br "/>', "<<br />",
    "<b<br />r />", "e.g. (this); that: other?", "3.14 , 2,718", "...", "?!", "tabs\tand\nnewlines",
    "non\u00a0breaking\u2003spaces", "ΟΔΟΣ. ΑΣ.Β ΑΣ'Β Σ", "İstanbul İİ", "Straße", "ﬁne",
    "@-@ 1 @,@ 000", " = = Gameplay = = ", "<unk> <cls> <sep>", "emoji 🙂, ok",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tokenizer_matches_basic_english(text):
    expected = reference_basic_english(text)
    assert data.basic_english_normalize(text) == expected
    assert [token for token, _, _ in data.tokenize_with_spans(text)] == expected


def test_tokenizer_matches_basic_english_on_real_wikitext(real_valid_lines):
    for line in real_valid_lines:
        expected = reference_basic_english(line)
        assert data.basic_english_normalize(line) == expected, line
        assert [token for token, _, _ in data.tokenize_with_spans(line)] == expected, line


@pytest.mark.parametrize("text", [t for t in TRICKY if "Σ" not in t and "İ" not in t])
def test_spans_round_trip(text):
    previous_end = 0
    for token, start, end in data.tokenize_with_spans(text):
        assert previous_end <= start < end <= len(text)
        # The source is the token before lower-casing, with the `"` the tokenizer drops.
        assert text[start:end].lower().replace('"', "") == token
        assert text[start] != '"' and text[end - 1] != '"'
        previous_end = end


def test_spans_where_lower_casing_changes_the_text():
    # İ lower-cases to two characters; the span still points at the one in the text.
    text = "x İstanbul y"
    assert data.tokenize_with_spans(text) == [("x", 0, 1), ("i̇stanbul", 2, 10), ("y", 11, 12)]
    # A final sigma depends on what follows the word in the whole string.
    assert data.tokenize_with_spans("ΟΔΟΣ.")[0] == ("οδος", 0, 4)
    assert data.tokenize_with_spans("ΑΣ.Β")[0] == ("ασ", 0, 2)


###############################################################################
# Vocab
###############################################################################


def test_specials_have_fixed_ids():
    vocab = Vocab.build(Counter(["b", "a", "a", "<cls>", "<sep>"]))
    assert vocab.itos[:5] == ["<unk>", "<pad>", "<MASK>", "<cls>", "<sep>"]
    assert (UNK_ID, PAD_ID, MASK_ID, CLS_ID, SEP_ID) == (0, 1, 2, 3, 4)
    for i, word in enumerate(SPECIALS):
        assert vocab[word] == i
    # The old example's vocab had no <cls>/<sep>: both silently became <unk>.
    assert vocab["<cls>"] != UNK_ID and vocab["<sep>"] != UNK_ID
    assert vocab.itos.count("<cls>") == 1


def test_vocab_order_unknown_words_and_min_freq():
    counts = Counter("c c c b b a a d".split())
    vocab = Vocab.build(counts)
    assert vocab.itos[5:] == ["c", "a", "b", "d"]  # most frequent first, ties alphabetical
    assert vocab["never seen"] == UNK_ID
    assert vocab.lookup_indices(["c", "zzz", "d"]) == [5, UNK_ID, 8]
    assert Vocab.build(counts, min_freq=2).itos[5:] == ["c", "a", "b"]
    assert Vocab.build(counts, min_freq=4).itos == list(SPECIALS)


def test_vocab_rejects_bad_word_lists():
    with pytest.raises(ValueError):
        Vocab(["a", "b"])
    with pytest.raises(ValueError):
        Vocab(list(SPECIALS) + ["a", "a"])


def test_vocab_save_load_round_trip(tmp_path):
    vocab = Vocab.build(Counter("the cat sat on the mat".split()))
    path = tmp_path / "vocab.pt"
    data.save_vocab(vocab, path, dataset="WikiText2", min_freq=1)
    raw = torch.load(path, weights_only=True)  # plain data, no pickled classes
    assert raw["itos"] == vocab.itos
    loaded, meta = data.load_vocab(path)
    assert loaded.itos == vocab.itos and loaded.stoi == vocab.stoi
    assert meta == {"dataset": "WikiText2", "min_freq": 1}
    assert loaded.fingerprint() == vocab.fingerprint()


@pytest.mark.parametrize("content", [b"garbage bytes", b""])
def test_bad_vocab_file_is_a_data_error(tmp_path, content):
    path = tmp_path / "vocab.pt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a vocab file"):
        data.load_vocab(path)


def test_vocab_file_without_specials_is_a_data_error(tmp_path):
    path = tmp_path / "vocab.pt"
    torch.save({"itos": ["a", "b"], "meta": {}}, path)
    with pytest.raises(DataError, match="not a vocab file"):
        data.load_vocab(path)


###############################################################################
# Datasets and downloads
###############################################################################


def make_zip(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buffer.getvalue()


WIKITEXT_MEMBERS = {f"wikitext-2/wiki.{s}.tokens": " = Title = \n some text .\n"
                    for s in ("train", "valid", "test")}


def serve_archive(monkeypatch, folder, payload, urls, md5=None):
    """Put `payload` in the served folder and point WikiText2's archive at `urls`."""
    (folder / "wikitext-2-v1.zip").write_bytes(payload)
    spec = data.DATASETS["WikiText2"]
    archive = replace(spec.archive, md5=md5 or hashlib.md5(payload).hexdigest(), urls=tuple(urls))
    monkeypatch.setitem(data.DATASETS, "WikiText2", replace(spec, archive=archive))
    return archive


def test_download_extracts_and_removes_the_archive(tmp_path, http_root, monkeypatch):
    base, served = http_root
    serve_archive(monkeypatch, served, make_zip(WIKITEXT_MEMBERS), [f"{base}/wikitext-2-v1.zip"])
    data_dir = tmp_path / "data"
    files = data.dataset_files("WikiText2", data_dir, log=lambda *a: None)
    assert files["train"] == [data_dir / "wikitext-2" / "wiki.train.tokens"]
    assert files["train"][0].read_text() == WIKITEXT_MEMBERS["wikitext-2/wiki.train.tokens"]
    assert sorted(os.listdir(data_dir)) == ["wikitext-2"]  # no zip, no partial download


def test_download_tries_the_next_host(tmp_path, http_root, closed_url, monkeypatch):
    base, served = http_root
    urls = [f"{closed_url}/wikitext-2-v1.zip", f"{base}/missing.zip", f"{base}/wikitext-2-v1.zip"]
    serve_archive(monkeypatch, served, make_zip(WIKITEXT_MEMBERS), urls)
    logged = []
    files = data.dataset_files("WikiText2", tmp_path / "data", log=logged.append)
    assert files["valid"][0].is_file()
    assert sum("download failed" in line for line in logged) == 2


def test_bad_checksum_leaves_nothing_and_says_what_to_do(tmp_path, http_root, monkeypatch):
    base, served = http_root
    url = f"{base}/wikitext-2-v1.zip"
    archive = serve_archive(monkeypatch, served, make_zip(WIKITEXT_MEMBERS), [url], md5="0" * 32)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as error:
        data.dataset_files("WikiText2", data_dir, log=lambda *a: None)
    message = str(error.value)
    assert url in message and "MD5" in message
    assert f"place {archive.filename}" in message and str(data_dir) in message
    assert os.listdir(data_dir) == []


def test_archive_placed_by_hand_is_used_offline(tmp_path, closed_url, monkeypatch):
    payload = make_zip(WIKITEXT_MEMBERS)
    served = tmp_path / "unused"
    served.mkdir()
    serve_archive(monkeypatch, served, payload, [f"{closed_url}/wikitext-2-v1.zip"])
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "wikitext-2-v1.zip").write_bytes(payload)  # what the error message asks for
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    files = data.dataset_files("WikiText2", data_dir, log=lambda *a: None)
    assert files["test"][0].is_file()
    assert not (data_dir / "wikitext-2-v1.zip").exists()


def test_zip_member_escaping_the_folder_is_refused(tmp_path, http_root, monkeypatch):
    base, served = http_root
    members = {**WIKITEXT_MEMBERS, "../escaped.txt": "owned", "wikitext-2/../../escaped2.txt": "x"}
    serve_archive(monkeypatch, served, make_zip(members), [f"{base}/wikitext-2-v1.zip"])
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="refusing to extract"):
        data.dataset_files("WikiText2", data_dir, log=lambda *a: None)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "escaped2.txt").exists()
    assert os.listdir(data_dir) == []  # nothing extracted, archive removed


def _no_network(*args, **kwargs):
    raise AssertionError("the network was touched")


def test_present_files_touch_no_network(wikitext_dir, closed_url, monkeypatch):
    spec = data.DATASETS["WikiText2"]
    archive = replace(spec.archive, urls=(f"{closed_url}/wikitext-2-v1.zip",))
    monkeypatch.setitem(data.DATASETS, "WikiText2", replace(spec, archive=archive))
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    files = data.dataset_files("WikiText2", wikitext_dir)
    assert all(p.is_file() for paths in files.values() for p in paths)


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="unknown --dataset 'NoSuchSet'.*WikiText2"):
        data.dataset_files("NoSuchSet", tmp_path)


def test_folder_with_split_files(tmp_path):
    for split in data.SPLITS:
        (tmp_path / f"{split}.txt").write_text(f"{split} text\n")
    (tmp_path / "notes.txt").write_text("not a split\n")
    files = data.dataset_files(str(tmp_path), "unused")
    assert files == {s: [tmp_path / f"{s}.txt"] for s in data.SPLITS}


def test_folder_of_many_files_is_split_by_file(tmp_path):
    for i in range(40):
        (tmp_path / f"book{i:02d}.txt").write_text(f"book {i}\n")
    (tmp_path / "README.md").write_text("not a book\n")
    files = data.dataset_files(str(tmp_path), "unused")
    assert [len(files[s]) for s in ("train", "test", "valid")] == [34, 2, 4]  # 85/5/10
    every = [p for s in data.SPLITS for p in files[s]]
    assert sorted(every) == sorted(tmp_path.glob("*.txt"))  # disjoint, complete
    assert files == data.dataset_files(str(tmp_path), "unused")  # a fixed seed


def test_folder_of_few_files_is_split_by_text(tmp_path):
    lines = [f"line {i} of the folder" for i in range(1000)]
    (tmp_path / "a.txt").write_text("\n".join(lines[:300]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(lines[300:]) + "\n")
    ranges = data.split_byte_ranges(data.dataset_files(str(tmp_path), "unused"))
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
    first = data.load_splits(str(folder), "unused", log=lambda *a: None)[1]
    assert list((folder / ".cache").iterdir())
    second = data.load_splits(str(folder), "unused", log=lambda *a: None)[1]
    for split in data.SPLITS:
        assert torch.equal(first[split].ids, second[split].ids)


def test_non_utf8_file_is_a_data_error(tmp_path):
    train = tmp_path / "data" / "wikitext-2" / "wiki.train.tokens"
    write_wikitext(tmp_path / "data", toy_lines(10), toy_lines(2), toy_lines(2))
    train.write_bytes(b"good line\n\xff\xfe bad bytes\n")
    with pytest.raises(DataError, match=f"{re.escape(str(train))} is not UTF-8"):
        data.load_splits("WikiText2", tmp_path / "data", log=lambda *a: None)


###############################################################################
# Token ids and their cache
###############################################################################


def naive_ids(lines, vocab):
    return [vocab[w] for line in lines for w in data.basic_english_normalize(line)]


def test_load_splits_ids_and_lines(wikitext_dir):
    vocab, splits = data.load_splits("WikiText2", wikitext_dir, log=lambda *a: None)
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
    real = data._map_chunks

    def counting(fn, jobs, *args, **kwargs):
        calls.append(fn.__name__)
        return real(fn, jobs, *args, **kwargs)

    monkeypatch.setattr(data, "_map_chunks", counting)
    return calls


def test_second_load_reads_the_cache(wikitext_dir, monkeypatch):
    vocab, first = data.load_splits("WikiText2", wikitext_dir, log=lambda *a: None)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(data, "_map_chunks", no_tokenizing)
    _, second = data.load_splits("WikiText2", wikitext_dir, vocab=vocab)
    for split in data.SPLITS:
        assert torch.equal(first[split].ids, second[split].ids)
        assert torch.equal(first[split].line_offsets, second[split].line_offsets)
    cache = next((wikitext_dir / "wikitext-2" / ".cache").glob("train.*.pt"))
    assert torch.load(cache, weights_only=True)["ids"].dtype == torch.int32


def test_cache_is_invalidated_when_a_file_changes(wikitext_dir, monkeypatch):
    vocab, _ = data.load_splits("WikiText2", wikitext_dir, log=lambda *a: None)
    calls = _count_calls(monkeypatch)
    valid = wikitext_dir / "wikitext-2" / "wiki.valid.tokens"
    valid.write_text("w1 w2 w3\nw4\n")
    _, splits = data.load_splits("WikiText2", wikitext_dir, vocab=vocab)
    assert calls == ["_numericalize_chunk"]  # only the changed split
    assert splits["valid"].ids.tolist() == [vocab[w] for w in "w1 w2 w3 w4".split()]


def test_unreadable_cache_is_rebuilt(wikitext_dir):
    vocab, first = data.load_splits("WikiText2", wikitext_dir, log=lambda *a: None)
    for cache in (wikitext_dir / "wikitext-2" / ".cache").iterdir():
        cache.write_bytes(b"truncated")
    _, second = data.load_splits("WikiText2", wikitext_dir, vocab=vocab)
    assert torch.equal(first["test"].ids, second["test"].ids)


def test_vocab_file_reused_or_rebuilt(wikitext_dir, tmp_path, monkeypatch):
    vocab_path = tmp_path / "bert_vocab.pt"
    vocab, _ = data.load_splits("WikiText2", wikitext_dir, vocab_path=vocab_path, log=lambda *a: None)
    assert data.load_vocab(vocab_path)[1] == {"dataset": "WikiText2", "min_freq": 1}
    calls = _count_calls(monkeypatch)
    logged = []
    again, _ = data.load_splits("WikiText2", wikitext_dir, vocab_path=vocab_path, log=logged.append)
    assert again.itos == vocab.itos and calls == [] and "using vocab" in logged[0]
    # Another min_freq (or dataset) rebuilds the vocab and overwrites the file.
    with open(wikitext_dir / "wikitext-2" / "wiki.train.tokens", "a") as f:
        f.write("rare\n")
    rebuilt, _ = data.load_splits("WikiText2", wikitext_dir, min_freq=2, vocab_path=vocab_path,
                                  log=logged.append)
    assert "rebuilding" in logged[-2] and calls[0] == "_count_chunk"
    assert "rare" not in rebuilt.stoi and rebuilt.itos == vocab.itos
    assert data.load_vocab(vocab_path)[1]["min_freq"] == 2
    folder = wikitext_dir / "wikitext-2"  # the same files as a folder: another dataset
    data.load_splits(str(folder), "unused", min_freq=2, vocab_path=vocab_path, log=logged.append)
    assert "rebuilding" in logged[-2]
    assert data.load_vocab(vocab_path)[1]["dataset"] == str(folder.resolve())


def test_parallel_tokenizing_equals_one_process(tmp_path, monkeypatch):
    path = tmp_path / "text.txt"
    # Real text when there is some, plus lines that end in \r\n, other line breaks,
    # quotes, punctuation and empty lines.
    text = REAL_VALID.read_text(encoding="utf-8") if REAL_VALID.is_file() else ""
    lines = text.splitlines()[:400] + toy_lines(50) + [
        'a "b" c\r', "", "x\x0by\u2028z", "ΟΔΟΣ. <br />end", "(don't) stop: now; ok?!"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    ranges = [(str(path), 0, path.stat().st_size)]
    monkeypatch.setattr(data, "_CHUNK_BYTES", 2000)  # many chunks, some cut mid-paragraph
    assert len(data._chunks(ranges)) > 20
    vocab1, one = data.count_and_numericalize(ranges, min_freq=2, workers=1)
    vocab2, two = data.count_and_numericalize(ranges, min_freq=2, workers=2)
    assert vocab1.itos == vocab2.itos
    expected_lines = path.read_text(encoding="utf-8").splitlines()
    expected_counts = Counter(w for line in expected_lines for w in data.basic_english_normalize(line))
    assert vocab1.itos == Vocab.build(expected_counts, min_freq=2).itos
    expected_ids = naive_ids(expected_lines, vocab1)
    for split in (one, two, data.numericalize(ranges, vocab1, workers=1),
                  data.numericalize(ranges, vocab1, workers=2)):
        assert split.ids.tolist() == expected_ids
        assert split.line_offsets.diff().tolist() == [
            len(data.basic_english_normalize(line)) for line in expected_lines]


###############################################################################
# Masked-LM batches
###############################################################################


def random_tokens(batch, seq, vocab_size=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(len(SPECIALS), vocab_size, (batch, seq), generator=g)
    tokens[:, 0] = CLS_ID
    return tokens


@pytest.mark.parametrize("seq, mask_frac", [(32, 0.15), (128, 0.15), (17, 0.5), (9, 0.1)])
def test_mask_tokens_counts_and_targets(seq, mask_frac):
    tokens = random_tokens(64, seq)
    inputs, targets, masked = data.mask_tokens(tokens, mask_frac, 1000,
                                               generator=torch.Generator().manual_seed(1))
    assert masked.shape == tokens.shape and masked.dtype == torch.bool
    assert (masked.sum(1) == max(1, round(mask_frac * (seq - 1)))).all()
    assert not masked[:, 0].any()
    assert torch.equal(targets, tokens[masked])
    assert (inputs[masked] == MASK_ID).all()
    assert torch.equal(inputs[~masked], tokens[~masked])
    # Every position but <cls> gets masked sometimes: the choice is not biased.
    many = data.mask_tokens(random_tokens(2000, seq), mask_frac, 1000,
                            generator=torch.Generator().manual_seed(2))[2]
    assert many[:, 1:].any(0).all()


def test_bert_mask_mode_80_10_10():
    tokens = random_tokens(400, 129, vocab_size=30000)
    inputs, targets, masked = data.mask_tokens(tokens, 0.15, 30000, "bert",
                                               torch.Generator().manual_seed(3))
    replaced = inputs[masked]
    n = len(targets)
    as_mask = (replaced == MASK_ID).float().mean().item()
    unchanged = (replaced == targets).float().mean().item()
    random_word = ((replaced != MASK_ID) & (replaced != targets)).float().mean().item()
    tolerance = 4 * math.sqrt(0.1 * 0.9 / n)
    assert as_mask == pytest.approx(0.8, abs=tolerance)
    assert unchanged == pytest.approx(0.1, abs=tolerance)
    assert random_word == pytest.approx(0.1, abs=tolerance)
    assert (replaced[replaced != MASK_ID] >= len(SPECIALS)).all()  # never a special
    assert torch.equal(inputs[~masked], tokens[~masked])


def test_masks_depend_only_on_seed_epoch_batch():
    windows = torch.randint(len(SPECIALS), 500, (64, 31), dtype=torch.int32,
                            generator=torch.Generator().manual_seed(0))
    order = torch.arange(64)

    def batch(seed, epoch, i):
        return data.MLMBatches(windows, order, 8, 0.15, 500, "mask", seed, epoch)[i]

    a, b = batch(1, 2, 3), batch(1, 2, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["masked_positions"], batch(1, 2, 4)["masked_positions"])
    assert not torch.equal(a["masked_positions"], batch(1, 3, 3)["masked_positions"])
    assert not torch.equal(a["masked_positions"], batch(2, 2, 3)["masked_positions"])
    # Rows are <cls> + the ordered windows; the targets are the original tokens.
    assert (a["inputs"][:, 0] == CLS_ID).all() and a["inputs"].shape == (8, 32)
    original = torch.cat([torch.full((8, 1), CLS_ID), windows[24:32].long()], dim=1)
    assert torch.equal(a["targets"], original[a["masked_positions"]])


def test_mlm_windows():
    split = data.TokenizedSplit(torch.arange(100, dtype=torch.int32), torch.tensor([0, 100]))
    windows = data.mlm_windows(split, bptt=11)
    assert windows.shape == (10, 10) and torch.equal(windows.flatten(), split.ids)
    assert data.mlm_windows(split, bptt=34).shape == (3, 33)  # the tail is dropped


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_epoch_order_shards_are_disjoint_and_equal(world_size):
    shards = [data.epoch_order(103, seed=7, epoch=1, shuffle=True, rank=r, world_size=world_size,
                               batch_size=4) for r in range(world_size)]
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1 and sizes.pop() % 4 == 0
    every = torch.cat(shards)
    assert len(set(every.tolist())) == len(every) and every.max() < 103
    assert len(every) > 103 - world_size * 4  # only the remainder is dropped
    again = data.epoch_order(103, seed=7, epoch=1, shuffle=True, rank=0, world_size=world_size,
                             batch_size=4)
    assert torch.equal(shards[0], again)
    other_epoch = data.epoch_order(103, seed=7, epoch=2, shuffle=True, rank=0,
                                   world_size=world_size, batch_size=4)
    assert not torch.equal(shards[0], other_epoch)


###############################################################################
# Next-sentence pairs
###############################################################################


def lines_split(lengths):
    """A TokenizedSplit whose line i holds the ids 1000*i + 5, 1000*i + 6, ..."""
    ids = torch.cat([torch.arange(n, dtype=torch.int32) + 1000 * i + 5 for i, n in enumerate(lengths)])
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths).cumsum(0)
    return data.TokenizedSplit(ids, offsets)


def line_tokens(split, line):
    return split.ids[split.line_offsets[line]:split.line_offsets[line + 1]].tolist()


def test_ns_pairs_layout_types_padding_and_labels():
    lengths = [25, 3, 40, 0, 19, 20, 30] * 30
    split = lines_split(lengths)
    pairs = data.ns_pairs(split, min_sentence_len=20, frac_ns=0.5,
                          generator=torch.Generator().manual_seed(0))
    long_lines = [i for i, n in enumerate(lengths) if n >= 20]
    assert sorted(pairs["line"].tolist()) == long_lines  # short lines excluded
    assert (pairs["label"] == 0).sum() == int(0.5 * len(long_lines))
    bptt = 64
    batch = data.ns_collate(split, pairs, torch.arange(len(long_lines)), bptt)
    inputs, types = batch["inputs"], batch["token_types"]
    assert inputs.shape == types.shape == (len(long_lines), bptt)
    assert torch.equal(batch["labels"], pairs["label"])
    for row in range(len(long_lines)):
        line, cut = int(pairs["line"][row]), int(pairs["cut"][row])
        a = line_tokens(split, line)[:cut]
        if pairs["label"][row]:
            b = line_tokens(split, line)[cut:]
        else:
            b = line_tokens(split, int(pairs["other"][row]))[:int(pairs["other_cut"][row])]
        assert 1 <= cut < lengths[line] and len(b) >= 1
        expected = ([CLS_ID] + a + [SEP_ID] + b + [SEP_ID])[:bptt]
        n = len(expected)
        assert inputs[row, :n].tolist() == expected
        assert (inputs[row, n:] == PAD_ID).all()
        assert types[row, :n].tolist() == [0] * (len(a) + 2) + [1] * (n - len(a) - 2)
        assert (types[row, n:] == 0).all()


def test_ns_pairs_are_cut_to_bptt():
    split = lines_split([50] * 8)
    pairs = data.ns_pairs(split, 20, 0.0, torch.Generator().manual_seed(0))
    batch = data.ns_collate(split, pairs, torch.arange(8), bptt=16)
    assert batch["inputs"].shape == (8, 16)
    assert not (batch["inputs"] == PAD_ID).any()
    assert (batch["labels"] == 1).all()
    for row in range(8):
        cut = int(pairs["cut"][row])
        line = line_tokens(split, int(pairs["line"][row]))
        assert batch["inputs"][row].tolist() == ([CLS_ID] + line[:cut] + [SEP_ID] + line[cut:])[:16]


def test_ns_label_fraction_on_many_lines():
    split = lines_split([30] * 1000)
    for frac in (0.0, 0.3, 0.5, 1.0):
        pairs = data.ns_pairs(split, 20, frac, torch.Generator().manual_seed(1))
        negatives = pairs["label"] == 0
        assert negatives.float().mean().item() == pytest.approx(frac, abs=1e-3)
        # A positive pair's B is the rest of its own line.
        assert torch.equal(pairs["other"][~negatives], pairs["line"][~negatives])
