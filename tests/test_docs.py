"""The user documentation stays true to the tree: every relative link of README.md,
docs/ and benchmarks/README.md names a file that exists (and a heading that exists, for
#anchors), the README stays short, and every `python -m` command line of the README's
code blocks is accepted, as written, by the parser of the command it calls."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "benchmarks" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in md.read_text().splitlines()
            if line.startswith("#")}


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(md: Path) -> None:
    bad = []
    for target in LINK.findall(md.read_text()):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    assert not bad, f"{md.relative_to(REPO)}: {bad}"


def test_the_readme_is_short_and_points_at_the_docs() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for doc in ("docs/training.md", "docs/configuration.md", "docs/store.md",
                "docs/data.md", "docs/results.md"):
        assert f"]({doc})" in text, doc


def _readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python -m ") and "$" not in line:  # no shell expansion
                cmds.append(shlex.split(line))
    return cmds


class _Parsed(Exception):
    pass


def test_the_readme_python_commands_parse_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options and subcommands exist as the README spells them (tests/test_readme.py runs
    every line of the README's bash blocks on data)."""
    from dissect_dist import __main__ as top
    from dissect_dist.data import __main__ as data_cli
    from dissect_dist.report import main as report_main
    from store import __main__ as store_cli

    mains = {"dissect_dist.data": data_cli.main, "store": store_cli.main,
             "dissect_dist": top.main, "dissect_dist.report": report_main}
    real = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        ns = real(self, args, namespace)  # exits 2 on an unknown option or argument
        if self.prog == "python -m dissect_dist":  # the top level dispatches on
            return ns
        raise _Parsed()

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    cmds = _readme_commands()
    assert len(cmds) >= 4, cmds
    for cmd in cmds:
        with pytest.raises(_Parsed):
            mains[cmd[2]](cmd[3:])


def test_the_files_the_readme_commands_name_exist() -> None:
    """The shipped files the README's command lines use (configs, hostfile, scripts)."""
    text = (REPO / "README.md").read_text()
    named = {tok for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for tok in re.findall(r"(?:launch|benchmarks)/[\w./-]+", block)}
    assert {"launch/train.py", "launch/configs/vitb32-cc12m.yaml",
            "launch/hostfile.example"} <= named, named
    missing = [p for p in named if not (REPO / p).exists()]
    assert not missing, missing
