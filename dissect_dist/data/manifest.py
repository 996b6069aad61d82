"""The manifest: shard URL -> sample count, giving every sample the dense id
offset[shard] + position in shard. Built once (from tar headers, or from img2dataset's
*_stats.json), stored as JSON beside the shards, checked against each shard on read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import re
from collections.abc import Sequence
from typing import Any, BinaryIO

import fsspec
import numpy as np

FORMAT = "dissect-dist/manifest"
VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# webdataset's key/extension split: key = dirname + basename up to the first dot.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class ManifestError(ValueError):
    """The manifest is unreadable or disagrees with the shards."""


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    offset: int  # byte offset of the data in the tar
    size: int


@dataclasses.dataclass(slots=True)
class TarSample:
    key: str
    members: dict[str, Member]


@dataclasses.dataclass(slots=True)
class TarIndex:
    """Samples of one shard, from its headers only. `truncated` is set when the file
    ends inside a header or a member's data (a partial download or copy)."""

    samples: list[TarSample]
    truncated: bool


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


class _BadHeader(Exception):
    pass


def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as e:
        raise _BadHeader(f"not an octal number: {text!r}") from e


def _pax_path(data: bytes) -> str | None:
    """The `path` record of a pax extended header ("<len> path=<value>\n" records)."""
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        length = int(data[pos:sp])
        record = data[sp + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        pos += length
    return None


def scan_tar(fileobj: BinaryIO, file_size: int) -> TarIndex:
    """Index a WebDataset tar from its 512-byte headers only; member data is seeked
    over. Handles ustar, GNU long names and pax path records. A file that ends inside
    a header or a member, or holds garbage where a header should be, sets `truncated`
    and keeps the samples before the last one seen (which may have lost members)."""
    samples: list[TarSample] = []
    truncated = False
    pos = 0
    long_name: str | None = None
    while True:
        fileobj.seek(pos)
        hdr = fileobj.read(_BLOCK)
        if len(hdr) < _BLOCK:
            truncated = True  # a whole tar ends with zero blocks, never mid-header
            break
        if hdr == _ZERO_BLOCK:
            break  # end-of-archive marker
        try:
            stored = _octal(hdr[148:156])
            if stored != sum(hdr[:148]) + 8 * 32 + sum(hdr[156:]):
                raise _BadHeader("header checksum mismatch")
            size = _octal(hdr[124:136])
        except _BadHeader:
            truncated = True
            break
        kind = hdr[156:157]
        data_at = pos + _BLOCK
        nxt = data_at + -(-size // _BLOCK) * _BLOCK
        if kind in (b"L", b"x", b"g"):
            if data_at + size > file_size:
                truncated = True
                break
            fileobj.seek(data_at)
            extra = fileobj.read(size)
            if kind == b"L":
                long_name = extra.split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":
                long_name = _pax_path(extra) or long_name
            pos = nxt
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if hdr[257:262] == b"ustar":
                prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
                if prefix:
                    name = f"{prefix}/{name}"
        pos = nxt
        if kind not in (b"0", b"\0", b"7"):
            continue  # directories, links, devices: not sample members
        m = _KEY_EXT.match(name)
        if data_at + size > file_size:
            truncated = True
            break
        if m is None:
            continue
        key, ext = m.group(1), m.group(2).lower()
        if not samples or samples[-1].key != key:
            samples.append(TarSample(key, {}))
        samples[-1].members[ext] = Member(data_at, size)
    if truncated and samples:
        # The last sample may be missing members that lay past the cut: unusable.
        samples.pop()
    return TarIndex(samples, truncated)


def index_shard(url: str, storage_options: dict[str, Any] | None = None) -> TarIndex:
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    size = fs.size(path)
    with fs.open(path, "rb") as f:
        return scan_tar(f, size)


_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """A list of URLs as it is, or one string with its brace groups expanded left to right
    as webdataset expands shard URLs: lists ("{train,val}", nestable) and numeric ranges,
    zero-padded to the first bound's width ("{000..009}"); a group with neither stays as
    written. "s3://b/{train,val}-{00..01}.tar" -> train-00, train-01, val-00, val-01."""
    if not isinstance(spec, str):
        return list(spec)
    group = _first_brace_group(spec)
    if group is None:
        return [spec]
    start, end = group
    head, body, tails = spec[:start], spec[start + 1:end], expand_urls(spec[end + 1:])
    m = _RANGE.fullmatch(body)
    if m is not None:
        lo, hi = m.group(1), m.group(2)
        if int(lo) > int(hi):
            raise ManifestError(f"{spec}: brace range {{{lo}..{hi}}} counts down; "
                                f"write {{{hi}..{lo}}}")
        middles = [f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        alternatives = _split_top_level(body)
        if len(alternatives) == 1:  # "{abc}": not a group, kept with its braces
            middles = ["{" + x + "}" for x in expand_urls(body)]
        else:
            middles = [x for alt in alternatives for x in expand_urls(alt)]
    return [head + mid + tail for mid in middles for tail in tails]


def _first_brace_group(s: str) -> tuple[int, int] | None:
    """(index of "{", index of its matching "}") of the first group, None without one."""
    depth, start = 0, -1
    for i, c in enumerate(s):
        if c == "{":
            if depth == 0:
                start = i
            depth += 1
        elif c == "}":
            if depth == 0:
                raise ManifestError(f"{s}: '}}' at position {i} closes no '{{'")
            depth -= 1
            if depth == 0:
                return start, i
    if depth:
        raise ManifestError(f"{s}: '{{' at position {start} is never closed")
    return None


def _split_top_level(body: str) -> list[str]:
    """body split at the commas outside nested braces."""
    parts, depth, last = [], 0, 0
    for i, c in enumerate(body):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    parts.append(body[last:])
    return parts


@dataclasses.dataclass(frozen=True)
class Manifest:
    urls: tuple[str, ...]
    counts: np.ndarray  # (S,) int64
    _ends: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.urls) != self.counts.shape[0]:
            raise ManifestError(f"{len(self.urls)} shard URLs but {self.counts.shape[0]} counts")
        if len(self.urls) == 0:
            raise ManifestError("manifest lists no shards")
        # (S,) end id of each shard, for locate(); computed once, not per batch
        object.__setattr__(self, "_ends", np.cumsum(self.counts).astype(np.int64))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], self._ends[:-1]]).astype(np.int64)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, position in shard) of each global id."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.total):
            raise ManifestError(f"sample id outside [0, {self.total})")
        shard = np.searchsorted(self._ends, ids, side="right")
        return shard, ids - self.offsets[shard]

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for u, c in zip(self.urls, self.counts.tolist()):
            h.update(f"{posixpath.basename(u)}:{c}\n".encode())
        return h.hexdigest()[:16]

    # ---------------------------------------------------------------- building
    @classmethod
    def from_tars(cls, urls: Sequence[str], storage_options: dict[str, Any] | None = None,
                  progress: bool = False) -> Manifest:
        counts = []
        for i, url in enumerate(urls):
            idx = index_shard(url, storage_options)
            if idx.truncated:
                raise ManifestError(
                    f"{url} is truncated (the file ends inside a tar member); re-download or "
                    "re-create the shard before building the manifest"
                )
            counts.append(len(idx.samples))
            if progress and (i + 1) % 100 == 0:
                print(f"[manifest] {i + 1}/{len(urls)} shards indexed", flush=True)
        return cls(tuple(urls), np.asarray(counts, dtype=np.int64))

    @classmethod
    def from_stats(cls, urls: Sequence[str], storage_options: dict[str, Any] | None = None
                   ) -> Manifest:
        """From img2dataset's per-shard `<shard>_stats.json` ("successes" = samples)."""
        counts = []
        for url in urls:
            stats = re.sub(r"\.tar$", "_stats.json", url)
            fs, path = fsspec.core.url_to_fs(stats, **(storage_options or {}))
            if not fs.exists(path):
                raise ManifestError(f"{stats} not found: build the manifest from tar headers "
                                    "instead (python -m dissect_dist.data manifest --from tar)")
            counts.append(int(json.loads(fs.cat_file(path))["successes"]))
        return cls(tuple(urls), np.asarray(counts, dtype=np.int64))

    # ---------------------------------------------------------------- storage
    def save(self, path: str) -> None:
        base = os.path.dirname(os.path.abspath(path)) if "://" not in path else None
        shards = []
        for u, c in zip(self.urls, self.counts.tolist()):
            if "://" not in u:
                u = os.path.abspath(u)  # a relative path means relative to the cwd, here
                if base and u.startswith(base + os.sep):
                    u = os.path.relpath(u, base)  # stored relative to the manifest
            shards.append({"url": u, "samples": c})
        doc = {"format": FORMAT, "version": VERSION, "total": self.total, "shards": shards}
        with fsspec.open(path, "w") as f:
            json.dump(doc, f, indent=1)

    @classmethod
    def load(cls, path: str) -> Manifest:
        with fsspec.open(path, "r") as f:
            try:
                doc = json.load(f)
            except ValueError as e:
                raise ManifestError(f"{path}: not a JSON manifest ({e})") from e
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise ManifestError(f"{path}: not a {FORMAT} v{VERSION} manifest")
        remote = "://" in path
        base = posixpath.dirname(path) if remote else os.path.dirname(os.path.abspath(path))
        urls = []
        for s in doc["shards"]:
            u = s["url"]
            if "://" not in u and not os.path.isabs(u):
                u = posixpath.join(base, u) if remote else os.path.join(base, u)
            urls.append(u)
        m = cls(tuple(urls), np.asarray([s["samples"] for s in doc["shards"]], dtype=np.int64))
        if m.total != doc["total"]:
            raise ManifestError(
                f"{path}: shard counts sum to {m.total}, header says {doc['total']}"
            )
        return m
