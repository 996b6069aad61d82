"""The configuration reference, generated from dissect_dist/config.py: every key of every
section with its type, default and the comment written beside it in the dataclass (the
one place it is documented), so the reference cannot drift from the code.

    python -m dissect_dist.config_doc > docs/configuration.md

tests/test_config.py fails when docs/configuration.md is not what this prints, or when a
key has no comment."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from typing import Any

from dissect_dist import config

_FIELD = re.compile(r"^    (\w+): (.+?) = (.+?)(?:\s+#\s*(.*))?$")
_COMMENT = re.compile(r"^    #\s?(.*)$")

HEADER = """# Configuration reference

Generated from `dissect_dist/config.py` by `python -m dissect_dist.config_doc`; do not
edit by hand. A run's config is a YAML file with these sections (the shipped ones are in
`launch/configs/`), and any key can be overridden on the command line as
`section.key=value` (`deepspeed launch/train.py --config C.yaml train.epochs=3`). Bad keys
and values are refused before any process starts, naming the key.
"""


def field_docs(cls: type) -> dict[str, str]:
    """{field: its comment}: the comment lines right above the field, plus the comment
    on the field's own line."""
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        c = _COMMENT.match(line)
        if c:
            above.append(c.group(1).strip())
            continue
        f = _FIELD.match(line)
        if f:
            docs[f.group(1)] = " ".join([*above, f.group(4) or ""]).strip()
        above = []
    return docs


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def reference() -> str:
    out = [HEADER]
    for section, cls in config._CLASSES.items():
        doc = (cls.__doc__ or "").strip()
        out.append(f"## `{section}`\n")
        if doc and not doc.startswith(cls.__name__ + "("):
            out.append(doc + "\n")
        out.append("| key | type | default | what it does |\n|---|---|---|---|")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            typ = str(f.type).replace("|", "or")
            text = docs.get(f.name, "").replace("|", "\\|")
            out.append(f"| `{section}.{f.name}` | `{typ}` | `{_default(f)}` | {text} |")
        out.append("")
    return "\n".join(out)


def undocumented() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in config._CLASSES.items()
            for f in dataclasses.fields(cls) if not field_docs(cls).get(f.name)]


if __name__ == "__main__":
    sys.stdout.write(reference())
