"""The ``config`` and ``training.config`` parts of the chart's ``values.schema.json``.

Both are generated from the typed config tree (``SmartPathConfig``, ``TrainingConfig``) so the
chart cannot accept a key the services would refuse, nor refuse one they accept:

- every object closes with ``additionalProperties: false`` (a typo'd key fails ``helm install``);
- the storage secrets (``access_key``, ``secret_key``) are left out: credentials never go under
  ``config``, they come from Secrets as ``SMARTPATH_STORAGE__*`` environment variables;
- the fields the chart sets itself are left out, so each has one place in the values:
  ``storage.endpoint|secure|region`` (from ``minio`` / ``externalStorage``) and
  ``serve.auth_token_file`` (from ``auth``);
- ``training`` is left out of ``config``: the chart takes it as ``training.config``;
- titles, defaults, formats and ``required`` are dropped (values are partial trees, and Helm
  does not apply schema defaults).

``tests/deploy/test_chart.py`` fails when the file and the config tree disagree; rewrite the
two parts with::

    .venv/bin/python -m tests.deploy.config_schema --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CHART = Path(__file__).resolve().parents[2] / "charts" / "smartpath"
SCHEMA_FILE = CHART / "values.schema.json"
DROP = {"title", "default", "format", "required", "examples"}
SECRET_FIELDS = {"storage": {"access_key", "secret_key"}}
CHART_MANAGED = {"storage": {"endpoint", "secure", "region"}, "serve": {"auth_token_file"}}
GENERATED_NOTE = "Generated from {} by tests/deploy/config_schema.py; do not edit by hand."


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve ``$ref``s, translate 2020-12 ``prefixItems`` to draft-07 and close objects."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline(merged, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in DROP or key == "$defs":
            continue
        if key == "prefixItems":
            out["items"] = _inline(value, defs)
        elif key == "properties":
            out[key] = {name: _inline(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _inline(value, defs)
    if "properties" in out:
        out["type"] = "object"
        out["additionalProperties"] = False
    return out


def _schema_of(model: type) -> dict[str, Any]:
    raw = model.model_json_schema()
    return _inline(raw, raw.get("$defs", {}))


def config_schema() -> dict[str, Any]:
    """Schema of ``.Values.config``: SmartPathConfig without secrets and without training."""
    from smartpath.core.config import SmartPathConfig

    schema = _schema_of(SmartPathConfig)
    schema["properties"].pop("training")
    for section, fields in [*SECRET_FIELDS.items(), *CHART_MANAGED.items()]:
        for field in fields:
            schema["properties"][section]["properties"].pop(field)
    schema["description"] = (
        "The SmartPath config tree (smartpath.core.config.SmartPathConfig) rendered into "
        "the RayService's serveConfigV2 args and the config.yaml ConfigMap. No secrets here. "
        + GENERATED_NOTE.format("SmartPathConfig")
    )
    return schema


def training_config_schema() -> dict[str, Any]:
    """Schema of ``.Values.training.config``: the ``training`` section (TrainingConfig)."""
    from smartpath.core.config.training import TrainingConfig

    schema = _schema_of(TrainingConfig)
    schema["description"] = (
        "The training section of the config tree (smartpath.core.config.training.TrainingConfig), "
        "merged into the RayJobs' config.yaml as `training`. "
        + GENERATED_NOTE.format("TrainingConfig")
    )
    return schema


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


def write() -> None:
    """Rewrite the two generated parts of values.schema.json, keeping the rest as it is."""
    schema = load_schema()
    schema["properties"]["config"] = config_schema()
    schema["properties"]["training"]["properties"]["config"] = training_config_schema()
    SCHEMA_FILE.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: python -m tests.deploy.config_schema --write (updates {SCHEMA_FILE})")
    write()
    print(f"updated {SCHEMA_FILE}")
