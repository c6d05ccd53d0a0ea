"""stream_file: the pairs of one file handed on chunk by chunk, equal to extract_file."""

from __future__ import annotations

import pandas as pd
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import ExtractConfig
from laion_dask.stages.extract import extract_file, stream_file
from tests.helpers.extract import make_wat, wat_payload
from tests.helpers.warc_spec import spec_file

CFG = ExtractConfig()


def _pages(n: int, links_per_page: int = 7) -> list[dict]:
    return [
        wat_payload(
            f"http://h{i % 13}.com/p{i}.html",
            [
                {"path": "IMG@/src", "url": f"img/{i}-{k}.jpg", "alt": f"photo {i} number {k}"}
                for k in range(links_per_page)
            ]
            + [{"path": "A@/href", "url": "x.html"}],
        )
        for i in range(n)
    ]


def _stream(path, chunk_rows, cfg=CFG):
    chunks: list[pd.DataFrame] = []
    summary = stream_file(str(path), cfg, sink=chunks.append, chunk_rows=chunk_rows)
    return chunks, summary


@pytest.mark.parametrize("compression", ["record", "file", "none"])
@pytest.mark.parametrize("chunk_rows", [1, 20, 10_000])
def test_chunks_concatenate_to_extract_file(tmp_path, compression, chunk_rows):
    path = tmp_path / f"f-{compression}.wat.gz"
    path.write_bytes(make_wat(_pages(60), compression))
    whole = extract_file(str(path), CFG)
    chunks, summary = _stream(path, chunk_rows)
    # whole-file gzip is refused by FastWARC at the second record and read again through gzip:
    # the first reader must not have handed anything on (no duplicated pairs)
    got = pd.concat(chunks, ignore_index=True)
    pd.testing.assert_frame_equal(got, whole.pairs)
    assert summary.pairs_found == len(got) == 60 * 7
    a, b = summary.to_dict(), whole.summary.to_dict()
    a.pop("seconds"), b.pop("seconds")
    assert a == b
    for c in chunks:
        assert dict(c.dtypes.astype(str)) == schema.PAIRS_DTYPES
        # cut at record boundaries once chunk_rows pairs are reached: at most one page more
        assert len(c) < max(chunk_rows, 1) + 7
    if chunk_rows == 20:
        assert len(chunks) > 10
    assert got["uid"].is_unique


def test_sink_sees_an_empty_frame_for_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.wat.gz"
    empty.write_bytes(b"")
    chunks, summary = _stream(empty, 5)
    assert [len(c) for c in chunks] == [0]
    assert summary.bad_records == {"empty_file": 1}
    bad = tmp_path / "bad.wat.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage" * 3)
    chunks, summary = _stream(bad, 5)
    assert [len(c) for c in chunks] == [0] and summary.error
    assert dict(chunks[0].dtypes.astype(str)) == schema.PAIRS_DTYPES
    with pytest.raises(OSError, match="bad.wat.gz"):
        _stream(bad, 5, ExtractConfig(skip_unreadable_files=False))


def test_streaming_holds_one_chunk_at_a_time(tmp_path):
    """The collector forgets what it handed on: its lists never exceed one chunk + one page."""
    import laion_dask.stages.extract as ex

    path = tmp_path / "many.wat.gz"
    path.write_bytes(make_wat(_pages(400)))
    seen: list[int] = []
    original = ex._Collector.flush

    def watch(self):
        seen.append(len(self.texts))
        original(self)
        assert self.texts == [] and self.urls == [] and self.records == []

    ex._Collector.flush = watch
    try:
        chunks, summary = _stream(path, 50)
    finally:
        ex._Collector.flush = original
    assert max(seen) < 50 + 7
    assert sum(seen) == summary.pairs_found == 400 * 7


def test_whole_file_gzip_is_known_before_reading(tmp_path):
    import laion_dask.stages.extract as ex

    for compression, whole in (("file", True), ("record", False), ("none", False)):
        path = tmp_path / f"w-{compression}.wat.gz"
        path.write_bytes(make_wat(_pages(3), compression))
        assert ex._whole_file_gzip(path.read_bytes()[:65536]) is whole, compression
    one = tmp_path / "one.wat.gz"
    one.write_bytes(make_wat([], "file"))  # a single record: nothing to tell apart
    assert ex._whole_file_gzip(one.read_bytes()[:65536]) is False


def test_reader_giving_up_after_handing_on_pairs_fails_the_file(tmp_path, monkeypatch):
    """Pairs already handed on cannot be taken back: the file fails by name, no duplicates."""
    import laion_dask.stages.extract as ex

    monkeypatch.setattr(ex, "_whole_file_gzip", lambda head: False)
    path = tmp_path / "f.wat.gz"
    path.write_bytes(make_wat(_pages(60), "file"))
    chunks, summary = _stream(path, 1)
    assert summary.error and "gunzip the file first" in summary.error
    # what was handed on before the failure is the caller's to discard (the pipeline writes a
    # temporary file and renames it only on success)
    assert len(chunks[-1]) == 0


@pytest.mark.parametrize("chunk_rows", [20, 10_000])
def test_a_failing_sink_stops_the_file_and_is_never_a_counted_skip(tmp_path, chunk_rows):
    """A sink that cannot write (disk full) must raise, not look like a broken input stream
    (an OSError from the reader is counted as a skip and the file would end early)."""
    path = tmp_path / "f.wat.gz"
    path.write_bytes(make_wat(_pages(60)))
    calls = []

    def full_disk(frame: pd.DataFrame) -> None:
        calls.append(len(frame))
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        stream_file(str(path), CFG, sink=full_disk, chunk_rows=chunk_rows)
    assert len(calls) == 1
    empty = tmp_path / "empty.wat.gz"
    empty.write_bytes(b"")
    with pytest.raises(OSError, match="No space left"):
        stream_file(str(empty), CFG, sink=full_disk)


def test_fastwarc_meeting_a_record_it_cannot_read_late_fails_the_file_by_name(tmp_path):
    """A record whose field names are lower case (legal, but FastWARC cannot read its block)
    after pairs were handed on: the file fails with the fix, rather than losing the page."""
    good = make_wat(_pages(30), "none")
    odd = spec_file("lower_names", "none").data
    odd = odd[odd.index(b"WARC/1.0", 1) :]  # its records, without a second warcinfo
    path = tmp_path / "late.warc"
    path.write_bytes(good + odd)
    chunks, summary = _stream(path, 1)
    assert summary.error and 'reader = "warcio"' in summary.error
    assert len(chunks[-1]) == 0
    # read whole (nothing handed on before the end), the file goes to warcio and gives it all
    whole = extract_file(str(path), CFG)
    assert whole.summary.error is None and whole.summary.reader == "warcio"
    assert len(whole.pairs) == 30 * 7 + len(spec_file("lower_names", "none").pairs)


@pytest.mark.parametrize("chunk_rows", [1, 10_000])
def test_a_cut_whole_file_gzip_streams_what_it_holds(tmp_path, chunk_rows):
    spec = spec_file("truncated", "file")
    path = tmp_path / "cut.warc.gz"
    path.write_bytes(spec.data)
    chunks, summary = _stream(path, chunk_rows)
    got = pd.concat(chunks, ignore_index=True)
    assert sorted(zip(got["url"], got["text"], strict=True)) == sorted(spec.pairs)
    assert summary.bad_records == {"truncated_record": 1}


def test_corrupt_middle_of_a_whole_file_gzip_keeps_the_records_before_it(tmp_path):
    data = make_wat(_pages(200), "file")
    good = tmp_path / "good.wat.gz"
    good.write_bytes(data)
    broken = bytearray(data)
    middle = len(broken) // 2
    broken[middle : middle + 40] = bytes(b ^ 0x55 for b in broken[middle : middle + 40])
    bad = tmp_path / "bad.wat.gz"
    bad.write_bytes(bytes(broken))
    whole = extract_file(str(good), CFG).pairs
    res = extract_file(str(bad), CFG)
    assert res.summary.error is None and res.summary.bad_records.get("corrupt_gzip") == 1
    # a good share of the file was read, and what was read is what the intact file gives
    assert len(whole) / 4 < len(res.pairs) < len(whole)
    n = len(res.pairs) - 7  # the record the corruption cut may have lost its last links
    cols = ["url", "text", "page_url", "record_offset"]  # uid and source_file name the file
    pd.testing.assert_frame_equal(res.pairs[cols].iloc[:n], whole[cols].iloc[:n])
