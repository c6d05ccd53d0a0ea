"""kNN index, search and near-duplicate groups over a run's embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import ConfigError
from laion_dask.products import knn, neardup
from laion_dask.stages.embeddings import read_embeddings
from tests.helpers.knn import clustered_vectors, make_scene_run, make_vector_run

REPO = Path(__file__).resolve().parents[1]


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def _brute_force(vectors: np.ndarray, query: np.ndarray, k: int, allowed=None) -> np.ndarray:
    sims = vectors.astype(np.float32) @ query.astype(np.float32)
    if allowed is not None:
        sims = np.where(allowed, sims, -np.inf)
    order = np.lexsort((np.arange(len(sims)), -sims))
    return order[: min(k, int(np.isfinite(sims).sum()))]


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory, client):
    rng = np.random.default_rng(3)
    run = make_vector_run(
        tmp_path_factory.mktemp("flat") / "run", [_unit(rng, n, 16) for n in (50, 0, 70, 30)]
    )
    info = knn.build_index(run, client=client)
    return run, info


@pytest.fixture(scope="module")
def scene_run(tmp_path_factory, client):
    run, scenes = make_scene_run(tmp_path_factory.mktemp("scenes") / "run", client)
    knn.build_index(run, client=client)
    knn.build_index(run, modality="text", client=client)
    return run, scenes


def test_choose_index_follows_size_and_budget():
    cfg = knn.IndexConfig(flat_max_vectors=1000, memory_budget="1GB")
    assert knn.choose_index(1000, 512, cfg).kind == "flat"
    plan = knn.choose_index(1_000_000, 512, cfg)
    assert plan.kind == "ivfpq" and plan.factory == f"IVF1024,PQ{plan.pq_m}x8"
    assert plan.pq_m == 256 and plan.estimated_bytes <= 2**30
    tight = knn.choose_index(1_000_000, 512, knn.IndexConfig(memory_budget="100MB"))
    assert tight.pq_m < plan.pq_m and tight.estimated_bytes <= 100e6
    # Flat past the budget: IVF-PQ even below flat_max_vectors
    assert knn.choose_index(50_000, 512, knn.IndexConfig(memory_budget="50MB")).kind == "ivfpq"
    with pytest.raises(ValueError, match="too small"):
        knn.choose_index(1_000_000, 512, knn.IndexConfig(memory_budget="1MB"))
    with pytest.raises(ConfigError, match="index.memory_budget"):
        knn.IndexConfig(memory_budget="lots")
    with pytest.raises(ConfigError, match="index.target_recall"):
        knn.IndexConfig(target_recall=1.5)


def test_flat_results_equal_brute_force(flat_run):
    run, info = flat_run
    assert info.kind == "flat" and info.exact and info.recall == 1.0 and info.n == 150
    assert info.parts == 3  # the empty part adds nothing
    vectors, _, meta = read_embeddings(run.join("embeddings"))
    index = knn.load_index(run)
    assert index.metadata[schema.KEY].tolist() == meta[schema.KEY].tolist()
    rng = np.random.default_rng(0)
    for query in _unit(rng, 5, 16):
        (got,) = index.search_vectors(query, 10, dedup=None)
        want = _brute_force(vectors, query, 10)
        assert got["id"].tolist() == want.tolist()
        sims = vectors[want].astype(np.float32) @ query.astype(np.float32)
        np.testing.assert_allclose(got["similarity"], sims, rtol=1e-5, atol=1e-6)
        assert got[schema.KEY].tolist() == meta[schema.KEY].iloc[want].tolist()


def test_filters_equal_brute_force_over_the_rows_they_keep(flat_run):
    run, _ = flat_run
    vectors, _, _ = read_embeddings(run.join("embeddings"))
    index = knn.load_index(run)
    meta = index.metadata
    query = _unit(np.random.default_rng(1), 1, 16)[0]
    allowed = (
        meta[schema.LANGUAGE_GROUP].eq("en").to_numpy(bool)
        & (meta[schema.PUNSAFE].to_numpy() <= 0.5)
        & (meta[schema.PWATERMARK].to_numpy() <= 0.8)
    )
    (got,) = index.search_vectors(
        query, 8, language_group="en", max_punsafe=0.5, max_pwatermark=0.8, dedup=None
    )
    assert got["id"].tolist() == _brute_force(vectors, query, 8, allowed).tolist()
    assert set(got[schema.LANGUAGE_GROUP]) == {"en"} and (got[schema.PUNSAFE] <= 0.5).all()
    # more wanted than rows pass: every passing row, nothing else
    (few,) = index.search_vectors(query, 1000, language_group="nolang", dedup=None)
    assert len(few) == int(meta[schema.LANGUAGE_GROUP].eq("nolang").sum())
    with pytest.raises(ValueError, match="language group"):
        index.search_vectors(query, 3, language_group="fr")
    with pytest.raises(ValueError, match="width"):
        index.search_vectors(query[:8], 3)


def test_search_works_from_the_saved_index_in_a_fresh_process(flat_run):
    run, _ = flat_run
    query = _unit(np.random.default_rng(2), 1, 16)[0].astype(np.float32)
    here = knn.search(run, vector=query, k=7, thumbnails=False)
    code = (
        "import json, sys, numpy as np\n"
        "from laion_dask.products.knn import search\n"
        "q = np.array(json.loads(sys.argv[2]), dtype=np.float32)\n"
        "r = search(sys.argv[1], vector=q, k=7, thumbnails=False)\n"
        "print(json.dumps({'key': r['key'].tolist(), 'sim': r['similarity'].tolist()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, run.path, json.dumps(query.tolist())],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["key"] == here[schema.KEY].tolist()
    np.testing.assert_allclose(there["sim"], here["similarity"], rtol=1e-6)


def test_ivfpq_recall_is_measured_and_holds_on_fresh_queries(tmp_path, client):
    dim = 32
    data = clustered_vectors(6000, dim, seed=5)
    run = make_vector_run(tmp_path / "run", [data[:2000], data[2000:4500], data[4500:]])
    cfg = knn.IndexConfig(flat_max_vectors=1000, nlist=32, eval_queries=300, target_recall=0.9)
    info = knn.build_index(run, cfg, client=client)
    assert info.kind == "ivfpq" and info.factory == "IVF32,PQ8x8,Refine(SQfp16)"
    assert not info.exact
    assert info.recall >= info.recall_floor == 0.9 and info.meets_floor
    assert info.recall_by_setting[f"{info.nprobe}x{info.k_factor}"] == info.recall
    saved = json.loads(Path(run.join("index", "image.json")).read_text())
    assert saved["recall"] == info.recall and saved["nprobe"] == info.nprobe
    # recall@10 on other queries (rows of the run, their own id excluded), brute force as truth
    index = knn.load_index(run)
    vectors = data.astype(np.float32)
    rng = np.random.default_rng(99)
    qids = rng.choice(len(data), 200, replace=False)
    hits = 0
    for qid in qids:
        (got,) = index.search_vectors(vectors[qid], 11, dedup=None)
        found = [i for i in got["id"] if i != qid][:10]
        truth = [i for i in _brute_force(data, vectors[qid], 11) if i != qid][:10]
        hits += len(set(found) & set(truth))
    assert hits / (10 * len(qids)) >= info.recall_floor


def test_ivf_probes_more_lists_when_a_filter_leaves_them_short(tmp_path, client):
    """A selective filter: its few rows sit in lists the query's nprobe does not reach. The
    search must still return every allowed row (up to k), not the few in the probed lists."""
    data = clustered_vectors(6000, 32, seed=8)
    run = make_vector_run(tmp_path / "run", [data[:3000], data[3000:]])
    cfg = knn.IndexConfig(flat_max_vectors=1000, nlist=32, eval_queries=200, target_recall=0.8)
    info = knn.build_index(run, cfg, client=client)
    assert info.kind == "ivfpq" and info.nprobe < info.nlist
    index = knn.load_index(run)
    punsafe = index.metadata[schema.PUNSAFE].to_numpy(dtype="float64")
    cut = float(np.sort(punsafe)[11])  # 12 rows pass, spread over the clusters
    allowed = set(np.flatnonzero(punsafe <= cut).tolist())
    assert len(allowed) == 12
    for qid in (0, 2500, 5999):
        (got,) = index.search_vectors(data[qid].astype(np.float32), 12, max_punsafe=cut, dedup=None)
        assert set(got["id"]) == allowed
        assert (got[schema.PUNSAFE] <= cut).all()
        assert got["similarity"].is_monotonic_decreasing


def test_collapse_near_duplicates_keeps_the_best_ranked():
    v = np.array([[1, 0, 0], [0.99, 0.141, 0], [0, 1, 0], [0, 0.99, 0.141], [0, 0, 1]], float)
    kept, collapsed = knn.collapse_near_duplicates(v, 0.94)
    assert kept.tolist() == [0, 2, 4] and collapsed.tolist() == [1, 0, 1, 0, 0]
    groups = np.array([np.nan, np.nan, 7, np.nan, 7])
    kept, _ = knn.collapse_near_duplicates(v, 0.94, groups=groups)
    assert kept.tolist() == [0, 2]


def test_near_duplicate_groups_are_planted_sets(tmp_path, client):
    rng = np.random.default_rng(11)
    base = _unit(rng, 120, 32).astype(np.float32)
    # plant: rows 5, 60 and 100 are copies of row 5 (+ tiny noise); rows 20 and 90 a pair
    planted = {60: 5, 100: 5, 90: 20}
    for dst, src in planted.items():
        base[dst] = base[src] + 0.01 * rng.normal(size=32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    data = base.astype(np.float16)
    run = make_vector_run(tmp_path / "run", [data[:50], data[50:120]])
    knn.build_index(run, client=client)
    report = knn.find_near_duplicates(run, 0.94, client=client)
    assert (report.groups, report.members, report.near_duplicates) == (2, 5, 3)
    groups = neardup.read_near_duplicates(run)
    meta = knn.load_index(run).metadata
    sim = meta["caption_similarity"].to_numpy()
    for members in ({5, 60, 100}, {20, 90}):
        rows = groups[groups[schema.KEY].isin(meta[schema.KEY].iloc[sorted(members)])]
        assert len(rows) == len(members) and rows[neardup.DUPLICATE_GROUP].nunique() == 1
        canonical = max(members, key=lambda i: (sim[i], -i))
        assert int(rows[neardup.DUPLICATE_GROUP].iloc[0]) == canonical
        flags = dict(zip(rows[schema.KEY], rows[neardup.NEAR_DUPLICATE], strict=True))
        assert [k for k, f in flags.items() if not f] == [meta[schema.KEY].iloc[canonical]]
    # per part on disk, with markers that add up; joinable onto any frame with a key
    assert sorted(run.markers("neardup")) == [0, 1]
    assert sum(m["near_duplicates"] for m in run.markers("neardup").values()) == 3
    scores = pd.concat([run.read_parquet(p) for p in run.parts("scores")], ignore_index=True)
    joined = neardup.add_near_duplicate(scores, groups)
    assert len(joined) == len(scores) and int(joined[neardup.NEAR_DUPLICATE].sum()) == 3
    assert int(joined[neardup.DUPLICATE_GROUP].notna().sum()) == 5
    # the same run again: the same groups
    knn.find_near_duplicates(run, 0.94, client=client)
    pd.testing.assert_frame_equal(neardup.read_near_duplicates(run), groups)
    # search collapses a group into its best-ranked member
    index = knn.load_index(run)
    (res,) = index.search_vectors(data[5], 3)
    assert len(res) == 3 and int(res["collapsed"].iloc[0]) == 2
    assert not set(res["id"]) & ({5, 60, 100} - {int(res["id"].iloc[0])})


def test_groups_from_other_scores_are_refused(tmp_path, client):
    """A part re-scored after the index or the groups were made: its keys may name other
    images now, so neither the groups nor the index they came from are used silently."""
    rng = np.random.default_rng(3)
    data = _unit(rng, 80, 16).astype(np.float16)
    data[60] = data[5]
    run = make_vector_run(tmp_path / "run", [data[:40], data[40:]])
    knn.build_index(run, client=client)
    assert knn.load_index(run).info.scores_fingerprints == {"0": "x", "1": "x"}
    knn.find_near_duplicates(run, 0.99, client=client)
    parts = {p: run.read_parquet(run.part_path("scores", p)) for p in (0, 1)}
    joined = neardup.join_part_near_duplicates(run, 1, parts[1])
    assert joined[neardup.DUPLICATE_GROUP].notna().any()
    # part 1 re-scored (another config): its marker's fingerprint changes
    marker = run.done_marker("scores", 1)
    run.mark_done("scores", 1, {**marker, "fingerprint": "y"})
    with pytest.raises(neardup.StaleNearDuplicates, match="part 1 .*re-scored"):
        neardup.join_part_near_duplicates(run, 1, parts[1])
    neardup.join_part_near_duplicates(run, 0, parts[0])  # part 0 is unchanged: still joins
    with pytest.raises(neardup.StaleNearDuplicates, match=r"parts \[1\].*laion-dask index"):
        knn.find_near_duplicates(run, 0.99, client=client)
    # rebuilt from the current scores, both work again
    knn.build_index(run, client=client)
    knn.find_near_duplicates(run, 0.99, client=client)
    joined = neardup.join_part_near_duplicates(run, 1, parts[1])
    assert joined[neardup.DUPLICATE_GROUP].notna().any()


def test_text_search_with_the_runs_own_clip_finds_the_scene(scene_run):
    run, scenes = scene_run
    meta = knn.load_index(run).metadata
    for key in (meta[schema.KEY].iloc[3], meta[schema.KEY].iloc[20]):
        scene = scenes[key]
        res = knn.search(run, text=scene.key, k=3)
        assert len(res) == 3 and res["rank"].tolist() == [1, 2, 3]
        top = scenes[res[schema.KEY].iloc[0]]
        assert (top.colour, top.shape) == (scene.colour, scene.shape), (scene, top)
        assert res["similarity"].is_monotonic_decreasing
        assert res["thumbnail"].iloc[0] is not None and res["thumbnail"].iloc[0].size[0] <= 128
        assert res[schema.URL].iloc[0].startswith("http://img.example/")
        assert res[schema.TEXT].iloc[0] == top.key


def test_image_query_finds_itself_and_collapses_its_copy(scene_run):
    run, scenes = scene_run
    from laion_dask.ground.shards import read_shard_images

    image = read_shard_images(run.join("images", "00000.tar"), ["000000000"])["000000000"]
    res = knn.search(run, image=image, k=3, thumbnails=False)
    # 000000000 and 000010000 are the same picture under two URLs: one result, one collapsed
    assert res[schema.KEY].iloc[0] in {"000000000", "000010000"}
    assert int(res["collapsed"].iloc[0]) >= 1
    assert not {"000000000", "000010000"} <= set(res[schema.KEY])
    both = knn.search(run, image=image, k=3, thumbnails=False, dedup=None)
    assert {"000000000", "000010000"} <= set(both[schema.KEY].iloc[:2])
    # a caption index searches captions: the text query's best caption is the scene's own
    scene = scenes["000000005"]
    res = knn.search(run, text=scene.key, k=2, modality="text", thumbnails=False)
    assert res[schema.TEXT].iloc[0] == scene.key
    with pytest.raises(ValueError, match="cannot be decoded"):
        knn.search(run, image=b"not an image", k=3)
    with pytest.raises(ValueError, match="exactly one"):
        knn.search(run, text="a", image=image)


def test_image_query_puts_transparency_on_white_as_the_score_stage_does(tmp_path):
    import io

    from PIL import Image

    class Recorder:  # an Encoder that keeps what it was given
        dim = 4

        def encode_images(self, images):
            self.seen = [np.asarray(im) for im in images]
            return np.ones((len(images), self.dim), np.float32)

        def encode_texts(self, texts, groups):
            raise AssertionError("not a text query")

    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(buf, format="PNG")  # transparent red
    enc = Recorder()
    knn.encode_query(tmp_path, image=buf.getvalue(), encoder=enc)
    assert enc.seen[0].shape == (8, 8, 3)
    assert (enc.seen[0] == 255).all()  # white, as clip.to_rgb scores it; not the hidden red


def test_missing_index_is_a_clear_error(tmp_path):
    run = make_vector_run(tmp_path / "run", [_unit(np.random.default_rng(0), 5, 8)])
    with pytest.raises(FileNotFoundError, match="laion-dask index"):
        knn.load_index(run)


def test_cli_index_and_search(scene_run, client, capsys, tmp_path):
    from laion_dask.faces import cli

    run, scenes = scene_run
    address = client.scheduler.address
    assert cli.main(["index", run.path, "--scheduler", address, "-q"]) == 0
    printed = capsys.readouterr().out
    assert "flat" in printed and "recall@10" in printed
    scene = scenes["000000003"]
    assert cli.main(["search", run.path, scene.key, "-k", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(rows) == 2 and rows[0]["rank"] == 1 and "thumbnail" not in rows[0]
    assert cli.main(["search", run.path, "--image", str(tmp_path / "none.jpg")]) == 2
    # [index] of the config is read; a flag wins over it
    toml = tmp_path / "index.toml"
    toml.write_text("[index]\ntarget_recall = 0.8\nrecall_k = 5\n")
    args = ["index", run.path, "--config", str(toml), "--scheduler", address]
    assert cli.main([*args, "--target-recall", "0.9"]) == 0
    saved = json.loads(Path(run.join("index", "image.json")).read_text())
    assert (saved["recall_floor"], saved["recall_k"]) == (0.9, 5)


def test_near_duplicate_reason_reaches_filters_explore_report_and_materialize(tmp_path, client):
    """RUN/neardup flags become the ``near_duplicate`` final reason in all three places that
    compute it (filters, explore's numpy path, the report's codes) and in materialize's output."""
    from laion_dask.ground.config import FilterConfig
    from laion_dask.products import explore
    from laion_dask.products.materialize import materialize, read_dataset
    from laion_dask.products.report import build_stats
    from laion_dask.stages.filters import FINAL_REASON, add_final_reason
    from tests.helpers.runs import make_scored_run

    run = make_scored_run(tmp_path / "run")
    cfg = FilterConfig(similarity_en=-1, similarity_multi=-1, similarity_nolang=-1)
    joined, flagged = [], set()
    for p in sorted(run.markers("scores")):
        df = run.read_parquet(run.part_path("scores", p))
        keys = df[schema.KEY].dropna().astype(str).tolist()
        members = keys[::3]  # every third scored row repeats an image of its group
        flagged |= set(members[1:])
        nd = pd.DataFrame(
            {
                schema.KEY: members,
                neardup.DUPLICATE_GROUP: [p] * len(members),
                "canonical_key": [members[0]] * len(members),
                neardup.NEAR_DUPLICATE: [False] + [True] * (len(members) - 1),
            }
        )
        run.makedirs("neardup")
        run.write_parquet_atomic(run.part_path("neardup", p), nd)
        joined.append(neardup.join_part_near_duplicates(run, p, df))
    df = pd.concat(joined, ignore_index=True)
    expect = add_final_reason(df, cfg)[FINAL_REASON]
    near = df[schema.KEY].isin(flagged)
    upstream = add_final_reason(df.drop(columns=[neardup.NEAR_DUPLICATE]), cfg)[FINAL_REASON]
    # flagged rows the pipeline kept become near_duplicate; earlier reasons still win
    assert (expect[near & upstream.isna()] == "near_duplicate").all()
    assert (expect[near & upstream.notna()] == upstream[near & upstream.notna()]).all()
    assert (expect[~near] == upstream[~near]).all()
    assert (expect == "near_duplicate").sum() > 0
    final = build_stats(run, client=client, thresholds=cfg)["funnel"]["final"]
    assert final["dropped"]["near_duplicate"] == int((expect == "near_duplicate").sum())
    view = explore.open_run(run, client=client)
    pd.testing.assert_series_equal(view.reasons_at(cfg), expect, check_names=False)
    report = materialize(run, cfg, client=client)
    assert report.dropped["near_duplicate"] == int((expect == "near_duplicate").sum())
    out_keys = set(
        pd.concat([read_dataset(run, g) for g in schema.LANGUAGE_GROUPS])[schema.KEY].astype(str)
    )
    assert not out_keys & flagged
