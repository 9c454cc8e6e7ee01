"""The deploy files (deploy/) stay tied to the code they run.

CI also lints them with their own tools (hadolint, `docker-compose config`, kubernetes-validate,
systemd-analyze; see .ci/run); these tests check what those tools cannot know: that the names,
paths, ports and commands in the files are the ones the bot actually has.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]  # comes with transformers; no stubs
from pydantic import SecretStr

from bot.cli import _parser
from bot.commands.discord import GATEWAY_CLOSE_S
from bot.config import Settings
from bot.ops.health import SERVER_SHUTDOWN_S, serve_health
from bot.ops.redis_server import free_port
from bot.platforms.frontdoor import CUT_WRITE_S
from bot.platforms.slack.app import EVENTS_PATH
from tests.conftest import repo_root

DEPLOY = repo_root() / "deploy"
K8S = DEPLOY / "k8s"
SETTINGS = {name.upper() for name in Settings.model_fields}
SECRET_SETTINGS = {
    name.upper()
    for name, field in Settings.model_fields.items()
    if field.annotation is not None and SecretStr in getattr(field.annotation, "__args__", ())
}
# Variables the deploy files may set that belong to other software, each for a stated reason.
THIRD_PARTY = {
    "PATH",  # the image's venv
    "PYTHONUNBUFFERED",  # logs reach `docker logs` at once
    "PYTHONDONTWRITEBYTECODE",  # a read-only root filesystem in Kubernetes
    "HF_HOME",  # the Hugging Face cache, on a volume
    "NVIDIA_DRIVER_CAPABILITIES",  # what the NVIDIA Container Toolkit mounts
    "LOCAL_KERNELS",  # the `kernels` package: the flash kernels pre-fetched into the image
}
# Beyond SHUTDOWN_GRACE_SECONDS, the longest the bot may take to stop after SIGTERM: closing cut
# answers with their notice, closing the HTTP server or the Discord gateway, and a margin for
# the runtime (Redis, the model) to close.
AFTER_GRACE_S = CUT_WRITE_S + max(SERVER_SHUTDOWN_S, GATEWAY_CLOSE_S) + 5


def grace_s(env: dict[str, str]) -> float:
    """SHUTDOWN_GRACE_SECONDS as a deploy file sets it (or the default)."""
    default = Settings.model_fields["shutdown_grace_seconds"].default
    return float(env.get("SHUTDOWN_GRACE_SECONDS", default))


def _command_is_valid(args: list[str]) -> None:
    _parser().parse_args(args)  # argparse exits on an unknown command


def settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """Settings as the bot would read them from exactly `env` (invalid values raise)."""
    for name in list(os.environ):
        if name.upper() in SETTINGS:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(INSTRUCTION, arguments) per stage, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    logical, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), args.strip()))
    return stages


def final_stage() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for instruction, args in dockerfile_stages()[-1]:
        found.setdefault(instruction, []).append(args)
    return found


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in final_stage()["ENV"]:
        for pair in shlex.split(args):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def build_args() -> set[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return set(re.findall(r"^ARG (\w+)", text, re.M))


def test_dockerfile_is_multi_stage_and_runs_the_console_script_as_a_non_root_user():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = final_stage()
    assert any("--from=builder" in args for args in final["COPY"])
    assert final["USER"] == ["10001:10001"]
    assert json.loads(final["ENTRYPOINT"][-1]) == ["supportbot"]
    pyproject = (repo_root() / "pyproject.toml").read_text()
    assert re.search(r'^supportbot = "bot\.cli:main"$', pyproject, re.M)
    _command_is_valid(json.loads(final["CMD"][-1]))


def test_dockerfile_env_port_and_volumes_match_the_settings(monkeypatch: pytest.MonkeyPatch):
    env = image_env()
    assert set(env) <= SETTINGS | THIRD_PARTY
    assert env["PORT"] == str(Settings.model_fields["port"].default)
    assert final_stage()["EXPOSE"] == [env["PORT"]]
    volumes = json.loads(final_stage()["VOLUME"][0])
    assert env["HF_HOME"] in volumes and env["DATA_DIR"] in volumes
    settings_from(monkeypatch, {k: v for k, v in env.items() if k in SETTINGS})


def test_dockerfile_pre_fetches_the_flash_kernels_that_local_kernels_names():
    """What the builder fetches (`python -m bot.llm.attention prefetch DIR`) is where the image's
    LOCAL_KERNELS points, for every flash implementation the engine tries (bot.llm.attention)."""
    from bot.llm.attention import KERNEL_REPOS, local_kernels

    builder = " ".join(args for _, args in dockerfile_stages()[0])
    prefetch = re.search(r"python -m bot\.llm\.attention prefetch (\S+)", builder)
    assert prefetch and '"/src[gpu]"' in builder
    target = Path(prefetch.group(1))
    entries = dict(e.split("=", 1) for e in image_env()["LOCAL_KERNELS"].split(":"))
    assert set(entries) == set(KERNEL_REPOS.values())
    for repo, path in entries.items():
        assert Path(path) == target / repo.split("/", 1)[1]
    assert any(args == f"--from=builder {target} {target}" for args in final_stage()["COPY"])
    # The format is the one bot.llm.attention reads (and the `kernels` package parses).
    assert local_kernels({"LOCAL_KERNELS": image_env()["LOCAL_KERNELS"]}) == {}  # not here
    pyproject = (repo_root() / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \["kernels', pyproject, re.M)


async def test_dockerfile_healthcheck_passes_against_the_bots_health_server():
    healthcheck = final_stage()["HEALTHCHECK"][0]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python" and "/healthz" in command[-1]
    command[0] = sys.executable
    port = free_port()

    async def ready() -> tuple[bool, dict[str, str]]:
        return True, {}

    async def check() -> int:
        env = {**os.environ, "PORT": str(port)}
        process = await asyncio.create_subprocess_exec(*command, env=env)
        return await process.wait()

    assert await check() != 0  # nothing listening: unhealthy
    runner = await serve_health(port, ready, host="127.0.0.1")
    try:
        assert await check() == 0
    finally:
        await runner.cleanup()


def test_dockerignore_sends_only_what_the_image_is_built_from():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!bot/"} <= set(rules)


# --- docker-compose.yml ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def _gpu_reserved(service: dict[str, Any]) -> bool:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_compose_bot_builds_this_image_reads_dotenv_and_has_the_gpu():
    services = compose()["services"]
    bot = services["bot"]
    context = (DEPLOY / bot["build"]["context"]).resolve()
    assert context == repo_root()
    assert (context / bot["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert (DEPLOY / bot["env_file"]).resolve() == repo_root() / ".env"  # cp .env.example .env
    _command_is_valid(bot["command"])
    assert set(bot["environment"]) <= SETTINGS
    assert _gpu_reserved(bot)
    env = image_env()
    mounts = {volume.split(":")[1] for volume in bot["volumes"]}
    assert {env["HF_HOME"], bot["environment"]["DATA_DIR"]} <= mounts
    assert bot["ports"] == [f"127.0.0.1:{bot['environment']['PORT']}:{env['PORT']}"]
    stop_s = int(bot["stop_grace_period"].removesuffix("s"))
    assert stop_s >= grace_s(bot["environment"]) + AFTER_GRACE_S


def test_compose_redis_url_names_the_persistent_redis_service():
    services = compose()["services"]
    url = urlsplit(services["bot"]["environment"]["REDIS_URL"])
    assert url.scheme == "redis"
    redis = services[url.hostname]
    assert url.port == 6379
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    [volume] = redis["volumes"]
    assert volume.split(":")[0] in compose()["volumes"]  # a named volume, not the container's
    assert services["bot"]["depends_on"][url.hostname]["condition"] == "service_healthy"


def _vllm_args(args: list[str]) -> dict[str, str]:
    return {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2)}


def test_compose_vllm_profile_serves_the_bots_default_model():
    vllm = compose()["services"]["vllm"]
    assert vllm["profiles"] == ["vllm"]
    assert _gpu_reserved(vllm)
    args = _vllm_args(vllm["command"])
    assert args["--model"] == Settings.model_fields["llm_model"].default
    assert "--trust-remote-code" not in vllm["command"]  # EXAONE is native in vLLM
    # The README's instruction for the profile must point at this service and port.
    assert f"LLM_BASE_URL=http://vllm:{args['--port']}/v1" in readme_section("Deploy")


# --- systemd -----------------------------------------------------------------------------------


def unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / "supportbot.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_systemd_unit_runs_the_console_script_with_an_environment_file():
    values = unit()
    [exec_start] = values["ExecStart"]
    binary, *args = shlex.split(exec_start)
    assert binary.endswith("/bin/supportbot")
    _command_is_valid(args)
    assert values["EnvironmentFile"] == ["/etc/supportbot/env"]
    names = {assignment.split("=", 1)[0] for assignment in values["Environment"]}
    assert names <= SETTINGS | THIRD_PARTY
    assert values["User"] == ["supportbot"]


def test_systemd_unit_stops_gracefully_and_keeps_the_gpu_reachable():
    values = unit()
    assert values["KillSignal"] == ["SIGTERM"]
    env = dict(assignment.partition("=")[::2] for assignment in values["Environment"])
    assert "SHUTDOWN_GRACE_SECONDS" in env  # stated beside the timeout it must stay below
    assert int(values["TimeoutStopSec"][0]) >= grace_s(env) + AFTER_GRACE_S
    assert values["Restart"] == ["on-failure"]
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert values[hardening] == ["yes"]
    assert values["ProtectSystem"] == ["strict"]
    # Both close the device list and so hide /dev/nvidia* from CUDA.
    assert values.get("PrivateDevices", ["no"]) == ["no"]
    assert "ProtectClock" not in values and "DeviceAllow" not in values
    # The state and the model cache are the writable places, and the bot uses them.
    env = dict(assignment.partition("=")[::2] for assignment in values["Environment"])
    writable = values["ReadWritePaths"][0].split()
    assert any(env["DATA_DIR"].startswith(path) for path in writable)
    assert any(env["HF_HOME"].startswith(path) for path in writable)


# --- Kubernetes --------------------------------------------------------------------------------


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def _port(container: dict[str, Any], name: str) -> int:
    [port] = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def test_kustomization_lists_every_manifest_but_the_secret_example():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)
    [image] = kustomization["images"]
    assert image["name"] == _container(k8s_objects()[("Deployment", "supportbot")])["image"]


def test_k8s_bot_runs_slack_http_mode_with_probes_on_healthz_and_readyz():
    objects = k8s_objects()
    bot = objects[("Deployment", "supportbot")]
    container = _container(bot)
    _command_is_valid(container["args"])
    assert container["args"] == ["slack"]
    config = objects[("ConfigMap", "supportbot")]["data"]
    assert _port(container, "http") == int(config["PORT"])
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    # The preStop pause runs first, inside the same grace period.
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    stop_s = bot["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert stop_s >= pause + grace_s(config) + AFTER_GRACE_S
    pod_security = bot["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsUser"] == 10001  # the Dockerfile's USER
    refs = {
        ("ConfigMap" if "configMapRef" in source else "Secret"): next(iter(source.values()))["name"]
        for source in container["envFrom"]
    }
    assert ("ConfigMap", refs["ConfigMap"]) in objects
    assert ("Secret", refs["Secret"]) in objects  # as secret.example.yaml names it


def test_k8s_settings_are_real_settings_and_secrets_hold_no_values(
    monkeypatch: pytest.MonkeyPatch,
):
    objects = k8s_objects()
    config = objects[("ConfigMap", "supportbot")]["data"]
    secret = objects[("Secret", "supportbot")]["stringData"]
    assert set(config) <= SETTINGS
    # REDIS_URL is secret only when it carries a password; the in-cluster one has none.
    assert set(config) & SECRET_SETTINGS <= {"REDIS_URL"}
    assert urlsplit(config["REDIS_URL"]).password is None
    assert set(secret) <= SECRET_SETTINGS
    assert "SLACK_APP_TOKEN" not in secret  # HTTP mode behind the Ingress, not Socket Mode
    assert all(value == "" or "REPLACE-ME" in value for value in secret.values())
    settings = settings_from(monkeypatch, {**config, **secret})
    assert settings.llm_base_url == config["LLM_BASE_URL"]


def test_k8s_bot_reaches_vllm_and_redis_through_their_services():
    objects = k8s_objects()
    config = objects[("ConfigMap", "supportbot")]["data"]
    llm = urlsplit(config["LLM_BASE_URL"])
    service = objects[("Service", llm.hostname)]
    [port] = service["spec"]["ports"]
    assert port["port"] == llm.port
    vllm = objects[("Deployment", llm.hostname)]
    container = _container(vllm)
    assert _port(container, port["targetPort"]) == int(_vllm_args(container["args"])["--port"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = _vllm_args(container["args"])
    assert args["--model"] == config["LLM_MODEL"] == Settings.model_fields["llm_model"].default
    assert args["--max-model-len"] == config["LLM_CONTEXT_TOKENS"]
    # The compose profile serves the same model the same way.
    assert _vllm_args(compose()["services"]["vllm"]["command"]) == args

    redis_url = urlsplit(config["REDIS_URL"])
    [redis_port] = objects[("Service", redis_url.hostname)]["spec"]["ports"]
    assert redis_port["port"] == redis_url.port
    redis = objects[("StatefulSet", redis_url.hostname)]
    redis_args = _container(redis)["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert _container(redis)["volumeMounts"][0]["name"] == claim["metadata"]["name"]


def test_k8s_ingress_routes_slacks_events_to_the_bot_and_the_hpa_scales_it():
    objects = k8s_objects()
    ingress = objects[("Ingress", "supportbot")]
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    assert path["path"] == EVENTS_PATH
    backend = path["backend"]["service"]
    service = objects[("Service", backend["name"])]
    [port] = service["spec"]["ports"]
    assert backend["port"]["name"] == port["name"]
    bot = objects[("Deployment", "supportbot")]
    assert service["spec"]["selector"] == bot["spec"]["selector"]["matchLabels"]
    assert _port(_container(bot), port["targetPort"])
    hpa = objects[("HorizontalPodAutoscaler", "supportbot")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "supportbot"
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in bot["spec"]  # the HPA owns the count


# --- README ------------------------------------------------------------------------------------


def readme_section(title: str) -> str:
    readme = (repo_root() / "README.md").read_text()
    return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_deploy_and_scale_out_sections_name_only_real_settings_and_files():
    readme = (repo_root() / "README.md").read_text()
    assert readme.index("\n## Deploy\n") < readme.index("\n## Scale out\n")
    assert readme.index("\n## Scale out\n") < readme.index("\n## Performance\n")
    deploy, scale_out = readme_section("Deploy"), readme_section("Scale out")
    assert "docker compose -f deploy/docker-compose.yml up -d" in deploy
    text = deploy + scale_out
    names = set(re.findall(r"\b([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)\b", text))
    known = SETTINGS | THIRD_PARTY | build_args()
    assert names <= known, names - known
    for path in set(re.findall(r"\b(deploy/[\w./-]+\w)", text)):
        assert (repo_root() / path).exists(), path
