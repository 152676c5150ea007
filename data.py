"""Token ids to BERT batches: masked-LM windows and masking, next-sentence pairs, and the
map-style datasets of whole batches the DataLoader runs.

A corpus arrives here as a TokenizedSplit (token ids plus line boundaries); corpus.py
makes those from the files on disk, with a tokenizer of tokenizer.py.
"""

import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import ClassVar

import torch

import utils

###############################################################################
# A tokenized split
###############################################################################

SPLITS = ("train", "valid", "test")


@dataclass
class TokenizedSplit:
    """A split as one flat int32 tensor of ids plus line boundaries into it."""

    ids: torch.Tensor  # (n_tokens,) int32
    line_offsets: torch.Tensor  # (n_lines + 1,) int64: line i is ids[off[i]:off[i+1]]

    def lines(self, min_len=1):
        """Indices of the lines with at least min_len tokens."""
        lengths = self.line_offsets[1:] - self.line_offsets[:-1]
        return torch.nonzero(lengths >= max(min_len, 1)).flatten()


###############################################################################
# Masked-LM batches
###############################################################################


def mlm_windows(split, bptt):
    """(n_windows, bptt - 1) view of the token stream: each window plus <cls> is one
    sequence of `bptt` tokens. The tail that does not fill a window is dropped."""
    n = len(split.ids) // (bptt - 1)
    return split.ids[: n * (bptt - 1)].view(n, bptt - 1)


@dataclass
class Masking:
    """How MLM masks a batch: --mask_frac and --mask-mode, and the tokenizer's ids it needs
    (plain data: it travels to DataLoader workers)."""

    mask_frac: float  # of the positions of each sequence after <cls>
    mask_mode: str  # "mask": all <MASK> (the old example); "bert": 80/10/10
    mask_id: int
    word_ids: torch.Tensor  # the ids a random replacement may take: never a special token

    RULES: ClassVar = {
        "mask_frac": (lambda x: utils.finite(x) and 0 < x < 1, "must be in (0, 1)"),
        "mask_mode": (utils.one_of("mask", "bert"), "use mask or bert"),
    }

    def __post_init__(self):
        utils.check_rules(self, self.RULES)

    @classmethod
    def of(cls, vocab, mask_frac, mask_mode):
        return cls(mask_frac, mask_mode, vocab.mask_id, vocab.word_ids)


def mask_tokens(tokens, masking, generator=None):
    """Masks `n_mask = round(masking.mask_frac * (seq - 1))` positions of each row, never
    position 0 (<cls>).

    Returns (inputs, targets, masked_positions): masked_positions is a (batch, n_mask)
    int64 tensor of the chosen positions, ascending in each row, and targets the original
    ids there, flattened row by row (tokens.gather(1, masked_positions).flatten()). A
    fixed number per row lets the model gather them without a device-to-host sync.
    Mode "mask" replaces every chosen token with the mask token (the old example);
    "bert" uses BERT's 80% mask token / 10% random word / 10% unchanged."""
    batch, seq = tokens.shape
    n_mask = max(1, round(masking.mask_frac * (seq - 1)))
    # The n_mask positions with the largest uniform scores: a random subset per row.
    scores = torch.rand(batch, seq - 1, generator=generator)
    masked_positions = (scores.topk(n_mask, dim=1).indices + 1).sort(dim=1).values
    targets = tokens.gather(1, masked_positions).flatten()
    if masking.mask_mode == "mask":
        replacement = torch.full_like(targets, masking.mask_id)
    elif masking.mask_mode == "bert":
        r = torch.rand(targets.shape, generator=generator)
        word_ids = masking.word_ids
        random_words = word_ids[torch.randint(len(word_ids), targets.shape, generator=generator)]
        replacement = torch.where(r < 0.8, masking.mask_id,
                                  torch.where(r < 0.9, random_words, targets))
    else:
        raise ValueError(f"unknown mask mode {masking.mask_mode!r}")
    inputs = tokens.scatter(1, masked_positions, replacement.view(batch, n_mask))
    return inputs, targets, masked_positions


def mlm_batch(windows, cls_id, masking, seed, epoch, i, rows):
    """Batch i of an epoch (a make_batch for Batches): <cls> + the windows `rows`, masked.

    Its masks are drawn from batch_generator(seed, "mask", epoch, i), so they are the same
    whichever worker makes the batch and after a resume."""
    text = windows[rows].long()
    tokens = torch.cat([torch.full((len(rows), 1), cls_id, dtype=torch.long), text], dim=1)
    inputs, targets, masked_positions = mask_tokens(
        tokens, masking, batch_generator(seed, "mask", epoch, i))
    return {"inputs": inputs, "targets": targets, "masked_positions": masked_positions}


def mlm_pair_batch(windows, specials, masking, seed, epoch, i, rows):
    """Batch i of an epoch for MLM with next-sentence prediction (--next-sentence, BERT's
    two pretraining tasks at once): each row `<cls> A <sep> B <sep>`, the `bptt` tokens of
    mlm_batch. A is the first `cut` tokens of its window (cut uniform in 1 .. bptt - 4), B
    the rest of the window (label 1) or, for half the rows, the same positions of a random
    other window (label 0). Token types are 0 up to the first <sep>, 1 after it. Masks as
    mlm_batch's, never on <cls> or <sep>; every draw from batch_generator(seed, "mask",
    epoch, i), so a batch is the same after a resume. `specials`: (cls_id, sep_id)."""
    cls_id, sep_id = specials
    generator = batch_generator(seed, "mask", epoch, i)
    text = windows[rows, :-2].long()  # bptt - 3 tokens: room for the two <sep>
    n, length = text.shape
    other = windows[torch.randint(len(windows), (n,), generator=generator), :-2].long()
    labels = (torch.rand(n, generator=generator) < 0.5).long()  # 1: B continues A
    cut = torch.randint(1, length, (n, 1), generator=generator)
    position = torch.arange(length)
    body = torch.where((position >= cut) & (labels[:, None] == 0), other, text)
    tokens = torch.cat([torch.full((n, 1), cls_id, dtype=torch.long), body], dim=1)
    inputs, targets, masked_positions = mask_tokens(tokens, masking, generator)
    # Positions after A move one right, to make room for the <sep> at cut + 1.
    moved = torch.arange(length + 1).expand(n, -1)
    moved = moved + (moved > cut).long()
    rows_out = torch.full((n, length + 3), sep_id, dtype=torch.long).scatter(1, moved, inputs)
    token_types = (torch.arange(length + 3) > cut + 1).long()
    return {"inputs": rows_out, "token_types": token_types, "ns_labels": labels,
            "targets": targets, "masked_positions": masked_positions + (masked_positions > cut).long()}


###############################################################################
# Next-sentence pairs
###############################################################################


@dataclass
class Pairs:
    """How next-sentence pairs are made: --frac_ns and --min_sentence_len."""

    frac_ns: float = 0.5  # of the pairs whose second part comes from another line
    min_sentence_len: int = 60  # lines shorter than this many tokens are not used

    RULES: ClassVar = {
        "frac_ns": (lambda x: utils.finite(x) and 0 <= x <= 1, "must be in [0, 1]"),
        "min_sentence_len": (utils.at_least(2), "must be at least 2 (a line is cut in two)"),
    }

    def __post_init__(self):
        utils.check_rules(self, self.RULES)


def ns_pairs(split, settings, generator):
    """The old example's pairs (`settings`: Pairs): each line of >= min_sentence_len tokens
    is cut at a random point into (A, B), label 1; for a `frac_ns` share of the pairs B is
    replaced by the first part of another line, label 0.

    Returns a dict of int64 tensors, one entry per pair: `line` (index of the line A
    comes from), `cut` (A is its first `cut` tokens), `other` and `other_cut` (the line and
    length B is taken from when label is 0) and `label` (1: B continues A)."""
    lines = split.lines(settings.min_sentence_len)
    off = split.line_offsets
    lengths = off[lines + 1] - off[lines]
    cut = 1 + (torch.rand(len(lines), generator=generator) * (lengths - 1)).long()
    n = len(lines)
    other = torch.arange(n)
    label = torch.ones(n, dtype=torch.long)
    n_shuffle = int(n * settings.frac_ns)
    replaced = torch.randperm(n, generator=generator)[:n_shuffle]
    other[replaced] = torch.randint(0, max(n, 1), (n_shuffle,), generator=generator)
    label[replaced] = 0
    return {"line": lines, "cut": cut, "other": lines[other], "other_cut": cut[other], "label": label}


def ns_collate(split, pairs, indices, bptt, specials):
    """`<cls> A <sep> B <sep>` rows, token types 0 for <cls> A <sep> and 1 after,
    cut or padded with <pad> to `bptt` positions; padding_mask is True at the tokens.
    `specials`: the tokenizer's (cls, sep, pad) ids."""
    cls_id, sep_id, pad_id = specials
    off, ids = split.line_offsets, split.ids
    batch = len(indices)
    tokens = torch.full((batch, bptt), pad_id, dtype=torch.long)
    token_types = torch.zeros((batch, bptt), dtype=torch.long)
    lengths = torch.zeros(batch, dtype=torch.long)
    for row, i in enumerate(indices.tolist()):
        line, cut = int(pairs["line"][i]), int(pairs["cut"][i])
        other, other_cut = int(pairs["other"][i]), int(pairs["other_cut"][i])
        a = ids[off[line]:off[line] + cut]
        if pairs["label"][i]:
            b = ids[off[line] + cut:off[line + 1]]
        else:
            b = ids[off[other]:off[other] + other_cut]
        seq = torch.cat([torch.tensor([cls_id]), a.long(), torch.tensor([sep_id]), b.long(),
                         torch.tensor([sep_id])])[:bptt]
        tokens[row, :len(seq)] = seq
        token_types[row, min(len(a) + 2, bptt):len(seq)] = 1
        lengths[row] = len(seq)
    return {"inputs": tokens, "token_types": token_types, "labels": pairs["label"][indices],
            "padding_mask": torch.arange(bptt) < lengths[:, None]}


def ns_batch(split, pairs, bptt, specials, i, rows):
    """A make_batch for Batches: ns_collate of the pairs `rows` (the pairs' random draws
    were made in ns_pairs, so the batch index is not needed)."""
    return ns_collate(split, pairs, rows, bptt, specials)


###############################################################################
# Batches for the DataLoader
###############################################################################


def batch_generator(seed, *keys):
    """A generator whose stream depends only on (seed, *keys), e.g. (seed, epoch, batch):
    a batch's masking is the same whichever worker makes it and after a resume."""
    h = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def epoch_order(n_items, seed, epoch, shuffle, rank=0, world_size=1, batch_size=1,
                drop_last=True):
    """This rank's item indices for an epoch: a seeded permutation (or 0..n-1), cut into
    equal disjoint shards per rank, of whole batches when drop_last."""
    if shuffle:
        order = torch.randperm(n_items, generator=batch_generator(seed, "order", epoch))
    else:
        order = torch.arange(n_items)
    per_rank = n_items // world_size
    if drop_last:
        per_rank -= per_rank % batch_size
    return order[rank * per_rank:(rank + 1) * per_rank] if world_size > 1 or drop_last else order


def evaluation_order(n_items, batch_size, max_batches=0):
    """The items an evaluation scores: all of them in order, or (--eval-batches) at most
    max_batches batches of items spread evenly over the split: the same sample every
    time, whatever the number of ranks, so evaluations compare across a run."""
    if not max_batches or n_items <= max_batches * batch_size:
        return torch.arange(n_items)
    n = max_batches * batch_size
    return torch.arange(n) * n_items // n


class Batches(torch.utils.data.Dataset):
    """Item i is batch i of an epoch: make_batch(i, order[i * batch_size:(i + 1) * batch_size]).

    A map-style dataset of whole batches, so DataLoader workers build them in parallel
    (DataLoader(..., batch_size=None)). make_batch is sent to the workers, so it must
    pickle: a functools.partial of a module-level function (mlm_batch, ns_batch, ...)."""

    def __init__(self, make_batch, order, batch_size):
        self.make_batch, self.order, self.batch_size = make_batch, order, batch_size

    def __len__(self):
        return (len(self.order) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i):
        return self.make_batch(i, self.order[i * self.batch_size:(i + 1) * self.batch_size])


def _worker_start_method():
    """forkserver (else spawn) for DataLoader workers: a fork of a process that holds CUDA
    or NCCL state (its threads, locks, the driver's context) can hang or crash."""
    methods = torch.multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def batch_loader(dataset, start, num_workers, pin_memory):
    """Batches start, start+1, ... of a dataset of whole batches.

    generator=: the loader must not draw its seed from the global RNG, or a resumed run's
    dropout would differ from the uninterrupted one. Each epoch makes its own loader and
    iterates it once, so persistent_workers would keep nothing alive worth keeping; the
    default prefetch_factor (2 batches a worker) keeps the workers ahead of the step."""
    context = _worker_start_method() if num_workers > 0 else None
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start, len(dataset)), num_workers=num_workers,
        multiprocessing_context=context, generator=torch.Generator(), pin_memory=pin_memory)


class Prefetch:
    """The items of `iterable` (a batch loader), made `depth` ahead by a background
    thread, so that the next batch is ready when the step asks for it: the loop runs at
    its step's speed. On a GPU the step itself only queues kernels, so building (and
    pinning) the next batch overlaps the device's work; DataLoader workers
    (--num-workers) are processes that take seconds to start and memory to run, this is
    one thread of the training process. The batches and their order are the loader's:
    building them draws on no global random state, so a resumed run is unchanged.

    Use as a context manager (or close()), which stops the thread when the loop stops
    early."""

    _END = object()

    def __init__(self, iterable, depth=2):
        self.items = queue.Queue(depth)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._fill, args=(iterable,), daemon=True,
                                       name="batch-prefetch")
        self.thread.start()

    def _fill(self, iterable):
        try:
            for item in iterable:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # the loop raises it where it asked for the batch
            self._put(_Failure(e))

    def _put(self, item):
        while not self.stopping.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while (item := self.items.get()) is not self._END:
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self):
        self.stopping.set()
        self.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Failure:
    def __init__(self, error):
        self.error = error


def micro_batch_groups(batches, size):
    """Consecutive groups of `size` batches (the last may be shorter): one optimizer
    step each (--grad-accum)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group
