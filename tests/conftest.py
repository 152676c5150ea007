"""Shared fixtures: real data when it is there, small WikiText-layout folders, and a local
HTTP server standing in for the dataset hosts."""

import functools
import hashlib
import http.server
import io
import os
import socket
import sys
import threading
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real data: the folder BERT_TEST_DATA names (CI sets it: .ci/run), laid out as
# wikitext-2/wiki.valid.tokens, squad/train-v1.1-notre-dame.json,
# squad/dev-v2.0-normans.json, bert-base-uncased/vocab.txt, glue/RTE/{train,dev}.tsv.
# Without it, or where a file is absent, a test skips (real_data_skip) or runs on synthetic
# data instead.
REAL_DATA_VARIABLE = "BERT_TEST_DATA"
REAL_DATA = Path(os.environ.get(REAL_DATA_VARIABLE) or "/nonexistent/BERT_TEST_DATA-unset")
REAL_VALID = REAL_DATA / "wikitext-2" / "wiki.valid.tokens"
NOTRE_DAME = REAL_DATA / "squad" / "train-v1.1-notre-dame.json"
NORMANS = REAL_DATA / "squad" / "dev-v2.0-normans.json"
BERT_VOCAB = REAL_DATA / "bert-base-uncased" / "vocab.txt"
REAL_RTE = REAL_DATA / "glue" / "RTE"  # GLUE's RTE: train.tsv, dev.tsv


def absent_reason(*paths):
    """Why a real-data test skips: its missing files, and how to point the tests at them."""
    if not os.environ.get(REAL_DATA_VARIABLE):
        wanted = ", ".join(str(Path(p).relative_to(REAL_DATA)) if Path(p).is_relative_to(
            REAL_DATA) else str(p) for p in paths)
        return f"real data absent: {REAL_DATA_VARIABLE} is not set (a folder with {wanted})"
    missing = ", ".join(str(p) for p in paths if not Path(p).exists())
    return f"real data absent: {missing} (set {REAL_DATA_VARIABLE} to a folder that has it)"


def needs_real(*paths):
    """A skipif mark for a test that reads these real-data files."""
    return pytest.mark.skipif(not all(Path(p).exists() for p in paths),
                              reason=absent_reason(*paths))


def real_data_skip(*paths):
    """pytest.skip, inside a test or fixture, when one of these files is absent."""
    if not all(Path(p).exists() for p in paths):
        pytest.skip(absent_reason(*paths))


@pytest.fixture(scope="session")
def real_valid_lines():
    real_data_skip(REAL_VALID)
    return REAL_VALID.read_text(encoding="utf-8").splitlines()


def one_thread():
    """Tiny models run in this process on one thread: they gain nothing from more, and on
    a busy machine OpenMP's spinning threads make each step many times slower."""
    import utils

    return utils.one_thread()


@pytest.fixture(scope="module")
def single_thread():
    """one_thread for a whole test file: `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    with one_thread():
        yield


def hashes(folder):
    """Every file under folder (hidden ones too) and its content's hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_error_line(module, argv, capsys):
    """(stdout, the error line) of task script `module` run in this process with `argv`,
    as `python SCRIPT ARGV` runs it (a subprocess would spend most of its time importing
    torch), which must stop with one line `error: ...` on stderr, exit code 2."""
    from bertkit import checks, flags, mains

    with pytest.raises(SystemExit) as exit_info:
        mains.launch(module.main, flags.parse_args(module.get_parser(), argv))
    checks.release_outputs()  # as the process's exit would
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return out, lines[0]


def toy_lines(n_lines, seed=0, words_per_line=30):
    """A repetitive corpus a tiny model can learn from: each line walks a fixed cycle of
    40 words (`w0 w1 ... w39 w0 ...`) from a random start, so a masked word is predictable
    from its neighbours, and every line has `words_per_line` tokens."""
    import random

    rng = random.Random(seed)
    cycle = [f"w{i}" for i in range(40)]
    lines = []
    for _ in range(n_lines):
        start = rng.randrange(len(cycle))
        lines.append(" ".join(cycle[(start + i) % len(cycle)] for i in range(words_per_line)))
    return lines


def write_wikitext(data_dir, train, valid, test, folder="wikitext-2"):
    """<data_dir>/<folder>/wiki.{train,valid,test}.tokens from lists of lines."""
    root = Path(data_dir) / folder
    root.mkdir(parents=True, exist_ok=True)
    for split, lines in (("train", train), ("valid", valid), ("test", test)):
        (root / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(data_dir)


def write_rte(folder, n_train, n_dev):
    """GLUE's RTE layout in `folder`: train.tsv and dev.tsv of toy sentence pairs of 12
    words, labeled entailment and not_entailment in turn."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, seed, n in (("train", 5, n_train), ("dev", 6, n_dev)):
        lines = toy_lines(2 * n, seed, 12)
        rows = [f"{i}\t{lines[2 * i]}\t{lines[2 * i + 1]}\t{('entailment', 'not_entailment')[i % 2]}"
                for i in range(n)]
        (folder / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n"
                                             + "\n".join(rows) + "\n")
    return folder


@pytest.fixture
def wikitext_dir(tmp_path):
    """A small WikiText-2-layout data dir of toy text (about 6k train tokens)."""
    return write_wikitext(tmp_path / "data", toy_lines(200, 0), toy_lines(20, 1), toy_lines(20, 2))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def make_zip(members):
    """A zip archive's bytes of {name: text} (for http_root to serve as a download)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture
def http_root(tmp_path):
    """(base_url, folder): an HTTP server on 127.0.0.1 serving `folder`, in a thread."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def closed_url():
    """A URL on 127.0.0.1 where nothing listens: any request to it fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def end_spawned_rank():
    """The end of a test's spawned gloo rank: the ranks meet, tear the group down, and
    the process exits without the interpreter's shutdown. A gloo worker thread may still
    be releasing a finished collective's work, whose thread-local state holds a Python
    object (seen after DDP's backward() and after the Trainer's collectives): when that
    happens after shutdown has begun, the thread cannot take the GIL and the process
    aborts ("terminate called without an active exception", about 1 run in 40 on 2
    cores)."""
    import torch.distributed as dist

    dist.barrier()  # no rank tears the group down while the other still uses it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
