"""data.py: tokenizer, vocab, MLM masking, NS pairs, batches and their loader."""

import functools
import math
import re
import threading
from collections import Counter

import pytest
import torch

import data
from bertkit import files
from bertkit.files import DataError
from bertkit.text import tokenizer
from bertkit.text.tokenizer import CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIALS, UNK_ID, Vocab

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
    assert tokenizer.basic_english_normalize(text) == expected
    assert [token for token, _, _ in tokenizer.tokenize_with_spans(text)] == expected


def test_tokenizer_matches_basic_english_on_real_wikitext(real_valid_lines):
    for line in real_valid_lines:
        expected = reference_basic_english(line)
        assert tokenizer.basic_english_normalize(line) == expected, line
        assert [token for token, _, _ in tokenizer.tokenize_with_spans(line)] == expected, line


@pytest.mark.parametrize("text", [t for t in TRICKY if "Σ" not in t and "İ" not in t])
def test_spans_round_trip(text):
    previous_end = 0
    for token, start, end in tokenizer.tokenize_with_spans(text):
        assert previous_end <= start < end <= len(text)
        # The source is the token before lower-casing, with the `"` the tokenizer drops.
        assert text[start:end].lower().replace('"', "") == token
        assert text[start] != '"' and text[end - 1] != '"'
        previous_end = end


def test_spans_where_lower_casing_changes_the_text():
    # İ lower-cases to two characters; the span still points at the one in the text.
    text = "x İstanbul y"
    assert tokenizer.tokenize_with_spans(text) == [("x", 0, 1), ("i̇stanbul", 2, 10), ("y", 11, 12)]
    # A final sigma depends on what follows the word in the whole string.
    assert tokenizer.tokenize_with_spans("ΟΔΟΣ.")[0] == ("οδος", 0, 4)
    assert tokenizer.tokenize_with_spans("ΑΣ.Β")[0] == ("ασ", 0, 2)


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
    tokenizer.save_vocab(vocab, path, dataset="WikiText2", min_freq=1)
    raw = torch.load(path, weights_only=True)  # plain data, no pickled classes
    assert raw["itos"] == vocab.itos
    loaded, meta = tokenizer.load_vocab(path)
    assert loaded.itos == vocab.itos and loaded.stoi == vocab.stoi
    assert meta == {"dataset": "WikiText2", "min_freq": 1}
    assert loaded.fingerprint() == vocab.fingerprint()


@pytest.mark.parametrize("content", [b"garbage bytes", b""])
def test_bad_vocab_file_is_a_data_error(tmp_path, content):
    path = tmp_path / "vocab.pt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="not a vocab file"):
        tokenizer.load_vocab(path)


def test_vocab_file_without_specials_is_a_data_error(tmp_path):
    path = tmp_path / "vocab.pt"
    torch.save({"itos": ["a", "b"], "meta": {}}, path)
    with pytest.raises(DataError, match="not a vocab file"):
        tokenizer.load_vocab(path)


###############################################################################
# Masked-LM batches
###############################################################################


def random_tokens(batch, seq, vocab_size=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(len(SPECIALS), vocab_size, (batch, seq), generator=g)
    tokens[:, 0] = CLS_ID
    return tokens


def as_bool_mask(masked_positions, seq):
    return torch.zeros(len(masked_positions), seq, dtype=torch.bool).scatter_(1, masked_positions, True)


def masking(frac, vocab_size, mode="mask"):
    """basic_english's masking for a vocabulary of vocab_size words."""
    return data.Masking(frac, mode, MASK_ID, torch.arange(len(SPECIALS), vocab_size))


SPECIALS_IDS = (tokenizer.CLS_ID, tokenizer.SEP_ID, PAD_ID)


@pytest.mark.parametrize("seq, mask_frac", [(32, 0.15), (128, 0.15), (17, 0.5), (9, 0.1)])
def test_mask_tokens_counts_and_targets(seq, mask_frac):
    tokens = random_tokens(64, seq)
    inputs, targets, positions = data.mask_tokens(tokens, masking(mask_frac, 1000),
                                                  generator=torch.Generator().manual_seed(1))
    n_mask = max(1, round(mask_frac * (seq - 1)))
    assert positions.shape == (64, n_mask) and positions.dtype == torch.int64
    assert (positions.diff(dim=1) > 0).all()  # ascending, so distinct
    assert (positions >= 1).all() and (positions < seq).all()  # never <cls>
    assert torch.equal(targets, tokens.gather(1, positions).flatten())
    masked = as_bool_mask(positions, seq)
    assert torch.equal(targets, tokens[masked])  # the same order as a boolean mask's
    assert (inputs[masked] == MASK_ID).all()
    assert torch.equal(inputs[~masked], tokens[~masked])
    # Every position but <cls> gets masked sometimes: the choice is not biased.
    many = data.mask_tokens(random_tokens(2000, seq), masking(mask_frac, 1000),
                            generator=torch.Generator().manual_seed(2))[2]
    assert as_bool_mask(many, seq)[:, 1:].any(0).all()


def boolean_mask_tokens(tokens, mask_frac, vocab_size, mask_mode, generator):
    """mask_tokens as it was with (batch, seq) boolean masks: the same draws must give the
    same inputs and targets, so runs and checkpoints from before stay reproducible."""
    batch, seq = tokens.shape
    n_mask = max(1, round(mask_frac * (seq - 1)))
    chosen = torch.rand(batch, seq - 1, generator=generator).topk(n_mask, dim=1).indices + 1
    masked = torch.zeros(batch, seq, dtype=torch.bool).scatter_(1, chosen, True)
    targets = tokens[masked]
    replacement = torch.full_like(targets, MASK_ID)
    if mask_mode == "bert":
        r = torch.rand(targets.shape, generator=generator)
        random_words = torch.randint(len(SPECIALS), vocab_size, targets.shape,
                                     generator=generator, dtype=targets.dtype)
        replacement = torch.where(r < 0.8, MASK_ID, torch.where(r < 0.9, random_words, targets))
    return tokens.masked_scatter(masked, replacement), targets, masked


@pytest.mark.parametrize("mask_mode", ["mask", "bert"])
def test_mask_tokens_equal_the_boolean_mask_version(mask_mode):
    tokens = random_tokens(50, 65)
    got = data.mask_tokens(tokens, masking(0.15, 1000, mask_mode),
                          torch.Generator().manual_seed(4))
    expected = boolean_mask_tokens(tokens, 0.15, 1000, mask_mode, torch.Generator().manual_seed(4))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(as_bool_mask(got[2], 65), expected[2])


def test_bert_mask_mode_80_10_10():
    tokens = random_tokens(400, 129, vocab_size=30000)
    inputs, targets, positions = data.mask_tokens(tokens, masking(0.15, 30000, "bert"),
                                                  torch.Generator().manual_seed(3))
    masked = as_bool_mask(positions, 129)
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
        make_batch = functools.partial(data.mlm_batch, windows, tokenizer.CLS_ID,
                                       masking(0.15, 500), seed, epoch)
        return data.Batches(make_batch, order, 8)[i]

    a, b = batch(1, 2, 3), batch(1, 2, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["masked_positions"], batch(1, 2, 4)["masked_positions"])
    assert not torch.equal(a["masked_positions"], batch(1, 3, 3)["masked_positions"])
    assert not torch.equal(a["masked_positions"], batch(2, 2, 3)["masked_positions"])
    # Rows are <cls> + the ordered windows; the targets are the original tokens.
    assert (a["inputs"][:, 0] == CLS_ID).all() and a["inputs"].shape == (8, 32)
    original = torch.cat([torch.full((8, 1), CLS_ID), windows[24:32].long()], dim=1)
    assert torch.equal(a["targets"], original.gather(1, a["masked_positions"]).flatten())
    assert "padding_mask" not in a  # MLM rows are never padded


def test_next_sentence_batches_are_bert_pairs_masked_off_the_specials():
    """--next-sentence: <cls> A <sep> B <sep>, B the window's own continuation (label 1)
    or another window's text at the same positions (label 0), about half each; token
    types 1 from B on; masks never on <cls> or <sep>, their targets the original tokens;
    the same batch for the same (seed, epoch, batch)."""
    windows = torch.randint(len(SPECIALS), 500, (4096, 31), dtype=torch.int32,
                            generator=torch.Generator().manual_seed(0))
    sep_id = SEP_ID
    make_batch = functools.partial(data.mlm_pair_batch, windows, (CLS_ID, sep_id),
                                   masking(0.25, 500), 7, 1)
    rows = torch.arange(256)
    batch = make_batch(3, rows)
    assert all(torch.equal(v, make_batch(3, rows)[k]) for k, v in batch.items())
    inputs, types, labels = batch["inputs"], batch["token_types"], batch["ns_labels"]
    assert inputs.shape == types.shape == (256, 32) and labels.shape == (256,)
    assert 0.4 < labels.float().mean() < 0.6
    n_mask = round(0.25 * 29)  # of the bptt - 3 text tokens
    assert batch["masked_positions"].shape == (256, n_mask)
    unmasked = inputs.scatter(1, batch["masked_positions"], batch["targets"].view(256, -1))
    for row in range(256):
        seps = (unmasked[row] == sep_id).nonzero().flatten().tolist()
        assert inputs[row, 0] == CLS_ID and seps[-1] == 31 and len(seps) == 2, seps
        cut = seps[0] - 1  # A's length
        assert 1 <= cut <= 28
        assert types[row].tolist() == [0] * (cut + 2) + [1] * (30 - cut)
        a, b = unmasked[row, 1:cut + 1], unmasked[row, cut + 2:31]
        assert torch.equal(a, windows[row, :cut].long())
        if labels[row] == 1:
            assert torch.equal(b, windows[row, cut:29].long())
        else:  # another window's text at the same positions
            assert not torch.equal(b, windows[row, cut:29].long())
            assert (windows[:, cut:29].long() == b).all(1).any()
        masked = batch["masked_positions"][row]
        assert not (unmasked[row, masked] == sep_id).any() and not (masked == 0).any()
    assert not torch.equal(inputs, make_batch(4, rows)["inputs"])


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
    pairs = data.ns_pairs(split, data.Pairs(frac_ns=0.5, min_sentence_len=20),
                          generator=torch.Generator().manual_seed(0))
    long_lines = [i for i, n in enumerate(lengths) if n >= 20]
    assert sorted(pairs["line"].tolist()) == long_lines  # short lines excluded
    assert (pairs["label"] == 0).sum() == int(0.5 * len(long_lines))
    bptt = 64
    batch = data.ns_collate(split, pairs, torch.arange(len(long_lines)), bptt, SPECIALS_IDS)
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
        assert batch["padding_mask"][row].tolist() == [True] * n + [False] * (bptt - n)


def test_ns_pairs_are_cut_to_bptt():
    split = lines_split([50] * 8)
    pairs = data.ns_pairs(split, data.Pairs(0.0, 20), torch.Generator().manual_seed(0))
    batch = data.ns_collate(split, pairs, torch.arange(8), 16, SPECIALS_IDS)
    assert batch["inputs"].shape == (8, 16)
    assert not (batch["inputs"] == PAD_ID).any() and batch["padding_mask"].all()
    assert (batch["labels"] == 1).all()
    for row in range(8):
        cut = int(pairs["cut"][row])
        line = line_tokens(split, int(pairs["line"][row]))
        assert batch["inputs"][row].tolist() == ([CLS_ID] + line[:cut] + [SEP_ID] + line[cut:])[:16]


def test_ns_label_fraction_on_many_lines():
    split = lines_split([30] * 1000)
    for frac in (0.0, 0.3, 0.5, 1.0):
        pairs = data.ns_pairs(split, data.Pairs(frac, 20), torch.Generator().manual_seed(1))
        negatives = pairs["label"] == 0
        assert negatives.float().mean().item() == pytest.approx(frac, abs=1e-3)
        # A positive pair's B is the rest of its own line.
        assert torch.equal(pairs["other"][~negatives], pairs["line"][~negatives])


###############################################################################
# Batches and their loader
###############################################################################


def index_and_rows(i, rows):
    return {"index": torch.tensor(i), "rows": rows}


def test_batches_cut_the_order_into_batches():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    batches = data.Batches(index_and_rows, order, batch_size=4)
    assert len(batches) == 3  # the last batch is short
    assert [batches[i]["rows"].tolist() for i in range(3)] == [
        order[:4].tolist(), order[4:8].tolist(), order[8:].tolist()]
    assert [int(batches[i]["index"]) for i in range(3)] == [0, 1, 2]
    assert len(data.Batches(index_and_rows, order, batch_size=5)) == 2


def loader_datasets():
    """An MLM and a next-sentence dataset of whole batches, as the task scripts make them."""
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(len(SPECIALS), 500, (40, 15), dtype=torch.int32, generator=g)
    mlm = functools.partial(data.mlm_batch, windows, tokenizer.CLS_ID, masking(0.15, 500, "bert"), 3, 1)
    split = lines_split([25, 3, 40, 19, 30] * 8)
    pairs = data.ns_pairs(split, data.Pairs(0.5, 10), g)
    ns = functools.partial(data.ns_batch, split, pairs, 32, SPECIALS_IDS)
    return [data.Batches(mlm, data.epoch_order(40, 3, 1, shuffle=True, batch_size=4), 4),
            data.Batches(ns, data.epoch_order(len(pairs["label"]), 3, 1, shuffle=True), 5)]


def test_loader_workers_give_the_batches_of_the_main_process():
    for dataset in loader_datasets():
        in_process = list(data.batch_loader(dataset, 2, num_workers=0, pin_memory=False))
        loader = data.batch_loader(dataset, 2, num_workers=2, pin_memory=False)
        # Never a fork of this process (it may hold CUDA or NCCL state): a fresh interpreter
        # imports the project's modules, so make_batch must pickle and the repo be on the path.
        expected = "forkserver" if "forkserver" in torch.multiprocessing.get_all_start_methods() else "spawn"
        assert loader.multiprocessing_context.get_start_method() == expected
        from_workers = list(loader)
        assert len(from_workers) == len(in_process) == len(dataset) - 2
        for a, b in zip(in_process, from_workers):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



# -- evaluation samples and prefetching ---------------------------------------------


def test_evaluation_order_is_all_or_an_even_fixed_sample():
    assert data.evaluation_order(10, 4).tolist() == list(range(10))
    assert data.evaluation_order(10, 4, max_batches=3).tolist() == list(range(10))  # fits
    sample = data.evaluation_order(1000, 4, max_batches=5)
    assert len(sample) == 20 and sample.tolist() == sorted(set(sample.tolist()))
    assert sample[0] == 0 and sample[-1] >= 900  # spread over the whole split
    assert torch.equal(sample, data.evaluation_order(1000, 4, max_batches=5))


def test_prefetch_yields_the_same_items_in_order_and_stops_early():
    assert list(data.Prefetch(range(50), depth=2)) == list(range(50))
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    with data.Prefetch(items(), depth=2) as ready:
        for i in ready:
            if i == 5:
                break
    assert len(produced) <= 5 + 1 + 2 + 1  # the thread stopped a few items ahead
    assert not any(t.name == "batch-prefetch" and t.is_alive() for t in threading.enumerate())


def test_prefetch_raises_the_loaders_error_in_the_loop():
    def items():
        yield 1
        raise files.DataError("bad batch")

    with pytest.raises(files.DataError, match="bad batch"), data.Prefetch(items()) as ready:
        for _ in ready:
            pass
