"""The training data loader: (ids, images, texts) batches over WebDataset shards, in
the deterministic order of `order.py`, resumable mid-epoch from a cursor.

Given an `ImagePlan` (decode.py) as preprocess, images are decoded at reduced JPEG
scale and batched as uint8 (normalised on the device by `Batch.images_on`); given any
other callable, each image is decoded at full size and passed through it. Given a
`TokenCache` (tokens.py), captions are tokenised once per shard and read back after.

Workers only parallelise decoding: worker k of K decodes the rank's batches
cursor+k, cursor+k+K, ... and torch's DataLoader hands them out round-robin, which
is batch order. Reading goes through fsspec with a per-shard header index, so
resuming (or skipping) touches tar headers only, never image bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import logging
import multiprocessing
from collections.abc import Callable, Iterator
from typing import Any, Literal

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dissect_dist.data.decode import DeviceJob, ImagePlan, TooManyPixels, to_rgb
from dissect_dist.data.manifest import IMAGE_EXTS, Manifest, ManifestError, TarIndex, scan_tar
from dissect_dist.data.order import OrderSpec, rank_batches, worker_batches
from dissect_dist.data.tokens import TokenCache

log = logging.getLogger(__name__)
STATE_VERSION = 1
SKIP_REASONS = ("missing_image", "undecodable_image", "missing_caption", "empty_caption",
                "truncated", "too_many_pixels")
# Not skips: a JPEG that reduced-size decoding rejected was decoded at full size instead.
RETRY_REASON = "full_size_retry"
# Not skips either: a JPEG the training device's decoder rejected, decoded on the host.
DEVICE_RETRY_REASON = "device_decode_retry"
_RETRIES_LOGGED = 20  # per retry reason and loader; later ones are counted only
_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError)
# A cold read of a shard from object storage (the tar's headers, then its first samples)
# takes seconds to a few minutes; a worker silent for longer is stuck.
DEFAULT_WORKER_TIMEOUT_S = 300.0


class DataStalled(RuntimeError):
    """A data worker produced no batch within the loader's worker_timeout_s."""


@dataclasses.dataclass
class Batch:
    index: int  # batch number within the epoch, on this rank
    ids: torch.Tensor  # (k,) int64 global sample ids, k <= batch_size (bad samples skipped)
    images: torch.Tensor  # (k, C, H, W): uint8 under an ImagePlan, else preprocess's output
    texts: Any  # tokenizer output for k captions (a (k, L) int64 tensor for open_clip)
    captions: list[str]
    plan: ImagePlan | None = None  # set when images are uint8 still to be normalised
    # Decoding on the training device (the loader's decode="device"): the JPEGs left to
    # decode there, concatenated (1-D uint8), and one row per JPEG: (batch row, offset,
    # length, box left, top, right, bottom, EXIF orientation, upright height, width).
    # `images` then holds only the rows decoded on the host (`host_rows`: the images the
    # device path does not take) until images_on decodes the rest and holds them all.
    encoded: torch.Tensor | None = None
    jobs: np.ndarray | None = None
    host_rows: np.ndarray | None = None
    account: Callable[[list[tuple[str, str, str]]], None] | None = None

    def images_on(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The images on `device` as `dtype`: uint8 ones are copied as uint8 and
        normalised there (bit-identical to ToTensor + Normalize, see ImagePlan.normalize).

        With JPEGs left to the device, they are decoded there first (`decode_jpeg`: nvJPEG
        on CUDA), once: `images` then holds the whole uint8 batch on `device`. One the
        device rejects is decoded on the host from the same box (counted as
        `device_decode_retry`), and one neither can decode is dropped from the batch
        (counted as `undecodable_image`): call this before reading ids, texts, captions."""
        if self.encoded is not None:
            self._decode_on(torch.device(device))
        if self.plan is not None:
            return self.plan.normalize(self.images, device, dtype)
        return self.images.to(device, non_blocking=True).to(dtype)

    def _decode_on(self, device: torch.device) -> None:
        plan, jobs, enc = self.plan, self.jobs, self.encoded
        assert plan is not None and jobs is not None and enc is not None
        out = torch.empty((self.ids.shape[0], 3, *plan.size), dtype=torch.uint8, device=device)
        if self.host_rows is not None and len(self.host_rows):
            out[torch.from_numpy(self.host_rows).to(device)] = self.images.to(device)
        if device.type == "cuda":
            # torchvision's nvJPEG path allocates its outputs on this stream but writes
            # them from a stream of its own without waiting for this one: a block the
            # caching allocator hands back while queued kernels still read it would be
            # overwritten under them. Wait for the queue first (the call blocks anyway).
            torch.cuda.current_stream(device).synchronize()
        bad: list[int] = []
        events: list[tuple[str, str, str]] = []
        for chunk in _chunks(jobs, _DEVICE_DECODE_PIXELS):  # full-size decodes held at once
            self._decode_chunk(chunk, enc, out, device, bad, events)
        if bad:
            keep = np.ones(self.ids.shape[0], dtype=bool)
            keep[bad] = False
            self._keep_rows(keep)
            out = out[torch.from_numpy(keep).to(device)]
        if events and self.account is not None:
            self.account(events)
        self.images, self.encoded, self.jobs, self.host_rows = out, None, None, None

    def _decode_chunk(self, jobs: np.ndarray, enc: torch.Tensor, out: torch.Tensor,
                      device: torch.device, bad: list[int],
                      events: list[tuple[str, str, str]]) -> None:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        plan = self.plan
        assert plan is not None
        data = [enc[o:o + n] for o, n in jobs[:, 1:3].tolist()]
        with warnings.catch_warnings():  # torchvision >= 0.29 marks its decoders deprecated
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities")
            try:
                decoded: list[torch.Tensor | None] = list(
                    decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # one bad JPEG fails the whole call: one at a time
                # (the ones it rejects are decoded on the host and counted, below)
                decoded = [_decode_one(d, device) for d in data]
                if all(x is None for x in decoded):  # not the data: the decoder itself
                    raise RuntimeError(
                        f"decoding {len(data)} JPEGs on {device} failed for every one of them "
                        f"({e}); data.decode=workers decodes them in the data workers") from e
        for (row, _, _, x0, y0, x1, y1, orient, h, w), x, d in zip(jobs.tolist(), decoded,
                                                                     data):
            job = DeviceJob((x0, y0, x1, y1), orient, (h, w))
            if x is not None:
                try:
                    out[row] = plan.finish_on_device(x, job)
                    continue
                except ValueError:  # decoded at another size than its header's
                    pass
            sid = f"id {int(self.ids[row])}"
            try:
                out[row] = plan.decode_job(d.numpy().tobytes(), job).to(device)
                events.append((DEVICE_RETRY_REASON, "device", sid))
            except _DECODE_ERRORS:  # (its header passed the worker's checks)
                bad.append(row)
                events.append(("undecodable_image", "device", sid))

    def _keep_rows(self, keep: np.ndarray) -> None:
        """Drop the rows where `keep` is False from ids, texts and captions."""
        mask = torch.from_numpy(keep)
        self.ids = self.ids[mask]
        if isinstance(self.texts, torch.Tensor):
            self.texts = self.texts[mask]
        elif isinstance(self.texts, list):
            self.texts = [t for t, k in zip(self.texts, keep) if k]
        else:
            raise TypeError(f"cannot drop rows from tokenizer output of type "
                            f"{type(self.texts).__name__}: use data.decode=workers")
        self.captions = [c for c, k in zip(self.captions, keep) if k]


# Decoded pixels a device decode holds at once (uint8 RGB: 3 bytes each): a batch of
# camera-size photos is decoded in chunks, each finished before the next is decoded.
_DEVICE_DECODE_PIXELS = 256 * 2**20


def _chunks(jobs: np.ndarray, budget: int) -> Iterator[np.ndarray]:
    """`jobs` in order, in runs whose decoded pixels (height x width) stay within
    `budget`; a single larger image is a run of its own."""
    start, total = 0, 0
    for i, px in enumerate((jobs[:, 8] * jobs[:, 9]).tolist()):
        if total and total + px > budget:
            yield jobs[start:i]
            start, total = i, 0
        total += px
    if start < len(jobs):
        yield jobs[start:]


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        out: torch.Tensor = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return out
    except RuntimeError:
        return None


class ShardReader:
    """Random access to samples of the manifest's shards (one per worker)."""

    def __init__(self, manifest: Manifest, storage_options: dict[str, Any] | None = None,
                 max_open: int = 8) -> None:
        self.manifest = manifest
        self.opts = storage_options or {}
        self._index: dict[int, TarIndex] = {}
        self._token_keys: dict[int, str] = {}
        self._files: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.max_open = max_open

    def _file(self, shard: int) -> Any:
        f = self._files.get(shard)
        if f is None:
            fs, path = fsspec.core.url_to_fs(self.manifest.urls[shard], **self.opts)
            f = fs.open(path, "rb")
            self._files[shard] = f
            if len(self._files) > self.max_open:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(shard)
        return f

    def index(self, shard: int) -> TarIndex:
        idx = self._index.get(shard)
        if idx is None:
            url = self.manifest.urls[shard]
            fs, path = fsspec.core.url_to_fs(url, **self.opts)
            idx = scan_tar(self._file(shard), fs.size(path))
            want = int(self.manifest.counts[shard])
            found = len(idx.samples)
            if found > want or (found < want and not idx.truncated):
                raise ManifestError(
                    f"manifest says {url} has {want} samples, found {found}: the shard changed "
                    "after the manifest was built; rebuild it with "
                    "`python -m dissect_dist.data manifest SHARDS --out MANIFEST`"
                )
            self._index[shard] = idx
        return idx

    def read(self, shard: int, pos: int) -> tuple[str, dict[str, bytes]] | tuple[str, str]:
        """(key, {ext: bytes}) or ("", reason) when the sample cannot be read."""
        idx = self.index(shard)
        if pos >= len(idx.samples):
            return "", "truncated"
        s = idx.samples[pos]
        f = self._file(shard)
        out = {}
        for ext, m in s.members.items():
            f.seek(m.offset)
            out[ext] = f.read(m.size)
        return s.key, out

    def captions(self, shard: int) -> list[str]:
        """Every caption of a shard in position order ("" where missing or not UTF-8)."""
        idx = self.index(shard)
        f = self._file(shard)
        out = []
        for s in idx.samples:
            m = s.members.get("txt")
            text = ""
            if m is not None:
                f.seek(m.offset)
                try:
                    text = f.read(m.size).decode("utf-8").strip()
                except UnicodeDecodeError:
                    pass
            out.append(text)
        return out

    def token_key(self, shard: int) -> str:
        key = self._token_keys.get(shard)
        if key is None:
            url = self.manifest.urls[shard]
            fs, path = fsspec.core.url_to_fs(url, **self.opts)
            key = TokenCache.shard_key(url, int(self.manifest.counts[shard]), int(fs.size(path)))
            self._token_keys[shard] = key
        return key

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _caption(members: dict[str, bytes]) -> str:
    """The caption, or the skip reason prefixed by "!"."""
    if not any(e in members for e in IMAGE_EXTS):
        return "!missing_image"
    if "txt" not in members:
        return "!missing_caption"
    try:
        caption = members["txt"].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "!missing_caption"
    return caption or "!empty_caption"


def decode_sample(members: dict[str, bytes], preprocess: Callable[[Any], torch.Tensor],
                  max_pixels: int | None = None) -> tuple[torch.Tensor, str] | str:
    """(image tensor, caption) or the skip reason: full-size decode, upright (EXIF
    orientation applied), RGB, through `preprocess`."""
    from PIL import Image, ImageOps

    caption = _caption(members)
    if caption.startswith("!"):
        return caption[1:]
    ext = next(e for e in IMAGE_EXTS if e in members)
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with Image.open(io.BytesIO(members[ext])) as im:
            if limit and im.width * im.height > limit:
                return "too_many_pixels"
            im.load()
            image = to_rgb(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError:
        return "too_many_pixels"
    except _DECODE_ERRORS:
        return "undecodable_image"
    return preprocess(image), caption


def decode_planned(members: dict[str, bytes], plan: ImagePlan,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, str, bool] | str:
    """(uint8 image, caption, retried at full size) or the skip reason; the image is
    written into `out` when given. The torch RNG state is saved before a reduced-size
    decode so that a full-size retry draws the same crop."""
    from PIL import Image

    caption = _caption(members)
    if caption.startswith("!"):
        return caption[1:]
    data = members[next(e for e in IMAGE_EXTS if e in members)]
    rng = torch.get_rng_state()
    try:
        return plan.decode(data, out), caption, False
    except (TooManyPixels, Image.DecompressionBombError):
        return "too_many_pixels"
    except _DECODE_ERRORS:
        if not plan.draft:
            return "undecodable_image"
    torch.set_rng_state(rng)
    try:
        return plan.decode_full(data, out), caption, True
    except (TooManyPixels, Image.DecompressionBombError):
        return "too_many_pixels"
    except _DECODE_ERRORS:
        return "undecodable_image"


def prepare_planned(members: dict[str, bytes], plan: ImagePlan
                    ) -> tuple[bytes, DeviceJob, str] | str | None:
    """(JPEG bytes, device job, caption) for a sample the training device decodes, the
    skip reason, or None for an image the device path does not take (no RNG draw then:
    decode it with decode_planned)."""
    from PIL import Image

    caption = _caption(members)
    if caption.startswith("!"):
        return caption[1:]
    data = members[next(e for e in IMAGE_EXTS if e in members)]
    try:
        job = plan.prepare(data)
    except (TooManyPixels, Image.DecompressionBombError):
        return "too_many_pixels"
    except _DECODE_ERRORS:
        return "undecodable_image"
    return None if job is None else (data, job, caption)


class _Stream(IterableDataset):  # type: ignore[type-arg]
    """What each DataLoader worker runs: its share of the rank's remaining batches of the
    epoch that `shared` names. Workers persist across epochs (see WebDatasetLoader): the
    loader writes (epoch, cursor) into shared memory before each epoch, and each worker
    reads them when the epoch's iteration starts there. Each worker also writes what it
    is reading (batch, shard, position) so that a stalled one can be named."""

    def __init__(self, manifest: Manifest, spec: OrderSpec, rank: int,
                 preprocess: Callable[[Any], torch.Tensor] | ImagePlan,
                 tokenizer: Callable[[list[str]], Any] | None,
                 storage_options: dict[str, Any] | None, shared: torch.Tensor,
                 tokens: TokenCache | None = None, device_decode: bool = False) -> None:
        self.manifest, self.spec, self.rank = manifest, spec, rank
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.opts, self.tokens, self.device_decode = storage_options, tokens, device_decode
        # int64, shared memory: [epoch, cursor, then (batch, shard, position) per worker]
        self.shared = shared
        self._reading: np.ndarray | None = None  # this worker's row, as numpy

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        k, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, cursor = (int(x) for x in self.shared[:2].tolist())
        self._reading = self.shared[2:].view(-1, 3)[k].numpy()
        self._reading[:] = -1
        batches = rank_batches(self.manifest.counts, self.spec, epoch, self.rank)
        reader = ShardReader(self.manifest, self.opts)
        try:
            for j in worker_batches(batches.shape[0], cursor, k, n_workers):
                yield self._make(epoch, j, batches[j], reader)
        finally:
            reader.close()

    def _make(self, epoch: int, j: int, ids: np.ndarray, reader: ShardReader
              ) -> dict[str, Any]:
        shards, positions = self.manifest.locate(ids)
        plan = self.preprocess if isinstance(self.preprocess, ImagePlan) else None
        in_worker = get_worker_info() is not None
        kept: list[int] = []
        images, captions, skipped, rows = [], [], [], []
        slots = None
        if plan is not None and not self.device_decode:
            # decoded straight into the batch (one copy per image)
            slots = torch.empty((len(ids), 3, *plan.size), dtype=torch.uint8)
            if in_worker:
                slots.share_memory_()  # type: ignore[no-untyped-call]  # sent without a copy
        encoded: list[bytes] = []
        jobs: list[tuple[int, ...]] = []
        host_rows: list[int] = []
        offset = 0
        reading = self._reading
        assert reading is not None
        for sid, shard, pos in zip(ids.tolist(), shards.tolist(), positions.tolist()):
            reading[0], reading[1], reading[2] = j, shard, pos
            key, got = reader.read(shard, pos)
            if isinstance(got, str):
                skipped.append((got, self.manifest.urls[shard], key or f"#{pos}"))
                continue
            # Random augmentation as a pure function of (seed, epoch, sample id): the same
            # whatever the worker count, and identical after a resume.
            # The CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding,
            # whose stack capture costs more than a reduced-size decode.
            torch.default_generator.manual_seed(
                (self.spec.seed * 1_000_003 + epoch) * 2_147_483_647 + sid)
            res: tuple[Any, ...] | str | None = None
            if plan is not None and self.device_decode:
                res = prepare_planned(got, plan)
                if isinstance(res, tuple):  # left to the device: its bytes and crop box
                    data, job, caption = res
                    jobs.append((len(kept), offset, len(data), *job.box, job.orientation,
                                 *job.size))
                    encoded.append(data)
                    offset += len(data)
                    res = (None, caption)
                elif res is None:
                    host_rows.append(len(kept))
            if res is None and plan is not None:
                res = decode_planned(got, plan, slots[len(kept)] if slots is not None else None)
                if not isinstance(res, str) and res[2]:
                    skipped.append((RETRY_REASON, self.manifest.urls[shard], key))
            elif res is None:
                res = decode_sample(got, self.preprocess)  # type: ignore[arg-type]
            if isinstance(res, str):
                if host_rows and host_rows[-1] == len(kept):
                    host_rows.pop()
                skipped.append((res, self.manifest.urls[shard], key))
                continue
            kept.append(sid)
            if res[0] is not None:
                images.append(res[0])
            captions.append(res[1])
            if self.tokens is not None:
                rows.append(self.tokens.rows(reader.token_key(shard),
                                             functools.partial(reader.captions, shard))[pos])
        if self.tokens is not None and rows:
            texts: Any = torch.from_numpy(np.stack(rows)).to(torch.int64)
        else:
            texts = self.tokenizer(captions) if (self.tokenizer and captions) else captions
        # ids and tokens travel inline, as numpy arrays: a tensor crosses from a worker as
        # a file descriptor that the main process fetches from the worker (a socket
        # round trip served by a thread that waits for the decoding worker's GIL).
        if isinstance(texts, torch.Tensor):
            texts = texts.numpy()
        if not images:
            batch_images = torch.empty(0)
        elif slots is not None:
            batch_images = slots[:len(kept)]
        else:
            batch_images = torch.stack(images)
        out = {"index": j, "ids": np.asarray(kept, dtype=np.int64), "images": batch_images,
               "texts": texts, "captions": captions, "skipped": skipped}
        if self.device_decode and plan is not None:
            buf = torch.empty(offset, dtype=torch.uint8)
            if in_worker:
                buf.share_memory_()  # type: ignore[no-untyped-call]
            view = buf.numpy()
            for (_, o, n, *_), data in zip(jobs, encoded):
                view[o:o + n] = np.frombuffer(data, dtype=np.uint8)
            out.update(encoded=buf, jobs=np.asarray(jobs, dtype=np.int64).reshape(-1, 10),
                       host_rows=np.asarray(host_rows, dtype=np.int64))
        return out


class WebDatasetLoader:
    """Stateful per-rank loader. Iterating yields the rest of the current epoch;
    when an epoch is exhausted the next iteration starts the next epoch.

    state_dict()/load_state_dict() carry (epoch, cursor): a resumed loader yields
    exactly the batches an uninterrupted one would have yielded next.
    """

    def __init__(self, manifest: Manifest, *, rank: int, world_size: int, batch_size: int,
                 seed: int, preprocess: Callable[[Any], torch.Tensor] | ImagePlan,
                 tokenizer: Callable[[list[str]], Any] | None = None, num_workers: int = 2,
                 shuffle_window: int = 4, storage_options: dict[str, Any] | None = None,
                 pin_memory: bool = False, token_cache: str | None = None,
                 decode: Literal["workers", "device"] = "workers",
                 worker_timeout_s: float = DEFAULT_WORKER_TIMEOUT_S) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers}: need >= 0")
        if worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s={worker_timeout_s}: need > 0")
        self.manifest = manifest
        self.rank = rank
        self.spec = OrderSpec(seed=seed, world_size=world_size, batch_size=batch_size,
                              window=shuffle_window)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        if token_cache is not None and tokenizer is None:
            raise ValueError(f"token_cache={token_cache!r} needs a tokenizer")
        # Captions tokenised once per shard into this directory (None: per batch).
        self.tokens = TokenCache(token_cache, tokenizer) \
            if token_cache is not None and tokenizer is not None else None
        self.plan = preprocess if isinstance(preprocess, ImagePlan) else None
        if decode not in ("workers", "device"):
            raise ValueError(f"decode={decode!r}: choose 'workers' or 'device'")
        if decode == "device" and self.plan is None:
            raise ValueError("decode='device' needs an ImagePlan as preprocess (the JPEG fast "
                             f"path), got {type(preprocess).__name__}")
        if decode == "device" and self.plan is not None and not self.plan.device_decodable():
            raise ValueError(
                f"decode='device' resizes on the device with torch's bicubic or bilinear "
                f"filter (resampling 'fast'); this plan has PIL filter {self.plan.resample} "
                f"and resampling {self.plan.resampling!r}: use decode='workers'")
        # Where JPEGs are decoded: in the data workers, or (as far as the device decoder
        # takes them) on the training device, by Batch.images_on.
        self.decode = decode
        self.num_workers = num_workers
        # How long the rank waits for its next batch from a worker before it stops with
        # DataStalled (a shard read that never returns must not hang the run).
        self.worker_timeout_s = worker_timeout_s
        self.pin_memory = pin_memory  # page-locked batches, for asynchronous copies to a GPU
        self.opts = storage_options
        self.epoch = 0
        self.cursor = 0  # batches of this epoch already handed out
        self.skipped: collections.Counter[str] = collections.Counter()
        self.retried: collections.Counter[str] = collections.Counter()  # decoded, not skipped
        self._logged: set[tuple[str, str, str]] = set()
        if len(self) == 0:
            raise ValueError(
                f"{manifest.total} samples cannot fill one global batch of "
                f"{world_size} x {batch_size}: lower batch_size or add data"
            )
        # [epoch, cursor, (batch, shard, position) being read by each worker]; in shared
        # memory, read by the workers (see _Stream).
        self._shared = torch.full((2 + 3 * max(num_workers, 1),), -1, dtype=torch.int64)
        if num_workers:
            self._shared.share_memory_()  # type: ignore[no-untyped-call]
            _start_fork_server(preprocess, tokenizer)  # its imports overlap the caller's setup
        self._loader: DataLoader[Any] | None = None

    def __len__(self) -> int:
        """Batches per epoch on every rank."""
        return self.manifest.total // (self.spec.world_size * self.spec.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self.cursor >= len(self):
            self.epoch, self.cursor = self.epoch + 1, 0
        self._shared[0], self._shared[1] = self.epoch, self.cursor  # before the workers read it
        start = self.cursor
        batches = iter(self._data_loader())  # persistent workers: begin this epoch
        while True:
            try:
                item = next(batches)
            except StopIteration:
                return
            except RuntimeError as e:
                if "DataLoader timed out" not in str(e):
                    raise
                raise DataStalled(self._stall_message(start)) from None
            if item["index"] != self.cursor:  # the order contract, checked on every batch
                raise RuntimeError(f"loader produced batch {item['index']}, expected {self.cursor}")
            self._account(item["skipped"])
            self.cursor += 1
            ids, texts = _tensor(item["ids"], self.pin_memory), _tensor(item["texts"],
                                                                         self.pin_memory)
            yield Batch(item["index"], ids, item["images"], texts, item["captions"], self.plan,
                        encoded=item.get("encoded"), jobs=item.get("jobs"),
                        host_rows=item.get("host_rows"), account=self._account)

    def _data_loader(self) -> DataLoader[Any]:
        """One DataLoader for the loader's life. Its workers are started once, from the fork
        server, and kept across epochs: a trainer runs threads (gloo's, the heartbeat, the
        metric writers) by the time it loads data, and forking a process that runs threads
        can deadlock the child inside fork() (a lock another thread held, e.g. CPython's
        thread-state list, is never released there). Measured on the 28-px demo data and
        the photo set (benchmarks/loader_throughput.py, epoch-start columns): persistent
        workers also start each epoch sooner than workers forked anew per epoch; a fresh
        fork-server worker per epoch would pay the unpickling of the tokenizer and the
        worker's setup every epoch (seconds)."""
        if self._loader is None:
            stream = _Stream(self.manifest, self.spec, self.rank, self.preprocess,
                             self.tokenizer, self.opts, self._shared, self.tokens,
                             device_decode=self.decode == "device")
            workers: dict[str, Any] = {}
            if self.num_workers:
                workers = {"multiprocessing_context": _fork_server(),
                           "persistent_workers": True, "timeout": self.worker_timeout_s,
                           "worker_init_fn": _worker_init}
            self._loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                      collate_fn=_identity, pin_memory=self.pin_memory,
                                      **workers)
        return self._loader

    def _stall_message(self, start: int) -> str:
        """Which worker the rank waited for (batch `cursor` is worker (cursor - start) % K's,
        see worker_batches) and what that worker was reading."""
        k = (self.cursor - start) % self.num_workers
        batch, shard, pos = (int(x) for x in self._shared[2:].view(-1, 3)[k].tolist())
        if shard < 0:
            where = "it had not read a sample of this epoch yet"
        else:
            where = (f"it was reading sample {pos} of {self.manifest.urls[shard]} for batch "
                     f"{batch}")
        return (f"rank {self.rank}: data worker {k} of {self.num_workers} produced no batch in "
                f"{self.worker_timeout_s:g} s (data.worker_timeout_s; waiting for batch "
                f"{self.cursor} of epoch {self.epoch}): {where}. Check that this shard can be "
                "read from here (storage, network, credentials), or raise "
                "data.worker_timeout_s if a cold read takes longer; then restart with "
                "--resume latest")

    def close(self) -> None:
        """Stop the data workers (they are kept across epochs until then)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()

    def _account(self, skipped: list[tuple[str, str, str]]) -> None:
        for reason, shard, key in skipped:
            retry = reason in (RETRY_REASON, DEVICE_RETRY_REASON)
            (self.retried if retry else self.skipped)[reason] += 1
            if retry and self.retried[reason] > _RETRIES_LOGGED:
                # A retry can be systematic (a kind of JPEG one decoder never takes):
                # the first few are logged, the rest only counted (loader.retried).
                if self.retried[reason] == _RETRIES_LOGGED + 1:
                    log.warning("more samples needed %s; counted in loader.retried, no "
                                "longer logged one by one", reason)
                continue
            if (shard, key, reason) not in self._logged:
                self._logged.add((shard, key, reason))
                if reason == RETRY_REASON:
                    log.warning("sample %s in %s: reduced-size JPEG decoding failed, decoded "
                                "at full size", key, shard)
                elif reason == DEVICE_RETRY_REASON:
                    log.warning("sample %s: the training device's JPEG decoder failed, "
                                "decoded on the host", key)
                elif shard == "device":
                    log.warning("skipped sample %s (decoded on the training device): %s",
                                key, reason)
                else:
                    log.warning("skipped sample %s in %s: %s", key, shard, reason)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "cursor": self.cursor,
            "seed": self.spec.seed, "world_size": self.spec.world_size,
            "batch_size": self.spec.batch_size, "window": self.spec.window,
            "batches_per_epoch": len(self), "manifest": self.manifest.fingerprint(),
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data cursor version {sd.get('version')}, expected {STATE_VERSION}")
        if sd["manifest"] != self.manifest.fingerprint():
            raise ValueError(
                "checkpoint's data cursor belongs to another manifest (fingerprint "
                f"{sd['manifest']} vs {self.manifest.fingerprint()}): resume with the manifest "
                "the run started with"
            )
        mine = (self.spec.seed, self.spec.world_size, self.spec.batch_size, self.spec.window)
        theirs = (sd["seed"], sd["world_size"], sd["batch_size"], sd["window"])
        epoch, cursor = sd["epoch"], sd["cursor"]
        if mine != theirs:
            if cursor >= sd["batches_per_epoch"]:
                epoch, cursor = epoch + 1, 0  # that epoch was complete: start the next anew
            elif cursor > 0:
                raise ValueError(
                    f"checkpoint was taken mid-epoch (epoch {epoch}, batch {cursor}) with "
                    f"seed/world_size/batch_size/window {theirs}; this run has {mine}. The rest "
                    "of that epoch's order depends on them: resume with the same values, or "
                    "from a checkpoint at an epoch boundary"
                )
        self.epoch, self.cursor = epoch, cursor
        self.skipped = collections.Counter(sd.get("skipped", {}))


# A worker hands each batch to the main process from a second thread (the queue's feeder
# and the descriptor-passing server), which needs the GIL while the worker's own thread
# decodes the next batch; at CPython's default 5 ms switch interval that costs tens of
# milliseconds per batch of latency (the first batch after a start or a resume waits for
# it). 0.2 ms hands the GIL over sooner.
_WORKER_SWITCH_INTERVAL_S = 2e-4


def _fork_server() -> Any:
    return multiprocessing.get_context("forkserver")


def _start_fork_server(preprocess: Any, tokenizer: Any) -> None:
    """Start this process's fork server now (a fresh interpreter, started by fork + exec,
    which is safe with threads), with what a worker imports already imported: its imports
    then overlap the caller's setup, and each worker it forks starts warm. The preload list
    counts only before the server first starts (one per process)."""
    from multiprocessing import forkserver

    mods = ["numpy", "torch", "PIL.Image", "fsspec", __name__]
    mods += [type(x).__module__ for x in (preprocess, tokenizer)
             if x is not None and type(x).__module__ not in ("builtins", "__main__")]
    ctx = _fork_server()
    ctx.set_forkserver_preload(list(dict.fromkeys(mods)))
    forkserver.ensure_running()


def _worker_init(_: int) -> None:
    import sys

    sys.setswitchinterval(_WORKER_SWITCH_INTERVAL_S)


def _identity(x: Any) -> Any:
    return x


def _tensor(x: Any, pin: bool) -> Any:
    """A worker's numpy array as a tensor (no copy; page-locked when `pin`)."""
    if not isinstance(x, np.ndarray):
        return x
    t = torch.from_numpy(x)
    return t.pin_memory() if pin else t
