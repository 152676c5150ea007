"""The README's laptop-sized steps, as written there, cut to two optimizer steps each on a
small WikiText-2-layout folder, SQuAD file and RTE-layout folder: they run one after the
other, every later step reads what the one before wrote, and their sequence lengths match
(no warning)."""

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import REPO, one_thread, toy_lines, write_rte, write_wikitext

from bertkit import checks, flags, mains

# The first literal block with these commands: in the documentation file its sections come
# from while it is there, else in README.rst.
FIRST = "python mlm_task.py --device cpu"


def quick_commands():
    for path in [*sorted(REPO.glob("DOC-*.rst")), REPO / "README.rst"]:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        if f"    {FIRST}" in text:
            block = text[text.index(f"    {FIRST}"):].split("\n\n")[0]
            return [shlex.split(line.strip()) for line in block.splitlines()]
    pytest.fail(f"no literal block starting with {FIRST!r} in README.rst")


def run_here(argv, cwd):
    """`python SCRIPT FLAGS` in this process (a subprocess would spend seconds importing
    torch): its stdout."""
    module = __import__(Path(argv[0]).stem)
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), one_thread():
        patch.chdir(cwd)
        mains.launch(module.main, flags.parse_args(module.get_parser(), argv[1:]))
        checks.release_outputs()
    return out.getvalue()


def squad_file(path, seed, n):
    """SQuAD v1.1 JSON: a question about a word of each toy line."""
    paragraphs = [{"context": line, "qas": [{"id": f"{seed}-{i}", "question": "which word?",
                                              "answers": [{"text": line.split()[3],
                                                           "answer_start": line.index(
                                                               " " + line.split()[3]) + 1}]}]}
                  for i, line in enumerate(toy_lines(n, seed, 40))]
    path.write_text(json.dumps({"version": "1.1", "data": [{"paragraphs": paragraphs}]}))


def test_the_quick_steps_run_in_order_with_matching_lengths(tmp_path):
    commands = quick_commands()
    scripts = [Path(command[1]).name for command in commands]
    assert scripts == ["mlm_task.py", "ns_task.py", "qa_task.py", "glue_task.py"]
    write_wikitext(tmp_path / ".data", toy_lines(120, 0), toy_lines(30, 1), toy_lines(30, 2))
    (tmp_path / ".data" / "squad").mkdir()
    squad_file(tmp_path / ".data" / "squad" / "train-v1.1.json", 3, 40)
    squad_file(tmp_path / ".data" / "squad" / "dev-v1.1.json", 4, 8)
    write_rte(tmp_path / ".data" / "glue" / "RTE", 24, 8)
    ns = next(command for command in commands if command[1] == "ns_task.py")
    # One epoch of WikiText-2's long lines is about 1,000 steps: a loss line every N of them.
    assert 0 < int(ns[ns.index("--log-interval") + 1]) <= 200
    for command in commands:
        out = run_here([*command[1:], "--max-steps", "2", "--eval-batches", "1"], tmp_path)
        assert "End of training" in out, out
        assert not re.search(r"^warning", out, re.M), out
    for name in ("mlm_bert.pt", "ns_bert.pt", "qa_model.pt", "predictions.json", "glue_model.pt",
                 "glue_predictions.tsv"):
        assert (tmp_path / name).is_file(), name
    trained = torch.load(tmp_path / "qa_model.pt", weights_only=True)["config"]["trained_len"]
    assert 0 < trained <= 128  # its longest window, real tokens
    glue_model = torch.load(tmp_path / "glue_model.pt", weights_only=True)
    assert glue_model["labels"] == ["entailment", "not_entailment"] and glue_model["task"] == "RTE"
