"""SmartPath checkpoints: safetensors + manifest round trips (local folder and S3), refusal of
foreign, newer or damaged checkpoints, and no pickle anywhere."""

from __future__ import annotations

import json
import pickle
import re
import socket
import subprocess
from datetime import UTC
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import smartpath.model.checkpoint as checkpoint_module
from smartpath.core.config import StorageConfig
from smartpath.core.config.model import ModelConfig
from smartpath.core.errors import InvalidArgumentError
from smartpath.core.storage import LocalStore, ObjectRef, S3Store
from smartpath.model.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    CheckpointFormatError,
    ExpertInfo,
    Manifest,
    Provenance,
    load_checkpoint,
    parse_manifest,
    save_checkpoint,
)
from smartpath.model.tokenizer import load_tokenizer, train_builtin_tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_builtin_tokenizer(1024)


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 8, generator=g)
    return {
        "experts.0.q_proj.lora_A": torch.randn(8, 64, generator=g),
        "experts.0.q_proj.lora_B": torch.zeros(64, 8),
        "experts.1.q_proj.lora_A": torch.randn(8, 64, generator=g).to(torch.bfloat16),
        "router.weight": base,
        "router.weight_t": base.t(),  # a view sharing storage, non-contiguous
        "aggregator.step": torch.tensor([7], dtype=torch.int64),
    }


@pytest.fixture
def manifest() -> Manifest:
    return Manifest(
        model=ModelConfig(preset="tiny", experts={"num_experts": 2, "top_k": 1}),
        experts=[
            ExpertInfo(name="classify", index=0, tensor_prefix="experts.0."),
            ExpertInfo(name="detect", index=1, tensor_prefix="experts.1.", info={"steps": 10}),
        ],
        metrics={"val/accuracy": 0.5},
        provenance={"training": {"run": "unit-test"}},
    )


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def _no_pickle(folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if p.suffix in PICKLE_SUFFIXES]


def test_local_round_trip(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
) -> None:
    dest = tmp_path / "ckpt"
    written = save_checkpoint(dest, tensors, manifest, tok)
    assert {p.name for p in dest.iterdir()} == {MANIFEST_FILE, WEIGHTS_FILE, "tokenizer"}
    _no_pickle(dest)
    assert "tokenizer.json" in written.tokenizer_files
    assert written.weights is not None
    assert written.weights.tensors["experts.1.q_proj.lora_A"].dtype == "bfloat16"
    assert written.weights.tensors["router.weight_t"].shape == [8, 4]

    raw = json.loads((dest / MANIFEST_FILE).read_text())
    assert raw["format"] == FORMAT_NAME == "smartpath-checkpoint"
    assert raw["format_version"] == FORMAT_VERSION
    assert raw["model"]["text"]["hidden_size"] == 64
    assert [e["name"] for e in raw["experts"]] == ["classify", "detect"]

    loaded, got, tok_dir = load_checkpoint(dest)
    _assert_same_tensors(tensors, loaded)
    assert got == written
    assert got.model == manifest.model
    assert got.metrics == {"val/accuracy": 0.5}
    assert got.provenance.training == {"run": "unit-test"}
    assert got.provenance.created_at.tzinfo is not None
    assert got.provenance.created_at.utcoffset() == UTC.utcoffset(None)
    assert load_tokenizer(tok_dir).encode("<answer>12</answer>") == tok.encode(
        "<answer>12</answer>"
    )


def test_provenance_is_hostname_free(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
) -> None:
    save_checkpoint(tmp_path, tensors, manifest, tok)
    text = (tmp_path / MANIFEST_FILE).read_text()
    prov = json.loads(text)["provenance"]
    assert "hostname" not in text and "host" not in prov
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in text
    commit = prov["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert prov["torch_version"] == torch.__version__


def test_provenance_records_a_dirty_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    package = Path(checkpoint_module.__file__).resolve().parent
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=package,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the package is not in a git work tree")
    assert Provenance().git_dirty is bool(status.strip())
    monkeypatch.setenv("SMARTPATH_GIT_COMMIT", "0" * 40)  # an installed copy: no tree to ask
    assert Provenance().git_dirty is None


def test_manifest_written_before_git_dirty_reads_as_unknown(manifest: Manifest) -> None:
    raw = json.loads(manifest.model_dump_json())
    del raw["provenance"]["git_dirty"]
    assert parse_manifest(json.dumps(raw)).provenance.git_dirty is None


def test_the_model_facts_travel_in_the_manifest(
    tmp_path: Path, tensors: dict[str, torch.Tensor], tok: PreTrainedTokenizerFast
) -> None:
    facts = {
        "tile_encoder": "stain-stats-v1",
        "slide_tiles": {
            "mpp": 1.0,
            "tile_size": 128,
            "min_tissue": 0.5,
            "stain_norm": "macenko-v1",
        },
        "labels": {"classification/roi": ["benign", "malignant"], "detection/roi": ["mitosis"]},
        "prompt_style": "compact",
    }
    written = Manifest(model=ModelConfig(preset="tiny", **facts))
    save_checkpoint(tmp_path / "ckpt", tensors, written, tok)
    _, got, _ = load_checkpoint(tmp_path / "ckpt")
    for key, value in facts.items():
        dumped = got.model.model_dump(mode="json")[key]
        assert dumped == value, key


def test_a_manifest_written_before_the_model_facts_loads_with_defaults(manifest: Manifest) -> None:
    raw = json.loads(manifest.model_dump_json())
    for key in ("tile_encoder", "slide_tiles", "labels"):
        del raw["model"][key]
    model = parse_manifest(json.dumps(raw)).model
    assert model.tile_encoder == "stain-stats-v1" and model.labels == {}
    assert (model.slide_tiles.mpp, model.slide_tiles.tile_size) == (0.5, 96)
    assert model.slide_tiles.stain_norm is None  # raw tiles, as the model was trained on


@pytest.mark.parametrize(
    "labels",
    [{"classify/roi": ["a"]}, {"classification/roi": []}, {"classification/roi": ["a", "a"]}],
)
def test_a_bad_label_taxonomy_is_refused(labels: dict[str, list[str]]) -> None:
    with pytest.raises(ValueError, match="labels"):
        ModelConfig(preset="tiny", labels=labels)


def test_s3_round_trip(
    s3_config: StorageConfig,
    bucket_name: str,
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
) -> None:
    uri = f"s3://{bucket_name}/runs/r1/ckpt/"
    written = save_checkpoint(uri, tensors, manifest, tok, store=s3_config)
    store = S3Store(s3_config)
    keys = [i.key for i in store.list(bucket_name, "runs/r1/ckpt/")]
    assert f"runs/r1/ckpt/{MANIFEST_FILE}" in keys
    assert f"runs/r1/ckpt/{WEIGHTS_FILE}" in keys
    assert "runs/r1/ckpt/tokenizer/tokenizer.json" in keys
    assert not [k for k in keys if k.endswith(PICKLE_SUFFIXES)]

    loaded, got, tok_dir = load_checkpoint(uri, store, cache_dir=tmp_path / "cache")
    _assert_same_tensors(tensors, loaded)
    assert got == written
    assert tok_dir.is_relative_to(tmp_path / "cache")
    assert load_tokenizer(tok_dir).encode("<think>") == tok.encode("<think>")
    _no_pickle(tok_dir.parent)

    # without the trailing slash, and from the cache (a stale extra object is never fetched)
    store.put_bytes(ObjectRef(bucket_name, "runs/r1/ckpt/stale.bin"), b"not pickle-loaded")
    again, _, tok_dir2 = load_checkpoint(uri.rstrip("/"), store, cache_dir=tmp_path / "cache")
    _assert_same_tensors(tensors, again)
    assert tok_dir2 == tok_dir
    assert not (tok_dir.parent / "stale.bin").exists()

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(uri, tensors, manifest, tok, store=store)


def test_local_store_and_default_prefix_parsing(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
) -> None:
    store = LocalStore(tmp_path / "objects")
    save_checkpoint("s3://models/ckpt", tensors, manifest, tok, store=store)
    loaded, _, _ = load_checkpoint("s3://models/ckpt/", store, cache_dir=tmp_path / "c")
    _assert_same_tensors(tensors, loaded)
    with pytest.raises(InvalidArgumentError):
        save_checkpoint("s3://Bad_Bucket/x", tensors, manifest, tok, store=store)


def test_loading_never_unpickles(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    save_checkpoint(tmp_path, tensors, manifest, tok)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    loaded, _, _ = load_checkpoint(tmp_path)
    _assert_same_tensors(tensors, loaded)


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointFormatError, match="pickle files are never loaded"):
        load_checkpoint(tmp_path)


def _rewrite_manifest(folder: Path, **changes: object) -> None:
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    raw.update(changes)
    (folder / MANIFEST_FILE).write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"format": "something-else"}, "not a SmartPath checkpoint"),
        ({"format_version": FORMAT_VERSION + 1}, "upgrade smartpath"),
        ({"format_version": 999}, r"format_version 999, but .* reads versions up to"),
        ({"format_version": "1"}, "expected a positive integer"),
        ({"format_version": 0}, "expected a positive integer"),
        ({"format_version": True}, "expected a positive integer"),
        ({"unexpected": 1}, "does not match the schema"),
        ({"model": {"preset": "huge"}}, "does not match the schema"),
    ],
)
def test_bad_manifests_are_refused(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
    changes: dict,
    match: str,
) -> None:
    save_checkpoint(tmp_path, tensors, manifest, tok)
    _rewrite_manifest(tmp_path, **changes)
    with pytest.raises(CheckpointFormatError, match=match) as info:
        load_checkpoint(tmp_path)
    assert isinstance(info.value, ValueError)


def test_newer_version_on_s3_is_refused_before_downloading_weights(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
) -> None:
    store = LocalStore(tmp_path / "objects")
    save_checkpoint("s3://models/new/", tensors, manifest, tok, store=store)
    ref = ObjectRef("models", f"new/{MANIFEST_FILE}")
    raw = json.loads(store.get_bytes(ref))
    raw["format_version"] = FORMAT_VERSION + 1
    store.put_bytes(ref, json.dumps(raw).encode())

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("downloaded a file of a refused checkpoint")

    store.download = no_download  # type: ignore[method-assign]
    with pytest.raises(CheckpointFormatError, match="upgrade smartpath"):
        load_checkpoint("s3://models/new/", store, cache_dir=tmp_path / "cache")


def test_parse_manifest_rejects_non_json_and_non_objects() -> None:
    with pytest.raises(CheckpointFormatError, match="not valid JSON"):
        parse_manifest(b"\x00not json")
    with pytest.raises(CheckpointFormatError, match="JSON object"):
        parse_manifest("[1, 2]")


def test_damaged_or_incomplete_checkpoints_are_refused(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
) -> None:
    save_checkpoint(tmp_path, tensors, manifest, tok)
    weights = tmp_path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="SHA-256"):
        load_checkpoint(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointFormatError, match=r"no model\.safetensors"):
        load_checkpoint(tmp_path)

    other = tmp_path / "other"
    save_checkpoint(other, tensors, manifest, tok)
    (other / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointFormatError, match="tokenizer files"):
        load_checkpoint(other)
    with pytest.raises(CheckpointFormatError, match=r"no manifest\.json"):
        load_checkpoint(tmp_path / "other" / "tokenizer")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")


def test_overwrite_is_explicit(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
) -> None:
    save_checkpoint(tmp_path, tensors, manifest, tok)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(tmp_path, tensors, manifest, tok)
    smaller = {"router.weight": torch.ones(2, 2)}
    save_checkpoint(
        tmp_path, smaller, manifest.model_copy(update={"experts": []}), tok, overwrite=True
    )
    loaded, got, _ = load_checkpoint(tmp_path)
    _assert_same_tensors(smaller, loaded)
    assert got.experts == []


def test_tokenizer_can_be_given_as_a_folder(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
) -> None:
    save_checkpoint(tmp_path / "a", tensors, manifest, tok)
    _, _, tok_dir = load_checkpoint(tmp_path / "a")
    written = save_checkpoint(tmp_path / "b", tensors, manifest, tok_dir)
    _, got, tok_dir_b = load_checkpoint(tmp_path / "b")
    assert got.tokenizer_files == written.tokenizer_files
    assert load_tokenizer(tok_dir_b).encode("x 12") == tok.encode("x 12")


def test_manifest_validation(
    tmp_path: Path,
    tensors: dict[str, torch.Tensor],
    manifest: Manifest,
    tok: PreTrainedTokenizerFast,
) -> None:
    with pytest.raises(ValueError, match="unique"):
        Manifest(
            model=ModelConfig(),
            experts=[ExpertInfo(name="a", index=0), ExpertInfo(name="a", index=1)],
        )
    with pytest.raises(ValueError, match=r"indexes must be 0\.\.1"):
        Manifest(
            model=ModelConfig(),
            experts=[ExpertInfo(name="a", index=0), ExpertInfo(name="b", index=2)],
        )
    bad = manifest.model_copy(
        update={"experts": [ExpertInfo(name="x", index=0, tensor_prefix="nothing.")]}
    )
    with pytest.raises(ValueError, match="no tensor name starts with it"):
        save_checkpoint(tmp_path, tensors, bad, tok)
    with pytest.raises(TypeError, match=r"not a torch\.Tensor"):
        save_checkpoint(tmp_path, {"a": [1.0]}, manifest, tok)  # type: ignore[dict-item]
