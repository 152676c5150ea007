"""Tokenizers and their vocabularies: the old example's basic_english words and BERT's
WordPiece, one interface (encode, encode_with_spans, itos, the special ids, state()), how
checkpoints and vocab files store them, and which one a run uses (TokenizerSpec,
choose_vocab).

Everything the old example took from torchtext's tokenizer and vocab, in plain Python
(and the `tokenizers` library for WordPiece).
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import ClassVar

import torch

import utils
from bertkit.files import DataError, atomic_save, load_torch

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

    def save_transformers(self, folder):
        """The files transformers' AutoTokenizer loads as this tokenizer (a
        PreTrainedTokenizerFast: basic_english_pipeline's word-level tokenizer.json); their
        names."""
        specials = dict(zip(("unk_token", "pad_token", "mask_token", "cls_token", "sep_token"),
                            SPECIALS))
        files = {
            "tokenizer.json": basic_english_pipeline(self.itos).to_str(),
            "tokenizer_config.json": json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
                "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
                "clean_up_tokenization_spaces": False, **specials}, indent=2),
            "special_tokens_map.json": json.dumps(specials, indent=2),
        }
        for name, text in files.items():
            (Path(folder) / name).write_text(text, encoding="utf-8")
        return list(files)

    def state(self):
        """What a checkpoint stores beside the word list to rebuild the tokenizer."""
        return {"kind": self.kind}

    @classmethod
    def build(cls, counter, min_freq=1, of_a_train_split=False):
        """Words with count >= min_freq, most frequent first (ties alphabetical). A train
        split's (`of_a_train_split`) must keep a word, or every token would be <unk>: a
        DataError then, raised before its ids are written anywhere."""
        words = sorted(
            (w for w, c in counter.items() if c >= min_freq and w not in SPECIALS),
            key=lambda w: (-counter[w], w),
        )
        if of_a_train_split and not words:
            raise DataError(f"--min-freq {min_freq}: no word of the train split is seen that "
                            "often; every token would be <unk>")
        return cls(list(SPECIALS) + words)


# BERT's special tokens, as every published BERT vocabulary spells them.
WORDPIECE_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]",
                      "mask": "[MASK]"}


def basic_english_pipeline(itos):
    """basic_english as a `tokenizers` Tokenizer, for transformers: the same substitutions
    as normalize_text, a split on white space, a word-level vocabulary, and the pairs as
    our QA windows hold them (<cls> A <sep> B <sep>, token types 0 then 1). The same ids as
    Vocab.encode on ordinary text; they differ only on rare Unicode (Rust's lower case
    has no Greek final sigma, and str.split also splits at the control characters U+001C
    to U+001F)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(itos)}, unk_token=SPECIALS[0]))
    steps = [normalizers.Lowercase(), normalizers.Replace('"', ""), normalizers.Replace("<br />", " ")]
    steps += [normalizers.Replace(char, f" {char} ") for char in _OWN_TOKENS]
    steps += [normalizers.Replace(";", " "), normalizers.Replace(":", " ")]
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIALS))
    cls, sep = SPECIALS[CLS_ID], SPECIALS[SEP_ID]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, CLS_ID), (sep, SEP_ID)])
    return tokenizer


def basic_english_words(tokenizer_json):
    """The word list of a tokenizer.json that is basic_english_pipeline's (convert.py's
    export of a basic_english model), else None."""
    vocab = tokenizer_json.get("model", {}).get("vocab")
    if tokenizer_json.get("model", {}).get("type") != "WordLevel" or not isinstance(vocab, dict):
        return None
    itos = sorted(vocab, key=vocab.get)
    if [vocab[word] for word in itos] != list(range(len(itos))) or tuple(itos[:5]) != SPECIALS:
        return None
    ours = json.loads(basic_english_pipeline(SPECIALS).to_str())
    same = all(tokenizer_json.get(part) == ours[part] for part in ("normalizer", "pre_tokenizer"))
    return itos if same else None

class WordPiece:
    """BERT's WordPiece tokenizer (the `tokenizers` library's, as transformers'
    BertTokenizerFast runs it), with the interface of Vocab. Built from the content of a
    tokenizer.json, which checkpoints store, so that every script tokenizes alike."""

    kind = "wordpiece"

    def __init__(self, tokenizer_json):
        from tokenizers import Tokenizer

        self.json = tokenizer_json
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the library raises a plain Exception for bad JSON
            raise ValueError(f"not a tokenizer.json ({' '.join(str(e).split())[:100]})") from None
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
            if basic_english_words(json.loads(text)) is not None:
                return Vocab(basic_english_words(json.loads(text)))
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
    """The tokenizer a checkpoint of this project stores (see bertkit/checkpoint.py)."""
    return tokenizer_from_state(ckpt["vocab"], ckpt.get("tokenizer"))


def save_vocab(vocab, path, **meta):
    """Plain data (a list of str and dicts), loadable with torch.load(weights_only=True)."""
    atomic_save({"itos": vocab.itos, "tokenizer": vocab.state(), "meta": meta}, path)


def load_vocab(path):
    """Returns (vocab, meta). Raises DataError with a clear message if unusable."""
    problem = f"{path} is not a vocab file written by this project"
    try:
        obj = load_torch(path)
    except FileNotFoundError:
        raise
    except Exception:  # torch.load's own message is a page of advice that does not apply
        raise DataError(f"{problem} (torch.load cannot read it)") from None
    try:
        return tokenizer_from_state(obj["itos"], obj.get("tokenizer")), dict(obj.get("meta", {}))
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise DataError(f"{problem} ({type(e).__name__}: {e})") from None


###############################################################################
# Which tokenizer a run uses
###############################################################################


@dataclass
class TokenizerSpec:
    """The tokenizer of a new model: --tokenizer, --vocab-size and --min-freq."""

    # basic_english (the old example's words), wordpiece (learned from the train split), or
    # the path of a BERT vocab.txt, a tokenizer.json or a transformers model folder.
    tokenizer: str = "basic_english"
    vocab_size: int = 30522  # wordpiece: tokens learned
    min_freq: int = 1  # basic_english: words seen fewer times become <unk>

    RULES: ClassVar = {
        "vocab_size": (lambda x: 6 <= x <= 2**31 - 1, "must be at least 6"),
        "min_freq": (utils.at_least(1), "must be at least 1"),
    }

    def __post_init__(self):
        self.tokenizer = self.tokenizer or "basic_english"
        utils.check_rules(self, self.RULES)

    @property
    def learned(self):
        """Whether the vocabulary is learned from the train split (else read from a file)."""
        return self.tokenizer in ("basic_english", "wordpiece")

    def meta(self, dataset):
        """What a saved vocab file must have been built from to be reused."""
        if self.tokenizer == "basic_english":
            return {"dataset": dataset, "min_freq": self.min_freq}
        return {"dataset": dataset, "tokenizer": self.tokenizer, "vocab_size": self.vocab_size}


def choose_vocab(spec, dataset, vocab_path, train_text, log=print):
    """The tokenizer of a new model: the file spec.tokenizer names; else the vocab at
    `vocab_path` when it was built from the same `dataset` with the same settings; else
    one learned from the train split (`train_text`: corpus.TrainText), saved at
    `vocab_path`."""
    if not spec.learned:
        return load_tokenizer(spec.tokenizer)
    meta = spec.meta(dataset)
    vocab = _saved_vocab(vocab_path, meta, log)
    if vocab is not None:
        return vocab
    if spec.tokenizer == "basic_english":
        # Vocab.build refuses a train split whose words are all too rare.
        vocab = train_text.count_words(spec.min_freq)
        log(f"built a vocab of {len(vocab)} words from the train split (min_freq {spec.min_freq})")
    else:
        vocab = train_wordpiece(train_text.sample_lines(), spec.vocab_size)
        if len(vocab) < spec.vocab_size:
            # WordPiece merges pieces until --vocab-size or until no pair is left to merge.
            log(f"trained a WordPiece vocabulary of {len(vocab)} tokens on the train split, "
                f"fewer than --vocab-size {spec.vocab_size}: its text has no more pieces to "
                "merge (every word it holds is already one token); more text gives more")
        else:
            log(f"trained a WordPiece vocabulary of {len(vocab)} tokens on the train split")
    if vocab_path:
        save_vocab(vocab, vocab_path, **meta)
    return vocab


def _saved_vocab(vocab_path, meta, log):
    """The vocab at vocab_path if it was built for `meta` (dataset, min_freq), else None."""
    if not vocab_path or not os.path.exists(vocab_path):
        return None
    vocab, saved_meta = load_vocab(vocab_path)
    if saved_meta != meta:
        log(f"{vocab_path} was built for {saved_meta}, not {meta}: rebuilding it")
        return None
    log(f"using vocab {vocab_path} ({len(vocab)} words)")
    return vocab
