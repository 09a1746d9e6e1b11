"""deploy/kubernetes/: the manifests against Kubernetes' own schemas (kubernetes-validate, offline), their parts
fitting each other and the gateway, and the gateway reloading a ConfigMap as the kubelet updates it (a swap of the
``..data`` symlink), since no cluster runs here."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import GatewayProcess, http_request
from gateway.config.keys import generate_key, hash_key

MANIFESTS = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def _documents() -> dict[str, dict]:
    found = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        document = yaml.safe_load(path.read_text())
        found[document["kind"]] = document
    return found


def test_the_manifests_are_valid_kubernetes():
    validator = Path(sys.executable).with_name("kubernetes-validate")
    files = [str(p) for p in sorted(MANIFESTS.glob("*.yaml")) if p.name != "kustomization.yaml"]
    done = subprocess.run([str(validator), "--strict", "--no-warn", *files], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(files)
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(Path(f).name for f in files)


def test_the_parts_fit_each_other_and_the_gateway(tmp_path):
    documents = _documents()
    deployment, service = documents["Deployment"], documents["Service"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    grace = pod["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]  # not the sleep action: Kubernetes 1.30+ only
    assert command[0] == "sleep" and grace > float(env["GATEWAY_GRACEFUL_SHUTDOWN_SECONDS"]) + float(command[1])
    assert container["envFrom"][0]["secretRef"]["name"] == documents["Secret"]["metadata"]["name"]
    assert {"REDIS_URL", "DATABASE_URL", "QDRANT_URL", "GATEWAY_ADMIN_KEY", "GATEWAY_METRICS_KEY"} <= set(documents["Secret"]["stringData"])
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == documents["ConfigMap"]["metadata"]["name"]
    assert env["GATEWAY_CONFIG_DIR"] == next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "config")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     documents["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert documents["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    for name, text in documents["ConfigMap"]["data"].items():  # the config it carries is one the gateway loads
        (tmp_path / name).write_text(text)
    done = subprocess.run([sys.executable, "-m", "gateway", "config", "check", "--config-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "OPENAI_API_KEY": "sk-x"})
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr


def _kubelet_write(folder: Path, files: dict[str, str], generation: int) -> None:
    """What the kubelet does to a ConfigMap volume: files in a new timestamped folder, ``..data`` swapped to it
    atomically, and each name a symlink through ``..data``."""
    target = folder / f"..2026_11_26_00_00_0{generation}.{generation:09d}"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
    temporary = folder / "..data_tmp"
    temporary.symlink_to(target.name)
    os.replace(temporary, folder / "..data")
    for name in files:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def test_a_configmap_update_is_reloaded_without_a_restart(sim, tmp_path):
    key = generate_key()
    folder = tmp_path / "config"
    folder.mkdir()
    models = {"models": {"first": {"deployments": [{"name": "a", "api_base": f"{sim.url}/v1", "model": "sim"}]}}}
    tenants = {"tenants": {"t": {"name": "T", "tier": "enterprise", "keys": [{"name": "k", "sha256": hash_key(key)}]}}}
    _kubelet_write(folder, {"models.yaml": yaml.safe_dump(models), "tenants.yaml": yaml.safe_dump(tenants)}, 1)
    gateway = GatewayProcess(folder)
    try:
        names = lambda: {m["id"] for m in http_request(gateway.port, "GET", "/v1/models",  # noqa: E731
                                                      headers={"Authorization": f"Bearer {key}"})[1]["data"]}
        assert names() == {"first"}
        models["models"]["second"] = models["models"]["first"]
        _kubelet_write(folder, {"models.yaml": yaml.safe_dump(models), "tenants.yaml": yaml.safe_dump(tenants)}, 2)
        deadline = time.monotonic() + 10
        while names() != {"first", "second"}:
            assert time.monotonic() < deadline, "the ConfigMap's new files were not reloaded"
            time.sleep(0.2)
    finally:
        gateway.stop()


def test_the_trainers_job_template_and_its_rights_are_valid_and_fit_the_gateway(tmp_path):
    """deploy/kubernetes/trainer/: the Job template a kubernetes trainer makes its runs from, and the account's
    rights, valid Kubernetes; the template is one the gateway's config takes, and the rights are what it uses."""
    from gateway.config.schema import FineTuningSpec
    from gateway.config.secrets import Secrets
    from gateway.config.trainers import compile_trainers
    from gateway.finetune.launch import KubernetesLaunch

    folder = MANIFESTS / "trainer"
    validator = Path(sys.executable).with_name("kubernetes-validate")
    done = subprocess.run([str(validator), "--strict", "--no-warn", str(folder / "job-template.yaml"),
                           str(folder / "rbac.yaml")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.count("passed") == 4, done.stdout + done.stderr
    spec = FineTuningSpec.model_validate({"report_url": "http://llm-gateway.llm-gateway.svc:4000", "trainers": {
        "cluster": {"kind": "kubernetes", "api_server": "https://kubernetes.default.svc", "namespace": "llm-training",
                    "token": "env:TRAINER_KUBE_TOKEN", "job_template": "job-template.yaml"}}})
    problems: list[str] = []
    trainers = compile_trainers(spec, folder, Secrets({"TRAINER_KUBE_TOKEN": "t"}), problems)
    assert problems == []
    job = {"id": "ftjob-0123456789abcdef01234567", "restarts": 0}
    manifest = KubernetesLaunch(trainers["cluster"], job, "http://gw/v1/fine_tuning/trainer/jobs/x",
                                "ftrun-t").manifest()
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["FINE_TUNING_JOB"]["value"] == job["id"] and "GATEWAY_TRAINER_TOKEN" in env
    assert container["args"][:3] == ["python", "-m", "gateway.finetune.remote"]
    documents = yaml.safe_load_all((folder / "rbac.yaml").read_text())
    rules = {(group, resource): set(rule["verbs"]) for document in documents
             if document["kind"] == "Role" for rule in document["rules"]
             for group in rule["apiGroups"] for resource in rule["resources"]}
    assert rules == {("batch", "jobs"): {"create", "get", "delete"}, ("", "secrets"): {"create"}}
