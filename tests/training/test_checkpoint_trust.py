"""Checkpoint trust: a training checkpoint's sha256 manifest is written last on save and
checked on resume before anything is unpickled; DeepSpeed then loads with weights_only=True.
No Ray: the manifest helpers on fake folders, :meth:`DeepSpeedRun.load` with a stub engine,
and the real DeepSpeed engine on CPU in a subprocess (as in test_stages)."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from smartpath.training.checkpoint_trust import (
    MANIFEST_NAME,
    CheckpointIntegrityError,
    FileSum,
    file_sums,
    merge_sums,
    read_manifest,
    verify_checkpoint,
    write_manifest,
)
from smartpath.training.engine import CHECKPOINT_TAG, DeepSpeedRun
from tests.conftest import run_deepspeed_script

MODEL_STATES = f"{CHECKPOINT_TAG}/mp_rank_00_model_states.pt"
OPTIM_STATES = f"{CHECKPOINT_TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def fake_checkpoint(folder: Path) -> Path:
    """A folder laid out like DeepSpeed's checkpoint (real torch pickles), with its manifest."""
    (folder / CHECKPOINT_TAG).mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(6.0)}, "step": 3}, folder / MODEL_STATES)
    torch.save({"optimizer_state_dict": {"m": torch.ones(4)}}, folder / OPTIM_STATES)
    (folder / "latest").write_text(CHECKPOINT_TAG)
    (folder / "zero_to_fp32.py").write_text("# recovery script\n")
    write_manifest(folder)
    return folder


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.load (and pickle.load) fail the test if called; returns the paths tried."""
    calls: list[str] = []

    def refuse(path, *args, **kwargs):
        calls.append(str(path))
        pytest.fail(f"unpickled {path} during a failing verification")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    return calls


def refused(folder: Path) -> CheckpointIntegrityError:
    with pytest.raises(CheckpointIntegrityError) as info:
        verify_checkpoint(folder)
    assert isinstance(info.value, ValueError)
    assert str(folder) not in str(info.value)  # relative paths only, no server paths
    return info.value


def test_manifest_lists_every_file_relative_with_sha256_and_size(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["format"] == "smartpath-checkpoint-sums/1"
    assert sorted(manifest["files"]) == sorted(
        ["latest", "zero_to_fp32.py", MODEL_STATES, OPTIM_STATES]
    )
    entry = manifest["files"][MODEL_STATES]
    assert entry["size"] == (folder / MODEL_STATES).stat().st_size
    assert entry["sha256"] == hashlib.sha256((folder / MODEL_STATES).read_bytes()).hexdigest()
    assert verify_checkpoint(folder) == read_manifest(folder) == file_sums(folder)


def test_intact_checkpoint_verifies_without_unpickling(tmp_path: Path, no_torch_load) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    assert set(verify_checkpoint(folder)) == {
        "latest",
        "zero_to_fp32.py",
        MODEL_STATES,
        OPTIM_STATES,
    }
    assert no_torch_load == []


def test_a_flipped_byte_is_refused_naming_the_file(tmp_path: Path, no_torch_load) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    data = bytearray((folder / OPTIM_STATES).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / OPTIM_STATES).write_bytes(bytes(data))
    error = refused(folder)
    assert error.files == (OPTIM_STATES,)
    assert f"{OPTIM_STATES!r} does not match its recorded sha256" in str(error)
    assert "refusing to load" in str(error)


def test_a_changed_size_is_refused(tmp_path: Path, no_torch_load) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    with (folder / MODEL_STATES).open("ab") as f:
        f.write(b"\0")
    error = refused(folder)
    assert error.files == (MODEL_STATES,) and "bytes, the manifest records" in str(error)


def test_a_missing_manifest_is_refused(tmp_path: Path, no_torch_load) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    (folder / MANIFEST_NAME).unlink()
    error = refused(folder)
    assert f"checkpoint has no {MANIFEST_NAME}" in str(error)
    assert error.files == (MANIFEST_NAME,)


@pytest.mark.parametrize("name", ["evil.pt", f"{CHECKPOINT_TAG}/extra.pkl", "notes.txt"])
def test_an_unlisted_file_is_refused(tmp_path: Path, no_torch_load, name: str) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    (folder / name).write_bytes(pickle.dumps({"x": 1}))
    error = refused(folder)
    assert error.files == (name,)
    kind = "file" if name.endswith(".txt") else "pickle file"
    assert f"unlisted {kind} {name!r}" in str(error)


def test_ray_trains_metadata_file_may_be_unlisted(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    (folder / ".metadata.json").write_text("{}")
    verify_checkpoint(folder)


def test_a_listed_but_missing_file_is_refused(tmp_path: Path, no_torch_load) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    (folder / OPTIM_STATES).unlink()
    error = refused(folder)
    assert error.files == (OPTIM_STATES,) and f"{OPTIM_STATES!r} is listed but missing" in str(
        error
    )


def test_every_problem_is_named(tmp_path: Path, no_torch_load) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    (folder / OPTIM_STATES).unlink()
    (folder / "latest").write_text("other")
    (folder / "evil.pt").write_bytes(b"x")
    assert set(refused(folder).files) == {OPTIM_STATES, "latest", "evil.pt"}


def test_a_linked_file_is_refused(tmp_path: Path, no_torch_load) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    outside = tmp_path / "outside.pt"
    shutil.move(folder / MODEL_STATES, outside)
    (folder / MODEL_STATES).symlink_to(outside)
    error = refused(folder)
    assert error.files == (MODEL_STATES,) and "not a regular file" in str(error)
    with pytest.raises(CheckpointIntegrityError, match="not a regular file"):
        file_sums(folder)


@pytest.mark.parametrize(
    "manifest",
    [
        "not json",
        json.dumps({"format": "other", "files": {"latest": {"sha256": "0" * 64, "size": 5}}}),
        json.dumps({"format": "smartpath-checkpoint-sums/1", "files": {}}),
        json.dumps({"format": "smartpath-checkpoint-sums/1", "files": {"latest": {"size": 5}}}),
        json.dumps(
            {"format": "smartpath-checkpoint-sums/1", "files": {"../x": {"sha256": "0" * 64}}}
        ),
        json.dumps(
            {
                "format": "smartpath-checkpoint-sums/1",
                "files": {"/etc/passwd": {"sha256": "0" * 64, "size": 1}},
            }
        ),
    ],
)
def test_a_malformed_manifest_is_refused(tmp_path: Path, no_torch_load, manifest: str) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    (folder / MANIFEST_NAME).write_text(manifest)
    assert MANIFEST_NAME in str(refused(folder))


def test_ranks_sums_merge_into_one_manifest() -> None:
    a = {"latest": FileSum("a" * 64, 5), MODEL_STATES: FileSum("b" * 64, 10)}
    b = {OPTIM_STATES.replace("rank_0", "rank_1"): FileSum("c" * 64, 7)}
    assert set(merge_sums([a, b])) == {*a, *b}
    assert merge_sums([a, a]) == a  # the same file from two ranks
    with pytest.raises(CheckpointIntegrityError, match="two ranks with different bytes"):
        merge_sums([a, {"latest": FileSum("d" * 64, 5)}])


class StubEngine:
    """DeepSpeed's engine as far as :meth:`DeepSpeedRun.load` sees it: load_checkpoint
    unpickles the tag's files with torch.load."""

    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load_checkpoint(self, folder: str, tag: str, load_module_strict: bool):
        states = torch.load(Path(folder, tag, "mp_rank_00_model_states.pt"), weights_only=True)
        self.loaded.append(tag)
        return folder, {"step": states["step"], "history": [{"loss": 1.0}]}


def stub_run() -> DeepSpeedRun:
    run = object.__new__(DeepSpeedRun)
    run.engine = StubEngine()
    run.resumes = 0
    return run


def test_deepspeed_run_load_verifies_before_deepspeed_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fake_checkpoint(tmp_path / "ckpt")
    run = stub_run()
    assert run.load(folder) == (3, [{"loss": 1.0}]) and run.resumes == 1

    (folder / "evil.pt").write_bytes(b"x")
    calls: list[str] = []
    monkeypatch.setattr(torch, "load", lambda path, *a, **k: calls.append(str(path)))
    with pytest.raises(CheckpointIntegrityError, match=r"unlisted pickle file 'evil\.pt'"):
        run.load(folder)
    assert calls == [] and run.engine.loaded == [CHECKPOINT_TAG]


# ---------------------------------------------------------------------------------------------
# The real DeepSpeed engine on CPU

DEEPSPEED_SCRIPT = """
import json, os, shutil, sys, torch, torch.distributed as dist
from pathlib import Path
from smartpath.core.config.model import ModelConfig
from smartpath.core.config.training import DistributedConfig, OptimConfig
from smartpath.model.base import base_from_config
from smartpath.model.mllm import MultimodalBatch, SmartPathModel
from smartpath.training.checkpoint_trust import (
    MANIFEST_NAME, CheckpointIntegrityError, deepspeed_safe_globals, file_sums, write_manifest,
)
from smartpath.training.engine import DeepSpeedRun, trainable_parameters

dist.init_process_group("gloo", rank=0, world_size=1)
cfg = ModelConfig(preset="tiny", dtype="bfloat16", aggregator={"feature_dim": 32})
base, tokenizer = base_from_config(cfg, dtype=torch.float32)
model = SmartPathModel(cfg, base, tokenizer)
params = trainable_parameters(model, train_base=False)
run = DeepSpeedRun(model, params, OptimConfig(lr=1e-2, warmup_steps=0), DistributedConfig(),
                   batch_size=2, total_steps=4, device=torch.device("cpu"))
ids = torch.randint(10, 200, (2, 16), generator=torch.Generator().manual_seed(0))
batch = MultimodalBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                        task_ids=torch.tensor([0, 1]), scale_ids=torch.tensor([0, 0]))

def step():
    run.engine.train()
    out = run.engine(batch)
    run.backward(out.logits.float().log_softmax(-1)[..., 5].mean().neg())
    run.engine.step()

def trained():
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

root = Path(sys.argv[1])
result = {}
step()
saved = root / "saved"
run.save(saved, step=1, history=[{"step": 1, "loss": 2.5}])
at_save = trained()
manifest = json.loads((saved / MANIFEST_NAME).read_text())
result["listed"] = sorted(manifest["files"])
result["on_disk"] = sorted(file_sums(saved))
allowed = {f"{c.__module__}.{c.__qualname__}" for c in deepspeed_safe_globals()}
result["unsafe_globals"] = sorted(
    g for rel in result["listed"] if rel.endswith(".pt")
    for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(saved / rel))
    if g not in allowed
)
step()
result["moved_after_save"] = any(not torch.equal(p, at_save[n]) for n, p in trained().items())

real_load, loads = torch.load, []
def recording_load(path, *args, **kwargs):
    loads.append({"file": os.path.relpath(str(path), str(root)),
                  "weights_only": kwargs.get("weights_only")})
    return real_load(path, *args, **kwargs)
torch.load = recording_load

start, history = run.load(saved)
result["resumed"] = [start, history, run.resumes]
result["restored"] = all(torch.equal(p, at_save[n]) for n, p in trained().items())
result["loads"] = loads[:]

def refused(name, tamper):
    folder = root / name
    shutil.copytree(saved, folder)
    tamper(folder)
    del loads[:]
    try:
        run.load(folder)
    except CheckpointIntegrityError as err:
        result[name] = {"error": str(err), "files": list(err.files), "loads": loads[:]}
    else:
        result[name] = {"error": None, "loads": loads[:]}

def flip(folder):
    optim = next((folder / "state").glob("*optim_states.pt"))
    data = bytearray(optim.read_bytes()); data[len(data) // 2] ^= 1; optim.write_bytes(data)

refused("flipped", flip)
refused("no_manifest", lambda f: (f / MANIFEST_NAME).unlink())
refused("evil", lambda f: (f / "state" / "evil.pt").write_bytes(b"x"))
refused("missing", lambda f: (f / "state" / "mp_rank_00_model_states.pt").unlink())

# Someone who can write the bucket replaces the model states with a pickle that runs code and
# rewrites the manifest to match: the sums pass, and weights-only loading refuses the payload.
marker = root / "payload-ran"
class Payload:
    def __reduce__(self):
        return (open, (str(marker), "w"))
forged = root / "forged"
shutil.copytree(saved, forged)
torch.save({"module": Payload()}, forged / "state" / "mp_rank_00_model_states.pt")
(forged / MANIFEST_NAME).unlink()
write_manifest(forged)
try:
    run.load(forged)
    result["forged"] = "loaded"
except Exception as err:
    result["forged"] = type(err).__name__ + ": " + str(err).splitlines()[0]
result["payload_ran"] = marker.exists()
print(json.dumps(result))
"""


def test_real_deepspeed_checkpoint_is_verified_and_loaded_weights_only(tmp_path: Path) -> None:
    result = run_deepspeed_script(DEEPSPEED_SCRIPT, str(tmp_path), cwd=tmp_path)
    # Save: the manifest lists every file DeepSpeed wrote, the pickles included.
    assert result["listed"] == result["on_disk"]
    assert {MODEL_STATES, "latest"} <= set(result["listed"])
    assert any(rel.endswith("optim_states.pt") for rel in result["listed"])
    assert result["unsafe_globals"] == []  # nothing beyond the allow-list in DeepSpeed's pickles
    # Restore: verified, then every torch.load of DeepSpeed's is weights_only=True, and the
    # trained parameters are back at their saved values.
    assert result["moved_after_save"] and result["restored"]
    assert result["resumed"] == [1, [{"step": 1, "loss": 2.5}], 1]
    loaded = {call["file"] for call in result["loads"]}
    assert f"saved/{MODEL_STATES}" in loaded and any("optim_states" in f for f in loaded)
    assert all(call["weights_only"] is True for call in result["loads"]), result["loads"]
    # Tampered checkpoints: refused before DeepSpeed unpickles anything.
    for name, fragment in [
        ("flipped", "optim_states.pt' does not match its recorded sha256"),
        ("no_manifest", f"checkpoint has no {MANIFEST_NAME}"),
        ("evil", f"unlisted pickle file '{CHECKPOINT_TAG}/evil.pt'"),
        ("missing", f"'{MODEL_STATES}' is listed but missing"),
    ]:
        outcome = result[name]
        assert outcome["error"] is not None and fragment in outcome["error"], (name, outcome)
        assert outcome["loads"] == [], (name, outcome)
        assert str(tmp_path) not in outcome["error"]
    # A forged checkpoint with a matching manifest still cannot run code on load.
    assert result["forged"].startswith("UnpicklingError"), result["forged"]
    assert not result["payload_ran"]
