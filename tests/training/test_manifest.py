"""The JSONL manifest: schema, validation with line numbers, local and S3 round trips, refs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from smartpath.core.config import StorageConfig
from smartpath.core.storage import ObjectRef, S3Store
from smartpath.model.grammar import (
    Detection,
    DetectionAnswer,
    LabelAnswer,
    Polygon,
    SegmentationAnswer,
    TextAnswer,
    format_answer,
)
from smartpath.training.manifest import (
    ManifestError,
    RoiSample,
    WsiSample,
    iter_manifest,
    load_roi_image,
    parse_target,
    read_manifest,
    resolve_ref,
    write_manifest,
)


def samples() -> list[RoiSample | WsiSample]:
    det = DetectionAnswer((Detection("nucleus", (10.0, 20.5, 300.0, 400.0)),))
    seg = SegmentationAnswer((Polygon("gland", ((0.0, 0.0), (500.0, 0.0), (250.5, 400.0))),))
    return [
        RoiSample(
            id="c1",
            image="images/a.png",
            task="classification",
            labels=["benign", "tumor"],
            target="tumor",
            split="val",
            source="test",
            mpp=0.5,
        ),
        RoiSample(
            id="d1",
            image="images/a.png",
            task="detection",
            labels=["nucleus"],
            target=format_answer(det),
        ),
        RoiSample(id="s1", image="/abs/b.png", task="segmentation", target=format_answer(seg)),
        RoiSample(
            id="q1",
            image="s3://other-bucket/c.png",
            task="vqa",
            prompt="Is there tumour?",
            options=["yes", "no"],
            target="no",
            split="test",
        ),
        WsiSample(id="w1", features="feats/w1.safetensors", task="classification", target="x"),
        WsiSample(id="w2", slide="s3://slides/w2.svs", task="vqa", prompt="Grade?", target="2"),
    ]


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(12, 17, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# Schema


def test_targets_parse_to_typed_answers() -> None:
    answers = [parse_target(s) for s in samples()]
    assert answers[0] == LabelAnswer("tumor")
    assert isinstance(answers[1], DetectionAnswer)
    assert answers[1].detections[0].box == (10.0, 20.5, 300.0, 400.0)
    assert isinstance(answers[2], SegmentationAnswer)
    assert answers[3] == TextAnswer("no")
    assert answers[5] == TextAnswer("2")


def test_wsi_sample_needs_exactly_one_of_slide_and_features() -> None:
    with pytest.raises(ValidationError, match="exactly one of 'slide' and 'features'"):
        WsiSample(id="w", slide="s3://b-1/s.svs", features="f.npz", task="vqa", target="a")
    with pytest.raises(ValidationError, match="exactly one of 'slide' and 'features'"):
        WsiSample(id="w", task="vqa", target="a")
    assert WsiSample(id="w", features="f.npz", task="vqa", target="a").features == "f.npz"
    with pytest.raises(ValidationError, match=r"\.safetensors or \.npz"):
        WsiSample(id="w", features="f.pt", task="vqa", target="a")


def test_wsi_sample_rejects_roi_only_tasks() -> None:
    with pytest.raises(ValidationError, match="task"):
        WsiSample(id="w", slide="s.svs", task="detection", target="[]")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("task", "target", "extra", "why"),
    [
        ("classification", "cancer", {"labels": ["benign", "tumor"]}, "not one of"),
        ("detection", '[{"label": "n", "box": [5, 5, 5, 9]}]', {}, "target does not parse"),
        ("segmentation", "not json", {}, "target does not parse"),
        ("vqa", "maybe", {"options": ["yes", "no"]}, "not one of"),
        ("vqa", "   ", {}, "empty answer"),
        ("classification", "<answer>x</answer>", {}, "grammar tag"),
    ],
)
def test_unparseable_targets_are_rejected(
    task: str, target: str, extra: dict[str, object], why: str
) -> None:
    with pytest.raises(ValidationError, match=why):
        RoiSample(id="x", image="a.png", task=task, target=target, **extra)  # type: ignore[arg-type]


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="lables"):
        RoiSample.model_validate(
            {"id": "x", "image": "a.png", "task": "classification", "target": "a", "lables": []}
        )


# ---------------------------------------------------------------------------------------------
# Reading and writing


def test_local_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "manifest.jsonl"
    write_manifest(samples(), path)
    lines = path.read_text().splitlines()
    assert len(lines) == 6
    assert json.loads(lines[0])["scale"] == "roi"
    assert json.loads(lines[4])["scale"] == "wsi"
    assert "prompt" not in json.loads(lines[0])  # None fields are omitted
    assert read_manifest(path) == samples()
    assert [type(s) for s in iter_manifest(str(path))] == [type(s) for s in samples()]
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.jsonl"]  # no temp files


def test_write_replaces_and_rejects_duplicate_ids(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    write_manifest(samples(), path)
    write_manifest(samples()[:2], path)
    assert read_manifest(path) == samples()[:2]
    with pytest.raises(ManifestError, match="duplicate id 'c1'"):
        write_manifest([samples()[0], samples()[0]], tmp_path / "dup.jsonl")
    assert not (tmp_path / "dup.jsonl").exists()


def test_bad_lines_name_the_line(tmp_path: Path) -> None:
    good = samples()[0].model_dump_json()
    cases = {
        "{not json": "invalid sample",
        json.dumps({"scale": "roi", "id": "b", "image": "a.png", "task": "classification"}): (
            "target: Field required"
        ),
        json.dumps(
            {"scale": "roi", "id": "b", "image": "a.png", "task": "detection", "target": "[1]"}
        ): "target does not parse for task 'detection'",
        json.dumps({"scale": "tile", "id": "b"}): "scale",
        json.dumps(
            {"scale": "wsi", "id": "b", "slide": "s", "features": "f", "task": "vqa", "target": "a"}
        ): "exactly one of 'slide' and 'features'",
        good: "duplicate id 'c1' \\(first on line 1\\)",
    }
    for bad, why in cases.items():
        path = tmp_path / "m.jsonl"
        path.write_text(f"{good}\n\n   \n{bad}\n")
        with pytest.raises(ManifestError, match=rf"m\.jsonl:4: .*{why}"):
            read_manifest(path)
    # Lazily: the good first sample comes out before the error.
    it = iter_manifest(path)
    assert next(it).id == "c1"
    with pytest.raises(ManifestError, match=":4:"):
        next(it)


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    body = "\n".join(s.model_dump_json() for s in samples()[:2])
    path.write_text(f"\n{body}\n\n\r\n")
    assert read_manifest(path) == samples()[:2]


def test_s3_round_trip_and_image(s3_config: StorageConfig, bucket_name: str) -> None:
    store = S3Store(s3_config)
    store.ensure_bucket(bucket_name)
    uri = f"s3://{bucket_name}/data/manifest.jsonl"
    write_manifest(samples(), uri, store)
    raw = store.get_bytes(ObjectRef(bucket_name, "data/manifest.jsonl")).decode()
    assert len(raw.splitlines()) == 6
    assert read_manifest(uri, store) == samples()

    arr = image()
    store.put_bytes(ObjectRef(bucket_name, "data/images/a.png"), png_bytes(arr))
    roi = read_manifest(uri, store)[0]
    assert isinstance(roi, RoiSample)
    got = load_roi_image(roi, uri, store)
    assert got.dtype == np.uint8 and got.shape == (12, 17, 3)
    np.testing.assert_array_equal(got, arr)


def test_s3_needs_a_store() -> None:
    with pytest.raises(ManifestError, match="needs an ObjectStore"):
        read_manifest("s3://some-bucket/m.jsonl")
    with pytest.raises(ManifestError, match="needs an ObjectStore"):
        write_manifest(samples(), "s3://some-bucket/m.jsonl")


# ---------------------------------------------------------------------------------------------
# Refs and images


def test_resolve_ref(tmp_path: Path) -> None:
    manifest = tmp_path / "ds" / "m.jsonl"
    assert resolve_ref("images/a.png", manifest) == tmp_path / "ds" / "images" / "a.png"
    assert resolve_ref("../other/a.png", str(manifest)) == tmp_path / "other" / "a.png"
    assert resolve_ref("/abs/a.png", manifest) == Path("/abs/a.png")
    assert resolve_ref("s3://bkt-1/k/a.png", manifest) == ObjectRef("bkt-1", "k/a.png")
    s3m = "s3://bkt-1/runs/ds/m.jsonl"
    assert resolve_ref("images/a.png", s3m) == ObjectRef("bkt-1", "runs/ds/images/a.png")
    assert resolve_ref("../x/a.png", s3m) == ObjectRef("bkt-1", "runs/x/a.png")
    assert resolve_ref("/abs/a.png", s3m) == Path("/abs/a.png")
    with pytest.raises(ManifestError, match="leaves the bucket"):
        resolve_ref("../../../a.png", s3m)


def test_load_roi_image_local(tmp_path: Path) -> None:
    arr = image()
    (tmp_path / "images").mkdir()
    Image.fromarray(arr).save(tmp_path / "images" / "a.png")
    Image.fromarray(arr[..., 0]).save(tmp_path / "images" / "gray.png")
    manifest = tmp_path / "m.jsonl"
    roi = samples()[0]
    assert isinstance(roi, RoiSample)
    np.testing.assert_array_equal(load_roi_image(roi, manifest), arr)
    gray = roi.model_copy(update={"image": str(tmp_path / "images" / "gray.png")})
    got = load_roi_image(gray, manifest)
    assert got.shape == (12, 17, 3)
    np.testing.assert_array_equal(got[..., 2], arr[..., 0])
