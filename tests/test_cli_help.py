"""Every option of every command line the project ships says what it does in --help."""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _launch_main() -> Callable[[], object]:
    spec = importlib.util.spec_from_file_location("launch_train", REPO / "launch" / "train.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main  # type: ignore[no-any-return]


def _mains() -> dict[str, Callable[[], Callable[[], object]]]:
    from dissect_dist import __main__ as top_cli
    from dissect_dist import demo
    from dissect_dist.data import __main__ as data_cli
    from store import __main__ as store_cli

    return {"python -m dissect_dist": lambda: lambda: top_cli.main([]),
            "python -m dissect_dist.data": lambda: lambda: data_cli.main([]),
            "python -m store": lambda: lambda: store_cli.main([]),
            "python -m dissect_dist.demo": lambda: demo.main,
            "launch/train.py": _launch_main}


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _options(parser: argparse.ArgumentParser, prefix: str) -> Iterator[tuple[str, str | None]]:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{prefix} {name}")
            continue
        yield f"{prefix} {'/'.join(action.option_strings) or action.dest}", action.help


@pytest.mark.parametrize("command", sorted(_mains()))
def test_every_option_has_a_help_string(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsed(self)

    main = _mains()[command]()
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as parsed:
        main()
    options = list(_options(parsed.value.parser, command))
    assert options, command
    assert [name for name, text in options if not text] == []
