"""The Dockerfiles and compose files in docker/, checked offline without Docker: what each image is built from,
runs as and installs; what each build context holds; the stack's services, health checks, start order, secrets
and GPU profile; and that every CHAT_ variable they set is a setting. ``make images`` builds and runs them."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import tarfile
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from config.settings import ROOT, Settings
from scripts import images

DOCKER = ROOT / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
COMPOSE_FILES = sorted(DOCKER.glob("compose*.yaml"))
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# What the stack needs whatever else is set: passwords and keys have no defaults.
SECRETS = ("CHAT_SECRET_KEY", "CHAT_FLOWER_BASIC_AUTH", "CQ_REDIS_PASSWORD", "CQ_POSTGRES_PASSWORD")
LOCAL_ENV = {"CHAT_SECRET_KEY": "k" * 48, "CHAT_FLOWER_BASIC_AUTH": "admin:pw", "CQ_REDIS_PASSWORD": "redispw",
             "CQ_POSTGRES_PASSWORD": "pgpw"}
REMOTE_ENV = {"CHAT_BROKER_URL": "redis://:pw@stack.example:6379/0",
              "CHAT_DATABASE_URL": "postgresql+psycopg://chat:pw@/chat?host=a:5432&host=b:5433"
                                   "&target_session_attrs=read-write",
              "CHAT_REPLICA_URL": "postgresql+psycopg://chat:pw@b:5433/chat"}


# --- a Dockerfile, read as the legacy builder reads it --------------------------------------------------------

@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        return json.loads(self.args)


def instructions(path: Path) -> list[Instruction]:
    """Continuation lines joined, comments dropped (inside a continuation too, as Docker does)."""
    found, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        keyword, _, args = (current + line).partition(" ")
        found.append(Instruction(keyword.upper(), args.strip()))
        current = ""
    assert not current, f"{path.name} ends inside a continuation"
    return found


def stages(path: Path) -> list[list[Instruction]]:
    """The instructions of each stage, from its FROM on; what comes before the first FROM is left out."""
    result: list[list[Instruction]] = []
    for ins in instructions(path):
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def global_args(path: Path) -> dict[str, str]:
    args = {}
    for ins in instructions(path):
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            args[name] = default
    return args


def runs(path: Path) -> list[str]:
    return [ins.args for ins in instructions(path) if ins.keyword == "RUN"]


def image_of(dockerfile: str) -> images.Image:
    """The first image built from ``dockerfile`` (both worker variants share one, and one context)."""
    return next(i for i in (*images.IMAGES, images.CUDA_IMAGE, images.PYTHON_BASE) if i.dockerfile == dockerfile)


# --- compose files, interpolated as docker-compose does --------------------------------------------------------

class MissingVariable(KeyError):
    pass


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


def interpolate(value, env: dict[str, str]):
    """``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?error}`` and ``$$``, through every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group("escaped"):
            return "$"
        name, op, arg = match.group("name") or match.group("bare"), match.group("op"), match.group("arg")
        found = env.get(name)
        if op in (":?", "?") and (found is None or (op == ":?" and not found)):
            raise MissingVariable(name)
        if op == ":-":
            return found or arg
        if op == "-":
            return arg if found is None else found
        return found or ""

    return _VARIABLE.sub(one, value)


def raw(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def compose(name: str, env: dict[str, str]) -> dict:
    return interpolate(raw(name), env)


def stack(**env: str) -> dict:
    return compose("compose.yaml", {**LOCAL_ENV, **env})["services"]


def variables(text: str) -> set[str]:
    return {m.group("name") or m.group("bare") for m in _VARIABLE.finditer(text) if not m.group("escaped")}


def chat_settings() -> set[str]:
    names = {"CHAT_" + name.upper() for name in Settings.model_fields}
    for info in Settings.model_fields.values():
        choices = getattr(info.validation_alias, "choices", None) or []
        names |= {c for c in choices if isinstance(c, str) and c.startswith("CHAT_")}
    return names


# --- the Dockerfiles --------------------------------------------------------------------------------------------

def test_the_dockerfiles_are_the_ones_images_py_builds():
    built = {i.dockerfile for i in (*images.IMAGES, images.CUDA_IMAGE, images.PYTHON_BASE)}
    assert {f"docker/{p.name}" for p in DOCKERFILES} == built


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_stage_builds_on_a_base_given_as_an_argument(path):
    args = global_args(path)
    assert "BASE_IMAGE" in args, f"{path.name}: no ARG BASE_IMAGE before its first FROM"
    assert args["BASE_IMAGE"] in ("python:3.11-slim-bookworm", "debian:bookworm-slim")
    for stage in stages(path):
        image = stage[0].args.split()[0]
        assert image == "${BASE_IMAGE}", f"{path.name}: FROM {image}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_runs_as_a_user_that_is_not_root(path):
    final = stages(path)[-1]
    users = [i for i, ins in enumerate(final) if ins.keyword == "USER"]
    starts = [i for i, ins in enumerate(final) if ins.keyword in ("CMD", "ENTRYPOINT")]
    assert starts, f"{path.name} says nothing to run"
    if path.name == "Dockerfile.python":  # a base image, never run by the stack
        return
    assert users and users[-1] < min(starts), f"{path.name}: no USER before CMD/ENTRYPOINT"
    assert final[users[-1]].args.split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installs_leave_no_caches_and_no_build_tools(path):
    for command in runs(path):
        if "apt-get install" in command:
            assert "--no-install-recommends" in command and "rm -rf /var/lib/apt/lists/*" in command, command
            assert not re.search(r"\b(gcc|g\+\+|build-essential|make|\S+-dev)\b", command), command
        # Every install goes through pip-install.sh (no cache, extra CA certificates); uninstalls are fine.
        assert not re.search(r"pip3? install|-m pip install", command), command
    pip_install = (DOCKER / "pip-install.sh").read_text()
    assert "--no-cache-dir" in pip_install


def test_the_web_image_installs_no_torch():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not [d for d in PYPROJECT["project"]["dependencies"] + extras["web"] if d.startswith("torch")]
    dockerfile = DOCKER / "Dockerfile.web"
    installs = [c for c in runs(dockerfile) if "pip-install" in c]
    assert installs and all(re.findall(r"pip-install (\S+)", c) == ["'.[web]'"] for c in installs)
    # ... and the build fails should torch ever come in through a dependency.
    assert any("import torch" in c and "exit 1" in c for c in installs)


def _torch_install(variant: str, find_links: str = "", **args: str) -> subprocess.CompletedProcess:
    """The worker's torch install, run by sh with pip-install replaced by an echo."""
    dockerfile = DOCKER / "Dockerfile.worker"
    [command] = [c for c in runs(dockerfile) if '"$VARIANT"' in c]
    defaults = {ins.args.partition("=")[0]: ins.args.partition("=")[2]
                for ins in stages(dockerfile)[0] if ins.keyword == "ARG"}
    env = {**defaults, **args, "VARIANT": variant, "TORCH_FIND_LINKS": find_links, "PATH": "/usr/bin:/bin"}
    script = command.replace("sh /usr/local/bin/pip-install", "echo")
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=10)


def test_each_worker_variant_installs_the_pinned_torch_build():
    [pin] = [d for d in PYPROJECT["project"]["optional-dependencies"]["worker"] if d.startswith("torch")]
    version = pin.split("==")[1]
    assert version == images.TORCH_VERSION
    cpu = _torch_install("cpu")
    assert cpu.returncode == 0 and cpu.stdout.split() == [
        "--extra-index-url", "https://download.pytorch.org/whl/cpu", f"torch=={version}+cpu"]
    served = _torch_install("cpu", "http://127.0.0.1:1/")
    assert served.stdout.split() == ["--find-links", "http://127.0.0.1:1/", f"torch=={version}+cpu"]
    cuda = _torch_install("cuda")  # PyPI's own torch: the CUDA build, with the CUDA runtime as wheels
    assert cuda.returncode == 0 and cuda.stdout.split() == [f"torch=={version}"]
    older = _torch_install("cuda", TORCH_CUDA_INDEX="https://download.pytorch.org/whl/cu126")
    assert older.stdout.split() == ["--index-url", "https://download.pytorch.org/whl/cu126", f"torch=={version}"]
    assert _torch_install("rocm").returncode != 0
    assert global_args(DOCKER / "Dockerfile.worker") == {"BASE_IMAGE": "python:3.11-slim-bookworm"}
    assert ("VARIANT", "cuda") in images.CUDA_IMAGE.args


def test_the_worker_image_holds_no_model_and_looks_for_it_in_models():
    final = stages(DOCKER / "Dockerfile.worker")[-1]
    env = " ".join(ins.args for ins in final if ins.keyword == "ENV")
    assert "CHAT_MODELS_DIR=/models" in env
    assert not any("fetch_model" in ins.args for ins in final if ins.keyword == "RUN")
    [cmd] = [ins.exec_form() for ins in final if ins.keyword == "CMD"]
    assert cmd == ["python", "-m", "workers.launch"]
    [web_cmd] = [ins.exec_form() for ins in stages(DOCKER / "Dockerfile.web")[-1] if ins.keyword == "CMD"]
    assert web_cmd == ["gunicorn", "--config", "config/gunicorn.py", "app.web:create_app()"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_file_copied_is_in_the_build_context(path):
    image = image_of(f"docker/{path.name}")
    with tarfile.open(fileobj=io.BytesIO(images.build_context(image, {}))) as tar:
        names = tar.getnames()
    for stage in stages(path):
        for ins in stage:
            if ins.keyword != "COPY" or ins.args.startswith("--from"):
                continue
            for source in ins.args.split()[:-1]:
                pattern = source.rstrip("/")
                assert any(fnmatch(n, pattern) or n.startswith(pattern + "/") for n in names), \
                    f"{path.name}: COPY {source} is not in its context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_build_contexts_leave_out_the_bulk(path):
    allowed, excluded = images.context_rules(path)
    assert not {".venv", "data", ".git", "tests", "docs", "build"} & {a.split("/")[0] for a in allowed}
    image = image_of(f"docker/{path.name}")
    with tarfile.open(fileobj=io.BytesIO(images.build_context(image, {}))) as tar:
        members = tar.getmembers()
    assert not [m.name for m in members if "__pycache__" in m.name or m.name.endswith(".pyc")]
    assert all(m.uid == 0 and m.mode & 0o004 for m in members)  # root's, readable by the images' users
    assert sum(m.size for m in members) < 20 * 2**20


# --- the compose files ------------------------------------------------------------------------------------------

def test_the_stack_has_every_service_with_a_health_check():
    services = stack()
    assert set(services) == {"redis", "primary", "replica", "migrate", "web", "flower", "model", "worker",
                             "worker-cuda"}
    for name in ("redis", "primary", "replica", "web", "flower", "worker", "worker-cuda"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    web_check = " ".join(services["web"]["healthcheck"]["test"])
    assert "/healthz" in web_check and "/readyz" in web_check
    for name in ("migrate", "model"):  # one-shot services
        assert services[name]["restart"] == "no"


def test_redis_has_a_password_and_an_append_only_file():
    redis = stack()["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == LOCAL_ENV["CQ_REDIS_PASSWORD"]
    entrypoint = (DOCKER / "redis" / "entrypoint.sh").read_text()
    assert "requirepass" in entrypoint and "--appendonly yes" in entrypoint
    assert redis["volumes"] == ["redis:/data"]
    broker = stack()["web"]["environment"]["CHAT_BROKER_URL"]
    assert broker.startswith(f"redis://:{LOCAL_ENV['CQ_REDIS_PASSWORD']}@redis:")


def test_the_replica_copies_the_primary_on_first_start_and_streams():
    services = stack()
    assert services["primary"]["environment"]["PG_ROLE"] == "primary"
    replica = services["replica"]
    assert replica["environment"]["PG_ROLE"] == "replica" and replica["environment"]["PRIMARY_HOST"] == "primary"
    assert replica["depends_on"]["primary"]["condition"] == "service_healthy"
    entrypoint = (DOCKER / "postgres" / "entrypoint.sh").read_text()
    assert re.search(r"pg_basebackup .*-R", entrypoint)
    assert "streaming" in (DOCKER / "postgres" / "healthcheck.sh").read_text()
    assert "postgresql-15" in " ".join(runs(DOCKER / "Dockerfile.postgres"))


def test_the_stack_starts_in_order():
    services = stack()
    assert services["migrate"]["command"] == ["python", "-m", "alembic", "-c", "migrations/alembic.ini", "upgrade",
                                              "head"]
    assert services["web"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for worker in ("worker", "worker-cuda"):
        assert services[worker]["depends_on"]["model"]["condition"] == "service_completed_successfully"
    assert services["model"]["command"][:3] == ["python", "-m", "workers.fetch_model"]
    dest = services["model"]["command"][services["model"]["command"].index("--dest") + 1]
    assert Path(dest).parent == Path(services["worker"]["environment"]["CHAT_MODELS_DIR"])
    assert Path(dest).name == services["worker"]["environment"]["CHAT_MODEL"]
    assert "models:/models:ro" in services["worker"]["volumes"] and "models:/models" in services["model"]["volumes"]


def test_the_gpu_worker_is_in_a_profile_and_reserves_the_gpus():
    services = stack()
    cuda = services["worker-cuda"]
    assert cuda["profiles"] == ["gpu"] and "profiles" not in services["worker"]
    [device] = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert cuda["build"]["args"]["VARIANT"] == "cuda" and services["worker"]["build"]["args"]["VARIANT"] == "cpu"
    assert cuda["image"] == images.CUDA_IMAGE.tag


def test_secrets_have_no_defaults_and_ports_face_loopback_unless_told():
    text = (DOCKER / "compose.yaml").read_text()
    for name in SECRETS:
        assert f"${{{name}:?" in text and f"${{{name}:-" not in text, name
        with pytest.raises(MissingVariable):
            compose("compose.yaml", {k: v for k, v in LOCAL_ENV.items() if k != name})
    for name, service in raw("compose.yaml")["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${CQ_PUBLISH_ADDRESS:-127.0.0.1}:"), (name, port)
    assert stack(CQ_PUBLISH_ADDRESS="0.0.0.0")["web"]["ports"] == ["0.0.0.0:8000:8000"]


def test_the_web_tier_and_the_workers_agree_on_the_queue_and_the_databases(monkeypatch):
    services = stack()
    found = {}
    for name in ("web", "worker"):
        for key in list(os.environ):
            if key.startswith("CHAT_"):
                monkeypatch.delenv(key)
        for key, value in services[name]["environment"].items():
            monkeypatch.setenv(key, str(value))
        found[name] = Settings()
    web, worker = found["web"], found["worker"]
    assert web.queue == worker.queue == "gen.smollm2-135m-instruct"
    assert web.resolved_broker_url == worker.resolved_broker_url == services["flower"]["environment"][
        "CELERY_BROKER_URL"]
    primary = make_url(web.resolved_database_url)
    assert primary.password == LOCAL_ENV["CQ_POSTGRES_PASSWORD"]
    assert primary.query["host"] == ("primary:5432", "replica:5433")
    assert make_url(web.resolved_replica_url).host == "replica"
    assert web.secret_key == LOCAL_ENV["CHAT_SECRET_KEY"]
    migrate = make_url(services["migrate"]["environment"]["CHAT_DATABASE_URL"])
    assert (migrate.host, migrate.port) == ("primary", 5432)


def test_the_workers_file_runs_workers_alone_against_remote_services():
    for name in REMOTE_ENV:
        with pytest.raises(MissingVariable):
            compose("compose.workers.yaml", {k: v for k, v in REMOTE_ENV.items() if k != name})
    services = compose("compose.workers.yaml", REMOTE_ENV)["services"]
    assert set(services) == {"model", "worker", "worker-cuda"}
    for key, value in REMOTE_ENV.items():
        assert services["worker"]["environment"][key] == value
    assert services["worker-cuda"]["profiles"] == ["gpu"]
    assert compose("compose.workers.yaml", {**REMOTE_ENV, "CQ_NETWORK_MODE": "host"})["services"]["worker"][
        "network_mode"] == "host"


def test_every_chat_variable_named_is_a_setting():
    settings = chat_settings()
    named = set()
    for path in [*COMPOSE_FILES, DOCKER / "env.example", *DOCKERFILES]:
        text = path.read_text()
        named |= {n for n in variables(text) if n.startswith("CHAT_")}
        named |= set(re.findall(r"\b(CHAT_[A-Z0-9_]+)[=:]", text))
    unknown = named - settings
    assert not unknown, f"not settings: {sorted(unknown)}"


def test_images_py_builds_the_images_compose_and_kubernetes_name():
    built = {i.tag for i in (*images.IMAGES, images.CUDA_IMAGE)}
    named = {s["image"] for path in COMPOSE_FILES for s in raw(path.name).get("services", {}).values() if "image" in s}
    assert named == built
    k8s = {m.group(1) for m in re.finditer(r"image: (\S+)", "".join(p.read_text() for p in (DOCKER / "k8s").glob("*.yaml")))}
    assert k8s <= built
