"""Shared fixtures: real WikiText text when it is there, small WikiText-layout folders,
and a local HTTP server standing in for the dataset hosts."""

import functools
import http.server
import socket
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The real WikiText-2 validation split, beside the repo; tests that need it skip without it.
REAL_VALID = Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/wiki.valid.tokens"


@pytest.fixture(scope="session")
def real_valid_lines():
    if not REAL_VALID.is_file():
        pytest.skip(f"{REAL_VALID} is absent")
    return REAL_VALID.read_text(encoding="utf-8").splitlines()


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


@pytest.fixture
def wikitext_dir(tmp_path):
    """A small WikiText-2-layout data dir of toy text (about 6k train tokens)."""
    return write_wikitext(tmp_path / "data", toy_lines(200, 0), toy_lines(20, 1), toy_lines(20, 2))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


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
