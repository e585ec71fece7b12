"""The shipped text speaks of the project as it is: no account of how it was built, no machine paths.

What is read: README.md, docs/*.md, configs/**/*.yaml and bench/results/*.json whole; in align/,
reward/, sampling/, bench/, scripts/ and tests/ the comments and docstrings of Python files and
the comments of shell scripts (code and its strings are not read: a test may build a path in a
temporary folder). This file is left out: its patterns would match themselves.

What fails:
- HISTORY: numbered work periods and the tracker the work was planned in: a session or a stop
  followed by its number, a run tag made of "s" and a number with a letter, phrases such as "this
  session", "work period", "ticket", a bare "#123" or "issue 123", "the issue's", "the goal's" (the
  tracker's goal), "earlier variant". A peer project's thread named with its repository
  (``huggingface/trl#7020``) is a citation and passes; so does pytest's session scope.
- PATHS: an absolute path into a development machine's folders (the roots in ``MACHINE_ROOTS``);
  results record paths relative to the repository (bench/machine.py's ``portable``).
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

from conftest import ROOT

SELF = Path(__file__).resolve()

HISTORY = re.compile(
    r"\bsessions?\s*#?\d+"  # a numbered work period
    r"|\b(?:this|that|last|previous|prior|earlier|later|next|work(?:ing)?|coding) sessions?\b"
    r"|\bstops?\s*#?\d+\b|\b(?:this|that|last|previous|earlier) stop\b"
    r"|(?<![A-Za-z0-9])s\d{1,2}[a-d]\b"  # run tags such as s12a
    r"|\bwork(?:ing)? periods?\b|\btickets?\s*#?\d+|\b(?:this|the|that|our) ticket\b"
    r"|\bissues?\s*#?\d+|\b(?:this|the|that|our) issue(?:'s)?\b|\bissue's\b|\(issues?:"
    r"|(?<![\w/.-])#\d+\b"  # a bare tracker number
    r"|\bthe goal's\b|\bearlier variant\b|\b(?:session|work|dev|development) notes\b",
    re.IGNORECASE,
)
MACHINE_ROOTS = ("work", "tmp", "home", "check", "root", "Users", "mnt", "scratch")
ABSOLUTE_PATH = re.compile(r"(?<![\w.~$}-])/(?:%s)/" % "|".join(MACHINE_ROOTS))

WHOLE = ("README.md", "docs/*.md", "configs/**/*.yaml", "configs/*.yaml", "bench/results/*.json")
CODE_DIRS = ("align", "reward", "sampling", "bench", "scripts", "tests")


def files(*patterns: str) -> list[Path]:
    """Tracked and new (not ignored) files matching the git pathspecs, this file left out."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    paths = sorted({ROOT / line for line in out.splitlines() if line})
    return [p for p in paths if p.is_file() and p.resolve() != SELF]


def python_prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python source."""
    found = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                start = body[0].lineno
                found += [(start + i, line) for i, line in enumerate(body[0].value.value.splitlines())]
    return found


def shell_comments(source: str) -> list[tuple[int, str]]:
    """(line, text) of a shell script's comments: whole-line ones and those after `` #``."""
    found = []
    for lineno, line in enumerate(source.splitlines(), 1):
        stripped = line.lstrip()
        if stripped.startswith("#"):
            found.append((lineno, stripped))
        elif " #" in line:
            found.append((lineno, line.split(" #", 1)[1]))
    return found


def shipped_prose() -> list[tuple[str, int, str]]:
    """(file, line, text) of everything the test reads."""
    prose = []
    for path in files(*WHOLE):
        prose += [(str(path.relative_to(ROOT)), n, line) for n, line in enumerate(path.read_text().splitlines(), 1)]
    for path in files(*(f"{d}/*.py" for d in CODE_DIRS), *(f"{d}/**/*.py" for d in CODE_DIRS)):
        prose += [(str(path.relative_to(ROOT)), n, text) for n, text in python_prose(path.read_text())]
    for path in files(*(f"{d}/*.sh" for d in CODE_DIRS), *(f"{d}/**/*.sh" for d in CODE_DIRS), ".ci/*"):
        prose += [(str(path.relative_to(ROOT)), n, text) for n, text in shell_comments(path.read_text())]
    return prose


def offending(pattern: re.Pattern) -> list[str]:
    return [
        f"{name}:{line}: {m.group(0)!r} in {text.strip()[:120]!r}"
        for name, line, text in shipped_prose()
        for m in [pattern.search(text)]
        if m
    ]


def test_the_scan_reads_what_it_should():
    names = {name for name, _, _ in shipped_prose()}
    for expected in (
        "README.md",
        "docs/benchmarks.md",
        "configs/recipes/quickstart.yaml",
        "bench/machine.py",
        "tests/conftest.py",
        "scripts/test.sh",
    ):
        assert expected in names, expected
    assert any(name.startswith("bench/results/") for name in names)
    assert str(SELF.relative_to(ROOT)) not in names


def test_the_patterns_catch_history_and_paths_and_pass_the_rest():
    caught = [
        "CI (stop 26) saw it",
        "as in Session 12",
        "since this stop, the faster",
        "the goal's size",
        "files _s12a and _s13b",
        "the issue's new-user case",
        'issue\'s "fraction of peak"',
        "(issue: references)",
        "see issue 41",
        "fixed in #12",
        "a run of the earlier variant",
        "one work period later",
        "ticket 7",
    ]
    for text in caught:
        assert HISTORY.search(text), text
    passed = [
        "session-scoped fixtures",
        "shared by the whole session",
        '@pytest.fixture(scope="session")',
        "huggingface/trl#7020",
        "docs/vllm-cpu.md#8",
        "stop tokens",
        "SIGTERM makes it stop at a safe point",
        "the library issues it",
        "goal: >= 3x",
        "s1 and s2 are sums",
        "a parking ticket",
    ]
    for text in passed:
        assert not HISTORY.search(text), text
    for text in ("/work/shared/data/x.json", "written to /tmp/bd/tiny", '"/root/.cache/align/gguf/abc"'):
        assert ABSOLUTE_PATH.search(text), text
    for text in (
        "../shared/data/real/x.json",
        "~/.cache/align",
        "$XDG_CACHE_HOME/align",
        "/proc/cpuinfo",
        "https://example.org/home/x",
        "bench/results/rlhf.json",
    ):
        assert not ABSOLUTE_PATH.search(text), text


def test_shipped_text_has_no_development_history():
    bad = offending(HISTORY)
    assert not bad, "text about how the project was built (say what it is instead):\n" + "\n".join(bad)


def test_shipped_text_has_no_machine_paths():
    bad = offending(ABSOLUTE_PATH)
    assert not bad, "absolute paths of a development machine (use repository-relative ones):\n" + "\n".join(bad)


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly the test command the README gives."""
    ci = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == ["bash scripts/test.sh"], ci
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^bash scripts/test\.sh\s+#", readme, flags=re.M)
