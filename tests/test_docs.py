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


def what_a_run_writes(doc, script):
    """The text of `script`'s row of the table of what a run writes in `doc`."""
    text = (REPO / doc).read_text(encoding="utf-8")
    start = text.index(f"``{script}``", text.index("=" * 16, text.index("What ")))
    rows = text[start:].split("\n\n")[0].splitlines()
    row = [rows[0]] + [line for line in rows[1:] if line.startswith(" ")
                       and not line.lstrip().startswith("=")]
    ends = next((i for i, line in enumerate(row[1:], 1) if not line.startswith(" ")), len(row))
    return " ".join(row[:ends])


@pytest.mark.parametrize("doc", ["README.rst", "docs/runs.rst"])
@pytest.mark.parametrize("script", TASK_SCRIPTS)
def test_the_tables_of_what_a_run_writes_name_every_default_output(doc, script):
    """Each script's row names every file a run with the defaults writes: its model, state,
    metrics log, loss log, vocabulary copy (bert_vocab.pt) and predictions."""
    parser = importlib.import_module(script).get_parser()
    defaults = {action.default for action in parser._actions if action.dest in (
        "save", "state_file", "metrics_file", "save_vocab", "predictions")}
    row = what_a_run_writes(doc, f"{script}.py")
    for name in sorted(defaults | {f"{script.split('_')[0]}_loss.txt"}):
        assert f"``{name}``" in row, f"{doc}: {script}.py's row lacks {name}: {row}"


def test_no_paragraph_of_the_docs_begins_with_a_stray_comma():
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            assert not line.startswith(", "), f"{doc.name}, line {number}: {line[:40]}"


def test_the_end_of_training_lines_quoted_are_as_printed():
    """An ``| End of training | ...`` quoted in the docs is what the run prints for its
    numbers (logs.format_metrics: a loss of five decimals, ...); and no doc calls it the
    last line, which names the files written."""
    from bertkit.training import logs

    units = {v: k for k, v in logs.COUNTS.items()}
    quoted = 0
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        assert "the last line it prints" not in text, doc.name
        inline = re.findall(r"``\| End of training \| (.*?)``", text, re.S)
        for quote in inline + re.findall(r"^ +\| End of training \| (.*)$", text, re.M):
            if quote.strip() in ("", "..."):  # the line named, not quoted
                continue
            metrics = {}
            for part in " ".join(quote.split()).split(" | "):
                words = part.split()
                if words[0] == "scored":
                    metrics[units[" ".join(words[2:])]] = int(words[1])
                else:
                    metrics[words[1]] = float(words[2].rstrip("%"))
            printed = logs.format_metrics("test", metrics)
            assert " ".join(printed.split()) == " ".join(quote.split()), (doc.name, quote)
            quoted += 1
    assert quoted >= 1
