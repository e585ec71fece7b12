"""The code points only at documents a user's clone has, never at files outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import ROOT

# A Markdown file named in code or a script: `docs/vllm-cpu.md#3`, `README.md`, `../x/stack.md`.
MENTION = re.compile(r"(?<![\w/.'\"-])((?:\.\./|[\w.-]+/)*[\w.-]+\.md)(?![\w])(?:#[\w-]+)?")
# Files align writes (not documents it ships).
OUTPUTS = {"report.md"}
ANCHOR = re.compile(r"\.md#(\d+)")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [
        ROOT / line for line in out.splitlines() if line and not line.startswith("tests/project/test_docs_refs.py")
    ]


def test_every_markdown_file_the_code_names_is_in_the_repository():
    missing = []
    for path in tracked("*.py", "*.sh", "*.yaml", "*.yml", "*.toml", ".ci/*"):
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in MENTION.findall(line):
                if name in OUTPUTS:
                    continue
                if not (ROOT / name).resolve().is_file() or not (ROOT / name).resolve().is_relative_to(ROOT):
                    missing.append(f"{path.relative_to(ROOT)}:{lineno}: {name}")
    assert not missing, "code names documents a clone does not have:\n" + "\n".join(missing)


def test_numbered_anchors_into_vllm_cpu_exist():
    """`docs/vllm-cpu.md#N` must name a section `## N.` of that page."""
    sections = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "vllm-cpu.md").read_text(), flags=re.M))
    bad = []
    for path in tracked("*.py", "*.sh"):
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if "docs/vllm-cpu.md#" in line:
                bad += [f"{path.relative_to(ROOT)}:{lineno}: #{n}" for n in ANCHOR.findall(line) if n not in sections]
    assert not bad, "anchors with no section in docs/vllm-cpu.md:\n" + "\n".join(bad)


# A Markdown link: [text](target), the target without its #anchor.
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def test_every_relative_link_of_the_docs_resolves_to_a_file_of_the_repository():
    """README.md and docs/*.md link files by relative paths; each must exist where the link points."""
    broken = []
    for path in tracked("*.md"):
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):  # https:, mailto:
                    continue
                resolved = (path.parent / target).resolve()
                if not resolved.exists() or not resolved.is_relative_to(ROOT):
                    broken.append(f"{path.relative_to(ROOT)}:{lineno}: {target}")
    assert not broken, "links to files the repository does not have:\n" + "\n".join(broken)
