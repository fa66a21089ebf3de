"""Strict schema validation of rendered Kubernetes objects, for every supported version.

* Built-in kinds: the strict JSON schemas of ``kubernetes-validate``, the newest release (1.25 and
  later) and, for 1.23 and 1.24, release 1.28.3 of the same tool, which the Makefile installs
  beside it (``.venv/k8s-schemas``; one environment cannot hold two releases of one package).
* Dask kinds: the CRDs shipped in the dask-kubernetes wheel, made strict (unknown keys fail).
"""

from __future__ import annotations

import copy
import json
import sys
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import referencing
import referencing.jsonschema
import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: release 1.28.3 of kubernetes-validate, installed by `make install-test` for its 1.23/1.24 schemas
OLD_SCHEMAS = Path(sys.prefix) / "k8s-schemas" / "kubernetes_validate" / "kubernetes-json-schema"
NEW_SCHEMAS = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
OLDEST = (1, 23)


def newest() -> tuple[int, int]:
    major, minor = kubernetes_validate.utils.latest_version().split(".")[:2]
    return int(major), int(minor)


def supported_versions() -> list[str]:
    """Every Kubernetes minor version from 1.23 to the newest kubernetes-validate knows."""
    return [f"1.{m}" for m in range(OLDEST[1], newest()[1] + 1)]


def _schema_dir(version: str) -> Path:
    base = NEW_SCHEMAS if (NEW_SCHEMAS / f"v{version}.0-local-strict").is_dir() else OLD_SCHEMAS
    path = base / f"v{version}.0-local-strict"
    if not path.is_dir():
        raise FileNotFoundError(
            f"no strict schemas for Kubernetes {version} in {path}: run `make install-test` "
            "(it installs kubernetes-validate 1.28.3's schemas for 1.23 and 1.24)"
        )
    return path


@cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    import re

    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    root = _schema_dir(version)
    schema = json.loads((root / f"{kind.lower()}-{group}.json").read_text())
    defs = json.loads((root / "_definitions.json").read_text())
    spec = referencing.jsonschema.DRAFT7
    registry = referencing.Registry().with_resources(
        [
            ("_definitions.json", referencing.Resource.from_contents(defs, spec)),
            ("", referencing.Resource.from_contents(schema, spec)),
        ]
    )
    schema = {k: v for k, v in schema.items() if k != "$schema"}
    return jsonschema.Draft7Validator(schema, registry=registry)


def validate_builtin(obj: dict, version: str) -> None:
    """Raise ``jsonschema.ValidationError`` if ``obj`` is not valid for Kubernetes ``version``
    (strict: unknown fields fail)."""
    validator = _validator(version, obj["kind"], obj["apiVersion"])
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        raise jsonschema.ValidationError(
            f"{obj['kind']} {obj['metadata'].get('name')} for Kubernetes {version}: "
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        )


# ---- dask-kubernetes CRDs ------------------------------------------------------------------
def _strict(node):
    """Reject what the API server would silently prune: unknown keys of every object schema."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _strict(v) for k, v in node.items()}
    if node.get("x-kubernetes-int-or-string") is True:
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    is_object = node.get("type") == "object" or isinstance(node.get("properties"), dict)
    if (
        is_object
        and not node.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in node
    ):
        node["additionalProperties"] = False
    return node


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    import dask_kubernetes

    crds = (
        Path(dask_kubernetes.__file__).parent
        / "operator/deployment/helm/dask-kubernetes-operator/crds"
    )
    crd = yaml.load((crds / f"{kind.lower()}.yaml").read_text(), Loader=_Loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    meta = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "required": ["name"],
    }
    schema["properties"].update(
        apiVersion={"const": "kubernetes.dask.org/v1"}, kind={"const": kind}, metadata=meta
    )
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return jsonschema.Draft7Validator(_strict(schema))


def drop_none(obj):
    if isinstance(obj, dict):
        return {k: drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [drop_none(v) for v in obj]
    return obj


def validate_crd(obj: dict) -> None:
    errors = sorted(crd_validator(obj["kind"]).iter_errors(drop_none(obj)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


def pod_specs(obj) -> list[dict]:
    """Every pod spec (a mapping with ``containers``) anywhere in an object."""
    found = []
    if isinstance(obj, dict):
        if "containers" in obj:
            found.append(obj)
        for v in obj.values():
            found += pod_specs(v)
    elif isinstance(obj, list):
        for v in obj:
            found += pod_specs(v)
    return found


def validate_everything(objects: list[dict], version: str) -> list[str]:
    """Validate every object strictly for ``version`` (Dask kinds against the CRDs, and their
    pod specs as Pods of that version); return the kinds checked."""
    kinds = []
    for obj in objects:
        if obj["apiVersion"].startswith("kubernetes.dask.org/"):
            validate_crd(obj)
            for spec in pod_specs(obj):
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": spec}
                validate_builtin(pod, version)
        else:
            validate_builtin(obj, version)
        kinds.append(obj["kind"])
    return kinds
