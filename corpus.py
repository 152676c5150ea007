"""Datasets on disk to token ids: download, split, tokenize in parallel, cache.

load_splits is what the scripts call: it finds a dataset's files (downloading them if
needed), cuts them into train/valid/test byte ranges, tokenizes them with a tokenizer of
tokenizer.py in worker processes (learning its vocabulary from the train split when
tokenizer.choose_vocab asks), and caches the token ids beside the data, so a second run
only reads them. Batches are data.py's.
"""

import contextlib
import hashlib
import http.client
import operator
import os
import random
import tempfile
import urllib.request
import zipfile
from array import array
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch

import logs
import utils
from data import SPLITS, TokenizedSplit
from files import DataError, atomic_save, load_torch
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


def dataset_files(dataset, data_dir, download=True, log=print):
    """Returns {split: [paths]} for a dataset name or a folder of text files."""
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
    # A folder with wiki.{split}.tokens or {split}.txt files uses them as the splits.
    for pattern in ("wiki.{}.tokens", "{}.txt"):
        if all((folder / pattern.format(s)).is_file() for s in SPLITS):
            return {s: [folder / pattern.format(s)] for s in SPLITS}
    # Hidden files and folders are skipped: among them .cache/, where the token ids go.
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and
                   not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if spec.split_by == "files":
        paths = [p for p in paths if p.suffix == ".txt"] or paths
    if not paths:
        raise DataError(f"no text files in {folder}")
    if spec.split_by == "files" and len(paths) >= 20:
        # BookCorpus and large folders: shuffle the files with a fixed seed, 85% train,
        # then 5% test, then 10% valid (the old example's split).
        random.Random(1000).shuffle(paths)
        a, b = len(paths) * 17 // 20, len(paths) * 18 // 20
        return {"train": paths[:a], "test": paths[a:b], "valid": paths[b:]}
    return {s: paths for s in SPLITS}  # split by lines, below


def split_byte_ranges(files_by_split):
    """{split: [(path, start, end)]}: the byte ranges of the files each split reads.

    When all splits share the same files (EnWik9, a small folder) they take the first
    80%, the next 10% and the last 10% of the text, cut at line boundaries."""
    if not (files_by_split["train"] == files_by_split["valid"] == files_by_split["test"]):
        return {s: [(str(p), 0, _file_size(p)) for p in paths] for s, paths in files_by_split.items()}
    paths = files_by_split["train"]
    sizes = [_file_size(p) for p in paths]
    total = sum(sizes)
    cuts = [0, _line_boundary(paths, sizes, total * 8 // 10),
            _line_boundary(paths, sizes, total * 9 // 10), total]
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


def _line_boundary(paths, sizes, position):
    """The first line start at or after `position` in the concatenation of `paths`."""
    offset = 0
    for p, size in zip(paths, sizes):
        if position < offset + size:
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

CACHE_VERSION = 1  # bump when tokenization changes (the tokenizer itself is in the key)
# Text one worker tokenizes at a time. Bounds a worker's memory (its word list takes about
# 12x the chunk's bytes) and is small enough that 2-8 workers get an even share of a corpus.
_CHUNK_BYTES = 4 << 20
# Ends each line in a chunk's token stream. The tokenizer never outputs ';' (it is a
# separator), so a whole chunk can be split in one call and its lines found again after.
_LINE_END = ";"


def _chunks(ranges, chunk_bytes=None):
    """Cut byte ranges into pieces of about chunk_bytes that end on line boundaries."""
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


def _read_text(path, start, end):
    try:
        with open(path, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {start + e.start})") from None


def _chunk_words(job):
    """The tokens of a chunk's lines (str.splitlines), each line followed by _LINE_END.

    Normalizing the whole chunk at once equals normalizing line by line: no substitution
    adds, removes or reaches across a line break."""
    lines = normalize_text(_read_text(*job)).splitlines()
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
    """int32 token ids of a chunk, -1 after each line."""
    return _lookup_ids(_worker_lookup, _chunk_words(job)), None


def _count_chunk(job):
    """Ids in a vocabulary of the chunk's own words, and those words. The main process
    counts them and maps them to the real vocab once every count is in, so the train split
    is tokenized once for both counting and numericalizing."""
    words = _chunk_words(job)
    own_words = dict.fromkeys(words)
    own_words.pop(_LINE_END, None)
    index = dict(zip(own_words, range(len(own_words))))
    index[_LINE_END] = -1
    return _lookup_ids(index, words), list(own_words)


def _as_tensor(int32_array):
    if not len(int32_array):  # torch.frombuffer refuses empty buffers
        return torch.empty(0, dtype=torch.int32)
    return torch.frombuffer(int32_array, dtype=torch.int32)


def _split_line_ends(int32_array):
    """(ids without the -1 line ends, tokens per line), as tensors."""
    ids = _as_tensor(int32_array)
    is_end = ids < 0
    line_ends = torch.nonzero(is_end).flatten()
    return ids[~is_end], line_ends.diff(prepend=torch.tensor([-1])) - 1


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
    jobs. A generator, so the caller handles each chunk while the workers tokenize the next."""
    if workers <= 1 or len(jobs) <= 1:
        if initializer:
            initializer(*initargs)
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs) as pool:
        try:
            yield from pool.map(fn, jobs)
        except BaseException:
            pool.shutdown(cancel_futures=True)  # report a bad file now, not after the rest
            raise


def _with_progress(jobs, results):
    """A bar over the tokenized chunks' results, counting their bytes of text."""
    sizes = [end - start for _, start, end in jobs]
    with logs.progress(total=sum(sizes), unit="B", unit_scale=True, desc="tokenizing") as bar:
        for result, size in zip(results, sizes):  # results first: it ends the workers' pool
            yield result
            bar.update(size)


def default_workers():
    return min(utils.available_cpus(), 8)


def _tokenized_split(ids, lengths):
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    return TokenizedSplit(ids, offsets)


def _cat(tensors, dtype):
    return torch.cat([torch.empty(0, dtype=dtype)] + tensors)


def numericalize(ranges, vocab, workers=None):
    """Tokenize byte ranges of files into a TokenizedSplit of `vocab`'s ids.

    Workers return compact int32 arrays, so memory stays at about 8 bytes a token (the
    chunks and their concatenation): never a Python list of all token ids."""
    if vocab.kind == "wordpiece":
        return _numericalize_wordpiece(ranges, vocab)
    ids, lengths = [], []
    jobs = _chunks(ranges)
    with _one_torch_thread():
        for chunk_ids, _ in _with_progress(jobs, _map_chunks(_numericalize_chunk, jobs,
                                                        workers or default_workers(),
                                                        initializer=_set_worker_vocab,
                                                        initargs=(vocab.itos,))):
            chunk_ids, chunk_lengths = _split_line_ends(chunk_ids)
            ids.append(chunk_ids)
            lengths.append(chunk_lengths)
    return _tokenized_split(_cat(ids, torch.int32), _cat(lengths, torch.int64))


def _numericalize_wordpiece(ranges, tokenizer):
    """numericalize for WordPiece: the tokenizers library encodes each chunk's lines on
    all cores itself (no process pool), and each chunk becomes int32 right away."""
    ids, lengths = [], []
    for job in _chunks(ranges):
        encoded = tokenizer.encode_batch(_read_text(*job).splitlines())
        counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        ids.append(torch.from_numpy(np.fromiter(chain.from_iterable(encoded), dtype=np.int32,
                                                count=int(counts.sum()))))
        lengths.append(torch.from_numpy(counts))
    return _tokenized_split(_cat(ids, torch.int32), _cat(lengths, torch.int64))


# A WordPiece vocabulary is learned from at most this much of the train split, in chunks
# spread evenly over it: enough text for a 30k vocabulary, in seconds on a laptop.
WORDPIECE_SAMPLE_BYTES = 64 << 20


def _sample_lines(ranges, max_bytes=WORDPIECE_SAMPLE_BYTES):
    jobs = _chunks(ranges)
    total = sum(end - start for _, start, end in jobs)
    step = max(1, -(-total // max_bytes))  # every step-th chunk
    for job in jobs[::step]:
        yield from _read_text(*job).splitlines()


def count_and_numericalize(ranges, min_freq=1, workers=None):
    """Build the vocab from the text of `ranges` and numericalize it, in one tokenization.

    Returns (vocab, TokenizedSplit): the same as Vocab.build of the word counts followed by
    numericalize(ranges, vocab)."""
    counter = Counter()
    chunks, lengths = [], []
    jobs = _chunks(ranges)
    with _one_torch_thread():
        for own_ids, own_words in _with_progress(jobs, _map_chunks(_count_chunk, jobs,
                                                              workers or default_workers())):
            own_ids, chunk_lengths = _split_line_ends(own_ids)
            counts = torch.bincount(own_ids, minlength=len(own_words))
            counter.update(dict(zip(own_words, counts.tolist())))
            chunks.append((own_ids, own_words))
            lengths.append(chunk_lengths)
    vocab = Vocab.build(counter, min_freq)
    # Each chunk's own ids -> the vocab's, written into one tensor; each chunk is dropped
    # once copied, so the peak stays at about two copies of the ids.
    ids = torch.empty(sum(len(own_ids) for own_ids, _ in chunks), dtype=torch.int32)
    position = 0
    for i, (own_ids, own_words) in enumerate(chunks):
        to_vocab = torch.tensor([vocab[w] for w in own_words], dtype=torch.int32)
        torch.index_select(to_vocab, 0, own_ids, out=ids[position:position + len(own_ids)])
        position += len(own_ids)
        chunks[i] = None
    return vocab, _tokenized_split(ids, _cat(lengths, torch.int64))


def _cache_path(ranges, vocab, split, cache_dir):
    h = hashlib.sha1(f"{CACHE_VERSION}\n{vocab.fingerprint()}".encode())
    for path, start, end in ranges:
        st = os.stat(path)
        h.update(f"\n{os.path.abspath(path)}\t{start}\t{end}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return Path(cache_dir) / f"{split}.{h.hexdigest()[:16]}.pt"


def _load_cache(path):
    """The cached split, or None if there is none or it is unreadable (it is rebuilt)."""
    if not path.exists():
        return None
    try:
        obj = load_torch(path, mmap=True)
        return TokenizedSplit(obj["ids"], obj["line_offsets"])
    except Exception:  # a truncated or foreign file: tokenizing again is always correct
        return None


def load_splits(dataset, data_dir, vocab=None, spec=None, vocab_path=None, log=print,
                workers=None):
    """Returns (vocab, {split: TokenizedSplit}) for `dataset`.

    The vocab (the tokenizer) is `vocab` if given, else tokenizer.choose_vocab's for
    `spec` (a TokenizerSpec; default basic_english), learned from the train split when it
    must be. Token ids are cached beside the data in `.cache/`, keyed by the tokenizer and
    the files' sizes and mtimes, so a second run skips tokenization."""
    ranges = split_byte_ranges(dataset_files(dataset, data_dir, log=log))
    splits = {}
    if vocab is None:
        def learn(spec):
            if spec.tokenizer == "basic_english":
                # Counting and numericalizing in one tokenization of the train split.
                learned, splits["train"] = count_and_numericalize(ranges["train"], spec.min_freq,
                                                                  workers)
                return learned
            return train_wordpiece(_sample_lines(ranges["train"]), spec.vocab_size)

        name = dataset if dataset in DATASETS else os.path.abspath(dataset)
        vocab = choose_vocab(spec or TokenizerSpec(), name, vocab_path, learn, log)
    cache_dir = Path(ranges["train"][0][0]).parent / ".cache" if ranges["train"] else None
    for split in SPLITS:
        cache = _cache_path(ranges[split], vocab, split, cache_dir) if cache_dir else None
        if split not in splits:
            splits[split] = _load_cache(cache) if cache else None
            if splits[split] is not None:
                continue
            splits[split] = numericalize(ranges[split], vocab, workers)
        if cache is None:
            continue
        try:
            atomic_save({"ids": splits[split].ids, "line_offsets": splits[split].line_offsets}, cache)
        except OSError as e:  # a read-only data folder still works, only without a cache
            log(f"could not write token cache {cache}: {e}")
    return vocab, splits
