"""The commands of README.rst and docs/ as written: every `python SCRIPT.py ...` line of
their literal blocks (also after torchrun or srun) parses with that script's own parser and
passes its value checks, so a renamed flag or a changed choice cannot leave a command in
the docs that no longer runs. (What the commands do is tested where each feature is.)"""

import importlib
import re
import shlex
from pathlib import Path

import pytest

from bertkit import flags

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.rst", *sorted((REPO / "docs").glob("*.rst"))]
TASK_SCRIPTS = ("mlm_task", "ns_task", "qa_task", "glue_task")


def literal_lines(text):
    """The lines of the text's literal blocks (indented after a line ending in '::')."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.rstrip().endswith("::"):
            inside = True
            continue
        if inside and line.strip() and not line.startswith(" "):
            inside = False
        if inside and line.strip():
            lines.append(line.strip())
    return lines


def commands():
    """(doc name, script, argv) of every command that runs one of our scripts."""
    found = []
    for doc in DOCS:
        for line in literal_lines(doc.read_text(encoding="utf-8")):
            line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
            line = re.sub(r"\[[^\]]*\]", "", line)  # [OPTIONAL PARTS] of a usage line
            match = re.search(r"(?:^|\s)(?:python\s+)?(\w+)\.py(\s.*)?$", line)
            if not match or not re.match(r"(\w+=\S+\s+)*(python|torchrun|srun)\b", line):
                continue
            script, rest = match.group(1), match.group(2) or ""
            if script in (*TASK_SCRIPTS, "bench"):
                found.append((doc.name, script, shlex.split(rest)))
    return found


COMMANDS = commands()


def test_the_docs_have_commands_of_every_task_script():
    scripts = {script for _, script, _ in COMMANDS}
    assert {"mlm_task", "ns_task", "qa_task", "bench"} <= scripts, scripts


@pytest.mark.parametrize("doc, script, argv", COMMANDS,
                         ids=[f"{d}:{s}:{i}" for i, (d, s, _) in enumerate(COMMANDS)])
def test_every_command_in_the_docs_parses(doc, script, argv, capsys, monkeypatch):
    try:
        if script == "bench":
            if "cuda" in argv:  # a command for a GPU machine: only the device check refuses
                monkeypatch.setattr("torch.cuda.is_available", lambda: True)
            importlib.import_module("bench").parse_args(argv)
            return
        parser = importlib.import_module(script).get_parser()
        args = parser.parse_args(argv)
        flags.check_values(args, parser)
    except SystemExit:
        pytest.fail(f"{doc}: python {script}.py {shlex.join(argv)}: "
                    f"{capsys.readouterr().err.strip()}")
