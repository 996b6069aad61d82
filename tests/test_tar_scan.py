"""The header-only tar scanner agrees with Python's tarfile on every tar format a
WebDataset shard comes in, and flags truncation and garbage."""

from __future__ import annotations

import io
import tarfile

import pytest

from dissect_dist.data.manifest import scan_tar


def _tar(fmt: int, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for i, name in enumerate(names):
            data = bytes([i % 251]) * (i * 37 % 1500)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# 20 samples of (txt, jpg); every third sample under a 150-byte directory path.
NAMES = [("deep/" * 30 if (i // 2) % 3 == 0 else "") + f"sample{i // 2:04d}."
         + ("jpg" if i % 2 else "txt") for i in range(40)]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_scanner_matches_tarfile(fmt: int) -> None:
    short = [n.replace("deep/" * 30, "d/") for n in NAMES]  # ustar: names <= 255 bytes
    names = NAMES if fmt != tarfile.USTAR_FORMAT else short
    raw = _tar(fmt, names)
    idx = scan_tar(io.BytesIO(raw), len(raw))
    assert not idx.truncated
    got = [(s.key + "." + ext, m.offset, m.size)
           for s in idx.samples for ext, m in s.members.items()]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        want = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isfile()]
    assert sorted(got) == sorted(want)
    assert len(idx.samples) == len({n.rsplit(".", 1)[0] for n in names})


def test_truncation_and_garbage_keep_only_complete_samples() -> None:
    raw = _tar(tarfile.GNU_FORMAT, NAMES)
    whole = scan_tar(io.BytesIO(raw), len(raw))
    cut = raw[: len(raw) // 2]
    part = scan_tar(io.BytesIO(cut), len(cut))
    assert part.truncated and 0 < len(part.samples) < len(whole.samples)
    for s in part.samples:  # every kept sample is complete and inside the file
        assert set(s.members) == {"jpg", "txt"}
        assert all(m.offset + m.size <= len(cut) for m in s.members.values())
    garbage = raw[:1024] + b"not a tar header at all" * 40
    assert scan_tar(io.BytesIO(garbage), len(garbage)).truncated
