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
            if line.startswith("python -m "):
                cmds.append(shlex.split(line))
    return cmds


class _Parsed(Exception):
    pass


def test_the_readme_python_commands_parse_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Options and subcommands exist as the README spells them (running them on data is
    covered by tests/test_builders.py, test_cli.py and test_manifest_urls.py)."""
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


@pytest.mark.slow
def test_the_readme_python_commands_run_as_written(tmp_path: Path) -> None:
    """In a scratch directory that holds what the README's commands name (100 local
    shards, a folder of images with caps.csv, a run's metrics), each `python -m` line of
    the README's code blocks runs as written and succeeds. The S3 line needs a bucket: it
    is only parsed (above); the S3 manifest path itself is tested in tests/test_s3.py."""
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    from tests.datagen import make_dataset
    from tests.test_cli import _metrics

    shards = make_dataset(tmp_path / "data" / "src", [2] * 100)
    (tmp_path / "data" / "shards").mkdir()
    for i, url in enumerate(shards.urls):  # the README's names: data/shards/00000..00099.tar
        os.replace(url.removeprefix("file://"), tmp_path / "data" / "shards" / f"{i:05d}.tar")
    (tmp_path / "DIR").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "DIR" / "a.png")
    (tmp_path / "caps.csv").write_text("filepath,title\na.png,a red square\n")
    _metrics(tmp_path / "runs" / "my-run", 20, partial=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ran = 0
    for cmd in _readme_commands():
        if any(a.startswith("s3://") for a in cmd):
            continue
        r = subprocess.run([sys.executable, *cmd[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
        ran += 1
    assert ran >= 3
    man = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert man["total"] == 200 and len(man["shards"]) == 100
    assert (tmp_path / "data" / "mine" / "manifest.json").exists()
    assert (tmp_path / "runs" / "my-run" / "report.png").exists()


def test_the_files_the_readme_commands_name_exist() -> None:
    """The shipped files the README's command lines use (configs, hostfile, scripts)."""
    text = (REPO / "README.md").read_text()
    named = {tok for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for tok in re.findall(r"(?:launch|benchmarks)/[\w./-]+", block)}
    assert {"launch/train.py", "launch/configs/vitb32-cc12m.yaml",
            "launch/hostfile.example"} <= named, named
    missing = [p for p in named if not (REPO / p).exists()]
    assert not missing, missing
