from __future__ import annotations

import dataclasses
import re

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


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GB", 4_000_000_000),
        ("4 gb", 4_000_000_000),
        ("1.5GiB", 1_610_612_736),
        ("512MiB", 512 * 2**20),
        ("10kB", 10_000),
        ("1e9", 1_000_000_000),
        ("2.5e3 KB", 2_500_000),
        ("123", 123),
        ("100 B", 100),
        (".5 KiB", 512),
        ("4.35KB", 4350),  # no float truncation to 4349
    ],
)
def test_parse_bytes_reads_si_and_binary_units(text, expected):
    from laion_dask.ground.config import parse_bytes

    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "4XB", "4 G B", "1,000", "0x10"])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    from laion_dask.ground.config import parse_bytes

    with pytest.raises(ValueError, match="byte size"):
        parse_bytes(text)


def test_ground_config_does_not_import_dask():
    """ground sits under orchestration: its byte sizes are parsed without Dask."""
    import ast
    import inspect

    from laion_dask.ground import config

    tree = ast.parse(inspect.getsource(config))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("dask", "distributed")}
    cfg = load_config_text('[index]\nmemory_budget = "1.5GiB"\n')
    assert cfg.index.budget_bytes == 1_610_612_736


def load_config_text(text: str) -> PipelineConfig:
    import tomllib

    return config_from_dict(tomllib.loads(text))


def test_a_runs_own_config_toml_is_accepted_as_a_config(tmp_path):
    """RUN/config.toml carries a [run] table of facts (resolved model revision ...): reading it
    back as a config skips that table instead of refusing an 'unknown section'."""
    from laion_dask.orchestration.rundir import RunDir

    cfg = PipelineConfig().replace("input", paths=("a.warc.gz",)).replace("download", retries=4)
    run = RunDir(str(tmp_path / "run"))
    run.write_config(cfg, extra={"clip_resolved": {"revision": "abc", "device": "cpu"}})
    assert "[run.clip_resolved]" in open(run.config_path).read()
    assert load_config(run.config_path) == cfg
    with pytest.raises(ConfigError, match="^run: must be a table"):
        config_from_dict({"run": 3})


def test_negative_similarity_thresholds_are_warned_about():
    from laion_dask.ground.config import config_warnings

    assert config_warnings(PipelineConfig()) == []
    assert config_warnings(FilterConfig(similarity_en=-1, similarity_multi=-1)) == []
    (line,) = config_warnings(FilterConfig(similarity_en=-0.3))
    assert line.startswith("filters.similarity_en = -0.3 keeps every scored row")
    assert "did you mean 0.3?" in line
    cfg = PipelineConfig().replace("filters", similarity_multi=-0.05, similarity_nolang=-0.2)
    assert [w.split(" ")[0] for w in config_warnings(cfg)] == [
        "filters.similarity_multi",
        "filters.similarity_nolang",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "sets no threshold"),
        ({"filters": {}}, "sets no threshold"),
        ({"download": {"retries": 1}}, "no [filters] table, and download is not a threshold"),
        ({"similarity_en": 0.3, "filters": {"max_punsafe": 0.5}}, "outside the [filters] table"),
        ({"filters": {"similarity": 0.3}}, "filters.similarity: unknown key"),
        ({"filters": 0.3}, "filters must be a table"),
    ],
)
def test_a_thresholds_file_that_cannot_be_meant_is_refused(data, message):
    from laion_dask.ground.config import filters_table

    with pytest.raises(ConfigError, match=re.escape(message)):
        filters_table(data, where="t.toml")


def test_thresholds_tables_that_are_meant_are_read():
    from laion_dask.ground.config import filters_table

    assert filters_table({"similarity_en": 0.3}) == {"similarity_en": 0.3}
    whole = {"filters": {"similarity_en": 0.2}, "download": {"retries": 1}, "run": {}}
    assert filters_table(whole) == {"similarity_en": 0.2}  # a whole config.toml is fine
