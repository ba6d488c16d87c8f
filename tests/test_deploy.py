"""Offline checks of deploy/: the image recipe, the rendered manifests and their hardening.

Nothing here needs a cluster or a Docker engine. Each overlay is rendered with
``kubectl kustomize`` (or a standalone ``kustomize``), every rendered object is validated in
strict mode against the Kubernetes OpenAPI schemas shipped by ``kubernetes-validate``, and the
properties a reviewer would otherwise check by eye are asserted: Pod Security "restricted",
native gRPC probes, a grace period that covers the configured drain, and the wiring between
routesvc, its telemetry backend and Redis. The Dockerfile is linted with hadolint.

A missing tool fails its tests with a message naming ``.ci/deploy-check.sh``, which installs
everything; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from routesvc.config import parse_config
from routesvc.server import Server
from tests.conftest import process_environ
from tests.proxies import ConnectProxy

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
LOCK = DEPLOY / "requirements.lock"
OVERLAYS = ("dev", "prod")
# A release kubernetes-validate ships schemas for; native gRPC probes are GA since 1.27.
K8S_VERSION = "1.32.0"
SETUP_HINT = "run `bash .ci/deploy-check.sh` from the repository root, which installs it"

Obj = dict[str, Any]


def _find(name: str) -> str | None:
    """The path of ``name``: beside this interpreter (venv scripts), on PATH, or in the CI cache."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    cache = Path(os.environ.get("ROUTESVC_CACHE", Path.home() / ".cache" / "routesvc"))
    return shutil.which(name) or shutil.which(name, path=str(cache / "bin"))


def _tool(name: str) -> str:
    """The path of ``name``; fails the test, saying how to install it, when it is missing."""
    found = _find(name)
    if found is None:
        pytest.fail(f"{name} is not installed; {SETUP_HINT}", pytrace=False)
    return found


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # A fixed argv of a resolved tool with no shell: nothing here comes from outside the repo.
    return subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT, timeout=120)


@functools.cache
def _render(overlay: str) -> tuple[Obj, ...]:
    path = str(DEPLOY / "k8s" / "overlays" / overlay)
    # kubectl embeds kustomize; a standalone kustomize (built by .ci/deploy-check.sh where kubectl
    # is absent) renders the same output.
    if kubectl := _find("kubectl"):
        argv = [kubectl, "kustomize", path]
    elif kustomize := _find("kustomize"):
        argv = [kustomize, "build", path]
    else:
        pytest.fail(f"neither kubectl nor kustomize is installed; {SETUP_HINT}", pytrace=False)
    result = _run(argv)
    assert result.returncode == 0, f"rendering overlays/{overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@dataclass(frozen=True)
class Overlay:
    """One rendered overlay and lookups into it."""

    name: str
    objects: tuple[Obj, ...]

    def get(self, kind: str, name: str) -> Obj:
        """The object of ``kind`` named ``name``; fails the test when it is missing."""
        for obj in self.objects:
            if obj["kind"] == kind and obj["metadata"]["name"] == name:
                return obj
        pytest.fail(f"overlays/{self.name} renders no {kind} {name!r}")

    def of_kind(self, kind: str) -> list[Obj]:
        """Every object of ``kind``."""
        return [obj for obj in self.objects if obj["kind"] == kind]

    @property
    def routesvc(self) -> Obj:
        """The routesvc Deployment."""
        return self.get("Deployment", "routesvc")

    @property
    def pod(self) -> Obj:
        """The routesvc pod spec."""
        return self.routesvc["spec"]["template"]["spec"]

    @property
    def container(self) -> Obj:
        """The routesvc container."""
        (container,) = [c for c in self.pod["containers"] if c["name"] == "routesvc"]
        return container

    @property
    def env(self) -> dict[str, Obj]:
        """The routesvc container's environment, by variable name."""
        return {var["name"]: var for var in self.container.get("env", [])}

    @property
    def config_text(self) -> str:
        """The routing config routesvc is started with, from its ConfigMap."""
        return self.get("ConfigMap", "routesvc-config")["data"]["config.yaml"]

    @property
    def config(self) -> Obj:
        """The routing config, parsed."""
        return yaml.safe_load(self.config_text)

    def service_port(self, url: str) -> tuple[Obj, Obj]:
        """The Service and port that an in-cluster ``scheme://service:port`` URL points at."""
        parts = urlsplit(url)
        service = self.get("Service", parts.hostname or "")
        ports = [port for port in service["spec"]["ports"] if port["port"] == parts.port]
        assert ports, f"Service {service['metadata']['name']} has no port {parts.port} (from {url})"
        return service, ports[0]

    def pods_selected_by(self, selector: dict[str, str]) -> list[Obj]:
        """The Deployments whose pod labels match ``selector``."""
        return [
            deployment
            for deployment in self.of_kind("Deployment")
            if selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        ]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Overlay:
    """Each overlay in turn, rendered once per module."""
    return Overlay(request.param, _render(request.param))


@pytest.fixture(scope="module")
def dev() -> Overlay:
    """The dev overlay."""
    return Overlay("dev", _render("dev"))


@pytest.fixture(scope="module")
def prod() -> Overlay:
    """The prod overlay."""
    return Overlay("prod", _render("prod"))


def _workloads(overlay: Overlay) -> Iterator[tuple[str, Obj, Obj]]:
    for deployment in overlay.of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield f"{deployment['metadata']['name']}/{container['name']}", pod, container


class TestSchemas:
    """Every rendered object is valid Kubernetes, with no unknown or misspelt fields."""

    def test_every_object_validates_strictly(self, overlay: Overlay) -> None:
        """Each object validates against the strict schema of its kind for K8S_VERSION."""
        try:
            import kubernetes_validate
        except ImportError:
            pytest.fail(f"kubernetes-validate is not installed; {SETUP_HINT}", pytrace=False)
        errors = []
        for obj in overlay.objects:
            where = f"{obj['kind']}/{obj['metadata']['name']}"
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                errors.append(f"{where}: {exc.message}")
        assert errors == []

    def test_renders_the_expected_objects(self, overlay: Overlay) -> None:
        """Each overlay holds the routesvc set plus its own telemetry and state services."""
        common = {
            ("Namespace", None),
            ("ServiceAccount", "routesvc"),
            ("ConfigMap", "routesvc-config"),
            ("Deployment", "routesvc"),
            ("Service", "routesvc"),
            ("HorizontalPodAutoscaler", "routesvc"),
            ("PodDisruptionBudget", "routesvc"),
            ("NetworkPolicy", "routesvc"),
        }
        extra = {
            "dev": {("Deployment", "jaeger"), ("Service", "jaeger")},
            "prod": {
                ("Deployment", "otel-collector"),
                ("Service", "otel-collector"),
                ("ConfigMap", "otel-collector"),
                ("Deployment", "redis"),
                ("Service", "redis"),
                ("NetworkPolicy", "redis"),
            },
        }[overlay.name]
        rendered = {
            (obj["kind"], None if obj["kind"] == "Namespace" else obj["metadata"]["name"]) for obj in overlay.objects
        }
        assert common | extra == rendered

    def test_everything_lands_in_the_overlay_namespace(self, overlay: Overlay) -> None:
        """All namespaced objects go to the overlay's own Namespace."""
        (namespace,) = overlay.of_kind("Namespace")
        name = namespace["metadata"]["name"]
        elsewhere = [
            f"{obj['kind']}/{obj['metadata']['name']}"
            for obj in overlay.objects
            if obj["kind"] != "Namespace" and obj["metadata"].get("namespace") != name
        ]
        assert elsewhere == []


class TestRoutesvcHardening:
    """The routesvc Deployment meets Pod Security "restricted" and runs with least privilege."""

    def test_runs_as_non_root(self, overlay: Overlay) -> None:
        """The pod refuses to start as root and runs as a fixed non-zero uid and gid."""
        pod_context = overlay.pod["securityContext"]
        assert pod_context["runAsNonRoot"] is True
        assert overlay.container["securityContext"]["runAsNonRoot"] is True
        assert pod_context["runAsUser"] > 0
        assert pod_context["runAsGroup"] > 0

    def test_forbids_privilege_escalation(self, overlay: Overlay) -> None:
        """No setuid path to more privilege, and the container is not privileged."""
        context = overlay.container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context.get("privileged", False) is False

    def test_drops_all_capabilities(self, overlay: Overlay) -> None:
        """Every Linux capability is dropped and none is added back."""
        capabilities = overlay.container["securityContext"]["capabilities"]
        assert capabilities["drop"] == ["ALL"]
        assert "add" not in capabilities

    def test_root_filesystem_is_read_only_with_a_writable_tmp(self, overlay: Overlay) -> None:
        """The root filesystem is read-only; /tmp, the image's HOME, is an emptyDir."""
        assert overlay.container["securityContext"]["readOnlyRootFilesystem"] is True
        mounts = {mount["mountPath"]: mount["name"] for mount in overlay.container["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in overlay.pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]

    def test_uses_the_runtime_default_seccomp_profile(self, overlay: Overlay) -> None:
        """Syscalls are filtered by the container runtime's default seccomp profile."""
        assert overlay.pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert overlay.container["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    def test_service_account_token_is_not_mounted(self, overlay: Overlay) -> None:
        """routesvc has its own ServiceAccount, and no API token reaches the pod."""
        assert overlay.pod["serviceAccountName"] == "routesvc"
        assert overlay.pod["automountServiceAccountToken"] is False
        assert overlay.get("ServiceAccount", "routesvc")["automountServiceAccountToken"] is False

    def test_requests_and_limits_are_set(self, overlay: Overlay) -> None:
        """CPU and memory both have a request and a limit, the request no larger than the limit."""
        resources = overlay.container["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= resources[kind].keys(), kind
        assert _quantity(resources["requests"]["cpu"]) <= _quantity(resources["limits"]["cpu"])
        assert _quantity(resources["requests"]["memory"]) <= _quantity(resources["limits"]["memory"])

    def test_probes_are_native_grpc_on_the_serving_port(self, overlay: Overlay) -> None:
        """Startup, readiness and liveness call grpc.health.v1 on the gRPC port: no probe binary."""
        (grpc_port,) = [port["containerPort"] for port in overlay.container["ports"] if port["name"] == "grpc"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert {"grpc"} == overlay.container[probe].keys() & {"grpc", "httpGet", "tcpSocket", "exec"}, probe
            assert grpc_port == overlay.container[probe]["grpc"]["port"], probe

    def test_readiness_reacts_faster_than_the_drain_delay(self, overlay: Overlay) -> None:
        """NOT_SERVING at the start of a drain takes the pod out of endpoints before the delay ends."""
        probe = overlay.container["readinessProbe"]
        time_to_unready = probe["periodSeconds"] * probe.get("failureThreshold", 3)
        assert time_to_unready < overlay.config["server"]["drain_delay_seconds"]

    def test_grace_period_covers_drain_delay_and_shutdown_grace(self, overlay: Overlay) -> None:
        """The kubelet waits for the configured drain delay plus stop(grace) before SIGKILL."""
        server = overlay.config["server"]
        assert server["drain_delay_seconds"] > 0, "a zero drain delay drops requests while endpoints update"
        needed = server["drain_delay_seconds"] + server["grace_seconds"]
        assert overlay.pod["terminationGracePeriodSeconds"] >= needed


class TestRoutesvcWiring:
    """routesvc starts with the mounted config, on the port its Service and probes use."""

    def test_config_is_a_directory_mount_of_the_configmap(self, overlay: Overlay) -> None:
        """--config points into a ConfigMap directory mount (no subPath), so edits reach the pod."""
        args = overlay.container["args"]
        config_path = Path(args[args.index("--config") + 1])
        (mount,) = [m for m in overlay.container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
        assert "subPath" not in mount
        volume = next(v for v in overlay.pod["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == "routesvc-config"
        assert config_path.name in overlay.get("ConfigMap", "routesvc-config")["data"]

    def test_mounted_config_is_valid_for_the_service(self, overlay: Overlay) -> None:
        """routesvc's own config validator accepts the ConfigMap's config."""
        settings = parse_config(overlay.config_text, f"overlays/{overlay.name} routesvc-config", environ={})
        assert settings.config.server.host == "0.0.0.0"

    def test_a_raised_breaker_open_time_in_the_mounted_config_is_accepted(self, overlay: Overlay) -> None:
        """An operator who raises ``reliability.breaker.open_seconds`` past 60 in the shipped
        config gets it, the bound on a provider's wait following (max_open_seconds is left unset
        there: set to 60, it refused the config, and a reload of it, as shorter than open_seconds)."""
        config = yaml.safe_load(overlay.config_text)
        config["reliability"].setdefault("breaker", {})["open_seconds"] = 120
        settings = parse_config(yaml.safe_dump(config), f"overlays/{overlay.name} routesvc-config", environ={})
        assert settings.config.reliability.breaker.longest_open_seconds == 120

    def test_config_policy_matches_the_packaged_default(self, overlay: Overlay) -> None:
        """Only the server and logging sections differ from routesvc/default_config.yaml, and in
        prod batch mode is off (its job store is a file of each of several pods)."""
        default = yaml.safe_load((ROOT / "routesvc" / "default_config.yaml").read_text(encoding="utf-8"))
        if overlay.name == "prod":
            default["batch"]["enabled"] = False
        drop = {"server", "logging"}
        assert {k: v for k, v in overlay.config.items() if k not in drop} == {
            k: v for k, v in default.items() if k not in drop
        }, "deploy/k8s/base/config.yaml drifted from routesvc/default_config.yaml: copy the change over"

    def test_one_port_everywhere(self, overlay: Overlay) -> None:
        """The --port argument, the config, the container port and the Service agree."""
        args = overlay.container["args"]
        port = int(args[args.index("--port") + 1])
        assert port == overlay.config["server"]["port"]
        assert [{"name": "grpc", "containerPort": port, "protocol": "TCP"}] == overlay.container["ports"]

    def test_service_names_the_grpc_port_for_meshes(self, overlay: Overlay) -> None:
        """The Service port is named grpc with appProtocol grpc, so meshes balance HTTP/2 per call."""
        service = overlay.get("Service", "routesvc")
        (port,) = service["spec"]["ports"]
        assert (port["name"], port["appProtocol"], port["targetPort"]) == ("grpc", "grpc", "grpc")
        assert overlay.routesvc["spec"]["selector"]["matchLabels"].items() <= service["spec"]["selector"].items()

    def test_provider_keys_come_from_a_secret_that_is_not_committed(self, overlay: Overlay) -> None:
        """Keys are optional references to the Secret routesvc-provider-keys; no Secret is rendered."""
        for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
            reference = overlay.env[name]["valueFrom"]["secretKeyRef"]
            assert {"name": "routesvc-provider-keys", "key": name, "optional": True} == reference
        assert overlay.of_kind("Secret") == []

    def test_tracing_reaches_a_collector_in_the_overlay(self, overlay: Overlay) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT names a Service port 4317 in front of a labelled collector."""
        endpoint = overlay.env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"]
        service, port = overlay.service_port(endpoint)
        assert port["port"] == 4317
        backends = overlay.pods_selected_by(service["spec"]["selector"])
        expected = {"dev": ["jaeger"], "prod": ["otel-collector"]}[overlay.name]
        assert expected == [backend["metadata"]["name"] for backend in backends]
        labels = backends[0]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == "telemetry-collector"

    def test_the_autoscaler_alone_sets_the_replica_count(self, overlay: Overlay) -> None:
        """No replicas on the Deployment: every `kubectl apply -k` would reset the autoscaler's count."""
        assert "replicas" not in overlay.routesvc["spec"]

    def test_hpa_scales_the_deployment_and_pdb_covers_its_pods(self, overlay: Overlay) -> None:
        """The autoscaler targets routesvc and the disruption budget selects routesvc's pods."""
        hpa = overlay.get("HorizontalPodAutoscaler", "routesvc")["spec"]
        assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "routesvc"}
        assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
        pdb = overlay.get("PodDisruptionBudget", "routesvc")["spec"]
        assert (
            pdb["selector"]["matchLabels"].items() <= overlay.routesvc["spec"]["template"]["metadata"]["labels"].items()
        )
        assert pdb["maxUnavailable"] == 1


class TestNetworkPolicy:
    """routesvc accepts only gRPC and reaches only DNS, the providers, its collector and Redis."""

    def test_ingress_only_on_the_grpc_port(self, overlay: Overlay) -> None:
        """Every ingress rule admits the grpc port and nothing else."""
        policy = overlay.get("NetworkPolicy", "routesvc")["spec"]
        assert {"Ingress", "Egress"} == set(policy["policyTypes"])
        ports = [port for rule in policy["ingress"] for port in rule["ports"]]
        assert ports == [{"port": "grpc", "protocol": "TCP"}]

    def test_egress_only_to_dns_https_otlp_and_redis(self, overlay: Overlay) -> None:
        """Egress ports are DNS, HTTPS and OTLP, plus Redis where the overlay has one."""
        policy = overlay.get("NetworkPolicy", "routesvc")["spec"]
        assert all(rule.get("ports") for rule in policy["egress"]), "an egress rule without ports allows all"
        ports = {(port["port"], port["protocol"]) for rule in policy["egress"] for port in rule["ports"]}
        expected = {(53, "UDP"), (53, "TCP"), (443, "TCP"), (4317, "TCP")}
        if overlay.name == "prod":
            expected.add((6379, "TCP"))
        assert expected == ports

    def test_https_egress_excludes_private_ranges_and_metadata(self, overlay: Overlay) -> None:
        """The provider rule opens 443 to public addresses only, never the cloud metadata address."""
        policy = overlay.get("NetworkPolicy", "routesvc")["spec"]
        (rule,) = [rule for rule in policy["egress"] if any(p["port"] == 443 for p in rule["ports"])]
        peers = {peer["ipBlock"]["cidr"]: set(peer["ipBlock"]["except"]) for peer in rule["to"]}
        assert peers.keys() == {"0.0.0.0/0", "::/0"}
        assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= peers["0.0.0.0/0"]
        assert {"fc00::/7", "fe80::/10"} <= peers["::/0"]


class TestPodSecurityRestricted:
    """Every workload in an overlay passes the "restricted" profile its Namespace enforces."""

    def test_namespace_enforces_restricted(self, overlay: Overlay) -> None:
        """The overlay's Namespace makes the API server reject pods that are not restricted."""
        (namespace,) = overlay.of_kind("Namespace")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"

    def test_every_container_is_restricted(self, overlay: Overlay) -> None:
        """Non-root, no escalation, ALL dropped, seccomp set, no host namespaces or host paths."""
        allowed_volumes = {"configMap", "emptyDir", "secret", "projected", "downwardAPI",
                           "persistentVolumeClaim", "csi", "ephemeral"}  # fmt: skip
        problems = []
        for where, pod, container in _workloads(overlay):
            pod_context, context = pod.get("securityContext", {}), container.get("securityContext", {})
            checks = {
                "runAsNonRoot": context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True,
                "runAsUser != 0": context.get("runAsUser", pod_context.get("runAsUser")) != 0,
                "allowPrivilegeEscalation false": context.get("allowPrivilegeEscalation") is False,
                "drop ALL": context.get("capabilities", {}).get("drop") == ["ALL"],
                "no added capabilities": not context.get("capabilities", {}).get("add"),
                "seccomp RuntimeDefault": context.get("seccompProfile", pod_context.get("seccompProfile"))
                == {"type": "RuntimeDefault"},
                "not privileged": not context.get("privileged", False),
                "no host namespaces": not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")),
                "no hostPort": not any("hostPort" in port for port in container.get("ports", [])),
                "allowed volume types": all(
                    set(volume) - {"name"} <= allowed_volumes for volume in pod.get("volumes", [])
                ),
                "readOnlyRootFilesystem": context.get("readOnlyRootFilesystem") is True,
                "requests and limits": {"requests", "limits"} <= container.get("resources", {}).keys(),
                "probes": {"readinessProbe", "livenessProbe"} <= container.keys(),
                "no token": pod.get("automountServiceAccountToken") is False,
            }
            problems += [f"{where}: {name}" for name, ok in checks.items() if not ok]
        assert problems == []

    def test_images_are_pinned_to_a_version(self, overlay: Overlay) -> None:
        """No image floats on :latest or an empty tag."""
        images = [container["image"] for _, _, container in _workloads(overlay)]
        floating = [image for image in images if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")]
        assert floating == []


class TestDevOverlay:
    """dev: a single replica tracing to Jaeger all-in-one."""

    def test_single_replica(self, dev: Overlay) -> None:
        """Without shared state, dev keeps one replica so limits and budgets stay exact."""
        hpa = dev.get("HorizontalPodAutoscaler", "routesvc")["spec"]
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 1)

    def test_jaeger_gets_traces_only(self, dev: Overlay) -> None:
        """Jaeger refuses OTLP metrics, so the dev overlay turns the metrics exporter off."""
        assert dev.env["OTEL_METRICS_EXPORTER"]["value"] == "none"

    def test_jaeger_serves_otlp_and_the_ui(self, dev: Overlay) -> None:
        """The jaeger Service exposes OTLP/gRPC on 4317 and the UI on 16686."""
        ports = {port["name"]: port["port"] for port in dev.get("Service", "jaeger")["spec"]["ports"]}
        assert {"otlp-grpc": 4317, "ui": 16686}.items() <= ports.items()


class TestProdOverlay:
    """prod: three or more replicas sharing state through Redis, tracing through a Collector."""

    def test_at_least_three_replicas(self, prod: Overlay) -> None:
        """The autoscaler never goes below 3 replicas."""
        assert prod.get("HorizontalPodAutoscaler", "routesvc")["spec"]["minReplicas"] == 3

    def test_the_collector_takes_metrics_too(self, prod: Overlay) -> None:
        """routesvc exports metrics over OTLP to the collector, which needs a metrics pipeline fed
        by its OTLP receiver (without one it answers UNIMPLEMENTED at every export)."""
        assert "OTEL_METRICS_EXPORTER" not in prod.env
        config = yaml.safe_load(prod.get("ConfigMap", "otel-collector")["data"]["config.yaml"])
        assert "otlp" in config["service"]["pipelines"]["metrics"]["receivers"]

    def test_replicas_share_state_through_redis(self, prod: Overlay) -> None:
        """ROUTESVC_REDIS_URL names the redis Service, which selects the redis Deployment."""
        url = prod.env["ROUTESVC_REDIS_URL"]["value"]
        assert urlsplit(url).scheme == "redis"
        service, port = prod.service_port(url)
        assert port["port"] == 6379
        assert [d["metadata"]["name"] for d in prod.pods_selected_by(service["spec"]["selector"])] == ["redis"]

    def test_only_routesvc_reaches_redis(self, prod: Overlay) -> None:
        """Redis admits connections from routesvc pods only."""
        policy = prod.get("NetworkPolicy", "redis")["spec"]
        (rule,) = policy["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "routesvc"}}}]

    def test_collector_config_receives_otlp_grpc(self, prod: Overlay) -> None:
        """The Collector's traces pipeline starts at an OTLP receiver listening on 4317."""
        config = yaml.safe_load(prod.get("ConfigMap", "otel-collector")["data"]["config.yaml"])
        assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
        assert config["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]


def _quantity(value: str | int) -> float:
    """A Kubernetes CPU or memory quantity as a plain number (cores or bytes)."""
    text = str(value)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, f"not a quantity: {text!r}"
    number, suffix = match.groups()
    return float(number) * (suffixes[suffix] if suffix else 1)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    instructions = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    return instructions[starts[-1] :]


class TestDockerfile:
    """The image recipe: lint-clean, multi-stage, non-root, read-only friendly."""

    def test_hadolint_reports_nothing(self) -> None:
        """hadolint finds no issue at any severity, with no rule ignored."""
        result = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
        assert (result.stdout + result.stderr, result.returncode) == ("", 0)

    def test_builds_in_one_stage_and_runs_in_another_from_the_same_base(self) -> None:
        """The wheel is built in a first stage; the runtime stage copies only the venv and config."""
        instructions = _instructions(DOCKERFILE)
        stages = [args for keyword, args in instructions if keyword == "FROM"]
        assert stages == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]
        (base,) = [args for keyword, args in instructions if keyword == "ARG" and args.startswith("PYTHON_IMAGE=")]
        assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11(\.\d+)?-slim(-\w+)?", base)
        copies = [args for keyword, args in _final_stage(instructions) if keyword == "COPY"]
        assert copies
        assert all(args.startswith("--from=build ") for args in copies)

    def test_runtime_stage_installs_no_compiler(self) -> None:
        """Nothing in the final stage installs packages, so no toolchain reaches the image."""
        runs = [args for keyword, args in _final_stage(_instructions(DOCKERFILE)) if keyword == "RUN"]
        assert not any(re.search(r"apt-get|apk |pip install|gcc|build-essential", run) for run in runs)

    def test_runs_as_a_numeric_non_root_user(self) -> None:
        """USER is a numeric uid:gid other than 0, so Kubernetes can verify runAsNonRoot."""
        users = [args for keyword, args in _final_stage(_instructions(DOCKERFILE)) if keyword == "USER"]
        assert users == ["10001:10001"]

    def test_writes_only_under_tmp(self) -> None:
        """HOME and the caches live in /tmp, the one writable path under a read-only root."""
        env = " ".join(args for keyword, args in _final_stage(_instructions(DOCKERFILE)) if keyword == "ENV")
        for variable in ("HOME=/tmp", "XDG_CACHE_HOME=/tmp/", "PYTHONDONTWRITEBYTECODE=1"):
            assert variable in env

    def test_keeps_batch_jobs_on_a_volume_owned_by_the_runtime_user(self) -> None:
        """$ROUTESVC_DATA_DIR (the batch job store) is a VOLUME at /var/lib/routesvc, created owned
        by uid 10001 before the VOLUME line (later changes to it would be discarded), and it is the
        path the Kubernetes base mounts its data volume at. It was unset: the store went to HOME,
        the /tmp tmpfs, and a stopped container lost its jobs."""
        final = _final_stage(_instructions(DOCKERFILE))
        env = " ".join(args for keyword, args in final if keyword == "ENV")
        assert "ROUTESVC_DATA_DIR=/var/lib/routesvc" in env.split()
        volumes = [index for index, (keyword, _) in enumerate(final) if keyword == "VOLUME"]
        assert [final[index][1] for index in volumes] == ['["/var/lib/routesvc"]']
        created = [
            index
            for index, (keyword, args) in enumerate(final)
            if keyword == "RUN" and re.search(r"install -d -o 10001 -g 10001 (-m \d+ )?/var/lib/routesvc\b", args)
        ]
        assert created
        assert created[0] < volumes[0]

    def test_the_kubernetes_base_mounts_the_image_data_dir(self, overlay: Overlay) -> None:
        """The Deployment's ROUTESVC_DATA_DIR is the image's, and a volume is mounted there."""
        data_dir = overlay.env["ROUTESVC_DATA_DIR"]["value"]
        assert data_dir == "/var/lib/routesvc"
        assert data_dir in {mount["mountPath"] for mount in overlay.container["volumeMounts"]}

    def test_serves_routesvc_on_50051(self) -> None:
        """The entrypoint is `routesvc serve`, the gRPC port is exposed, and a healthcheck is set."""
        final = dict(_final_stage(_instructions(DOCKERFILE)))
        assert final["ENTRYPOINT"] == '["routesvc", "serve"]'
        assert final["EXPOSE"] == "50051"
        assert "grpc_health" in final["HEALTHCHECK"]

    @pytest.mark.parametrize("variable", ["https_proxy", "http_proxy", "grpc_proxy"])
    async def test_the_healthcheck_is_healthy_with_a_proxy_in_the_environment(
        self, server: Server, variable: str
    ) -> None:
        """The HEALTHCHECK command, run as Docker runs it against a serving routesvc, exits 0 with a
        proxy variable set (the usual way to send provider egress through a proxy; Docker's client
        config injects them into every container): it dials the container's own port directly, and
        the proxy (a relaying CONNECT proxy) is asked for no tunnel."""
        healthcheck = dict(_final_stage(_instructions(DOCKERFILE)))["HEALTHCHECK"]
        program, *arguments = json.loads(healthcheck.partition(" CMD ")[2])
        assert program == "python"
        async with ConnectProxy() as proxy:
            no_proxy = ("no_proxy", "NO_PROXY", "no_grpc_proxy", "grpc_proxy", "https_proxy", "http_proxy")
            env = {k: v for k, v in process_environ().items() if k not in no_proxy}
            env |= {variable: proxy.url, "ROUTESVC_HEALTH_TARGET": server.target}
            process = await asyncio.create_subprocess_exec(sys.executable, *arguments, env=env)
            async with asyncio.timeout(30):
                assert await process.wait() == 0
            assert proxy.requests == []


class TestCompose:
    """deploy/compose.yaml: routesvc read-only, with its state on a named volume."""

    def test_batch_jobs_live_on_a_named_volume(self) -> None:
        """The image's data dir is the named volume routesvc-data (it was only on the /tmp tmpfs,
        which compose discards at every stop); /tmp stays a tmpfs for scratch."""
        compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
        routesvc = compose["services"]["routesvc"]
        assert routesvc["read_only"] is True
        assert routesvc["tmpfs"] == ["/tmp"]
        assert "routesvc-data:/var/lib/routesvc" in routesvc["volumes"]
        assert "routesvc-data" in compose["volumes"]


class TestDockerignore:
    """The build context holds only what the wheel needs."""

    def test_context_is_an_allow_list(self) -> None:
        """Everything is excluded, then only the package and its metadata are let back in."""
        lines = [
            line.strip()
            for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert lines[0] == "*"
        allowed = {line[1:] for line in lines if line.startswith("!")}
        assert {"pyproject.toml", "README.md", "routesvc/"} <= allowed
        assert not allowed & {".git", ".venv", ".env", "tests/", "deploy/"}


@dataclass(frozen=True)
class _Pin:
    name: str
    version: str
    marker: Marker | None
    hashes: tuple[str, ...]

    def applies(self, environment: dict[str, str] | None = None) -> bool:
        return self.marker is None or self.marker.evaluate(environment)


def _pins() -> list[_Pin]:
    """deploy/requirements.lock's entries: `name==version [; marker]` then its `--hash=` options,
    one logical line continued with backslashes."""
    text = LOCK.read_text(encoding="utf-8").replace("\\\n", " ")
    pins = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *options = line.split(" --hash=")
        spec, _, marker = requirement.partition(";")
        name, version = spec.strip().split("==")
        pins.append(
            _Pin(
                canonicalize_name(name),
                version,
                Marker(marker.strip()) if marker.strip() else None,
                tuple(option.strip() for option in options),
            )
        )
    return pins


def _runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return [Requirement(line) for line in project["dependencies"]]


# The image's platforms: linux/amd64 and linux/arm64 on the Python of its base.
IMAGE_ENVIRONMENTS = [
    {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": machine,
        "python_version": "3.11",
        "python_full_version": "3.11.14",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "extra": "",
    }
    for machine in ("x86_64", "aarch64")
]


class TestDependencyLock:
    """deploy/requirements.lock pins every dependency the image installs, each file by its hash,
    and is what `make install` installs here too: the image runs the versions the tests ran on."""

    @pytest.mark.parametrize("environment", IMAGE_ENVIRONMENTS, ids=lambda e: e["platform_machine"])
    def test_every_runtime_requirement_is_pinned_once_within_its_range(self, environment: dict[str, str]) -> None:
        """Each of pyproject.toml's dependencies has exactly one pin for the image's platform, a
        version its specifier allows (a lock older than a raised floor fails here)."""
        pins = [pin for pin in _pins() if pin.applies(environment)]
        for requirement in _runtime_requirements():
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            versions = [pin.version for pin in pins if pin.name == canonicalize_name(requirement.name)]
            assert len(versions) == 1, (requirement.name, versions)
            assert requirement.specifier.contains(versions[0], prereleases=True), (str(requirement), versions[0])

    def test_every_pin_names_its_files_by_sha256(self) -> None:
        """`pip install --require-hashes` refuses an entry without a hash, so every one has one."""
        pins = _pins()
        assert len(pins) > 20
        for pin in pins:
            assert pin.hashes, pin.name
            assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", digest) for digest in pin.hashes), pin.name

    def test_this_environment_runs_the_locked_versions(self) -> None:
        """`make install` reads the lock as constraints: every locked package this interpreter
        takes is installed at the locked version (a venv made before the lock changed fails here
        until `make install` runs again, which it does whenever the lock is newer)."""
        wrong = {
            pin.name: (pin.version, importlib.metadata.version(pin.name))
            for pin in _pins()
            if pin.applies() and importlib.metadata.version(pin.name) != pin.version
        }
        assert wrong == {}

    def test_the_image_installs_the_lock_with_hashes_and_nothing_else(self) -> None:
        """The build stage installs the lock with --require-hashes, the wheel with --no-deps (it
        would otherwise resolve its ranges afresh), then runs `pip check`; the build context lets
        the lock in."""
        (build,) = [args for keyword, args in _instructions(DOCKERFILE) if keyword == "RUN" and "pip wheel" in args]
        assert "pip install --require-hashes --no-deps -r deploy/requirements.lock" in build
        assert "pip install --no-deps /wheels/routesvc-" in build
        assert build.rstrip().endswith("/opt/venv/bin/pip check")
        lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        assert "!deploy/requirements.lock" in lines

    def test_the_build_stage_commands_install_a_complete_venv_from_the_build_context(self, tmp_path: Path) -> None:
        """The Dockerfile's own install command, run here on a copy of the build context (what
        .dockerignore lets in) with its paths moved under a temporary folder: every locked file
        downloads and matches its hash, the wheel installs beside them, `pip check` finds no
        dependency missing, and the installed service starts its CLI. The image build itself
        needs a Docker engine, which CI has not."""
        context = tmp_path / "context"
        for name in ("pyproject.toml", "README.md", "deploy/requirements.lock"):
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, context / name)
        shutil.copytree(ROOT / "routesvc", context / "routesvc", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (build,) = [args for keyword, args in _instructions(DOCKERFILE) if keyword == "RUN" and "pip wheel" in args]
        command = (
            build.replace("/opt/venv", str(tmp_path / "venv"))
            .replace("/wheels", str(tmp_path / "wheels"))
            .replace("python -m ", f"{sys.executable} -m ")
        )
        result = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, check=False, cwd=context, timeout=900
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "No broken requirements found." in result.stdout
        routesvc = tmp_path / "venv" / "bin" / "routesvc"
        started = subprocess.run([str(routesvc), "--help"], capture_output=True, text=True, check=False, timeout=120)
        assert started.returncode == 0, started.stderr[-3000:]
        assert "serve" in started.stdout
