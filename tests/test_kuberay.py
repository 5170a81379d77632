"""deploy/kuberay/ against KubeRay's own CRD schemas (the openAPIV3Schema of ray.io_rayjobs.yaml and
ray.io_rayservices.yaml from ray-project/kuberay at the release named by the folder under
tests/data/, descriptions left out), validated as strictly as ``kubectl apply --validate=strict``:
a field the CRD does not define is an error, not silently dropped."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "tests" / "data" / "kuberay-v1.7.0"
DEPLOY = REPO / "deploy" / "kuberay"


def strict(schema: dict) -> dict:
    """Kubernetes prunes unknown fields; refuse them instead (except where the CRD keeps them)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd(name: str) -> dict:
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text())


def validate(manifest: dict, name: str) -> None:
    definition = crd(name)
    assert manifest["apiVersion"] == f"{definition['group']}/{definition['version']}" and manifest["kind"] == definition["kind"]
    schema = strict(definition["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # the API server's own ObjectMeta
    jsonschema.validate(manifest, schema, cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize(("file", "schema"), [("rayjob-tune.yaml", "rayjobs"), ("rayservice-serve.yaml", "rayservices")])
def test_manifests_match_kuberays_crd_schemas(file, schema):
    validate(yaml.safe_load((DEPLOY / file).read_text()), schema)


def test_a_misspelled_field_is_refused():
    """The strict check is not vacuous: a typo that Kubernetes would drop silently fails here."""
    manifest = yaml.safe_load((DEPLOY / "rayjob-tune.yaml").read_text())
    manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    with pytest.raises(jsonschema.ValidationError, match="maxReplica"):
        validate(manifest, "rayjobs")


def test_rayservice_serves_the_serve_configs_applications():
    service = yaml.safe_load((DEPLOY / "rayservice-serve.yaml").read_text())
    served = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert served["applications"] == yaml.safe_load((REPO / "serve" / "phi2.yaml").read_text())["applications"]


def test_settings_come_from_secrets_and_every_ray_container_has_a_gpu_or_is_the_head():
    for file in ("rayjob-tune.yaml", "rayservice-serve.yaml"):
        manifest = yaml.safe_load((DEPLOY / file).read_text())
        cluster = manifest["spec"].get("rayClusterSpec") or manifest["spec"]["rayClusterConfig"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        for group in groups:
            container = group["template"]["spec"]["containers"][0]
            env = {item["name"]: item for item in container.get("env", [])}
            assert {"secretRef": {"name": "loraops-s3"}} in container["envFrom"], file
            if "LORAOPS_DATABASE_URL" in env:
                assert env["LORAOPS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "loraops-postgres"
            assert not any(name.startswith("AWS_") for name in env), f"{file}: S3 credentials belong in the Secret"
        assert "LORAOPS_DATABASE_URL" in {item["name"] for item in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        for worker in cluster["workerGroupSpecs"]:
            assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1", file
