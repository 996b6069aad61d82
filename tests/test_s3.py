"""The store on s3:// against a local S3-compatible server (moto, 127.0.0.1 only)."""

from __future__ import annotations

import numpy as np
import pytest

from store import ScoreStore, SnapshotError, SnapshotLocation
from tests.rank_pool import free_port
from tests.store_model import gather_dense, rp_exchange_random, rp_new_store, same_bits

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                              "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing",
                 ).create_bucket(Bucket="scores-bucket")
    assert s3fs.S3FileSystem(**opts).exists("scores-bucket")
    yield opts
    server.stop()


def _rp_save_s3(ctx, url, step, opts):
    ctx["store"].save(SnapshotLocation(url, opts), step)


def _rp_load_s3(ctx, url, n, opts):
    ctx["store"] = ScoreStore.load(SnapshotLocation(url, opts),
                                   __import__("store").TorchDistributed(), n=n,
                                   chunk_target=256, shard_target=1024)


def test_s3_round_trip_single_process(s3) -> None:
    s = ScoreStore(10_000, chunk_target=256, shard_target=1024)
    s.values[::3] = 42.5
    loc = SnapshotLocation("s3://scores-bucket/single", s3)
    s.save(loc, 7)
    back = ScoreStore.load(loc, n=10_000)
    assert np.array_equal(back.local_numpy().view(np.uint16), s.local_numpy().view(np.uint16))
    with pytest.raises(SnapshotError, match="N=10000 samples, this run expects N=9"):
        ScoreStore.load(loc, n=9)


@pytest.mark.multirank
def test_s3_two_ranks_save_three_ranks_load(pools, s3) -> None:
    n = 20_011
    pools(2).run(rp_new_store, n, 256, 1024)
    pools(2).run(rp_exchange_random, 1, 3000)
    want = gather_dense(pools(2), n)
    pools(2).run(_rp_save_s3, "s3://scores-bucket/multi", 3, s3)
    pools(3).run(_rp_load_s3, "s3://scores-bucket/multi", n, s3)
    assert same_bits(gather_dense(pools(3), n), want)
