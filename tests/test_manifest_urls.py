"""Shard URL patterns for `python -m dissect_dist.data manifest`, as webdataset writes them."""

from __future__ import annotations

import pytest

from dissect_dist.data.manifest import ManifestError, expand_urls


@pytest.mark.parametrize("spec,want", [
    ("a.tar", ["a.tar"]),
    ("{a,b}.tar", ["a.tar", "b.tar"]),
    ("s3://b/shards/{000..003}.tar",
     ["s3://b/shards/000.tar", "s3://b/shards/001.tar", "s3://b/shards/002.tar",
      "s3://b/shards/003.tar"]),
    ("{8..11}.tar", ["8.tar", "9.tar", "10.tar", "11.tar"]),  # unpadded bounds: no padding
    ("{train,val}-{00..01}.tar",
     ["train-00.tar", "train-01.tar", "val-00.tar", "val-01.tar"]),  # left to right
    ("{x-{0..1},y}.tar", ["x-0.tar", "x-1.tar", "y.tar"]),  # nested
    ("{,old-}a.tar", ["a.tar", "old-a.tar"]),  # an empty alternative
    ("file{1}.tar", ["file{1}.tar"]),  # no list, no range: kept as written
])
def test_brace_lists_and_ranges_expand_as_webdataset_does(spec: str, want: list[str]) -> None:
    assert expand_urls(spec) == want


def test_a_list_of_urls_is_taken_as_it_is() -> None:
    assert expand_urls(["{a,b}.tar", "c.tar"]) == ["{a,b}.tar", "c.tar"]


@pytest.mark.parametrize("spec,msg", [
    ("{a,b.tar", "'{' at position 0 is never closed"),
    ("a}.tar", "'}' at position 1 closes no '{'"),
    ("{009..000}.tar", r"counts down; write \{000..009\}"),
])
def test_malformed_patterns_are_refused_naming_the_fault(spec: str, msg: str) -> None:
    with pytest.raises(ManifestError, match=msg):
        expand_urls(spec)


def test_manifest_command_takes_a_brace_list_and_a_range(tmp_path, capsys) -> None:
    import json

    from dissect_dist.data.__main__ import main
    from dissect_dist.data.manifest import Manifest
    from tests.datagen import make_dataset

    make_dataset(tmp_path, [3, 4, 5])
    out = tmp_path / "manifest.json"
    assert main(["manifest", f"{tmp_path}/shard-{{000000,000002}}.tar",
                 f"{tmp_path}/shard-{{000001..000001}}.tar", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["samples"] == 12
    m = Manifest.load(str(out))
    assert [u.rsplit("/", 1)[-1] for u in m.urls] == [
        "shard-000000.tar", "shard-000002.tar", "shard-000001.tar"]
    assert m.counts.tolist() == [3, 5, 4]
