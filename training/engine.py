"""Distributed plumbing shared by every training stage: a registry of stages by name, the ONE
per-worker loop that runs any of them, Ray Train TorchTrainer, DeepSpeed ZeRO, checkpoints in
object storage, resume, and the exported model.

Design decisions:

- Stages register by name (:func:`register_stage`; ``sft`` and ``grpo`` are built in). A
  :class:`Stage` says only what differs: its config section, how the model (and any reference)
  is built, the rows per step, and what one step does and logs. :func:`train_worker` is the one
  loop: DeepSpeed setup, restore, steps with the lr schedule, logging, checkpoints and the export.
- One entry point (:func:`run_stage`) builds a ``TorchTrainer`` whose workers all run
  :func:`train_worker` on the stage's *name* (a module-level function, so Ray pickles it by
  reference; each worker looks the stage up in its own registry). ``distributed`` in the config
  picks 1 CPU worker, 2 CPU workers or N GPU workers. Ray Train creates the process group (gloo
  on CPU, NCCL on GPU) and DeepSpeed joins it.
- DeepSpeed ZeRO-2 wraps the model with a plain ``torch.optim.AdamW`` over the trainable
  parameters only (no DeepSpeed-built optimizer ops, so nothing compiles for the optimizer on
  CPU; ``DS_ACCELERATOR=cpu`` is set when ``use_gpu`` is False); :class:`DeepSpeedRun` checks
  that ZeRO manages exactly those. Frozen base weights get no gradient, no optimizer state and
  no fp32 copy, and are excluded from checkpoints.
- Precision: the run's dtype is the model config's ``dtype`` resolved on the worker's device
  ("auto": bfloat16 on GPU, float32 on CPU). Every parameter is cast to it (the frozen base
  then costs 2 bytes per weight in bf16) and DeepSpeed runs its bf16 (or fp16) mixed precision:
  the trainable parameters in that dtype in the model, an fp32 master copy and the Adam
  moments sharded by ZeRO-2 over the ranks.
- ``distributed.gradient_checkpointing`` turns on the base's non-reentrant activation
  checkpointing (:func:`enable_gradient_checkpointing`), with the experts' per-request routing
  re-applied when a block is recomputed in the backward pass.
- Checkpoints: every ``checkpoint_every`` steps each rank writes its DeepSpeed shard (model
  states on rank 0, its optimizer partition on every rank, the step and the metric history as
  client state) into a temp folder and reports it to Ray Train, which merges the ranks' files
  into one checkpoint under ``{run}/{stage}/`` in the run's storage (local folder or S3).
  A worker failure makes Ray Train restart the whole group (``FailureConfig``) and each rank
  reloads the latest checkpoint: steps before it are not redone, steps after it are. The
  checkpoint carries the SHA-256 of the trainable parameters and of the optimizer's and lr
  schedule's state (all ranks); a resume whose restored state hashes otherwise fails.
- Trust (:mod:`smartpath.training.checkpoint_trust`): DeepSpeed's checkpoint files are pickles.
  Each checkpoint carries ``smartpath-checkpoint-sums.json`` (sha256 and size of every file,
  written last); resume verifies it before anything is unpickled and fails the run on a
  missing manifest or a missing, changed or unlisted file (``CheckpointIntegrityError``).
  DeepSpeed then loads with ``torch.load(weights_only=True)`` (its own engine passes
  ``weights_only=False``), allowing only its plain-data classes. The runs bucket is trusted:
  it must be writable only by the training job (the sums are not a signature). The exported
  model is safetensors only.
- Per-step sampling is a pure function of (seed, rank, step), so a resumed run draws exactly the
  batches the uninterrupted run would have drawn.
- At the end rank 0 exports the model as a SmartPath checkpoint (safetensors + manifest, the
  format serving loads) to ``{run}/{stage}/model`` and the history to
  ``{run}/{stage}/history.jsonl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from smartpath.core.config import SmartPathConfig, StorageConfig
from smartpath.core.config.training import DistributedConfig, OptimConfig
from smartpath.core.storage import make_store
from smartpath.core.storage.base import ObjectStore
from smartpath.core.storage.refs import ObjectRef
from smartpath.model.checkpoint import is_s3_uri, parse_prefix
from smartpath.model.devices import resolve_dtype
from smartpath.model.experts import ExpertRouting, MixtureLoRALinear, expert_modules
from smartpath.model.mllm import SmartPathModel
from smartpath.training.checkpoint_trust import (
    CheckpointIntegrityError,
    file_sums,
    merge_sums,
    use_weights_only_loading,
    verify_checkpoint,
    write_manifest,
)
from smartpath.training.collate import Collator
from smartpath.training.data import load_items

__all__ = [
    "DeepSpeedRun",
    "Stage",
    "StageSection",
    "StepMetrics",
    "deepspeed_config",
    "enable_gradient_checkpointing",
    "get_stage",
    "read_history",
    "register_stage",
    "run_dtype",
    "run_stage",
    "stage_main",
    "stages",
    "storage_target",
    "train_worker",
    "trainable_parameters",
    "write_text",
]

logger = logging.getLogger(__name__)

CHECKPOINT_TAG = "state"
HISTORY_FILE = "history.jsonl"
BUCKET_ELEMENTS = 50_000_000
"""ZeRO's gradient-reduce and all-gather bucket (elements). DeepSpeed's default, 5e8, would
allocate a 1 GB bf16 buffer per rank for a few hundred million trainable parameters at most."""


def trainable_parameters(model: SmartPathModel, train_base: bool) -> list[torch.nn.Parameter]:
    """Unfreeze SmartPath's own parts (experts, aggregator, router, image positions) and,
    with ``train_base``, every base weight; return the trainable parameters (tied weights
    once)."""
    params: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        own = name.startswith(("aggregator.", "router.", "image_position.")) or name.endswith(
            (".lora_A", ".lora_B")
        )
        param.requires_grad_(own or train_base)
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params


def lr_factor(optim: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine

    return factor


def run_dtype(spec: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The parameter dtype of a run on ``device``: the model config's ``dtype`` resolved there
    ("auto": bfloat16 on CUDA, float32 elsewhere)."""
    return resolve_dtype(spec, device)


def deepspeed_config(
    dist: DistributedConfig, batch_size: int, optim: OptimConfig, dtype: torch.dtype
) -> dict:
    """The DeepSpeed config: ZeRO stage, micro-batch per rank, clipping, and bf16/fp16 mixed
    precision when the run's parameter ``dtype`` is bfloat16/float16 (fp32 master weights and
    Adam state in the ZeRO optimizer)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": dist.zero_stage,
            "reduce_bucket_size": BUCKET_ELEMENTS,
            "allgather_bucket_size": BUCKET_ELEMENTS,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optim.max_grad_norm is not None:
        config["gradient_clipping"] = optim.max_grad_norm
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    elif dtype != torch.float32:
        raise ValueError(f"unsupported training dtype {dtype}; use float32, bfloat16 or float16")
    return config


@contextlib.contextmanager
def _routed(
    modules: Sequence[MixtureLoRALinear], routing: Sequence[ExpertRouting | None]
) -> Iterator[None]:
    """Within the block each expert module has its ``routing`` entry; restored after."""
    saved = [m.routing for m in modules]
    for module, r in zip(modules, routing, strict=True):
        module.routing = r
    try:
        yield
    finally:
        for module, r in zip(modules, saved, strict=True):
            module.routing = r


def _update_digest(digest: Any, value: Any) -> None:
    """Feed ``value`` into ``digest``: tensors by dtype, shape and bytes; mappings by sorted key;
    sequences in order; numbers and strings by repr. Anything else (DeepSpeed's loss scaler,
    fragment address tables) is not state a resume must reproduce and is left out."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{tensor.dtype}{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _update_digest(digest, value[key])
    elif isinstance(value, list | tuple):
        for item in value:
            _update_digest(digest, item)
    elif isinstance(value, bool | int | float | str) or value is None:
        digest.update(repr(value).encode())


def enable_gradient_checkpointing(model: SmartPathModel) -> None:
    """Turn on the base's non-reentrant activation checkpointing (every decoder block of the LM
    and every block of the vision tower).

    Non-reentrant checkpointing gives gradients to the LoRA experts inside a frozen base (it
    does not need inputs that require grad). The experts' routing is a module attribute set
    only during :meth:`SmartPathModel.forward`, but blocks are recomputed later, in the
    backward pass: a ``context_fn`` captures each block's routing at forward time and re-applies
    it for the recomputation, so the recomputed activations (and the gradients) are the ones of
    the forward pass.
    """
    modules = list(expert_modules(model.base).values())

    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _routed(modules, [m.routing for m in modules])

    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    base = model.base
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.x's name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class DeepSpeedRun:
    """A model wrapped by DeepSpeed on this worker, with checkpoint save/restore via Ray.

    ``device`` defaults to Ray Train's device for this worker; ``dtype`` is the run's parameter
    dtype (:func:`run_dtype`), also the dtype float inputs are cast to.
    """

    def __init__(
        self,
        model: SmartPathModel,
        params: list[torch.nn.Parameter],
        optim: OptimConfig,
        dist: DistributedConfig,
        *,
        batch_size: int,
        total_steps: int,
        device: torch.device | None = None,
    ) -> None:
        import deepspeed

        if device is None:
            import ray.train.torch

            device = ray.train.torch.get_device()
        self.device = device
        self.dtype = run_dtype(model.cfg.dtype, device)
        if any(not p.requires_grad for p in params):
            raise ValueError("the optimizer would get frozen parameters")
        for param in model.parameters():  # frozen base and trainable parts alike
            if param.is_floating_point() and param.dtype != self.dtype:
                param.data = param.data.to(self.dtype)
        optimizer = torch.optim.AdamW(
            params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(optim, total_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(dist, batch_size, optim, self.dtype),
        )
        use_weights_only_loading(self.engine)
        self.model: SmartPathModel = self.engine.module
        self.params = params
        managed = [p for group in getattr(self.optimizer, "bit16_groups", []) for p in group]
        if managed and {id(p) for p in managed} != {id(p) for p in params}:
            raise RuntimeError("DeepSpeed's ZeRO optimizer holds other than the trainable params")
        trainable = sum(p.numel() for p in params)
        total = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "training %d of %d parameters (%.2f%%) in %s", trainable, total,
            100.0 * trainable / max(total, 1), self.dtype,
        )  # fmt: skip
        self.resumes = 0  # restarts from a checkpoint so far (restored with the checkpoint)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through DeepSpeed, with every trainable parameter in the graph.

        A batch without images (or without slides) leaves the vision tower (or the aggregator)
        out of the graph; ranks would then reduce different gradient sets and gloo/NCCL fail.
        A zero-weighted touch of one element per parameter gives those a zero gradient.
        """
        touch = sum(p.reshape(-1)[0] for p in self.params)
        self.engine.backward(loss + 0.0 * touch)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def restore(self) -> tuple[int, list[dict[str, float]]]:
        """(first step to run, history so far) from Ray Train's latest checkpoint, if any."""
        import pyarrow.fs
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0, []
        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            return self.load(checkpoint.path)
        # One download per rank: ranks sharing Ray's per-node temporary folder race
        # (one may delete it while another still waits on its lock).
        with tempfile.TemporaryDirectory(prefix="smartpath-restore-") as folder:
            return self.load(checkpoint.to_directory(folder))

    def state_digest(self) -> str:
        """SHA-256 of the state a resume must give back: the trainable parameters and the
        optimizer's and the lr schedule's state, over every rank (a collective when
        distributed: under ZeRO each rank holds its own partition of the optimizer state)."""
        import torch.distributed as dist

        digest = hashlib.sha256()
        for value in (self.params, self.optimizer.state_dict(), self.scheduler.state_dict()):
            _update_digest(digest, value)
        local = digest.hexdigest()
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return local
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
        return hashlib.sha256("".join(parts).encode()).hexdigest()

    def load(self, folder: str | Path) -> tuple[int, list[dict[str, float]]]:
        """Verify the checkpoint in ``folder`` against its sha256 manifest (CheckpointIntegrityError
        before anything is unpickled), then load it: (first step to run, history so far).
        The restored parameters and optimizer state must be the saved ones, tensor for tensor
        (their digest against the one saved with them), or CheckpointIntegrityError."""
        verify_checkpoint(folder)
        _, client = self.engine.load_checkpoint(
            str(folder), tag=CHECKPOINT_TAG, load_module_strict=False
        )
        saved = client.get("state_digest")
        if saved is not None and self.state_digest() != saved:
            raise CheckpointIntegrityError(
                "the restored parameters or optimizer state differ from the checkpoint's"
            )
        step = int(client["step"])
        self.resumes = int(client.get("resumes", 0)) + 1
        logger.info("resumed from the checkpoint at step %d", step)
        return step, list(client["history"])

    def save(self, folder: str | Path, *, step: int, history: list) -> None:
        """Write this rank's DeepSpeed shard of the checkpoint into ``folder`` (a collective:
        every rank calls it); rank 0 then writes the sha256 manifest of every rank's files."""
        import torch.distributed as dist

        state_digest = self.state_digest()
        self.engine.save_checkpoint(
            str(folder),
            tag=CHECKPOINT_TAG,
            client_state={
                "step": step,
                "history": history,
                "resumes": self.resumes,
                "state_digest": state_digest,
            },
            exclude_frozen_parameters=True,
        )
        sums = file_sums(folder)
        if not dist.is_initialized() or dist.get_world_size() == 1:
            write_manifest(folder, sums)
            return
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, sums)
        if dist.get_rank() == 0:
            write_manifest(folder, merge_sums(parts))

    def report(
        self, metrics: Mapping[str, float], *, step: int, history: list, checkpoint: bool
    ) -> None:
        """Report ``metrics`` to Ray Train, with a checkpoint of every rank when asked."""
        import ray.train

        if not checkpoint:
            ray.train.report(dict(metrics))
            return
        with tempfile.TemporaryDirectory(prefix="smartpath-ckpt-") as folder:
            self.save(folder, step=step, history=history)
            ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder))

    def record(
        self,
        row: dict[str, float],
        history: list[dict[str, float]],
        *,
        step: int,
        total_steps: int,
        checkpoint_every: int,
        report_every: int,
    ) -> None:
        """Append step ``step``'s ``row`` to the history; report it every ``report_every`` steps,
        with a checkpoint every ``checkpoint_every`` steps and at the last step."""
        history.append(row)
        save = step % checkpoint_every == 0 or step == total_steps
        if save or step % report_every == 0:
            self.report(row, step=step, history=history, checkpoint=save)

    def all_reduce_mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """Mean of each value over the ranks that logged it (for logging; keys may differ,
        e.g. per-task rewards depend on each rank's draw)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return dict(values)
        gathered: list[dict[str, float]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, dict(values))
        keys = sorted({k for g in gathered for k in g})
        return {
            k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys
        }


# ---------------------------------------------------------------------------------------------
# Stages


class StageSection(Protocol):
    """What the engine reads from a stage's config section (``training.sft``, ``training.grpo``)."""

    steps: int
    train_base: bool
    optim: OptimConfig


@dataclass(frozen=True)
class StepMetrics:
    """What one step logs: ``mean`` is averaged over the ranks; ``local`` is this rank's value as
    is (timings, or DeepSpeed's grad norm, which is already global)."""

    mean: dict[str, float]
    local: dict[str, float] = field(default_factory=dict)


class Stage(ABC):
    """A training stage on one Ray Train worker: what differs between stages.

    :func:`train_worker` builds one per worker (the training items are loaded here), wraps
    :meth:`build_model`'s model with DeepSpeed, hands the run to :meth:`attach`, restores the
    latest checkpoint and calls :meth:`train_step` once per step.
    """

    name: ClassVar[str]
    run: DeepSpeedRun
    collator: Collator

    def __init__(self, config: SmartPathConfig, store: ObjectStore, rank: int) -> None:
        t = config.training
        self.config = config
        self.store = store
        self.rank = rank
        self.items = load_items(t.data.manifests, t.data.train_split, store)

    @classmethod
    def check(cls, config: SmartPathConfig) -> None:
        """Raise ValueError for a config this stage cannot run; called before any worker starts
        (the default accepts every config)."""
        return None

    @property
    @abstractmethod
    def section(self) -> StageSection:
        """This stage's config section: steps, optimizer and whether the base trains."""

    @property
    @abstractmethod
    def rows_per_step(self) -> int:
        """Sequences each rank trains on per step (DeepSpeed's micro-batch)."""

    @abstractmethod
    def build_model(self) -> SmartPathModel:
        """The model this stage trains (built or loaded on every rank)."""

    def attach(self, run: DeepSpeedRun) -> None:
        """Keep the DeepSpeed run and build the collator for its model."""
        self.run = run
        self.collator = Collator(run.model.cfg, run.model.tokenizer, run.model.slide_tokens)

    @abstractmethod
    def train_step(self, step: int) -> StepMetrics:
        """Run step ``step`` (0-based): draw the batch, update through ``self.run``, say what
        to log."""


_STAGES: dict[str, type[Stage]] = {}
BUILTIN_STAGE_MODULES = ("smartpath.training.sft", "smartpath.training.grpo")
"""Modules whose import registers the built-in stages."""


def register_stage(stage: type[Stage]) -> type[Stage]:
    """Class decorator: register ``stage`` under its ``name``. Registering a name again replaces
    the stage (``python -m smartpath.training.sft`` runs the module twice: as ``__main__`` and
    as itself)."""
    _STAGES[stage.name] = stage
    return stage


def stages() -> dict[str, type[Stage]]:
    """The registered stages by name, the built-in ones included."""
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
    return dict(_STAGES)


def get_stage(name: str) -> type[Stage]:
    """The stage registered as ``name``; ValueError naming the known stages otherwise."""
    known = stages()
    if name not in known:
        raise ValueError(
            f"unknown training stage {name!r}; known stages: {', '.join(sorted(known))}"
        )
    return known[name]


# ---------------------------------------------------------------------------------------------
# Storage of runs


def storage_target(run_stage_dir: str, storage: StorageConfig) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for Ray Train's RunConfig."""
    if not is_s3_uri(run_stage_dir):
        return str(Path(run_stage_dir).expanduser().absolute()), None
    import pyarrow.fs

    if storage.endpoint is None:
        raise ValueError("an s3:// run_root needs storage.endpoint")
    bucket, prefix = parse_prefix(run_stage_dir)
    make_store(storage).ensure_bucket(bucket)
    fs = pyarrow.fs.S3FileSystem(
        access_key=storage.access_key.get_secret_value() if storage.access_key else None,
        secret_key=storage.secret_key.get_secret_value() if storage.secret_key else None,
        endpoint_override=storage.endpoint,
        scheme="https" if storage.secure else "http",
        region=storage.region or "us-east-1",
    )
    return f"{bucket}/{prefix.rstrip('/')}", fs


def write_text(uri: str, text: str, store: ObjectStore) -> None:
    """Write a small text file to a local path or ``s3://bucket/key``."""
    if is_s3_uri(uri):
        bucket, key = parse_prefix(uri)
        store.ensure_bucket(bucket)
        store.put_bytes(ObjectRef(bucket, key.rstrip("/")), text.encode(), "text/plain")
        return
    path = Path(uri).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def read_history(stage_dir: str, store: ObjectStore) -> list[dict[str, float]]:
    """The per-step history a stage wrote (``history.jsonl``)."""
    uri = f"{stage_dir}/{HISTORY_FILE}"
    if is_s3_uri(uri):
        bucket, key = parse_prefix(uri)
        text = store.get_bytes(ObjectRef(bucket, key.rstrip("/"))).decode()
    else:
        text = Path(uri).expanduser().read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def finish_stage(
    run: DeepSpeedRun, config: SmartPathConfig, stage: str, history: list[dict[str, float]]
) -> None:
    """Rank 0 exports the model (its manifest records the last step's metrics as
    ``{stage}/{name}``) and the history; other ranks return at once."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        return
    store = make_store(config.storage)
    t = config.training
    metrics = {f"{stage}/{k}": v for k, v in (history[-1] if history else {}).items()}
    run.model.save(t.model_uri(stage), store, metrics=metrics, overwrite=True)
    lines = "".join(json.dumps(row) + "\n" for row in history)
    write_text(f"{t.stage_dir(stage)}/{HISTORY_FILE}", lines, store)


def with_absolute_paths(config: SmartPathConfig) -> SmartPathConfig:
    """``config`` with local run root, manifests and storage root made absolute: Ray workers
    run in their own working directories, so a relative path would point elsewhere there."""

    def absolute(path: str) -> str:
        return path if is_s3_uri(path) else str(Path(path).expanduser().absolute())

    t = config.training
    training = t.model_copy(
        update={
            "run_root": absolute(t.run_root),
            "data": t.data.model_copy(
                update={"manifests": [absolute(m) for m in t.data.manifests]}
            ),
        }
    )
    storage = config.storage.model_copy(
        update={"local_root": config.storage.local_root.expanduser().absolute()}
    )
    return config.model_copy(update={"training": training, "storage": storage})


def train_worker(loop_config: dict) -> None:
    """The one per-worker loop of every stage (runs inside Ray Train): ``loop_config`` holds the
    ``config`` and the ``stage``'s name."""
    import ray.train

    config: SmartPathConfig = loop_config["config"]
    t = config.training
    rank = ray.train.get_context().get_world_rank()
    stage = get_stage(loop_config["stage"])(config, make_store(config.storage), rank)
    section = stage.section
    model = stage.build_model()
    if t.distributed.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    run = DeepSpeedRun(
        model,
        trainable_parameters(model, section.train_base),
        section.optim,
        t.distributed,
        batch_size=stage.rows_per_step,
        total_steps=section.steps,
    )
    stage.attach(run)
    start, history = run.restore()
    for step in range(start, section.steps):
        tic = time.perf_counter()
        lr = run.lr
        metrics = stage.train_step(step)
        row = run.all_reduce_mean(metrics.mean)
        row.update(
            step=step + 1,
            resumes=run.resumes,
            lr=lr,
            **metrics.local,
            step_s=time.perf_counter() - tic,
        )
        run.record(
            row,
            history,
            step=step + 1,
            total_steps=section.steps,
            checkpoint_every=t.checkpoint_every,
            report_every=t.report_every,
        )
    finish_stage(run, config, stage.name, history)


def run_stage(config: SmartPathConfig, stage: str) -> Any:
    """Run the stage registered as ``stage`` on the configured Ray Train workers; return Ray
    Train's Result. An unknown stage, or a config the stage refuses, raises ValueError first.

    Starts a local Ray when none is running (the embedded default), joins
    ``serve.ray_address`` when set.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    get_stage(stage).check(config)
    config = with_absolute_paths(config)
    t = config.training
    dist = t.distributed
    if not ray.is_initialized():
        address = config.serve.ray_address
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    env = {"DS_ACCELERATOR": "cuda" if dist.use_gpu else "cpu"}
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    storage_path, filesystem = storage_target(t.run_dir(), config.storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config, "stage": stage},
        scaling_config=ScalingConfig(
            num_workers=dist.num_workers,
            use_gpu=dist.use_gpu,
            resources_per_worker={
                "CPU": dist.cpus_per_worker,
                **({"GPU": 1} if dist.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=stage,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env},
        ),
    )
    return trainer.fit()


def stage_main(stage: str, argv: list[str] | None = None) -> None:
    """Command-line entry of a stage: load the config once, run the stage, print where its
    model went."""
    import argparse

    from smartpath.core.config import load_config

    parser = argparse.ArgumentParser(prog=f"python -m smartpath.training.{stage}")
    parser.add_argument("--config", help="SmartPath config YAML (the training section is used)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    result = run_stage(config, stage)
    if result.error is not None:
        raise SystemExit(f"{stage} failed: {result.error}")
    print(json.dumps({"stage": stage, "model": config.training.model_uri(stage), **result.metrics}))
