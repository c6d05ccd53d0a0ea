from __future__ import annotations

import dataclasses

import pytest

from laion_dask.ground.config import (
    ConfigError,
    DownloadConfig,
    FilterConfig,
    PipelineConfig,
    config_from_dict,
    dump_config,
    load_config,
)


def test_defaults_are_laion_5b():
    cfg = PipelineConfig()
    assert cfg.filters.similarity_en == 0.28
    assert cfg.filters.similarity_multi == 0.26
    assert cfg.rules.min_text_chars == 5
    assert cfg.rules.blocked_extensions == (".svg", ".gif")
    assert cfg.download.max_pixels == 89_478_484
    assert cfg.download.min_bytes == 5_000
    assert cfg.download.allow_private_networks is False
    assert cfg.clip.model == "openai/clip-vit-base-patch32"


def test_round_trip_through_toml(tmp_path):
    cfg = PipelineConfig().replace("download", image_size=128, formats=("jpeg", "png"))
    cfg = cfg.replace("input", paths=("a.wat.gz", "CC-MAIN-2024-22"), limit=3)
    path = tmp_path / "config.toml"
    dump_config(cfg, path)
    back = load_config(path)
    assert back == cfg
    assert back.download.formats == ("JPEG", "PNG")


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"download": {"max_bytes": -1}}, "download.max_bytes"),
        ({"download": {"resize_mode": "stretch"}}, "download.resize_mode"),
        ({"download": {"min_bytes": 10, "max_bytes": 5}}, "download.min_bytes"),
        ({"download": {"encode_quality": 101}}, "download.encode_quality"),
        ({"filters": {"similarity_en": 2.0}}, "filters.similarity_en"),
        ({"filters": {"max_punsafe": -0.1}}, "filters.max_punsafe"),
        ({"language": {"min_confidence": 1.5}}, "language.min_confidence"),
        ({"language": {"backend": "cld3"}}, "language.backend"),
        ({"input": {"sample": 0}}, "input.sample"),
        ({"input": {"limit": 0}}, "input.limit"),
        ({"rules": {"blocked_extensions": ["svg"]}}, "rules.blocked_extensions"),
        ({"cluster": {"scheduler_address": "localhost"}}, "cluster.scheduler_address"),
        ({"clip": {"batch_size": 0}}, "clip.batch_size"),
        ({"clip": {"tags": "head"}}, "clip.tag_head"),
        ({"download": {"max_byte": 1}}, "download.max_byte"),
        ({"downlaod": {}}, "downlaod"),
        ({"download": {"deadline": float("nan")}}, "download.deadline"),
        ({"download": {"concurrency": True}}, "download.concurrency"),
    ],
)
def test_wrong_values_name_the_key(data, key):
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    assert str(err.value).startswith(key)


def test_configs_are_frozen():
    cfg = DownloadConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_bytes = 1  # type: ignore[misc]


def test_replace_validates_again():
    with pytest.raises(ConfigError, match="filters.similarity_multi"):
        PipelineConfig().replace("filters", similarity_multi=-3)


def test_bad_toml_is_a_config_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[download\nmax_bytes = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_similarity_for_group():
    f = FilterConfig(similarity_en=0.3, similarity_multi=0.2, similarity_nolang=0.1)
    assert [f.similarity_for(g) for g in ("en", "multi", "nolang", "xx")] == [0.3, 0.2, 0.1, 0.1]


def test_cluster_malloc_mmap_threshold_is_checked_and_round_trips(tmp_path):
    from laion_dask.ground.config import ClusterConfig

    assert ClusterConfig().malloc_mmap_threshold is None  # Dask's worker environment as it is
    for bad in (-1, 2**25 + 1, 1.5, "32MiB", True):
        with pytest.raises(ConfigError, match="cluster.malloc_mmap_threshold"):
            ClusterConfig(malloc_mmap_threshold=bad)
    cfg = PipelineConfig().replace("cluster", malloc_mmap_threshold=2**25)
    path = tmp_path / "c.toml"
    dump_config(cfg, path)
    assert "malloc_mmap_threshold = 33554432" in path.read_text()
    assert load_config(path).cluster.malloc_mmap_threshold == 2**25
    dump_config(PipelineConfig(), path)  # unset: left out of the TOML, read back unset
    assert "malloc_mmap_threshold" not in path.read_text()
    assert load_config(path).cluster.malloc_mmap_threshold is None


def test_per_host_interval_is_checked_against_the_deadline():
    from laion_dask.ground.config import ConfigError, DownloadConfig

    assert DownloadConfig(per_host_interval=0.5).per_host_interval == 0.5
    with pytest.raises(ConfigError, match="download.per_host_interval"):
        DownloadConfig(per_host_interval=-1)
    with pytest.raises(ConfigError, match="download.per_host_interval.*deadline"):
        DownloadConfig(per_host_interval=4.0, per_host_concurrency=8, deadline=30.0)


def test_index_section_is_read_validated_and_round_trips(tmp_path):
    from laion_dask.ground.config import ConfigError, dump_config, load_config

    path = tmp_path / "c.toml"
    path.write_text('[index]\nmemory_budget = "1GB"\ntarget_recall = 0.9\nnlist = 64\n')
    cfg = load_config(path)
    assert cfg.index.budget_bytes == 1_000_000_000 and cfg.index.target_recall == 0.9
    assert cfg.index.nlist == 64
    again = tmp_path / "again.toml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg
    path.write_text("[index]\nnprobe = 3\n")
    with pytest.raises(ConfigError, match=r"index\.nprobe: unknown key"):
        load_config(path)
    path.write_text("[index]\ntarget_recall = 1.5\n")
    with pytest.raises(ConfigError, match=r"index\.target_recall"):
        load_config(path)
