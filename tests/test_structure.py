"""The layout's promises (docs/layout.rst): the top level holds what a user runs and the
readable core (model.py, data.py, metrics.py, utils.py); everything else is one package,
bertkit/, one concern a module. Imports run one way: the package builds on the core, the
core imports nothing of the package; no import cycle; no task script imported by library
code, bench.py or the tests' helpers; no import name of ours shadows an installed library."""

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "bertkit"
TOP = {p.stem: p for p in REPO.glob("*.py")}
CORE = {"model", "data", "metrics", "utils"}
TASK_SCRIPTS = {"mlm_task", "ns_task", "qa_task", "glue_task"}
TOOLS = {"bench", "convert", "plot"}
MAX_TOP_LEVEL_FILES = 12
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = {"qa_task": 300, "glue_task": 300, "utils": 350}
MAX_LINES = 600
MAX_TRAINER_CLASS_LINES = 250


def dotted(path):
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {**TOP, **{dotted(p): p for p in (REPO / PACKAGE).rglob("*.py")}}


def tree(name):
    return ast.parse(MODULES[name].read_text(encoding="utf-8"))


def resolve(name, package):
    """The module of ours that an import names (`bertkit.glue.tasks`, `model`), or None."""
    if name in MODULES:
        return name
    head = name.split(".")[0]
    return head if head in MODULES else None


def imports(name):
    """The modules of this project `name` imports, at any depth of its code: `from bertkit.glue
    import tasks` counts as importing bertkit.glue.tasks."""
    found = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in MODULES)
    return {resolve(n, name) for n in found} - {None, name}


def in_package(name):
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def test_the_top_level_holds_what_a_user_runs_and_the_core():
    assert set(TOP) == TASK_SCRIPTS | TOOLS | CORE
    assert len(TOP) <= MAX_TOP_LEVEL_FILES
    assert (REPO / PACKAGE / "__init__.py").is_file()


def test_no_import_name_of_ours_is_an_installed_distributions():
    """A top-level kernels.py answered transformers' `import kernels` (Hugging Face's hub
    kernels): anything started from the repository root has the root first on sys.path."""
    installed = importlib.metadata.packages_distributions()
    ours = {*TOP, PACKAGE}
    clashes = {name: installed[name] for name in ours & set(installed)}
    assert not clashes, f"import names of installed distributions: {clashes}"


def test_transformers_bert_imports_with_the_repository_root_first_on_sys_path():
    pytest.importorskip("transformers")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from transformers import BertForMaskedLM; print(BertForMaskedLM.__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "BertForMaskedLM", out.stderr[-2000:]


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


def test_imports_between_the_top_level_and_the_package_run_one_way():
    """The package builds on the core; the core imports nothing of the package, and the
    package imports no script or tool (only the scripts and tools use both)."""
    for name in CORE:
        assert not {m for m in imports(name) if in_package(m)}, (
            f"{name}.py (the core) imports the package: {sorted(imports(name))}")
    for name in MODULES:
        if in_package(name):
            upward = imports(name) & (TASK_SCRIPTS | TOOLS)
            assert not upward, f"{name} imports the script(s) {sorted(upward)}"


def test_no_task_script_is_imported_by_a_module_or_bench():
    for name in MODULES:
        if name in TASK_SCRIPTS | TOOLS:
            continue
        tasks = imports(name) & TASK_SCRIPTS
        assert not tasks, f"{name} imports the script(s) {sorted(tasks)}"
    assert not imports("bench") & TASK_SCRIPTS


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_short(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    limit = MAX_MODULE_LINES.get(name, MAX_LINES)
    assert lines <= limit, f"{name} has {lines} lines (at most {limit})"
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, (
                f"{name}: {node.name} has {length} lines (at most {MAX_FUNCTION_LINES})")


def test_the_trainer_class_reads_top_to_bottom():
    (trainer,) = [node for node in tree("bertkit.training.trainer").body
                  if isinstance(node, ast.ClassDef) and node.name == "Trainer"]
    length = trainer.end_lineno - trainer.lineno + 1
    assert length <= MAX_TRAINER_CLASS_LINES, f"Trainer has {length} lines"


def test_model_py_holds_only_modules_and_their_config():
    """model.py imports no I/O, flags or data code of this project."""
    assert imports("model") <= {"utils"}


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
    first_torch = min((i for i, name in enumerate(names) if name.split(".")[0] == "torch"),
                      default=len(names))  # none: torch loads with the modules of ours
    first_ours = min(i for i, name in enumerate(names) if resolve(name, script))
    assert names.index("bertkit.cpu_threads") == first_ours < first_torch, names


def test_openmp_waits_passively_only_on_a_busy_machine_and_keeps_the_users_choice():
    from bertkit import cpu_threads

    assert cpu_threads.wait_policy({}, busy=0.9) == "PASSIVE"
    assert cpu_threads.wait_policy({}, busy=0.1) is None  # idle: OpenMP's spinning pays
    assert cpu_threads.wait_policy({"OMP_WAIT_POLICY": "ACTIVE"}, busy=0.9) is None
    assert 0.0 <= cpu_threads.busy_share(0.05) <= 1.0
    code = "import os; from bertkit import cpu_threads; import torch; print(os.environ.get('OMP_WAIT_POLICY'))"
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
    """The real-data tests read the folder the variable names, nothing without it (.ci/run
    sets it), and skip with a reason that names what is missing and the variable."""
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
    assert not Path(shown[""][0]).exists() and shown[""][1] == "False"
    assert shown[""][2] == ("real data absent: BERT_TEST_DATA is not set (a folder with "
                            "squad/dev-v2.0-normans.json)")
    ci = (REPO / ".ci" / "run").read_text()
    assert "BERT_TEST_DATA" in ci and "../shared/data" in ci
