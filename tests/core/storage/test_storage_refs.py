"""Slide reference parsing and the local-path allow-list."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from smartpath.core.errors import InvalidArgumentError, NotFoundError
from smartpath.core.storage import ObjectRef, parse_slide_ref, resolve_local_path
from smartpath.core.storage.refs import validate_bucket, validate_key


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://slides/case1/slide.svs", ObjectRef("slides", "case1/slide.svs")),
        ("s3://my.bucket-01/a b/ü.ndpi", ObjectRef("my.bucket-01", "a b/ü.ndpi")),
        ("s3://abc/x", ObjectRef("abc", "x")),
        ("s3://slides/series/dicom/", ObjectRef("slides", "series/dicom/")),
        ("s3://slides/" + "k" * 1024, ObjectRef("slides", "k" * 1024)),
        ("/data/slides/a.svs", Path("/data/slides/a.svs")),
        ("file:///data/slides/a.svs", Path("/data/slides/a.svs")),
        ("file://localhost/data/a%20b.svs", Path("/data/a b.svs")),
    ],
)
def test_parse_accepts(uri: str, expected: ObjectRef | Path) -> None:
    assert parse_slide_ref(uri) == expected


@pytest.mark.parametrize(
    ("uri", "needle"),
    [
        ("", "empty"),
        ("slides/a.svs", "unsupported"),
        ("http://host/a.svs", "unsupported"),
        ("gs://bucket/a.svs", "unsupported"),
        ("S3://slides/a.svs", "unsupported"),
        ("s3://slides", "no object key"),
        ("s3://slides/", "no object key"),
        ("s3:///a.svs", "bucket"),
        ("s3://ab/a.svs", "bucket"),
        ("s3://Slides/a.svs", "bucket"),
        ("s3://slides_1/a.svs", "bucket"),
        ("s3://-slides/a.svs", "bucket"),
        ("s3://slides-/a.svs", "bucket"),
        ("s3://sli..des/a.svs", "bucket"),
        ("s3://192.168.1.1/a.svs", "IP address"),
        ("s3://xn--slides/a.svs", "reserves"),
        ("s3://" + "b" * 64 + "/a.svs", "bucket"),
        ("s3://slides/../etc/passwd", "'..'"),
        ("s3://slides/a/../../b", "'..'"),
        ("s3://slides/./a.svs", "'.'"),
        ("s3://slides/a//b.svs", "empty"),
        ("s3://slides//abs.svs", "start with '/'"),
        ("s3://slides/a\\b.svs", "backslash"),
        ("s3://slides/a\x00b.svs", "NUL"),
        ("s3://slides/" + "k" * 1025, "1025 bytes"),
        ("s3://slides/" + "é" * 513, "1026 bytes"),
        ("file://otherhost/a.svs", "remote host"),
        ("/data/a\x00.svs", "NUL"),
        ("file:///", "root"),
    ],
)
def test_parse_rejects(uri: str, needle: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_slide_ref(uri)
    message = str(info.value)
    assert needle in message
    assert info.value.code == "INVALID_ARGUMENT"
    if not uri.startswith(("/", "file://")):
        assert "s3://bucket/key" in message  # says which form is expected


def test_parse_rejects_non_string() -> None:
    with pytest.raises(InvalidArgumentError, match="must be a string"):
        parse_slide_ref(b"s3://slides/a.svs")  # type: ignore[arg-type]


def test_huge_input_is_truncated_in_message() -> None:
    uri = "s3://slides/" + "x/" * 5000
    with pytest.raises(InvalidArgumentError) as info:
        parse_slide_ref(uri)
    message = str(info.value)
    assert len(message) < 600
    assert f"({len(uri)} chars)" in message


def test_object_ref_properties() -> None:
    assert ObjectRef("b12", "a/").is_folder
    assert not ObjectRef("b12", "a/x.svs").is_folder
    ref = ObjectRef("b12", "a/x.svs")
    assert ref.uri == "s3://b12/a/x.svs"
    assert str(ref) == "'s3://b12/a/x.svs'"  # quoted, as messages show caller input


def test_validators_pass_good_values_through() -> None:
    assert validate_bucket("good-bucket.1") == "good-bucket.1"
    assert validate_key("a/b/c.svs") == "a/b/c.svs"
    assert validate_key("a/b/", allow_folder=True) == "a/b/"
    with pytest.raises(InvalidArgumentError, match="folder"):
        validate_key("a/b/")


# -- local paths ----------------------------------------------------------------------------


def test_local_path_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "slides"
    (root / "sub").mkdir(parents=True)
    slide = root / "sub" / "a.svs"
    slide.write_bytes(b"x")
    assert resolve_local_path(slide, [root]) == slide.resolve()
    assert resolve_local_path(str(slide), [tmp_path / "other", root]) == slide.resolve()


def test_local_paths_refused_without_roots(tmp_path: Path) -> None:
    slide = tmp_path / "a.svs"
    slide.write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="disabled"):
        resolve_local_path(slide, [])


def test_local_path_outside_roots(tmp_path: Path) -> None:
    root = tmp_path / "slides"
    root.mkdir()
    outside = tmp_path / "secret.svs"
    outside.write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="outside"):
        resolve_local_path(outside, [root])
    # `..` that climbs out after resolution, and a sibling folder sharing the root's prefix
    with pytest.raises(InvalidArgumentError, match="outside"):
        resolve_local_path(root / ".." / "secret.svs", [root])
    sibling = tmp_path / "slides-evil"
    sibling.mkdir()
    (sibling / "a.svs").write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="outside"):
        resolve_local_path(sibling / "a.svs", [root])


def test_local_path_symlink_escape_refused(tmp_path: Path) -> None:
    root = tmp_path / "slides"
    root.mkdir()
    outside = tmp_path / "secret.svs"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.svs")
    with pytest.raises(InvalidArgumentError, match="outside"):
        resolve_local_path(root / "link.svs", [root])


def test_local_path_symlinked_root_allowed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.svs").write_bytes(b"x")
    os.symlink(real, tmp_path / "alias")
    assert resolve_local_path(tmp_path / "alias" / "a.svs", [tmp_path / "alias"]) == (
        real / "a.svs"
    )


def test_local_path_missing_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_local_path(tmp_path / "nope.svs", [tmp_path])


def test_local_path_must_be_absolute(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="absolute"):
        resolve_local_path("relative/a.svs", [tmp_path])
