from __future__ import annotations

import json

import numpy as np
import pandas as pd

from laion_dask.ground.shards import (
    ShardSample,
    iter_shard,
    make_key,
    read_images,
    read_shard_images,
    write_shard,
)


def test_round_trip_and_json_metadata(tmp_path):
    path = str(tmp_path / "00000.tar")
    meta = {
        "na": pd.NA,
        "nan": float("nan"),
        "none": None,
        "i": np.int32(7),
        "f": np.float32(0.5),
        "s": "x",
    }
    n = write_shard(
        path,
        [
            ShardSample(key=make_key(0, i), image=b"img%d" % i, text="t", meta=meta)
            for i in range(3)
        ],
    )
    assert n == 3 and not list(tmp_path.glob("*.tmp-*"))
    members = dict(iter_shard(path))
    assert sorted(members) == ["000000000", "000000001", "000000002"]

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    got = json.loads(members["000000001"]["json"], parse_constant=no_constants)
    assert got == {"na": None, "nan": None, "none": None, "i": 7, "f": 0.5, "s": "x"}
    assert read_shard_images(path, ["000000002"]) == {"000000002": b"img2"}


def test_read_images_in_order_across_shards_and_past_a_bad_one(tmp_path, caplog):
    root = tmp_path / "images"
    root.mkdir()
    write_shard(
        str(root / "00000.tar"),
        [ShardSample("k1", b"one", "t", {}), ShardSample("k2", b"two", "t", {})],
    )
    # the same key in another shard is another image
    write_shard(str(root / "00001.tar"), [ShardSample("k1", b"uno", "t", {}, ext="png")])
    (root / "00002.tar").write_bytes(b"not a tar at all")
    keys = ["k2", "k1", "k1", "k9", None, "k1", "k1"]
    shards = ["00000.tar", "00001.tar", "00000.tar", "00000.tar", "00000.tar", pd.NA, "00002.tar"]
    with caplog.at_level("WARNING", logger="laion_dask.ground.shards"):
        got = read_images(str(root), keys, shards)
    assert got == [b"two", b"uno", b"one", None, None, None, None]
    assert "00002.tar unreadable" in caplog.text and "1 images missing" in caplog.text
    assert read_images(str(root), [], []) == []
