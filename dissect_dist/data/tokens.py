"""Captions tokenised once: a directory of per-shard token arrays, filled the first time
a shard is read and reused by every later batch, worker, epoch and run that points at it.

    CACHE/tokenizer.json        the tokenizer's identity (refused if another one opens it)
    CACHE/<shard key>.npy       (samples in shard, context) int32 tokens, row = position

The shard key hashes the shard's URL, sample count and byte size, so a rebuilt shard
gets new rows. Captions longer than the context are truncated exactly as the tokenizer
truncates them (the rows are its output). Writes are atomic (temporary file, then
rename) and a per-shard lock keeps two workers from tokenising the same shard twice.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

FORMAT = "dissect-dist/token-cache"
VERSION = 1
# Text that exercises cleaning (ftfy, whitespace, case), byte-level BPE on non-ASCII,
# and truncation at the context length.
_PROBES = ("A photo of a cat.", "  Two   DOGS, running! ", "Café naïve — 東京 🚀 &amp; ok",
           " ".join(["long"] * 200))


class TokenizerMismatch(ValueError):
    """A token cache built with another tokenizer."""


# The vocabulary's part of the identity (its sorted JSON, ~1 MB for open_clip's), kept per
# live tokenizer object: building it takes ~50 ms, which every new loader (a resumed one
# too) paid again. A tokenizer whose vocabulary is changed in place after its first use
# (e.g. tokens added) keeps its first record: make a new tokenizer object instead.
_VOCAB_DIGESTS: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()


def tokenizer_identity(tokenizer: Callable[[list[str]], Any]) -> dict[str, Any]:
    """What identifies a tokenizer's output: its class, context length, vocabulary size,
    and a hash of its tokens for fixed probe texts plus of its vocabulary when it has one
    (that part computed once per tokenizer object)."""
    h = hashlib.sha256()
    out = torch.as_tensor(tokenizer(list(_PROBES)))
    h.update(str(tuple(out.shape)).encode())
    h.update(out.to(torch.int64).numpy().tobytes())
    h.update(_vocab_digest(tokenizer))
    cls = type(tokenizer)
    return {"class": f"{cls.__module__}.{cls.__qualname__}",
            "context_length": int(out.shape[-1]),
            "vocab_size": getattr(tokenizer, "vocab_size", None), "sha256": h.hexdigest()}


def _vocab_digest(tokenizer: Any) -> bytes:
    """The bytes the identity hashes for the vocabulary: its sorted JSON when the
    tokenizer has an `encoder` dict, else nothing."""
    try:
        return _VOCAB_DIGESTS[tokenizer]
    except (KeyError, TypeError):  # TypeError: not weakly referenceable
        pass
    enc = getattr(tokenizer, "encoder", None)
    digest = b""
    if isinstance(enc, dict):
        digest = json.dumps(sorted(enc.items()), ensure_ascii=False).encode()
    try:
        _VOCAB_DIGESTS[tokenizer] = digest
    except TypeError:
        pass
    return digest


class TokenCache:
    """Token rows by (shard, position); see the module docstring. Opening checks the
    tokenizer's identity against the directory's record (written on first open)."""

    def __init__(self, root: str, tokenizer: Callable[[list[str]], Any],
                 identity: dict[str, Any] | None = None, keep: int = 16) -> None:
        self.root, self.tokenizer = root, tokenizer
        self.identity = identity or tokenizer_identity(tokenizer)
        self._mem: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.keep = keep
        self.built = 0  # shards this process tokenised
        os.makedirs(root, exist_ok=True)
        rec = os.path.join(root, "tokenizer.json")
        doc = {"format": FORMAT, "version": VERSION, "tokenizer": self.identity}
        if not os.path.exists(rec):
            _atomic_write(rec, json.dumps(doc, indent=1).encode())
        with open(rec, encoding="utf-8") as f:
            have = json.load(f)
        if have.get("format") != FORMAT or have.get("version") != VERSION:
            raise TokenizerMismatch(f"{rec} is not a {FORMAT} v{VERSION} record: point the "
                                    "token cache at an empty or matching directory")
        if have["tokenizer"] != self.identity:
            raise TokenizerMismatch(
                f"token cache {root} was built with tokenizer {have['tokenizer']}, this run's "
                f"is {self.identity}: its tokens would be wrong for this model. Point the "
                "token cache at another directory (or delete this one to rebuild it)")

    def __getstate__(self) -> dict[str, Any]:  # into DataLoader workers: no loaded rows
        return {**self.__dict__, "_mem": collections.OrderedDict()}

    @staticmethod
    def shard_key(url: str, count: int, size: int) -> str:
        h = hashlib.sha256(f"{url}\n{count}\n{size}".encode()).hexdigest()[:20]
        base = os.path.basename(url.rstrip("/")).rsplit(".", 1)[0]
        return f"{base}-{h}"

    def rows(self, key: str, captions: Callable[[], Sequence[str]]) -> np.ndarray:
        """(n, context) int32 tokens of one shard; `captions()` (all the shard's
        captions, "" where one is missing) is called only if the shard is not cached."""
        hit = self._mem.get(key)
        if hit is not None:
            self._mem.move_to_end(key)
            return hit
        path = os.path.join(self.root, key + ".npy")
        if not os.path.exists(path):
            with _locked(path + ".lock"):
                if not os.path.exists(path):  # another worker may have built it meanwhile
                    toks = torch.as_tensor(self.tokenizer(list(captions())))
                    buf = _npy_bytes(toks.to(torch.int32).numpy())
                    _atomic_write(path, buf)
                    self.built += 1
        arr: np.ndarray = np.load(path, mmap_mode="r")
        self._mem[key] = arr
        if len(self._mem) > self.keep:
            self._mem.popitem(last=False)
        return arr


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
