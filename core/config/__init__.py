"""The one typed configuration tree shared by the CLI, the services and the Helm chart.

Loaded once (YAML file, then ``SMARTPATH_*`` environment overrides with ``__`` between
nesting levels, e.g. ``SMARTPATH_STORAGE__ENDPOINT=minio:9000``) and passed down explicitly.
The chart renders the same tree into the RayService's environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from smartpath.core.config.model import DTypeSpec
from smartpath.core.config.training import TrainingConfig

GiB = 1024**3


class StorageConfig(BaseModel):
    """Where slides, features, models and runs live."""

    endpoint: str | None = Field(
        None,
        description="S3/MinIO endpoint as host:port. None means the embedded default: a local "
        "directory behind the same interface.",
    )
    access_key: SecretStr | None = Field(None, description="S3 access key.")
    secret_key: SecretStr | None = Field(None, description="S3 secret key.")
    secure: bool = Field(False, description="Use TLS to reach the endpoint.")
    region: str | None = Field(None, description="S3 region; None lets the client discover it.")
    local_root: Path = Field(
        Path("~/.smartpath/storage"),
        description="Root of the local-directory backend; each bucket is a sub-folder.",
    )
    retries: int = Field(4, ge=0, description="Retries of transient S3 errors (0 means none).")
    backoff_s: float = Field(0.2, gt=0, description="First retry delay; doubles each retry.")
    timeout_s: float = Field(30.0, gt=0, description="Connect/read timeout of one S3 call.")

    @model_validator(mode="after")
    def _credentials_together(self) -> StorageConfig:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("storage.access_key and storage.secret_key must be set together")
        return self


class SlideCacheConfig(BaseModel):
    """The tiler's local copy of slides (OpenSlide needs a file on disk)."""

    dir: Path = Field(Path("~/.smartpath/cache/slides"), description="Cache folder.")
    max_bytes: int = Field(
        20 * GiB, gt=0, description="Upper bound on cached bytes; least recently used go first."
    )


class TilingConfig(BaseModel):
    """Defaults for tissue detection, tile plans and tile reading."""

    target_mpp: float = Field(0.5, gt=0, description="Default tile resolution in µm/px.")
    tile_size: int = Field(256, ge=16, le=4096, description="Tile edge in pixels at target_mpp.")
    overlap: int = Field(0, ge=0, description="Overlap between neighbouring tiles, pixels.")
    min_tissue_fraction: float = Field(
        0.25, ge=0, le=1, description="Tiles with less tissue than this are left out of plans."
    )
    tissue_mpp: float = Field(
        4.0, gt=0, description="Resolution (µm/px) of the thumbnail used for tissue detection."
    )
    tissue_max_px: int = Field(
        4096,
        ge=64,
        description="Cap on the tissue thumbnail's long side, whatever tissue_mpp says.",
    )
    min_tissue_area_um2: float = Field(
        2_000.0, ge=0, description="Tissue components smaller than this (µm²) are dropped."
    )
    max_hole_area_um2: float = Field(
        20_000.0, ge=0, description="Holes in tissue smaller than this (µm²) are filled."
    )
    read_workers: int = Field(0, ge=0, description="Tile decode threads; 0 means one per core.")
    batch_size: int = Field(64, ge=1, le=1024, description="Tiles per streamed batch.")
    prefetch_batches: int = Field(
        2,
        ge=1,
        le=8,
        description="Batches read ahead of the one being streamed; 2 keeps every core decoding "
        "while one batch is assembled (the GIL-bound part) and another is sent.",
    )
    max_region_pixels: int = Field(
        4096 * 4096, ge=1, description="Refuse slide regions larger than this at their resolution."
    )
    max_read_pixels: int = Field(
        1 << 28,
        ge=1 << 16,
        description="Most source pixels one thumbnail, tissue mask or region may read from the "
        "slide (a 16k x 16k level by default). A larger read samples a band of rows per "
        "output row; thumbnails and tissue masks shrink to fit; what still does not fit is "
        "INVALID_ARGUMENT.",
    )
    open_slide_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="Memory the open slides may hold (decoded ROI images count in full, "
        "OpenSlide handles a nominal 1 MiB); the least recently used close first.",
    )
    openslide_cache_bytes: int = Field(
        256 << 20,
        ge=0,
        description="OpenSlide's decoded-tile cache, shared by every open slide of a replica.",
    )
    max_tiles_per_request: int = Field(
        0, ge=0, description="Refuse ReadTiles asking for more tiles (0 means unbounded)."
    )
    local_slide_roots: list[Path] = Field(
        default_factory=list,
        description="Folders whose files may be referenced by local path. Empty refuses every "
        "local path (the safe default for a cluster).",
    )


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling of one deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="Scale out above this load.")
    # Defaults below are Serve's own (ray.serve.config.AutoscalingConfig).
    upscale_delay_s: float = Field(
        30.0,
        ge=0,
        description="Seconds the load must call for more replicas before Serve adds them.",
    )
    downscale_delay_s: float = Field(
        600.0,
        ge=0,
        description="Seconds the load must call for fewer replicas before Serve removes them.",
    )
    look_back_period_s: float = Field(
        30.0,
        gt=0,
        description="Window (seconds) over which Serve averages ongoing requests per replica; "
        "keep it above Serve's metrics push interval (10 s).",
    )

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must not exceed max_replicas")
        return self


class DeploymentConfig(BaseModel):
    """Resources and scaling of one Ray Serve deployment."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")
    max_ongoing_requests: int = Field(8, ge=1, description="Per-replica concurrency limit.")
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="Requests queued per caller before RESOURCE_EXHAUSTED (-1: unbounded).",
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)


class ModelServingConfig(BaseModel):
    """The model the services load and the limits on requests. What the model itself needs
    (tile encoder, slide tile spec, labels, prompt style) travels in its checkpoint
    (:class:`~smartpath.core.config.model.ModelConfig`), not here."""

    uri: str | None = Field(
        None,
        description="Checkpoint folder or s3:// URI. None serves the packaged demo model.",
    )
    region_mpp: float = Field(
        0.5, gt=0, description="Default resolution (µm/px) of slide regions sent as ROIs."
    )
    max_prompt_chars: int = Field(2000, ge=1, description="Longest accepted prompt.")
    max_image_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest accepted encoded ROI image."
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="Largest accepted ROI image (width x height)."
    )
    max_new_tokens: int = Field(256, ge=1, le=4096, description="Default and cap of tokens.")
    max_labels: int = Field(
        64,
        ge=1,
        description="Most candidate labels (and, separately, options) one question may name.",
    )
    max_tiles_per_request: int = Field(
        4096, ge=1, description="Most tiles one EncodeTiles request may carry."
    )
    max_image_tokens: int = Field(
        1280,
        ge=1,
        description="Visual tokens one ROI may become; a bigger image is resized (aspect kept) "
        "to fit, never refused. 1280 tokens = 28²·1280 ≈ 1 MP, Qwen2.5-VL's default.",
    )
    device: str = Field(
        "auto",
        description='Device the model-serving replicas run on: "auto" (CUDA when the replica '
        'has a GPU, else CPU), "cpu", "cuda" or "cuda:N".',
    )
    dtype: DTypeSpec = Field(
        "auto",
        description='Parameter dtype when serving: "auto" is bfloat16 on CUDA, float32 on CPU.',
    )
    features_bucket: str = Field(
        "smartpath", description="Bucket of the slide feature cache (features/… keys)."
    )


class BatchingDeploymentConfig(DeploymentConfig):
    """A deployment that batches concurrent requests into one forward pass."""

    max_batch_size: int = Field(16, ge=1, description="Requests (or tile sets) per forward.")
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        description="Token budget of one forward: visual tokens per encoder batch, prompt + new "
        "tokens per decoder batch. A batch is cut when the next request would exceed it.",
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="How long a partial batch waits for more requests. 0: an idle replica "
        "starts at once; requests that arrive meanwhile form the next batch.",
    )


class DecoderDeploymentConfig(BatchingDeploymentConfig):
    """The Decoder deployment: batching across requests, a bounded queue, expert sets."""

    max_pending: int = Field(
        64, ge=1, description="Requests waiting for a batch before RESOURCE_EXHAUSTED."
    )
    max_expert_sets: int = Field(
        8, ge=1, description="Expert sets a replica keeps warm (Serve model multiplexing)."
    )
    label_chunk: int = Field(
        16,
        ge=1,
        description="Candidate labels scored per forward (classification); bounds the memory "
        "of scoring many labels.",
    )
    scheduling: Literal["static", "continuous"] = Field(
        "continuous",
        description="continuous: waiting requests join the running batch at every step and "
        "finished ones leave (iteration-level batching); static: a batch runs to its end "
        "while new requests wait for the next one.",
    )


class ServeConfig(BaseModel):
    """The Ray Serve proxies."""

    host: str = Field("127.0.0.1", description="HTTP proxy bind address.")
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(9000, ge=1, le=65535)
    request_timeout_s: float | None = Field(
        None, gt=0, description="End-to-end gRPC timeout at the proxy (None: client deadline only)."
    )
    log_encoding: Literal["TEXT", "JSON"] = Field(
        "TEXT", description="Replica log format; JSON lines carry the request id (use in clusters)."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join; None starts Ray locally (the embedded default)."
    )
    max_message_bytes: int = Field(
        64 << 20,
        ge=1 << 20,
        lt=1 << 31,
        description="Largest gRPC message the proxy accepts or sends (RESOURCE_EXHAUSTED above "
        "it); Ray's own default is 2 GiB. Set on the Ray nodes' environment, so it applies "
        "where Ray starts (here, or the chart's pods).",
    )
    inline_message_bytes: int = Field(
        1 << 20,
        ge=0,
        lt=1 << 31,
        description="Calls between replicas whose tensors are at most this size go straight to "
        "the replica over Serve's gRPC (a few ms less per hop); larger ones pass their tensors "
        "through Ray's object store (zero-copy on a node). 0: always the object store.",
    )
    tiler: DeploymentConfig = Field(default_factory=DeploymentConfig)
    # Batching deployments take more concurrent requests than they batch, so batches fill.
    encoder: BatchingDeploymentConfig = Field(
        default_factory=lambda: BatchingDeploymentConfig(max_batch_size=32, max_ongoing_requests=64)
    )
    router: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(num_cpus=0.25, max_ongoing_requests=64)
    )
    decoder: DecoderDeploymentConfig = Field(
        default_factory=lambda: DecoderDeploymentConfig(
            max_ongoing_requests=32, max_batch_tokens=65536
        )
    )
    gateway: DeploymentConfig = Field(
        default_factory=lambda: DeploymentConfig(
            num_cpus=0.25, max_ongoing_requests=64, max_queued_requests=128
        )
    )
    deadline_s: float = Field(
        120.0,
        gt=0,
        description="Server-side deadline of one analysis (the client's may be shorter).",
    )
    auth_token_file: Path | None = Field(
        None,
        description="File of accepted bearer tokens, one per line as name:token or token (a "
        "mounted Secret), checked by every service's gRPC methods. None leaves them open; set "
        "it whenever the port is reachable from outside.",
    )
    audit_key: SecretStr | None = Field(
        None,
        description="Key of the slide-reference hashes in the audit log (same key on every "
        "replica, so a slide's calls link up). None: a random key per process.",
    )


class SmartPathConfig(BaseSettings):
    """Root of the configuration tree."""

    model_config = SettingsConfigDict(
        env_prefix="SMARTPATH_", env_nested_delimiter="__", extra="forbid"
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    storage: StorageConfig = Field(default_factory=StorageConfig)
    slide_cache: SlideCacheConfig = Field(default_factory=SlideCacheConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    model: ModelServingConfig = Field(default_factory=ModelServingConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file (init), so operators can override one value.
        return env_settings, init_settings


def load_config(path: str | Path | None = None, **overrides: Any) -> SmartPathConfig:
    """Load the config from an optional YAML file, then environment overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    data.update(overrides)
    return SmartPathConfig(**data)
