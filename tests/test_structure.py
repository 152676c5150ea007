"""The layout's promises (README, "Where things are"): each concern in its own module, no
import cycle among them, no grab-bag modules or long functions, and no task script imported
by library code, bench.py or the tests' helpers."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in REPO.glob("*.py")}
SCRIPTS = {"mlm_task", "ns_task", "qa_task", "glue_task", "bench", "convert", "plot", "metrics"}
TASK_SCRIPTS = {"mlm_task", "ns_task", "qa_task", "glue_task"}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = {"qa_task": 300, "glue_task": 300, "utils": 350}
MAX_LINES = 600


def tree(name):
    return ast.parse(MODULES[name].read_text(encoding="utf-8"))


def imports(name):
    """The modules of this project `name` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {name}


def test_no_import_cycle():
    graph = {name: imports(name) for name in MODULES}
    state = {}

    def visit(name, path):
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for other in sorted(graph[name]):
            visit(other, path + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_no_task_script_is_imported_by_a_module_or_bench():
    for name in MODULES:
        if name in SCRIPTS - {"metrics"}:
            continue
        tasks = imports(name) & TASK_SCRIPTS
        assert not tasks, f"{name}.py imports the script(s) {sorted(tasks)}"
    assert not imports("bench") & TASK_SCRIPTS


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_short(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    limit = MAX_MODULE_LINES.get(name, MAX_LINES)
    assert lines <= limit, f"{name}.py has {lines} lines (at most {limit})"
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, (
                f"{name}.py: {node.name} has {length} lines (at most {MAX_FUNCTION_LINES})")


def test_model_py_holds_only_modules_and_their_config():
    """model.py imports no I/O, flags or data code of this project."""
    assert imports("model") <= {"kernels", "rules"}


DOCS = ["README.rst", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.rst"))]


@pytest.mark.parametrize("name", DOCS)
def test_readme_and_docs_are_valid_restructuredtext(name):
    """A malformed table renders as an error block on the project's front page."""
    docutils_core = pytest.importorskip("docutils.core")
    import io

    errors = io.StringIO()
    docutils_core.publish_doctree(
        (REPO / name).read_text(encoding="utf-8"),
        settings_overrides={"warning_stream": errors, "report_level": 2, "halt_level": 5})
    assert errors.getvalue() == ""


@pytest.mark.parametrize("script", sorted(TASK_SCRIPTS))
def test_openmp_wait_policy_is_set_before_torch_loads(script):
    """libgomp reads OMP_WAIT_POLICY once, when torch is imported: cpu_threads must be the
    script's first import of this project and come before torch."""
    names = [alias.name if isinstance(node, ast.Import) else node.module
             for node in tree(script).body if isinstance(node, ast.Import | ast.ImportFrom)
             for alias in (node.names if isinstance(node, ast.Import) else node.names[:1])]
    first_torch = min(i for i, name in enumerate(names) if name.split(".")[0] == "torch")
    first_ours = min(i for i, name in enumerate(names) if name.split(".")[0] in MODULES)
    assert names.index("cpu_threads") == first_ours < first_torch, names


def test_openmp_waits_passively_only_on_a_busy_machine_and_keeps_the_users_choice():
    import cpu_threads

    assert cpu_threads.wait_policy({}, busy=0.9) == "PASSIVE"
    assert cpu_threads.wait_policy({}, busy=0.1) is None  # idle: OpenMP's spinning pays
    assert cpu_threads.wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}, busy=0.9) is None
    assert 0.0 <= cpu_threads.busy_share(0.05) <= 1.0
    code = "import os, cpu_threads, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.strip() == "ACTIVE", out.stderr


def test_readme_links_every_doc_and_every_link_has_its_file():
    """The README is the index of docs/: each file there is linked from it, and every link
    (README -> docs/X.rst, docs/X.rst -> Y.rst) names a file that exists."""
    import re

    readme = (REPO / "README.rst").read_text(encoding="utf-8")
    linked = set(re.findall(r"<(docs/[\w.-]+\.rst)>`_", readme))
    assert linked == {name for name in DOCS if name.startswith("docs/")}
    for name in DOCS[1:]:
        for target in re.findall(r"<([\w.-]+\.rst)>`_", (REPO / name).read_text(encoding="utf-8")):
            assert (REPO / "docs" / target).is_file(), f"{name} links {target}"


def test_real_data_is_looked_for_where_BERT_TEST_DATA_says(tmp_path):
    """The real-data tests read the folder the variable names (../shared/data without it),
    and skip with a reason that names what is missing and the variable."""
    (tmp_path / "squad").mkdir()
    (tmp_path / "squad" / "train-v1.1-notre-dame.json").write_text("{}")
    code = ("import conftest as c; print(c.REAL_DATA); print(c.NOTRE_DAME.exists()); "
            "print(c.absent_reason(c.NORMANS))")
    shown = {}
    for value in (str(tmp_path), ""):
        env = {**os.environ, "BERT_TEST_DATA": value}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", env=env,
                             capture_output=True, text=True, check=True).stdout.splitlines()
        shown[value] = out
    assert shown[str(tmp_path)] == [
        str(tmp_path), "True", f"real data absent: {tmp_path}/squad/dev-v2.0-normans.json (set "
                               "BERT_TEST_DATA to a folder that has it)"]
    assert shown[""][0] == str(REPO.parent / "shared" / "data")
