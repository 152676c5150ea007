"""Sentences and sentence pairs to model inputs, as bertkit/squad/windows.py is for SQuAD: each example
becomes `<cls> a <sep> b <sep>` (or `<cls> a <sep>`), token types 0 for `<cls> a <sep>` and 1
after, cut longest-first to max_len as transformers' tokenizers cut pairs
(truncation="longest_first"); then batches padded to their longest row.

Every example is tokenized once, up front, into one flat array of ids; a batch is a
gather from it, so building one costs about as much as copying its tokens.
"""

from array import array
from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """Every example's ids, in one flat int32 tensor: row i is ids[offsets[i]:offsets[i+1]]."""

    ids: torch.Tensor  # (n_tokens,) int32: <cls> a <sep> [b <sep>] of each row, end to end
    offsets: torch.Tensor  # (n + 1,) int64
    lengths: torch.Tensor  # (n,) int64: tokens of each row, specials included
    first_segment: torch.Tensor  # (n,) int64: tokens of <cls> a <sep>, the ones of type 0
    truncated: int  # rows that lost tokens to max_len

    def __len__(self):
        return len(self.lengths)


def truncated_lengths(len_a, len_b, room):
    """How many tokens of a and of b stay when at most `room` fit, as the `tokenizers`
    library's longest_first cuts a pair: when both are longer than half the room, the
    shorter keeps room // 2 and the longer the rest (the second text on a tie); otherwise
    only the longer is cut, to what the shorter leaves."""
    if len_a + len_b <= room:
        return len_a, len_b
    shorter, longer = sorted((len_a, len_b))
    kept_shorter, kept_longer = shorter, max(shorter, room - shorter)
    if kept_shorter + kept_longer > room:
        kept_shorter, kept_longer = room // 2, room - room // 2
    return (kept_shorter, kept_longer) if len_a <= len_b else (kept_longer, kept_shorter)


def _tokenize(vocab, texts):
    encode_batch = getattr(vocab, "encode_batch", None)  # WordPiece: on all cores
    return encode_batch(list(texts)) if encode_batch else [vocab.encode(text) for text in texts]


def encode(texts_a, texts_b, vocab, max_len):
    """Encoded rows of `<cls> a <sep> b <sep>` (texts_b None: `<cls> a <sep>`), at most
    max_len tokens each. vocab: a tokenizer of bertkit/text/tokenizer.py (Vocab or WordPiece)."""
    pairs = texts_b is not None
    specials = 3 if pairs else 2
    if max_len < specials:
        raise ValueError(f"max_len {max_len}: no room for a token beside the {specials} specials")
    if pairs and len(texts_a) != len(texts_b):
        raise ValueError(f"{len(texts_a)} first texts for {len(texts_b)} second texts")
    tokens_a = _tokenize(vocab, texts_a)
    tokens_b = _tokenize(vocab, texts_b) if pairs else [()] * len(tokens_a)
    room = max_len - specials
    ids, lengths, first_segment, truncated = array("i"), array("q"), array("q"), 0
    cls, sep = [vocab.cls_id], [vocab.sep_id]
    for a, b in zip(tokens_a, tokens_b):
        keep_a, keep_b = truncated_lengths(len(a), len(b), room)
        truncated += keep_a < len(a) or keep_b < len(b)
        ids.extend(cls)
        ids.extend(a[:keep_a])
        ids.extend(sep)
        if pairs:
            ids.extend(b[:keep_b])
            ids.extend(sep)
        first_segment.append(keep_a + 2)
        lengths.append(keep_a + keep_b + specials)
    lengths = _tensor(lengths, torch.int64)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return Encoded(_tensor(ids, torch.int32), offsets, lengths,
                   _tensor(first_segment, torch.int64), truncated)


def _tensor(values, dtype):
    """A tensor on the memory of an array.array (no copy)."""
    return torch.frombuffer(values, dtype=dtype) if values else torch.zeros(0, dtype=dtype)


def pair_batch(encoded, labels, pad_id, i, rows, seq_len=None):
    """Batch `i` (data.Batches' make_batch, as functools.partial(pair_batch, encoded,
    labels, pad_id)): the rows `rows` (a tensor of row indices), padded with pad_id to
    the longest of them, or to `seq_len` when given (one shape for every batch).
    `labels`: a tensor over all rows (label ids, or floats for regression), or None.

    {"inputs": (b, L) long, "token_types": (b, L) long (0 on the padding),
     "padding_mask": (b, L) bool, True at the tokens, "labels": (b,) when labels is given}"""
    rows = torch.as_tensor(rows, dtype=torch.long)
    lengths = encoded.lengths[rows]
    seq_len = seq_len or (int(lengths.max()) if len(rows) else 0)
    position = torch.arange(seq_len)
    padding_mask = position < lengths[:, None]
    gather = (encoded.offsets[rows, None] + position).clamp_(max=max(len(encoded.ids) - 1, 0))
    inputs = torch.where(padding_mask, encoded.ids[gather].long(), pad_id)
    token_types = (padding_mask & (position >= encoded.first_segment[rows, None])).long()
    batch = {"inputs": inputs, "token_types": token_types, "padding_mask": padding_mask}
    if labels is not None:
        batch["labels"] = labels[rows]
    return batch


def length_order(encoded, rows=None):
    """`rows` (default: all) sorted by length, longest first, file order among equals: the
    order to evaluate in, so that a batch holds rows of similar length and pads little."""
    rows = torch.arange(len(encoded)) if rows is None else torch.as_tensor(rows, dtype=torch.long)
    order = torch.sort(encoded.lengths[rows], descending=True, stable=True).indices
    return rows[order]
