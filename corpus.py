"""Datasets on disk to token ids: download, split, tokenize in parallel, cache.

load_splits is what the scripts call: it finds a dataset's files (downloading them if
needed; .txt, .jsonl and their .gz), cuts them into train/valid/test byte ranges,
tokenizes them with a tokenizer of tokenizer.py in worker processes (learning its
vocabulary from the train split when tokenizer.choose_vocab asks), and writes the token
ids to a cache file beside the data as they come, so memory does not grow with the corpus
and a second run only maps the file. Batches are data.py's.
"""

import contextlib
import gzip
import hashlib
import http.client
import json
import operator
import os
import random
import shutil
import struct
import tempfile
import urllib.request
import zipfile
import zlib
from array import array
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import logs
import utils
from data import SPLITS, TokenizedSplit
from files import DataError
from tokenizer import UNK_ID, TokenizerSpec, Vocab, choose_vocab, normalize_text, train_wordpiece

###############################################################################
# Datasets: where the files are, how to download them
###############################################################################


@dataclass
class Archive:
    filename: str
    md5: str
    urls: tuple  # tried in order
    extract_to: str = ""  # folder under --data-dir the archive members are relative to


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
    """Fetch `archive` into data_dir, verify its MD5, extract it and remove it if a zip.

    Hosts are tried in order. The download goes to a temporary name and is only renamed
    once the checksum matches; a failure leaves nothing behind, not even the folders it
    made. An archive already in data_dir (placed there by hand to work offline) is used
    as is if its MD5 matches. `expected`: the files the archive provides, named in the
    error as the other way to work offline."""
    data_dir = Path(data_dir)
    made = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / archive.filename
    if target.exists():
        if _md5(target) != archive.md5:
            raise DataError(f"{target} does not have the MD5 {archive.md5} of {archive.filename}: "
                            f"remove it, or replace it with a good copy")
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


def _md5(path):
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            md5.update(chunk)
    return md5.hexdigest()


def _download(archive, target, log, expected=()):
    errors = []
    for url in archive.urls:
        log(f"downloading {url}")
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{archive.filename}.", suffix=".part")
        try:
            md5 = hashlib.md5()
            with (os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response,
                  logs.progress(total=response.length, unit="B", unit_scale=True,
                                 desc=archive.filename) as bar):
                while chunk := response.read(1 << 20):
                    md5.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
            if md5.hexdigest() != archive.md5:
                raise DataError(f"MD5 mismatch (got {md5.hexdigest()}, expected {archive.md5})")
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
        f"place {archive.filename} (MD5 {archive.md5}) in {target.parent}/{extracted}, "
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


# What a folder's text files may be. Plain text is cut into byte ranges that workers read
# on their own; a .jsonl file has one JSON object a line whose "text" holds the lines;
# .gz versions of both are decompressed as a stream (see _gz_chunks).
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")


def _is_gzip(path):
    return str(path).endswith(".gz")


def _is_jsonl(path):
    return str(path).removesuffix(".gz").endswith(".jsonl")


def dataset_files(dataset, data_dir, download=True, log=print):
    """Returns {split: [paths]} for a dataset name or a folder of text files.

    When all three splits get the same list (EnWik9, a folder without split files), the
    splits are cut from its text: see dataset_ranges."""
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
    spec = DATASETS.get(dataset, DatasetSpec("", None))
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
            if _is_gzip(p):
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
# Token ids, cached
###############################################################################

CACHE_VERSION = 2  # bump when tokenization changes (the tokenizer itself is in the key)
# Text one worker tokenizes at a time. Bounds a worker's memory (its word list takes about
# 12x the chunk's bytes) and is small enough that 2-8 workers get an even share of a corpus.
_CHUNK_BYTES = 4 << 20
# Ends each line in a chunk's token stream. The tokenizer never outputs ';' (it is a
# separator), so a whole chunk can be split in one call and its lines found again after.
_LINE_END = ";"


class _Chunk(NamedTuple):
    """Lines of one file to tokenize: bytes [start, end) of it, which the worker reads
    itself, or for a .gz file `payload`, the decompressed bytes the main process read
    (start, end: their place in the decompressed text)."""

    path: str
    start: int
    end: int
    payload: bytes = None
    first_line: int = None  # for a payload: the line number of its first line
    file_bytes: int = 0  # bytes of the file on disk it stands for: the progress bar's unit


def _chunks(ranges, chunk_bytes=None):
    """Cut byte ranges of plain files into (path, start, end) pieces of about chunk_bytes
    that end on line boundaries."""
    chunk_bytes = chunk_bytes or _CHUNK_BYTES
    jobs = []
    for path, start, end in ranges:
        try:
            with open(path, "rb") as f:
                while start < end:
                    f.seek(min(start + chunk_bytes, end))
                    if f.tell() < end:
                        f.readline()
                    stop = min(f.tell(), end)
                    jobs.append((path, start, stop))
                    start = stop
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
    return jobs


def _jobs(ranges):
    """The _Chunks of `ranges`, made as they are needed: the main process decompresses a
    .gz file only as fast as the workers take its pieces."""
    for path, start, end in ranges:
        if _is_gzip(path):
            yield from _gz_chunks(path)
        else:
            for chunk in _chunks([(path, start, end)]):
                yield _Chunk(*chunk, file_bytes=chunk[2] - chunk[1])


def _gz_chunks(path):
    """A .gz file's chunks, decompressed here as one stream. A gzip stream cannot be
    entered in the middle, so workers cannot each seek to their part; decompressing
    (hundreds of MB/s) is far faster than tokenizing, so one process keeps up with all the
    workers, and a file of any size is read in pieces of _CHUNK_BYTES."""
    position, line, consumed = 0, 1, 0
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as f:
            while piece := f.read(_CHUNK_BYTES):
                piece += f.readline()
                yield _Chunk(path, position, position + len(piece), piece, line,
                             raw.tell() - consumed)
                position, line, consumed = position + len(piece), line + piece.count(b"\n"), raw.tell()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path} is not a readable gzip file ({e})") from None


def _read_bytes(path, start, end):
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


def _decode(raw, path, start, compressed=False):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        where = " of its decompressed text" if compressed else ""
        raise DataError(f"{path} is not UTF-8 text (byte {start + e.start}{where})") from None


def _read_text(path, start, end):
    return _decode(_read_bytes(path, start, end), path, start)


def _job_text(job):
    """A chunk's text as lines, as a .txt file would hold them."""
    raw = job.payload if job.payload is not None else _read_bytes(job.path, job.start, job.end)
    if _is_jsonl(job.path):
        return _jsonl_text(raw, job)
    return _decode(raw, job.path, job.start, compressed=job.payload is not None)


def _jsonl_text(raw, job):
    """The lines of the "text" of each record: a record's line breaks are line breaks.
    Blank lines between records are skipped; anything else that is not a JSON object with
    a "text" string is a DataError naming the line."""
    lines = []
    for i, record in enumerate(raw.split(b"\n")):  # JSON lines end at \n only
        if not record.strip():
            continue
        try:
            obj = json.loads(record)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise DataError(f"{job.path}, line {_line_number(job, i)}: not JSON "
                            f"({getattr(e, 'msg', e)})") from None
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{job.path}, line {_line_number(job, i)}: no \"text\" string "
                            "(each line must be a JSON object with one)")
        lines.extend(text.splitlines())
    return "".join(line + "\n" for line in lines)


def _line_number(job, index):
    """The 1-based line number in its file of the chunk's line `index`. Counting the lines
    before a chunk is only done for an error message."""
    if job.first_line is not None:
        return job.first_line + index
    before = 0
    with open(job.path, "rb") as f:
        for block in iter(lambda: f.read(min(1 << 20, job.start - f.tell())), b""):
            before += block.count(b"\n")
    return before + index + 1


def _chunk_words(job):
    """The tokens of a chunk's lines (str.splitlines), each line followed by _LINE_END.

    Normalizing the whole chunk at once equals normalizing line by line: no substitution
    adds, removes or reaches across a line break."""
    lines = normalize_text(_job_text(job)).splitlines()
    lines.append("")
    return f" {_LINE_END} ".join(lines).split()


class _Lookup(dict):
    """word -> id, <unk> for any other word, -1 for _LINE_END."""

    def __missing__(self, word):
        return UNK_ID


def _lookup_ids(index, words):
    """array("i", [index[w] for w in words]) at C speed: one itemgetter call does every
    lookup (for a single word it returns the bare value, not a tuple)."""
    if len(words) < 2:
        return array("i", [index[w] for w in words])
    return array("i", operator.itemgetter(*words)(index))


# Worker functions use no torch: torch ops in a forked worker can deadlock on the thread
# pool the parent process already started.
_worker_lookup = None


def _set_worker_vocab(itos):
    global _worker_lookup
    _worker_lookup = _Lookup(zip(itos, range(len(itos))))
    _worker_lookup[_LINE_END] = -1


def _numericalize_chunk(job):
    """(int32 token ids, tokens per line) of a chunk."""
    return _split_line_ends(_lookup_ids(_worker_lookup, _chunk_words(job))) + (None,)


def _count_chunk(job):
    """Ids in a vocabulary of the chunk's own words, tokens per line, and those words. The
    main process counts them and maps them to the real vocab once every count is in, so
    the train split is tokenized once for both counting and numericalizing."""
    words = _chunk_words(job)
    own_words = dict.fromkeys(words)
    own_words.pop(_LINE_END, None)
    index = dict(zip(own_words, range(len(own_words))))
    index[_LINE_END] = -1
    return _split_line_ends(_lookup_ids(index, words)) + (list(own_words),)


def _split_line_ends(int32_array):
    """(ids without the -1 line ends, tokens per line), as numpy arrays. Done in the
    workers (numpy, not torch: see above), so the main process only writes them."""
    ids = np.frombuffer(int32_array, dtype=np.int32)
    line_ends = np.flatnonzero(ids < 0)
    return ids[ids >= 0], np.diff(line_ends, prepend=-1) - 1


@contextlib.contextmanager
def _one_torch_thread():
    """For the main process' small torch ops between chunks: torch's other threads would
    spin on the cores the tokenizing workers need."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _map_chunks(fn, jobs, workers, initializer=None, initargs=()):
    """Yields fn(job) for each job in order, from worker processes when there are several
    jobs. A generator, so the caller handles each chunk while the workers tokenize the
    next; at most 2 jobs a worker are in flight (not Executor.map, which takes every job
    at once), so neither the jobs' payloads nor unread results pile up in memory."""
    jobs = iter(jobs)
    first = list(islice(jobs, 2))
    if workers <= 1 or len(first) <= 1:
        if initializer:
            initializer(*initargs)
        yield from map(fn, chain(first, jobs))
        return
    with ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs) as pool:
        try:
            pending = deque(pool.submit(fn, job) for job in chain(first, islice(jobs, 2 * workers - 2)))
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(fn, job) for job in islice(jobs, 1))
                yield result
        except BaseException:
            pool.shutdown(cancel_futures=True)  # report a bad file now, not after the rest
            raise


def _tokenize_chunks(fn, ranges, workers, initializer=None, initargs=()):
    """fn(chunk) for each chunk of `ranges`, in order, under a bar counting file bytes."""
    sizes = deque()

    def counted(jobs):
        for job in jobs:
            sizes.append(job.file_bytes)
            yield job

    total = sum(end - start for _, start, end in ranges)
    with (logs.progress(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar,
          _one_torch_thread()):
        for result in _map_chunks(fn, counted(_jobs(ranges)), workers or default_workers(),
                                  initializer=initializer, initargs=initargs):
            yield result
            bar.update(sizes.popleft())


def default_workers():
    return min(utils.available_cpus(), 8)


def _tokenized_split(ids, lengths):
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return TokenizedSplit(ids, offsets)


def _cat(tensors, dtype):
    return torch.cat([torch.empty(0, dtype=dtype)] + tensors)


###############################################################################
# Where the ids go: memory, or a file on disk as they come
###############################################################################


class _MemoryIds:
    """Collects a split's ids and line lengths in memory (no writable cache folder)."""

    def __init__(self):
        self.ids, self.lengths = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def write(self, ids=None, lengths=None):
        """Appends int32 ids and/or int64 tokens-per-line; each may come separately."""
        if ids is not None:
            self.ids.append(ids)
        if lengths is not None:
            self.lengths.append(lengths)

    def finish(self):
        return _tokenized_split(_cat(self.ids, torch.int32), _cat(self.lengths, torch.int64))


# The cache file: this header, the int32 ids, zero padding to 8 bytes, the int64 line
# offsets. A raw layout, so the ids are written as they come and read back through mmap,
# without pickle; the header's counts tell a truncated file from a whole one.
_MAGIC = b"int32ids"
_HEADER = struct.Struct("<8sqq8x")  # magic, number of ids, number of offsets: 32 bytes


def _offsets_at(n_ids):
    return _HEADER.size + -(-4 * n_ids // 8) * 8


class _IdFile:
    """Writes a split's ids to `path` as they come, so memory holds one chunk, not the
    corpus. As files._atomic_write: temporary files in the same folder, fsync, rename;
    a failure or an exception leaves no temporary file and no half-written cache."""

    def __init__(self, path):
        self.path, self.n_ids, self.last_offset, self.files = Path(path), 0, 0, []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.ids_file = self._temp(".tmp")
            self.offsets_file = self._temp(".offsets.tmp")  # appended to the ids at the end
            self.ids_file.write(bytes(_HEADER.size))
            self.offsets_file.write(bytes(8))  # line 0 starts at id 0
        except BaseException:
            self._remove()
            raise

    def _temp(self, suffix):
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=suffix)
        self.files.append((open(fd, "w+b"), name))
        return self.files[-1][0]

    def _remove(self):
        for f, name in self.files:
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)
        self.files = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._remove()  # after finish, only the offsets' temporary file is left

    def write(self, ids=None, lengths=None):
        if ids is not None:
            self.ids_file.write(ids.numpy())
            self.n_ids += len(ids)
        if lengths is not None and len(lengths):
            offsets = torch.cumsum(lengths, 0) + self.last_offset
            self.offsets_file.write(offsets.numpy())
            self.last_offset = int(offsets[-1])

    def finish(self):
        if self.last_offset != self.n_ids:
            raise ValueError(f"{self.n_ids} ids but lines of {self.last_offset}")
        n_offsets = self.offsets_file.tell() // 8
        self.ids_file.write(bytes(_offsets_at(self.n_ids) - self.ids_file.tell()))
        self.offsets_file.seek(0)
        shutil.copyfileobj(self.offsets_file, self.ids_file, 1 << 20)
        self.ids_file.seek(0)
        self.ids_file.write(_HEADER.pack(_MAGIC, self.n_ids, n_offsets))
        self.ids_file.flush()
        os.fsync(self.ids_file.fileno())
        os.chmod(self.files[0][1], 0o666 & ~files.UMASK)  # mkstemp makes 0600 files
        self.ids_file.close()
        os.replace(self.files[0][1], self.path)
        self.files.pop(0)
        return _read_id_file(self.path)


def _read_id_file(path):
    """The TokenizedSplit of a cache file, mapped from disk (its pages are read when
    used); ValueError if the file is not a whole one."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic, n_ids, n_offsets = _HEADER.unpack(f.read(_HEADER.size).ljust(_HEADER.size))
    offsets_at = _offsets_at(n_ids)
    if magic != _MAGIC or n_offsets < 1 or size != offsets_at + 8 * n_offsets:
        raise ValueError(f"{path} is not a whole token cache")
    data = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)

    def part(start, stop, dtype):
        # A tensor on a slice of the mapped storage, not a view of one tensor on all of
        # it: torch's multiprocessing cannot send a storage of from_file itself to
        # DataLoader workers (its file descriptor is closed), but it can a slice of it.
        return torch.empty(0, dtype=torch.uint8).set_(data[start:stop]).view(dtype)

    split = TokenizedSplit(part(_HEADER.size, _HEADER.size + 4 * n_ids, torch.int32),
                           part(offsets_at, size, torch.int64))
    if split.line_offsets[0] != 0 or split.line_offsets[-1] != n_ids:
        raise ValueError(f"{path} is not a whole token cache")
    return split


_SPOOL_BLOCK_IDS = 1 << 22  # ids a read of the spool brings back: 16 MB


class _Spool:
    """int32 ids kept for a second pass over them: in a temporary file in `folder`, or in
    memory when folder is None."""

    def __init__(self, folder=None):
        self.parts, self.file, self.name = [], None, None
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            fd, self.name = tempfile.mkstemp(dir=folder, prefix=".counting.", suffix=".tmp")
            self.file = open(fd, "w+b")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.parts = []
        if self.file is not None:
            self.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.name)

    def write(self, ids):
        if self.file is None:
            self.parts.append(ids)
        else:
            self.file.write(ids.numpy())

    def blocks(self):
        """The ids again, in order, in pieces; each piece is only valid until the next."""
        if self.file is None:
            while self.parts:
                yield self.parts.pop(0)
            return
        self.file.seek(0)
        buffer = torch.empty(_SPOOL_BLOCK_IDS, dtype=torch.int32)
        while n_bytes := self.file.readinto(buffer.numpy()):
            yield buffer[:n_bytes // 4]


###############################################################################
# Tokenizing
###############################################################################


def numericalize(ranges, vocab, workers=None):
    """Tokenize byte ranges of files into a TokenizedSplit of `vocab`'s ids, in memory.

    Workers return compact int32 arrays, so memory stays at about 8 bytes a token (the
    chunks and their concatenation): never a Python list of all token ids. load_splits
    writes to the cache file instead (_numericalize_cached), and holds one chunk."""
    return _numericalize_into(ranges, vocab, workers, _MemoryIds())


def _numericalize_into(ranges, vocab, workers, sink):
    """numericalize, writing each chunk's ids to `sink` (_MemoryIds or _IdFile)."""
    if vocab.kind == "wordpiece":
        return _numericalize_wordpiece(ranges, vocab, sink)
    for chunk_ids, chunk_lengths, _ in _tokenize_chunks(
            _numericalize_chunk, ranges, workers, initializer=_set_worker_vocab,
            initargs=(vocab.itos,)):
        sink.write(torch.from_numpy(chunk_ids), torch.from_numpy(chunk_lengths))
    return sink.finish()


def _numericalize_wordpiece(ranges, tokenizer, sink):
    """numericalize for WordPiece: the tokenizers library encodes each chunk's lines on
    all cores itself (no process pool), and each chunk becomes int32 right away."""
    for job in _jobs(ranges):
        encoded = tokenizer.encode_batch(_job_text(job).splitlines())
        counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        sink.write(torch.from_numpy(np.fromiter(chain.from_iterable(encoded), dtype=np.int32,
                                                count=int(counts.sum()))),
                   torch.from_numpy(counts))
    return sink.finish()


# A WordPiece vocabulary is learned from at most this much of the train split, in chunks
# spread evenly over it: enough text for a 30k vocabulary, in seconds on a laptop.
WORDPIECE_SAMPLE_BYTES = 64 << 20


def _sample_lines(ranges, max_bytes=WORDPIECE_SAMPLE_BYTES):
    """Lines of every step-th chunk (a .gz file is decompressed whole to find its chunks)."""
    total = sum(end - start for _, start, end in ranges)
    step = max(1, -(-total // max_bytes))
    for job in islice(_jobs(ranges), None, None, step):
        yield from _job_text(job).splitlines()


def count_and_numericalize(ranges, min_freq=1, workers=None):
    """Build the vocab from the text of `ranges` and numericalize it, in one tokenization.

    Returns (vocab, TokenizedSplit): the same as Vocab.build of the word counts followed by
    numericalize(ranges, vocab). In memory; load_splits streams to the cache instead
    (_count_and_numericalize_cached)."""
    return _count_then_remap(ranges, min_freq, workers, _Spool(), lambda vocab: _MemoryIds())


def _count_then_remap(ranges, min_freq, workers, spool, make_sink):
    """count_and_numericalize in two passes over ids, one over the text: tokenizing writes
    each word's id in the order words were first seen to `spool` while counting them; once
    the vocab is known, the spool is read back, mapped to the vocab's ids and written to
    make_sink(vocab). Tokenizing twice (count, then numericalize) would hold less, but
    costs a second tokenization; the spool costs a write and a read of 4 bytes a token."""
    with spool:
        words, counts, lengths = _count_into(ranges, workers, spool)
        vocab = Vocab.build(Counter(dict(zip(words, counts.tolist()))), min_freq)
        to_vocab = torch.tensor(vocab.lookup_indices(words), dtype=torch.int32)
        with make_sink(vocab) as sink:
            for block in spool.blocks():
                sink.write(ids=torch.index_select(to_vocab, 0, block))
            for chunk_lengths in lengths:
                sink.write(lengths=chunk_lengths)
            return vocab, sink.finish()


def _count_into(ranges, workers, spool):
    """Tokenize `ranges`, writing ids of the words in the order first seen to `spool`.
    Returns (those words, their counts, each chunk's tokens-per-line). What stays in
    memory grows with the number of distinct words, not with the text."""
    index = {}  # word -> its id in order of first sight
    counts = np.zeros(1 << 16, dtype=np.int64)
    lengths = []
    for own_ids, chunk_lengths, own_words in _tokenize_chunks(_count_chunk, ranges, workers):
        own_ids, chunk_lengths = torch.from_numpy(own_ids), torch.from_numpy(chunk_lengths)
        new_words = [w for w in own_words if w not in index]
        index.update(zip(new_words, range(len(index), len(index) + len(new_words))))
        to_seen = np.frombuffer(_lookup_ids(index, own_words), dtype=np.int32)
        if len(index) > len(counts):
            counts = np.concatenate([counts, np.zeros(len(index) + len(counts), np.int64)])
        # A chunk's own words are distinct, so fancy-index += adds each count once.
        counts[to_seen] += torch.bincount(own_ids, minlength=len(own_words)).numpy()
        spool.write(torch.index_select(torch.from_numpy(to_seen), 0, own_ids))
        lengths.append(chunk_lengths)
    return list(index), counts, lengths


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
        return _read_id_file(path)
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
        with _IdFile(cache) as sink:
            return _numericalize_into(ranges, vocab, workers, sink)

    return _on_disk_or_in_memory(on_disk, lambda: numericalize(ranges, vocab, workers),
                                 cache_dir, log)


def _count_and_numericalize_cached(ranges, min_freq, cache_dir, workers=None, log=print):
    """count_and_numericalize of the train split, written to its cache file as it goes."""
    if cache_dir is None:
        return count_and_numericalize(ranges, min_freq, workers)

    def on_disk():
        return _count_then_remap(ranges, min_freq, workers, _Spool(cache_dir), lambda vocab:
                                 _IdFile(_cache_path(ranges, vocab, "train", cache_dir)))

    return _on_disk_or_in_memory(on_disk, lambda: count_and_numericalize(ranges, min_freq, workers),
                                 cache_dir, log)


def load_splits(dataset, data_dir, vocab=None, spec=None, vocab_path=None, log=print,
                workers=None):
    """Returns (vocab, {split: TokenizedSplit}) for `dataset`.

    The vocab (the tokenizer) is `vocab` if given, else tokenizer.choose_vocab's for
    `spec` (a TokenizerSpec; default basic_english), learned from the train split when it
    must be. Token ids are cached beside the data in `.cache/`, keyed by the tokenizer and
    the files' sizes and mtimes, so a second run skips tokenization; the splits' ids are
    mapped from those files."""
    ranges = dataset_ranges(dataset, data_dir, log=log)
    cache_dir = Path(ranges["train"][0][0]).parent / ".cache" if ranges["train"] else None
    splits = {}
    if vocab is None:
        def learn(spec):
            if spec.tokenizer == "basic_english":
                # Counting and numericalizing in one tokenization of the train split.
                learned, splits["train"] = _count_and_numericalize_cached(
                    ranges["train"], spec.min_freq, cache_dir, workers, log)
                return learned
            return train_wordpiece(_sample_lines(ranges["train"]), spec.vocab_size)

        name = dataset if dataset in DATASETS else os.path.abspath(dataset)
        vocab = choose_vocab(spec or TokenizerSpec(), name, vocab_path, learn, log)
    for split in SPLITS:
        if split not in splits:
            splits[split] = _numericalize_cached(ranges[split], vocab, split, cache_dir, workers, log)
    return vocab, splits
