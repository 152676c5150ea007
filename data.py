"""Text to BERT batches: tokenizer, vocabulary, masking, next-sentence pairs, batching.

Everything the old example took from torchtext, in plain Python and torch. A corpus
arrives here as a TokenizedSplit (token ids plus line boundaries); corpus.py makes those
from the files on disk (download, parallel tokenization, cache).
"""

import hashlib
import re
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import torch

from utils import UserError, atomic_save


class DataError(UserError):
    """A problem with the input data, reported as one line (no traceback)."""


###############################################################################
# Tokenizer
###############################################################################

# torchtext's basic_english is a chain of regex substitutions on the lower-cased line:
#   '  -> " '  "   (its own token)          "  -> ""  (dropped, not a separator)
#   . , ( ) ! ?  -> " x " (their own tokens)  <br />, ;, : -> " " (separators)
# then a split on white space. The same as plain str.replace calls, which run at memchr
# speed (str.translate with multi-character replacements is several times slower, and
# this is the inner loop of tokenizing a 500 MB corpus). The order matters only for `"`:
# removing it can complete a `<br />`.
_OWN_TOKENS = ".,()!?'"


def normalize_text(text):
    """basic_english's substitutions without the final split (keeps line breaks)."""
    text = text.lower().replace('"', "").replace("<br />", " ")
    for char in _OWN_TOKENS:
        text = text.replace(char, f" {char} ")
    return text.replace(";", " ").replace(":", " ")


def basic_english_normalize(text):
    """The basic_english tokenizer: the same tokens as torchtext's, for any string."""
    return normalize_text(text).split()


# The same tokenizer as a scanner, so that every token keeps its character span. It runs
# on the lower-cased text with `"` removed, as basic_english does, and maps positions back:
# lower-casing the whole string (not token by token) is what gets a Greek final sigma right
# ("ΟΔΟΣ." -> "οδος ." but "ΑΣ.Β" -> "ασ . β"), and it can lengthen the text (İ -> i̇).
# A token is one of ' . , ( ) ! ? or a run of other non-space characters; `<br />`, ; and
# : separate words.
_SPAN_TOKEN = re.compile(r"(?P<separator><br />|[;:\s]+)|[.,()!?']|(?:[^.,()!?';:\s<]|<(?!br />))+")


def tokenize_with_spans(text):
    """Returns [(token, start, end)], where text[start:end] is the token's source.

    The tokens equal basic_english_normalize(text). A token's source can contain `"`
    characters, which the tokenizer drops (`ab"c` -> `abc`); quotes around a word are
    not part of its span."""
    lowered = text.lower()
    if len(lowered) == len(text):
        source = range(len(text))
    else:
        source = [i for i, char in enumerate(text) for _ in char.lower()]
    if '"' in lowered:
        source = [i for i, char in zip(source, lowered) if char != '"']
        lowered = lowered.replace('"', "")
    return [(match.group(), source[match.start()], source[match.end() - 1] + 1)
            for match in _SPAN_TOKEN.finditer(lowered) if not match.group("separator")]


###############################################################################
# Vocabulary
###############################################################################

SPECIALS = ("<unk>", "<pad>", "<MASK>", "<cls>", "<sep>")
UNK_ID, PAD_ID, MASK_ID, CLS_ID, SEP_ID = range(len(SPECIALS))


class Vocab:
    """The basic_english tokenizer's word vocabulary: itos / stoi with the specials first;
    unknown words map to <unk>. Shares its interface with WordPiece below."""

    kind = "basic_english"
    unk_id, pad_id, mask_id, cls_id, sep_id = UNK_ID, PAD_ID, MASK_ID, CLS_ID, SEP_ID

    def __init__(self, itos):
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab must start with the specials {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {word: i for i, word in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("vocab has duplicate words")
        # What MLM's random replacement may draw: every word, never a special.
        self.word_ids = torch.arange(len(SPECIALS), len(self.itos))

    def __len__(self):
        return len(self.itos)

    def __getitem__(self, word):
        return self.stoi.get(word, UNK_ID)

    def lookup_indices(self, words):
        return list(map(self.stoi.get, words, repeat(UNK_ID)))

    def encode(self, text):
        return self.lookup_indices(basic_english_normalize(text))

    def encode_with_spans(self, text):
        """(ids, [(start, end) character span of each token in text])."""
        tokens = tokenize_with_spans(text)
        return (self.lookup_indices([token for token, _, _ in tokens]),
                [(start, end) for _, start, end in tokens])

    def fingerprint(self):
        """Short hash of the word list: keys the token-id caches."""
        return hashlib.sha1("\n".join(self.itos).encode()).hexdigest()[:16]

    def state(self):
        """What a checkpoint stores beside the word list to rebuild the tokenizer."""
        return {"kind": self.kind}

    @classmethod
    def build(cls, counter, min_freq=1):
        """Words with count >= min_freq, most frequent first (ties alphabetical)."""
        words = sorted(
            (w for w, c in counter.items() if c >= min_freq and w not in SPECIALS),
            key=lambda w: (-counter[w], w),
        )
        return cls(list(SPECIALS) + words)


# BERT's special tokens, as every published BERT vocabulary spells them.
WORDPIECE_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]",
                      "mask": "[MASK]"}


class WordPiece:
    """BERT's WordPiece tokenizer (the `tokenizers` library's, as transformers'
    BertTokenizerFast runs it), with the interface of Vocab. Built from the content of a
    tokenizer.json, which checkpoints store, so that every script tokenizes alike."""

    kind = "wordpiece"

    def __init__(self, tokenizer_json):
        from tokenizers import Tokenizer

        self.json = tokenizer_json
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.itos = [None] * len(vocab)
        for word, i in vocab.items():
            if i >= len(vocab):
                raise ValueError(f"token ids are not 0..{len(vocab) - 1} (id {i})")
            self.itos[i] = word
        missing = [t for t in WORDPIECE_SPECIALS.values() if t not in vocab]
        if missing:
            raise ValueError(f"no special token {', '.join(missing)} in the vocabulary")
        for name, token in WORDPIECE_SPECIALS.items():
            setattr(self, f"{name}_id", vocab[token])
        special = {vocab[t] for t in WORDPIECE_SPECIALS.values()}
        special |= {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self.word_ids = torch.tensor([i for i in range(len(self.itos)) if i not in special])

    def __len__(self):
        return len(self.itos)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_spans(self, text):
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def encode_batch(self, lines):
        """Token ids of each line, encoded on all cores."""
        return [e.ids for e in self.tokenizer.encode_batch(lines, add_special_tokens=False)]

    def fingerprint(self):
        return hashlib.sha1(self.json.encode()).hexdigest()[:16]

    def state(self):
        return {"kind": self.kind, "json": self.json}

    def save_transformers(self, folder):
        """The files transformers' AutoTokenizer loads this tokenizer from; their names."""
        import json

        folder = Path(folder)
        lowercase = _lowercases(json.loads(self.json))
        files = {
            "tokenizer.json": self.json,
            "vocab.txt": "".join(word + "\n" for word in self.itos),
            "tokenizer_config.json": json.dumps({
                "tokenizer_class": "BertTokenizer", "do_lower_case": lowercase,
                "model_max_length": 512, "clean_up_tokenization_spaces": True,
                **{f"{name}_token": token for name, token in WORDPIECE_SPECIALS.items()}},
                indent=2),
            "special_tokens_map.json": json.dumps(
                {f"{name}_token": token for name, token in WORDPIECE_SPECIALS.items()}, indent=2),
        }
        for name, text in files.items():
            (folder / name).write_text(text, encoding="utf-8")
        return list(files)


def _lowercases(tokenizer_config):
    normalizer = tokenizer_config.get("normalizer") or {}
    parts = normalizer.get("normalizers", [normalizer])
    return any(part.get("lowercase") or part.get("type") == "Lowercase" for part in parts)


def bert_wordpiece_pipeline(vocab=None, lowercase=True):
    """BERT's tokenization as BertTokenizerFast builds it: clean the text, split CJK
    characters, lower-case and strip accents (uncased), split on white space and
    punctuation, then WordPiece with ## continuations. `vocab`: {word: id}, or None for a
    pipeline to train."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    model = (models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)
             if vocab is not None else models.WordPiece(unk_token="[UNK]"))
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def train_wordpiece(lines, vocab_size):
    """An uncased WordPiece vocabulary of `vocab_size` learned from an iterable of lines,
    with BERT's specials [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0-4."""
    from tokenizers import trainers

    tokenizer = bert_wordpiece_pipeline()
    specials = [WORDPIECE_SPECIALS[name] for name in ("pad", "unk", "cls", "sep", "mask")]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                        continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator(lines, trainer)
    return WordPiece(tokenizer.to_str())


def read_vocab_txt(path, lowercase=True):
    """A WordPiece tokenizer from a BERT vocab.txt (one token a line, its id the line's
    number), tokenizing as BertTokenizerFast does with that file."""
    words = Path(path).read_text(encoding="utf-8").splitlines()
    tokenizer = bert_wordpiece_pipeline({word: i for i, word in enumerate(words)}, lowercase)
    tokenizer.add_special_tokens([t for t in WORDPIECE_SPECIALS.values() if t in words])
    return WordPiece(tokenizer.to_str())


def load_tokenizer(path):
    """The tokenizer at `path`: a BERT vocab.txt, a tokenizer.json, or a folder holding one
    (a transformers model folder: tokenizer.json first, else vocab.txt with the folder's
    do_lower_case). Raises DataError naming the problem."""
    import json

    path = Path(path)
    try:
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return load_tokenizer(path / "tokenizer.json")
            if not (path / "vocab.txt").is_file():
                raise DataError(f"{path}: no tokenizer.json or vocab.txt in the folder")
            config = path / "tokenizer_config.json"
            lowercase = True  # BertTokenizer's default
            if config.is_file():
                lowercase = json.loads(config.read_text(encoding="utf-8")).get("do_lower_case", True)
            return read_vocab_txt(path / "vocab.txt", lowercase)
        if not path.is_file():
            raise DataError(f"{path}: no such file or folder")
        if path.suffix == ".json":
            text = path.read_text(encoding="utf-8")
            model_type = json.loads(text).get("model", {}).get("type")
            if model_type != "WordPiece":
                raise DataError(f"{path}: a {model_type} tokenizer, not BERT's WordPiece")
            return WordPiece(text)
        return read_vocab_txt(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: not a usable tokenizer ({e})") from None
    except Exception as e:  # the tokenizers library raises its own exception type
        raise DataError(f"{path}: not a usable tokenizer ({type(e).__name__}: {e})") from None


def tokenizer_from_state(itos, state):
    """The tokenizer a checkpoint or vocab file stored: its word list and its state()
    (None in files written before WordPiece: basic_english)."""
    state = state or {"kind": "basic_english"}
    if state.get("kind") == "basic_english":
        return Vocab(itos)
    if state.get("kind") != "wordpiece":
        raise ValueError(f"unknown tokenizer kind {state.get('kind')!r}")
    tokenizer = WordPiece(state["json"])
    if tokenizer.itos != list(itos):
        raise ValueError("the stored word list differs from the tokenizer's")
    return tokenizer


def tokenizer_from_checkpoint(ckpt):
    """The tokenizer a checkpoint of this project stores (see checkpoint.py)."""
    return tokenizer_from_state(ckpt["vocab"], ckpt.get("tokenizer"))


def save_vocab(vocab, path, **meta):
    """Plain data (a list of str and dicts), loadable with torch.load(weights_only=True)."""
    atomic_save({"itos": vocab.itos, "tokenizer": vocab.state(), "meta": meta}, path)


def load_vocab(path):
    """Returns (vocab, meta). Raises DataError with a clear message if unusable."""
    problem = f"{path} is not a vocab file written by this project"
    try:
        obj = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception:  # torch.load's own message is a page of advice that does not apply
        raise DataError(f"{problem} (torch.load cannot read it)") from None
    try:
        return tokenizer_from_state(obj["itos"], obj.get("tokenizer")), dict(obj.get("meta", {}))
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise DataError(f"{problem} ({type(e).__name__}: {e})") from None


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
    """How MLM masks a batch: the fraction of positions, the mode, and the tokenizer's
    ids it needs (plain data: it travels to DataLoader workers)."""

    frac: float
    mode: str  # "mask": all <MASK> (the old example); "bert": 80/10/10
    mask_id: int
    word_ids: torch.Tensor  # the ids a random replacement may take: never a special token

    @classmethod
    def of(cls, vocab, frac, mode):
        return cls(frac, mode, vocab.mask_id, vocab.word_ids)


def mask_tokens(tokens, masking, generator=None):
    """Masks `n_mask = round(masking.frac * (seq - 1))` positions of each row, never
    position 0 (<cls>).

    Returns (inputs, targets, masked_positions): masked_positions is a (batch, n_mask)
    int64 tensor of the chosen positions, ascending in each row, and targets the original
    ids there, flattened row by row (tokens.gather(1, masked_positions).flatten()). A
    fixed number per row lets the model gather them without a device-to-host sync.
    Mode "mask" replaces every chosen token with the mask token (the old example);
    "bert" uses BERT's 80% mask token / 10% random word / 10% unchanged."""
    batch, seq = tokens.shape
    n_mask = max(1, round(masking.frac * (seq - 1)))
    # The n_mask positions with the largest uniform scores: a random subset per row.
    scores = torch.rand(batch, seq - 1, generator=generator)
    masked_positions = (scores.topk(n_mask, dim=1).indices + 1).sort(dim=1).values
    targets = tokens.gather(1, masked_positions).flatten()
    if masking.mode == "mask":
        replacement = torch.full_like(targets, masking.mask_id)
    elif masking.mode == "bert":
        r = torch.rand(targets.shape, generator=generator)
        word_ids = masking.word_ids
        random_words = word_ids[torch.randint(len(word_ids), targets.shape, generator=generator)]
        replacement = torch.where(r < 0.8, masking.mask_id,
                                  torch.where(r < 0.9, random_words, targets))
    else:
        raise ValueError(f"unknown mask mode {masking.mode!r}")
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


###############################################################################
# Next-sentence pairs
###############################################################################


def ns_pairs(split, min_sentence_len, frac_ns, generator):
    """The old example's pairs: each line of >= min_sentence_len tokens is cut at a random
    point into (A, B), label 1; for a `frac_ns` share of the pairs B is replaced by the
    first part of another line, label 0.

    Returns a dict of int64 tensors, one entry per pair: `line` (index of the line A
    comes from), `cut` (A is its first `cut` tokens), `other` and `other_cut` (the line and
    length B is taken from when label is 0) and `label` (1: B continues A)."""
    lines = split.lines(min_sentence_len)
    off = split.line_offsets
    lengths = off[lines + 1] - off[lines]
    cut = 1 + (torch.rand(len(lines), generator=generator) * (lengths - 1)).long()
    n = len(lines)
    other = torch.arange(n)
    label = torch.ones(n, dtype=torch.long)
    n_shuffle = int(n * frac_ns)
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
