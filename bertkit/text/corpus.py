"""Datasets on disk to token ids: download, split, tokenize in parallel, cache.

load_splits is what the scripts call: it finds a dataset's files (downloading them if
needed; .txt, .jsonl and their .gz), cuts them into train/valid/test byte ranges,
tokenizes them with a tokenizer of bertkit/text/tokenizer.py in worker processes (learning its
vocabulary from the train split when tokenizer.choose_vocab asks), and writes the token
ids to a cache file beside the data as they come, so memory does not grow with the corpus
and a second run only maps the file. Batches are data.py's.
"""

import hashlib
import http.client
import os
import random
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bertkit.files import DataError
from bertkit.text.token_ids import (
    CACHE_VERSION,
    TEXT_SUFFIXES,
    IdFile,
    Spool,
    count_and_numericalize,
    count_then_remap,
    is_gzip,
    numericalize,
    numericalize_into,
    read_id_file,
    sample_lines,
)
from bertkit.text.tokenizer import TokenizerSpec, choose_vocab
from bertkit.training import logs
from data import SPLITS

###############################################################################
# Datasets: where the files are, how to download them
###############################################################################


@dataclass
class Archive:
    filename: str
    md5: str  # "" when only a SHA-256 is published
    urls: tuple  # tried in order
    extract_to: str = ""  # folder under --data-dir the archive members are relative to
    sha256: str = ""  # checked instead of the MD5 when given

    @property
    def checksum(self):
        """(name, hashlib algorithm, expected hex digest) of the check a download passes."""
        return ("SHA-256", "sha256", self.sha256) if self.sha256 else ("MD5", "md5", self.md5)


@dataclass
class DatasetSpec:
    folder: str  # under --data-dir
    splits: dict  # split -> file names inside folder (None: split files by seed)
    archive: Archive = None
    split_by: str = "files"  # how to make train/valid/test when there are no split files


DATASETS = {
    "WikiText2": DatasetSpec(
        "wikitext-2",
        {s: [f"wiki.{s}.tokens"] for s in ("train", "valid", "test")},
        Archive(
            "wikitext-2-v1.zip",
            "542ccefacc6c27f945fb54453812b3cd",
            (
                "https://wikitext.smerity.com/wikitext-2-v1.zip",
                "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
            ),
        ),
    ),
    "WikiText103": DatasetSpec(
        "wikitext-103",
        {s: [f"wiki.{s}.tokens"] for s in ("train", "valid", "test")},
        Archive(
            "wikitext-103-v1.zip",
            "9ddaacaf6af0710eda8c456decff7832",
            (
                "https://wikitext.smerity.com/wikitext-103-v1.zip",
                "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
            ),
        ),
    ),
    # One file of 13M lines; split by lines 80/10/10 as the old example did.
    "EnWik9": DatasetSpec(
        "enwik9",
        None,
        Archive(
            "enwik9.zip",
            "3e773f8a1577fda2e27f871ca17f31fd",
            ("http://mattmahoney.net/dc/enwik9.zip",),
            extract_to="enwik9",
        ),
        split_by="lines",
    ),
    "BookCorpus": DatasetSpec("bookcorpus", None),
}



def download_archive(archive, data_dir, log=print, expected=()):
    """Fetch `archive` into data_dir, verify its checksum (MD5, or SHA-256 where that is
    what is published), extract it and remove it if a zip.

    Hosts are tried in order. The download goes to a temporary name and is only renamed
    once the checksum matches; a failure leaves nothing behind, not even the folders it
    made. An archive already in data_dir (placed there by hand to work offline) is used
    as is if its checksum matches. `expected`: the files the archive provides, named in the
    error as the other way to work offline."""
    data_dir = Path(data_dir)
    made = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / archive.filename
    name, algorithm, expected_digest = archive.checksum
    if target.exists():
        if _digest(target, algorithm) != expected_digest:
            raise DataError(f"{target} does not have the {name} {expected_digest} of "
                            f"{archive.filename}: remove it, or replace it with a good copy")
        log(f"using {target}")
    else:
        try:
            _download(archive, target, log, expected)
        except BaseException:
            for folder in made:  # deepest first; stops at the first that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise
    if not archive.filename.endswith(".zip"):
        return  # a plain file (SQuAD's JSON) is used as downloaded
    try:
        safe_extract(target, data_dir / archive.extract_to)
    finally:
        target.unlink()


def _digest(path, algorithm="md5"):
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(archive, target, log, expected=()):
    name, algorithm, expected_digest = archive.checksum
    errors = []
    for url in archive.urls:
        log(f"downloading {url}")
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{archive.filename}.", suffix=".part")
        try:
            digest = hashlib.new(algorithm)
            with (os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response,
                  logs.progress(total=response.length, unit="B", unit_scale=True,
                                 desc=archive.filename) as bar):
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != expected_digest:
                raise DataError(f"{name} mismatch (got {digest.hexdigest()}, "
                                f"expected {expected_digest})")
            os.replace(tmp, target)
            return
        # OSError covers URLError, HTTPError and timeouts; HTTPException a cut connection
        # (IncompleteRead); ValueError a malformed URL.
        except (OSError, http.client.HTTPException, ValueError, DataError) as e:
            errors.append(f"{url}: {e}")
            log(f"download failed: {url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    extracted = f", or its files ({', '.join(map(str, expected))})" if expected else ""
    raise DataError(
        f"could not download {archive.filename} ({'; '.join(errors)}); to work offline, "
        f"place {archive.filename} ({name} {expected_digest}) in {target.parent}/{extracted}, "
        "and run again"
    )


def safe_extract(zip_path, dest):
    """Extract a zip, refusing any member whose path would land outside `dest`."""
    dest = Path(dest).resolve()
    with zipfile.ZipFile(zip_path) as zf:
        members = zf.infolist()
        for member in members:
            path = (dest / member.filename).resolve()
            if not path.is_relative_to(dest):
                raise DataError(f"refusing to extract {member.filename!r} from {zip_path}: "
                                f"it would be written outside {dest}")
        for member in members:
            zf.extract(member, dest)


def dataset_name(name):
    """--dataset as the scripts know it: a dataset's name in any case (wikitext2 is
    WikiText2), unless a folder of that very name exists; anything else as given."""
    if name in DATASETS or os.path.isdir(name):
        return name
    return {known.lower(): known for known in DATASETS}.get(name.lower(), name)


def dataset_files(dataset, data_dir, download=True, log=print):
    """Returns {split: [paths]} for a dataset name (any case) or a folder of text files.

    When all three splits get the same list (EnWik9, a folder without split files), the
    splits are cut from its text: see dataset_ranges."""
    dataset = dataset_name(dataset)
    if dataset in DATASETS:
        spec = DATASETS[dataset]
        folder = Path(data_dir) / spec.folder
    elif os.path.isdir(dataset):
        spec, folder = DatasetSpec("", None), Path(dataset)
    else:
        names = ", ".join(DATASETS)
        raise DataError(f"unknown --dataset {dataset!r}: use one of {names} or a folder of text files")

    if spec.splits is not None:
        files = {s: [folder / f for f in names] for s, names in spec.splits.items()}
        every = [p for paths in files.values() for p in paths]
        missing = [p for p in every if not p.exists()]
        # Download only when none is there: a partial folder is a mistake to name, not to
        # paper over with a download.
        if len(missing) == len(every) and download and spec.archive is not None:
            download_archive(spec.archive, data_dir, log, expected=missing)
            missing = [p for p in missing if not p.exists()]
        if missing:
            raise DataError(f"missing {', '.join(map(str, missing))} (the other files of "
                            f"{dataset} are in {folder})" if len(missing) < len(every)
                            else f"missing {', '.join(map(str, missing))}")
        return files

    if spec.archive is not None and not folder.exists() and download:
        download_archive(spec.archive, data_dir, log, expected=[folder])
    if not folder.is_dir():
        raise DataError(f"dataset folder {folder} does not exist (put the {dataset} text files there)")
    # A folder with wiki.{split}.tokens or {split}.txt (...) files uses them as the splits.
    for pattern in ("wiki.{}.tokens", *(f"{{}}{suffix}" for suffix in TEXT_SUFFIXES)):
        if all((folder / pattern.format(s)).is_file() for s in SPLITS):
            return {s: [folder / pattern.format(s)] for s in SPLITS}
    # Hidden files and folders are skipped: among them .cache/, where the token ids go.
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and
                   not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if spec.split_by == "files":
        paths = [p for p in paths if p.name.endswith(TEXT_SUFFIXES)] or paths
    if not paths:
        raise DataError(f"no text files in {folder}")
    if spec.split_by == "files" and len(paths) >= 20:
        # BookCorpus and large folders: files in an order fixed by a seed, so that the
        # held-out text at the end is not the last books of the alphabet.
        random.Random(1000).shuffle(paths)
    return {s: paths for s in SPLITS}  # split by bytes, below


def dataset_inputs(dataset, data_dir):
    """{what: path} of what a run reads of `dataset`, downloaded or not, for the output
    checks before the run (checks.prepare_run's also_read): the split files of a named
    dataset and the token-id cache folder beside them (load_splits), or the dataset's
    folder, cache included. Nothing for an unknown name (load_splits says so)."""
    spec = DATASETS.get(dataset)
    if spec is None:
        return {"--dataset": dataset} if os.path.isdir(dataset) else {}
    folder = Path(data_dir) / spec.folder
    if spec.splits is None:
        return {f"--dataset {dataset}": str(folder)}
    inputs = {f"--dataset {dataset}'s {split} file": str(folder / name)
              for split, names in spec.splits.items() for name in names}
    inputs[f"the token-id cache of --dataset {dataset}"] = str(folder / ".cache")
    return inputs


# The most text a folder dataset (and BookCorpus) holds out for each of valid and test,
# else 10% of it. A held-out set is only there to measure the loss: 8 MB is about 1.5M
# tokens, where the mean loss is already stable to far below the differences worth
# reading, and evaluating it takes seconds. 10% of a large corpus would cost minutes at
# every evaluation and take text away from training for nothing.
HELD_OUT_MAX_BYTES = 8 << 20


def dataset_ranges(dataset, data_dir, download=True, log=print):
    """{split: [(path, start, end)]}: the byte ranges each split of `dataset` reads.

    Split files (WikiText) are read whole; EnWik9 keeps the old example's 80/10/10 of its
    lines (split_byte_ranges); a folder of text files (or BookCorpus) holds out a bounded
    valid and test set from the end of its text (held_out_ranges)."""
    files = dataset_files(dataset, data_dir, download, log)
    spec = DATASETS.get(dataset_name(dataset), DatasetSpec("", None))
    if files["train"] == files["valid"] == files["test"] and spec.split_by == "files":
        return held_out_ranges(files["train"], HELD_OUT_MAX_BYTES)
    return split_byte_ranges(files)


def split_byte_ranges(files_by_split):
    """{split: [(path, start, end)]}: the byte ranges of the files each split reads.

    When all splits share the same files (EnWik9) they take the first 80%, the next 10%
    and the last 10% of the text, cut at line boundaries (a .gz file is never cut: see
    _line_boundary)."""
    if not (files_by_split["train"] == files_by_split["valid"] == files_by_split["test"]):
        return {s: [(str(p), 0, _file_size(p)) for p in paths] for s, paths in files_by_split.items()}
    paths = files_by_split["train"]
    sizes = [_file_size(p) for p in paths]
    total = sum(sizes)
    return _cut(paths, sizes, [0, _line_boundary(paths, sizes, total * 8 // 10),
                               _line_boundary(paths, sizes, total * 9 // 10), total])


def held_out_ranges(paths, max_bytes=HELD_OUT_MAX_BYTES):
    """Like split_byte_ranges of shared files, but valid and test are each the smaller of
    10% of the text and `max_bytes`, cut at line boundaries: test the last bytes, valid
    the ones before, train all the rest. The cuts are bytes, not whole files, so that the
    bound holds for a folder of a few huge files too (one file may straddle train and
    valid). .gz files count their compressed bytes and are never cut: a held-out set ends
    up with the whole .gz files that fit in the bound, or with one if none fits."""
    sizes = [_file_size(p) for p in paths]
    total = sum(sizes)
    held_out = min(total // 10, max_bytes)
    test_start = _held_out_cut(paths, sizes, total - held_out, total)
    valid_start = _held_out_cut(paths, sizes, max(test_start - held_out, 0), test_start)
    if valid_start == 0 < held_out:
        raise DataError(f"cannot hold out valid and test text from {', '.join(map(str, paths))}: "
                        "a .gz file is never cut (it cannot be read from the middle), so valid "
                        "and test are whole files and none would be left to train on; split "
                        "the text into more files, or name them train, valid and test")
    return _cut(paths, sizes, [0, valid_start, test_start, total])


def _held_out_cut(paths, sizes, position, stop):
    """The start of a held-out set that ends at `stop`: the line start at or after
    `position`; inside a .gz file, the file's end, or its start if the set would be empty."""
    cut = _line_boundary(paths, sizes, position, gz_to_end=True)
    return cut if cut < stop else _line_boundary(paths, sizes, position)


def _cut(paths, sizes, cuts):
    """{split: ranges} of the concatenated files, split at the positions `cuts`."""
    ranges = {}
    for split, lo, hi in zip(("train", "valid", "test"), cuts, cuts[1:]):
        ranges[split], offset = [], 0
        for p, size in zip(paths, sizes):
            a, b = max(lo - offset, 0), min(hi - offset, size)
            if a < b:
                ranges[split].append((str(p), a, b))
            offset += size
    return ranges


def _file_size(path):
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _line_boundary(paths, sizes, position, gz_to_end=False):
    """The first line start at or after `position` in the concatenation of `paths`; in
    a .gz file, which has no line starts one can seek to, the file's start (or end)."""
    offset = 0
    for p, size in zip(paths, sizes):
        if position < offset + size:
            if is_gzip(p):
                return offset + size if gz_to_end and position > offset else offset
            with open(p, "rb") as f:
                f.seek(position - offset)
                if position > offset:
                    f.seek(position - offset - 1)
                    f.readline()
                return offset + f.tell()
        offset += size
    return offset


###############################################################################
# The cache beside the data
###############################################################################


def _cache_path(ranges, vocab, split, cache_dir):
    h = hashlib.sha1(f"{CACHE_VERSION}\n{vocab.fingerprint()}".encode())
    for path, start, end in ranges:
        st = os.stat(path)
        h.update(f"\n{os.path.abspath(path)}\t{start}\t{end}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return Path(cache_dir) / f"{split}.{h.hexdigest()[:16]}.ids"


def _load_cache(path):
    """The cached split, or None if there is none or it is unreadable (it is rebuilt)."""
    if not path.exists():
        return None
    try:
        return read_id_file(path)
    except Exception:  # a truncated or foreign file: tokenizing again is always correct
        return None


def _on_disk_or_in_memory(on_disk, in_memory, cache_dir, log):
    """on_disk(), or in_memory() if the cache cannot be written: a read-only data folder
    still works, only without a cache (and with memory for all the ids)."""
    try:
        return on_disk()
    except OSError as e:
        log(f"could not write the token cache in {cache_dir}: {e}; tokenizing in memory")
        return in_memory()


def _numericalize_cached(ranges, vocab, split, cache_dir, workers=None, log=print):
    """The split's ids from its cache file, else tokenized into a new one."""
    if cache_dir is None:
        return numericalize(ranges, vocab, workers)
    cache = _cache_path(ranges, vocab, split, cache_dir)
    cached = _load_cache(cache)
    if cached is not None:
        return cached

    def on_disk():
        with IdFile(cache) as sink:
            return numericalize_into(ranges, vocab, workers, sink)

    return _on_disk_or_in_memory(on_disk, lambda: numericalize(ranges, vocab, workers),
                                 cache_dir, log)


def _count_and_numericalize_cached(ranges, min_freq, cache_dir, workers=None, log=print):
    """count_and_numericalize of the train split, written to its cache file as it goes."""
    if cache_dir is None:
        return count_and_numericalize(ranges, min_freq, workers)

    def on_disk():
        return count_then_remap(ranges, min_freq, workers, Spool(cache_dir), lambda vocab:
                                 IdFile(_cache_path(ranges, vocab, "train", cache_dir)))

    return _on_disk_or_in_memory(on_disk, lambda: count_and_numericalize(ranges, min_freq, workers),
                                 cache_dir, log)


class TrainText:
    """The train split's text, for tokenizer.choose_vocab to learn a vocabulary from."""

    def __init__(self, ranges, cache_dir, workers, log, splits):
        self.ranges, self.cache_dir, self.workers, self.log = ranges, cache_dir, workers, log
        self.splits = splits  # where count_words leaves the split's ids

    def count_words(self, min_freq):
        """basic_english's vocabulary of the words seen min_freq times, the split's ids
        numericalized in the same tokenization (and cached)."""
        vocab, self.splits["train"] = _count_and_numericalize_cached(
            self.ranges, min_freq, self.cache_dir, self.workers, self.log)
        return vocab

    def sample_lines(self):
        """Lines from chunks spread evenly over the split (at most WORDPIECE_SAMPLE_BYTES)."""
        return sample_lines(self.ranges)


def load_splits(dataset, data_dir, vocab=None, spec=None, vocab_path=None, log=print,
                workers=None):
    """Returns (vocab, {split: TokenizedSplit}) for `dataset`.

    The vocab (the tokenizer) is `vocab` if given, else tokenizer.choose_vocab's for
    `spec` (a TokenizerSpec; default basic_english), learned from the train split when it
    must be. Token ids are cached beside the data in `.cache/`, keyed by the tokenizer and
    the files' sizes and mtimes, so a second run skips tokenization; the splits' ids are
    mapped from those files."""
    dataset = dataset_name(dataset)
    ranges = dataset_ranges(dataset, data_dir, log=log)
    cache_dir = Path(ranges["train"][0][0]).parent / ".cache" if ranges["train"] else None
    splits = {}
    if vocab is None:
        name = dataset if dataset in DATASETS else os.path.abspath(dataset)
        vocab = choose_vocab(spec or TokenizerSpec(), name, vocab_path,
                             TrainText(ranges["train"], cache_dir, workers, log, splits), log)
    for split in SPLITS:
        if split not in splits:
            splits[split] = _numericalize_cached(ranges[split], vocab, split, cache_dir, workers, log)
    return vocab, splits
