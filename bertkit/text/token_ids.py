"""Text to token ids: files cut into chunks at line ends, tokenized in worker processes
(basic_english) or by the tokenizers library's threads (WordPiece), the ids written as
they come to a file read back through mmap (or kept in memory), so memory does not grow
with the corpus. bertkit/text/corpus.py decides which files and byte ranges, and where the file goes.
"""

import contextlib
import gzip
import json
import operator
import os
import shutil
import struct
import tempfile
import zlib
from array import array
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import utils
from bertkit import files
from bertkit.files import DataError
from bertkit.text.tokenizer import UNK_ID, Vocab, normalize_text
from bertkit.training import logs
from data import TokenizedSplit

# What a folder's text files may be. Plain text is cut into byte ranges that workers read
# on their own; a .jsonl file has one JSON object a line whose "text" holds the lines;
# .gz versions of both are decompressed as a stream (see _gz_chunks).
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")


def is_gzip(path):
    return str(path).endswith(".gz")


def is_jsonl(path):
    return str(path).removesuffix(".gz").endswith(".jsonl")



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
        if is_gzip(path):
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
    if is_jsonl(job.path):
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
    # The main process' small torch ops between chunks on one thread: torch's other threads
    # would spin on the cores the tokenizing workers need.
    with (logs.progress(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar,
          utils.one_thread()):
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


class IdFile:
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
        return read_id_file(self.path)


def read_id_file(path):
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


class Spool:
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
    return numericalize_into(ranges, vocab, workers, _MemoryIds())


def numericalize_into(ranges, vocab, workers, sink):
    """numericalize, writing each chunk's ids to `sink` (_MemoryIds or IdFile)."""
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


def sample_lines(ranges, max_bytes=WORDPIECE_SAMPLE_BYTES):
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
    return count_then_remap(ranges, min_freq, workers, Spool(), lambda vocab: _MemoryIds())


def count_then_remap(ranges, min_freq, workers, spool, make_sink):
    """count_and_numericalize in two passes over ids, one over the text: tokenizing writes
    each word's id in the order words were first seen to `spool` while counting them; once
    the vocab is known, the spool is read back, mapped to the vocab's ids and written to
    make_sink(vocab). Tokenizing twice (count, then numericalize) would hold less, but
    costs a second tokenization; the spool costs a write and a read of 4 bytes a token."""
    with spool:
        words, counts, lengths = _count_into(ranges, workers, spool)
        vocab = Vocab.build(Counter(dict(zip(words, counts.tolist()))), min_freq,
                            of_a_train_split=True)
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
