"""bertkit/glue/sentences.py: pairs to `<cls> a <sep> b <sep>` rows cut longest-first exactly as
transformers' tokenizers cut them (on constructed lengths with the basic_english tokenizer,
on real RTE text with BERT's real vocabulary), and the padded batches built from them."""

import functools
import pickle
import shutil

import pytest
import torch
from conftest import BERT_VOCAB, REAL_RTE, real_data_skip

import data
from bertkit.glue import sentences
from bertkit.text import tokenizer

REAL_VOCAB = BERT_VOCAB
REAL_RTE_DEV = REAL_RTE / "dev.tsv"
WORDS = [f"w{i}" for i in range(30)]


@pytest.fixture(scope="module")
def vocab():
    return tokenizer.Vocab(list(tokenizer.SPECIALS) + WORDS)


def rows(encoded):
    """[(ids, token types)] of each encoded row."""
    out = []
    for i in range(len(encoded)):
        ids = encoded.ids[encoded.offsets[i]:encoded.offsets[i + 1]].tolist()
        first = int(encoded.first_segment[i])
        out.append((ids, [0] * first + [1] * (len(ids) - first)))
    return out


def their_rows(their_tokenizer, texts_a, texts_b, max_len):
    out = their_tokenizer(texts_a, texts_b, truncation="longest_first", max_length=max_len,
                          return_token_type_ids=True)
    return list(zip(out["input_ids"], out["token_type_ids"]))


def test_pairs_are_cut_longest_first_as_transformers_cuts_them(vocab):
    """Every pair of lengths 0..9 at every max_len 3..14: equal ids and token types, which
    covers the cases of longest_first (no cut, only the longer cut, both cut to half the
    room with the odd token to the longer or, on a tie, to the second text)."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.basic_english_pipeline(vocab.itos), cls_token="<cls>",
        sep_token="<sep>", pad_token="<pad>", unk_token="<unk>")
    lengths = [(a, b) for a in range(10) for b in range(10)]
    texts_a = [" ".join(WORDS[:a]) for a, _ in lengths]
    texts_b = [" ".join(WORDS[10:10 + b]) for _, b in lengths]
    for max_len in range(3, 15):
        encoded = sentences.encode(texts_a, texts_b, vocab, max_len)
        assert rows(encoded) == their_rows(theirs, texts_a, texts_b, max_len), max_len
        assert encoded.truncated == sum(a + b + 3 > max_len for a, b in lengths)
    single = sentences.encode(texts_a, None, vocab, 5)
    assert rows(single) == their_rows(theirs, texts_a, None, 5)


def test_real_pairs_equal_bert_tokenizer_fast(tmp_path):
    """RTE's dev pairs with BERT's vocabulary: the ids and token types of
    BertTokenizerFast(truncation="longest_first", max_length), at the default 128 and at
    a length that cuts nearly every pair."""
    real_data_skip(REAL_VOCAB, REAL_RTE_DEV)
    transformers = pytest.importorskip("transformers")
    from bertkit.glue import tasks as glue

    shutil.copy(REAL_VOCAB, tmp_path / "vocab.txt")
    theirs = transformers.BertTokenizerFast.from_pretrained(tmp_path)
    ours = tokenizer.read_vocab_txt(REAL_VOCAB)
    dev = glue.read_task_file(REAL_RTE_DEV, glue.TASKS["RTE"], "dev")
    for max_len in (128, 25):
        encoded = sentences.encode(dev.texts_a, dev.texts_b, ours, max_len)
        assert rows(encoded) == their_rows(theirs, dev.texts_a, dev.texts_b, max_len)
        assert 0 < encoded.truncated <= len(dev)


def test_single_sentences_and_empty_texts(vocab):
    encoded = sentences.encode(["w1 w2", ""], None, vocab, 128)
    cls, sep = vocab.cls_id, vocab.sep_id
    assert rows(encoded) == [([cls, vocab["w1"], vocab["w2"], sep], [0] * 4), ([cls, sep], [0, 0])]
    pair = sentences.encode([""], [""], vocab, 3)
    assert rows(pair) == [([cls, sep, sep], [0, 0, 1])]
    with pytest.raises(ValueError, match="max_len 2"):
        sentences.encode(["w1"], ["w2"], vocab, 2)
    with pytest.raises(ValueError, match="2 first texts for 1"):
        sentences.encode(["w1", "w2"], ["w3"], vocab, 10)


def test_batches_are_padded_to_their_longest_row(vocab):
    texts_a = ["w1 w2 w3", "w4", "w5 w6", "w7 w8 w9 w10 w11"]
    texts_b = ["w12", "w13 w14", "", "w15"]
    encoded = sentences.encode(texts_a, texts_b, vocab, 8)
    labels = torch.tensor([1, 0, 2, 1])
    batch = sentences.pair_batch(encoded, labels, vocab.pad_id, 0, torch.tensor([1, 2]))
    # Rows of 6 and 5 tokens: padded to 6, not to max_len.
    assert batch["inputs"].shape == batch["token_types"].shape == (2, 6)
    assert batch["inputs"].dtype == batch["token_types"].dtype == torch.long
    expected = [row + [vocab.pad_id] * (6 - len(row)) for row, _ in rows(encoded)[1:3]]
    assert batch["inputs"].tolist() == expected
    assert batch["padding_mask"].tolist() == [[True] * 6, [True] * 5 + [False]]
    assert batch["token_types"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0]]
    assert batch["labels"].tolist() == [0, 2]
    # The longest row is cut to max_len (8): 5 + 1 + 3 > 8 cuts the first text to 4.
    whole = sentences.pair_batch(encoded, None, vocab.pad_id, 0, torch.arange(4))
    assert whole["inputs"].shape == (4, 8) and "labels" not in whole
    assert whole["inputs"][3].tolist() == [vocab.cls_id, *vocab.encode("w7 w8 w9 w10"),
                                           vocab.sep_id, vocab["w15"], vocab.sep_id]
    fixed = sentences.pair_batch(encoded, labels.float(), vocab.pad_id, 0, [0], seq_len=12)
    assert fixed["inputs"].shape == (1, 12) and fixed["labels"].dtype == torch.float32
    assert fixed["padding_mask"].sum() == int(encoded.lengths[0])


def test_length_order_and_batches_through_data_batches(vocab):
    texts = ["w1", "w1 w2 w3", "w1 w2", "w4 w5 w6", "w7"]
    encoded = sentences.encode(texts, None, vocab, 16)
    assert sentences.length_order(encoded).tolist() == [1, 3, 2, 0, 4]  # stable among equals
    assert sentences.length_order(encoded, torch.tensor([0, 2, 4])).tolist() == [2, 0, 4]
    make_batch = functools.partial(sentences.pair_batch, encoded, torch.arange(5), vocab.pad_id)
    batches = data.Batches(pickle.loads(pickle.dumps(make_batch)),  # as a DataLoader worker gets it
                           sentences.length_order(encoded), batch_size=2)
    batches = [batches[i] for i in range(len(batches))]
    shapes = [tuple(batch["inputs"].shape) for batch in batches]
    assert shapes == [(2, 5), (2, 4), (1, 3)]
    assert torch.cat([batch["labels"] for batch in batches]).tolist() == [1, 3, 2, 0, 4]


def test_wordpiece_and_word_vocabularies_give_the_same_layout(vocab):
    """WordPiece tokenizes the batch on all cores (encode_batch); Vocab one text at a time.
    Same rows for text both tokenize alike."""
    wordpiece = tokenizer.WordPiece(tokenizer.bert_wordpiece_pipeline(
        {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    ).to_str())
    texts_a, texts_b = ["w1 w2 w3 w4", "w5"], ["w6", "w7 w8 w9"]
    ours = rows(sentences.encode(texts_a, texts_b, vocab, 6))
    theirs = rows(sentences.encode(texts_a, texts_b, wordpiece, 6))
    shift = {wordpiece.cls_id: vocab.cls_id, wordpiece.sep_id: vocab.sep_id}
    assert [([shift.get(t, t) for t in ids], types) for ids, types in theirs] == ours
