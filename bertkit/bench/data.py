"""The data pipeline's speed and memory: `python bench.py --data` (see bench_data)."""

import resource
import shutil
import sys
import time
from pathlib import Path

from bertkit.text import corpus, token_ids, tokenizer
from bertkit.text.tokenizer import TokenizerSpec


def bench_data(text_file, corpus_dir, tokenizer_kind="basic_english"):
    """Tokenize, numericalize and cache a WikiText-103-sized corpus, then load the cache.

    The corpus is `text_file` (by default the real WikiText-2 validation split) repeated
    480 times (~540 MB from WikiText-2's 1.12 MB, built once in `corpus_dir`), laid out as
    WikiText-103. Run alone (python bench.py --data) so that the peak resident memory
    measured is the pipeline's: this process's plus the tokenizer workers' (an upper
    bound: the largest worker's peak times their number). With --tokenizer wordpiece,
    the `tokenizers` library alone then trains on the same sample and batch-encodes the
    same text, for the ratio of our pipeline's time to the library's.
    """
    if not Path(text_file).is_file():
        # Real text only: the numbers stand for WikiText-103's vocabulary and line lengths.
        sys.exit(f"error: --data needs {text_file} (--text-file: WikiText-layout text)")
    folder = Path(corpus_dir) / "wikitext-103"
    text = Path(text_file).read_bytes()
    repeats = 480  # 480 x 1.12 MB: WikiText-103's size, ~103M tokens
    train = folder / "wiki.train.tokens"
    if not (train.exists() and train.stat().st_size == len(text) * repeats):
        folder.mkdir(parents=True, exist_ok=True)
        with open(train, "wb") as f:
            for _ in range(repeats):
                f.write(text)
        lines = text.decode("utf-8").splitlines(keepends=True)
        (folder / "wiki.valid.tokens").write_text("".join(lines[:700]), encoding="utf-8")
        (folder / "wiki.test.tokens").write_text("".join(lines[-700:]), encoding="utf-8")
    shutil.rmtree(folder / ".cache", ignore_errors=True)
    vocab_path = Path(corpus_dir) / "bench_vocab.pt"
    vocab_path.unlink(missing_ok=True)

    def load():
        return corpus.load_splits("WikiText103", corpus_dir, vocab_path=vocab_path,
                                  log=lambda *_: None, spec=TokenizerSpec(tokenizer_kind))

    start = time.perf_counter()
    vocab, splits = load()
    tokenize_s = time.perf_counter() - start
    n_tokens = sum(len(s.ids) for s in splits.values())
    del splits
    start = time.perf_counter()
    _, cached = load()
    load_s = time.perf_counter() - start
    assert sum(len(s.ids) for s in cached.values()) == n_tokens
    # WordPiece encodes on threads of the tokenizers library, in this process.
    workers = token_ids.default_workers() if tokenizer_kind == "basic_english" else 0
    report_data(train, n_tokens, vocab, tokenize_s, load_s, workers)
    if tokenizer_kind == "wordpiece":
        library_s = library_wordpiece_seconds(folder, len(vocab))
        print(f"data: the tokenizers library alone (train on the same sample, batch-encode "
              f"every split) {library_s:.1f} s; ours / library {tokenize_s / library_s:.2f}")
        print(f"data_wordpiece_ratio {tokenize_s / library_s:.2f}")


def library_wordpiece_seconds(folder, vocab_size):
    """Seconds the `tokenizers` library alone takes to learn a vocabulary from the sample
    our pipeline learns from, then batch-encode the text of every split (in the same
    chunks, so that memory stays bounded as ours does)."""
    from tokenizers import trainers

    ranges = corpus.split_byte_ranges(corpus.dataset_files("WikiText103", folder.parent))
    start = time.perf_counter()
    library = tokenizer.bert_wordpiece_pipeline()
    specials = list(tokenizer.WORDPIECE_SPECIALS.values())
    library.train_from_iterator(token_ids.sample_lines(ranges["train"]), trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    for split in corpus.SPLITS:
        for job in token_ids._chunks(ranges[split]):
            library.encode_batch(token_ids._read_text(*job).splitlines(), add_special_tokens=False)
    return time.perf_counter() - start


def report_data(train, n_tokens, vocab, tokenize_s, load_s, workers):
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    peak_mb = main_mb + workers * worker_mb
    print(f"data: {train.stat().st_size / 1e6:.0f} MB of text, {n_tokens / 1e6:.1f}M tokens, vocab "
          f"{len(vocab)}, {workers} worker processes")
    print(f"data: vocab + token ids + cache {tokenize_s:.1f} s; peak resident {main_mb:.0f} MB + "
          f"{workers} x {worker_mb:.0f} MB = {peak_mb:.0f} MB; cache load {load_s:.2f} s")
    print(f"data_tokenize_s {tokenize_s:.1f} data_peak_rss_mb {peak_mb:.0f} "
          f"data_cache_load_s {load_s:.2f}")
