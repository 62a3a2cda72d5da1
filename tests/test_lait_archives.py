"""LAIT's archive reading on warcio's own sample files (tests/data/warcio): complete WARC and ARC files read
without a false `truncated_archive`, their variants (whole-file gzip, chunked HTTP bodies, wget's bracketed
target URIs, URLs with spaces) read as well-formed, and the damaged ones counted."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from modeling_imagebert.lait.records import DropCounter
from modeling_imagebert.lait.warc import dechunk, iter_pages, iter_responses

DATA = Path(__file__).parent / "data" / "warcio"
SPACE_URL = (
    "http://example.com/index.cfm?FuseAction=Email&EmailTitle=Examples From The Live Web&IsPopUp=False"
)

# file -> (URLs of the HTML pages read, drop counts of stage "warc"); docs/lait.md shows this table.
EXPECTED = {
    "example.warc": (["http://example.com/"], {}),
    "example.warc.gz": (["http://example.com/"], {}),
    "example.arc": (["http://example.com/"], {}),
    "example.arc.gz": (["http://example.com/"], {}),
    "example-space-in-url.arc": ([SPACE_URL], {}),
    "example-iana.org-chunked.warc": (["http://www.iana.org/"], {}),
    "example-wget-bad-target-uri.warc.gz": (["http://example.com/"], {}),
    "example-bad-non-chunked.warc.gz": (["http://example.com/"], {}),
    "example-bad.warc.gz.bad": (["http://example.com?example=1"], {"http_status": 1}),
    "example-wrong-chunks.warc.gz": (["http://example.com/"], {}),
    "example-digest.warc": ([], {}),
    "example-resource.warc.gz": ([], {}),
    "example-space-in-target-uri.warc.gz": ([], {}),
    "post-test.warc.gz": ([], {"not_html": 3}),
    "example-trunc.warc": ([], {"truncated_archive": 1, "undecodable": 1}),
    "bad.arc": ([], {"broken_warc_record": 3, "broken_http_headers": 1}),
}


def _read(path: Path | str, **kwargs) -> tuple[list, dict]:
    drops = DropCounter()
    pages = list(iter_pages(path, drops, **kwargs))
    return pages, drops.dropped.get("warc", {})


def test_every_sample_file_is_listed():
    assert sorted(
        p.name for p in DATA.iterdir() if p.suffix not in (".md", "") and p.name != "LICENSE"
    ) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_warcio_sample_files_give_their_pages_and_counts(name):
    urls, counts = EXPECTED[name]
    pages, dropped = _read(DATA / name)
    assert [page.page_url for page in pages] == urls
    assert dropped == counts
    for page in pages:
        assert page.html.lstrip().lower().startswith("<!doctype html>")


@pytest.mark.parametrize(
    "name", ["example.warc", "example.warc.gz", "example.arc", "example.arc.gz", "example-space-in-url.arc"]
)
def test_complete_files_give_no_truncated_archive(name):
    assert "truncated_archive" not in _read(DATA / name)[1]


def test_arc_records_resume_at_their_offset():
    for name in ("example.arc", "example.arc.gz"):
        (response,) = iter_responses(DATA / name, DropCounter())
        pages, dropped = _read(DATA / name, start_offset=response.warc_offset)
        assert [page.page_url for page in pages] == ["http://example.com/"] and dropped == {}
        assert response.status == 200 and response.warc_date == "20140216050221"


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.95])
def test_arc_cut_inside_a_record_counts_truncated_archive(tmp_path, cut):
    data = (DATA / "example.arc").read_bytes()
    plain = tmp_path / "cut.arc"
    plain.write_bytes(data[: int(len(data) * cut)])
    assert _read(plain) == ([], {"truncated_archive": 1})
    members = (DATA / "example.arc.gz").read_bytes()
    zipped = tmp_path / "cut.arc.gz"
    zipped.write_bytes(members[: 171 + int((len(members) - 171) * cut)])  # the filedesc member is whole
    assert _read(zipped) == ([], {"truncated_archive": 1})


def test_arc_version_2_whole_file_gzip_and_a_damaged_length(tmp_path):
    html = b"<!doctype html><html><body><p>A fox.</p></body></html>"
    http = b"HTTP/1.0 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html
    version = b"2 0 Test\nURL IP-address Archive-date Content-type Result-code Checksum Location Offset Filename Archive-length\n"
    filedesc = b"filedesc://test.arc 0.0.0.0 20200101000000 text/plain 200 - - 0 test.arc %d\n" % len(version)
    record = b"http://example.org/a 1.2.3.4 20200101000000 text/html 200 ABC - 0 test.arc %d\n" % len(http)
    broken = b"http://example.org/b 1.2.3.4 20200101000000 text/html 200 ABC - 0 test.arc -1\n\n"
    body = (
        filedesc
        + version
        + b"\n"
        + record
        + http
        + b"\n"
        + broken
        + record.replace(b"/a ", b"/c ")
        + http
        + b"\n"
    )
    path = tmp_path / "v2.arc.gz"
    path.write_bytes(gzip.compress(body))  # one member for the whole file
    pages, dropped = _read(path)
    assert [page.page_url for page in pages] == ["http://example.org/a", "http://example.org/c"]
    assert dropped == {"broken_warc_record": 1}
    assert all(page.charset == "utf-8" for page in pages)


def test_dechunk_reads_chunks_and_refuses_broken_ones():
    assert dechunk(b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n") == b"Wikipedia"
    assert dechunk(b"4\nWiki\n0\n") == b"Wiki"
    assert dechunk(b"zz\r\nWiki\r\n0\r\n") is None
    assert dechunk(b"9\r\nWiki\r\n0\r\n") is None
