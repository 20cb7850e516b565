"""The container files, read as data (no Docker engine needed): the stack is wired the way the worker needs.

Each check is a small function returning the problems it finds; the real files must have none, and a broken
sample must have some, so a check that can no longer fail is caught too.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from worker.settings import Settings
from worker.testing import PROJECT_ROOT

TORCH_VERSION = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((PROJECT_ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final_stage(dockerfile) -> list[tuple[str, str]]:
    """The instructions of the image itself: the last stage."""
    return stages(dockerfile)[-1]


@pytest.fixture(scope="module")
def test_override() -> dict[str, Any]:
    return yaml.load((PROJECT_ROOT / "docker-compose.test.yml").read_text(), Loader=ComposeLoader)  # noqa: S506


# ------------------------------------------------------------------------------------------------ helpers


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, args = pending.partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def stages(docker: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, each starting with its FROM (ARGs before the first FROM dropped)."""
    out: list[list[tuple[str, str]]] = []
    for keyword, args in docker:
        if keyword == "FROM":
            out.append([])
        if out:
            out[-1].append((keyword, args))
    return out


def global_args(docker: list[tuple[str, str]]) -> dict[str, str | None]:
    """ARGs declared before the first FROM (the ones a FROM line may use), with their defaults."""
    out: dict[str, str | None] = {}
    for keyword, args in docker:
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = args.partition("=")
            out[name] = default if _ else None
    return out


def from_image(stage: list[tuple[str, str]], args: dict[str, str | None]) -> str:
    """The image a stage starts from, build arguments replaced by their defaults."""
    image = stage[0][1].split()[0]
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1)) or "", image)


_BUILDKIT_ONLY_FLAGS = {"RUN": ("--mount", "--network", "--security"),
                        "COPY": ("--chmod", "--link", "--parents", "--exclude"),
                        "ADD": ("--chmod", "--link", "--checksum", "--keep-git-dir", "--exclude")}


def classic_builder_problems(text: str) -> list[str]:
    """Why the classic builder (no BuildKit, no buildx) could not build this Dockerfile, or needs a registry."""
    problems = []
    first = next((line for line in text.splitlines() if line.strip()), "")
    if re.match(r"#\s*syntax\s*=", first):
        problems.append("a '# syntax=' line: BuildKit pulls that frontend image from a registry")
    for keyword, args in instructions(text):
        flags = [w.split("=")[0] for w in args.split() if w.startswith("--")]
        for flag in _BUILDKIT_ONLY_FLAGS.get(keyword, ()):
            if flag in flags:
                problems.append(f"{keyword} {flag} needs BuildKit")
        if keyword in ("RUN", "COPY", "ADD") and re.search(r"<<-?\s*['\"]?[A-Za-z_]", args):
            problems.append(f"{keyword} with a heredoc needs BuildKit")
    return problems


def copy_sources(stage: list[tuple[str, str]]) -> list[str]:
    """The build-context paths a stage copies (COPY --from=another stage excluded)."""
    out = []
    for keyword, args in stage:
        if keyword not in ("COPY", "ADD"):
            continue
        words = args.split()
        if any(w.startswith("--from") for w in words):
            continue
        out += [w for w in words[:-1] if not w.startswith("--")]
    return out


def dockerignore_patterns() -> list[str]:
    lines = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: from the top of the context, * and ? within one path
    component, ** across any number of them."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(f"^{out}$")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves this context path out: the last pattern matching it or one of its parent folders
    decides, a leading ! keeping it in."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        regex = _pattern_regex(pattern.lstrip("!"))
        if any(regex.match(c) for c in candidates):
            ignored = not keep
    return ignored


class ComposeLoader(yaml.SafeLoader):
    """YAML as compose reads it: ``!reset`` (drop what the file before set) and ``!override`` tags."""


RESET = object()
ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
    else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node),
)


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as a dict, whichever of the two compose forms it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict((item.split("=", 1) + [None])[:2] for item in env)  # type: ignore[misc]
    return {k: None if v is None else str(v) for k, v in env.items()}


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def resolve(value: str | None) -> str | None:
    """The value compose would pass when the user's environment sets nothing: ``${X:-default}`` -> default."""
    if value is None:
        return None
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def seconds(duration: str | int | float) -> float:
    """A compose duration (``180s``, ``3m``, ``1m30s``, or a bare number of seconds) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def allinone_variables(compose_text: str, compose: dict[str, Any], docker_text: str) -> set[str]:
    """Every ALLINONE_* name the container files set or interpolate."""
    names = set(re.findall(r"\$\{(ALLINONE_[A-Za-z0-9_]*)", compose_text))
    for service in compose["services"].values():
        names |= {k for k in environment(service) if k.startswith("ALLINONE_")}
    for keyword, args in instructions(docker_text):
        if keyword in ("ENV", "ARG"):
            names |= set(re.findall(r"\b(ALLINONE_[A-Za-z0-9_]+)=", args))
    return names


def unknown_settings(names: set[str]) -> set[str]:
    return {n for n in names if n.removeprefix("ALLINONE_").lower() not in Settings.model_fields}


def shell_commands(script: str) -> list[list[str]]:
    """The words of each simple command in a RUN line (split at ``&&``, ``;``, ``|``, quotes respected)."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", ";", "||", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def torch_problems(docker: list[tuple[str, str]]) -> list[str]:
    """Why this Dockerfile could end up with a CUDA or an unpinned torch."""
    problems: list[str] = []
    torch_at = project_at = None
    for i, (keyword, args) in enumerate(docker):
        if keyword != "RUN":
            continue
        for words in shell_commands(args):
            if "pip" not in words or "install" not in words:
                continue
            packages = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
            torches = [p for p in packages if re.match(r"^torch(?![a-z])", p)]
            for p in torches:
                if p != f"torch=={TORCH_VERSION}":
                    problems.append(f"unpinned or wrongly pinned torch: {p!r}")
            if torches:
                if f"--index-url {CPU_INDEX}" not in " ".join(words):
                    problems.append(f"torch installed without --index-url {CPU_INDEX}")
                torch_at = i if torch_at is None else torch_at
            if any("worker" in re.findall(r"\[([\w,]+)\]$", p)[0].split(",") for p in packages if p.endswith("]")):
                project_at = i if project_at is None else project_at
    if torch_at is None:
        problems.append(f"torch=={TORCH_VERSION} is never installed from the CPU index")
    if project_at is None:
        problems.append("the project is never installed with its worker extra")
    if torch_at is not None and project_at is not None and torch_at > project_at:
        problems.append("torch is installed after the project: the project would pull torch from PyPI first")
    return problems


# ------------------------------------------------------------------------------------------------ compose


def test_redis_has_a_ping_healthcheck(services):
    redis = services["redis"]
    assert (resolve(redis["image"]) or "").startswith("redis:7")
    test = redis["healthcheck"]["test"]
    assert "redis-cli" in test and "ping" in test


def test_redis_never_evicts_queued_messages(services):
    command = services["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_redis_accepts_the_other_containers_whatever_its_build(services):
    # redis-server builds other than the official image's (Debian's, a local REDIS_IMAGE) start in protected
    # mode and refuse every client that is not on loopback: the worker would never connect.
    command = services["redis"]["command"]
    assert command[command.index("--protected-mode") + 1] == "no"


def test_base_images_are_variables_defaulting_to_the_public_images(services, dockerfile):
    assert global_args(dockerfile).get("BASE_IMAGE") == "python:3.11-slim"
    for name in ("worker", "producer"):
        args = services[name]["build"]["args"]
        assert services[name]["build"]["context"] == "."
        assert "${BASE_IMAGE:-" in args["BASE_IMAGE"], "a machine without a registry must be able to pass its own"
        # The same default as the Dockerfile's: users who set nothing get what a plain docker build gives
        assert resolve(args["BASE_IMAGE"]) == global_args(dockerfile)["BASE_IMAGE"]
        assert resolve(args["PIP_NO_INDEX"]) == "0"
    assert "${REDIS_IMAGE:-" in services["redis"]["image"]
    assert resolve(services["redis"]["image"]) == "redis:7-alpine"
    assert services["worker"]["image"] == services["producer"]["image"]


def test_worker_starts_only_after_redis_is_healthy(services):
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize(("service", "variable"), [("worker", "ALLINONE_REDIS_URL"),
                                                   ("producer", "ALLINONE_REDIS_URL"),
                                                   ("flower", "CELERY_BROKER_URL")])
def test_broker_urls_name_the_redis_service(services, service, variable):
    url = urlparse(resolve(environment(services[service])[variable]) or "")
    assert url.scheme == "redis"
    assert url.hostname == "redis" and url.hostname in services
    assert (url.port or 6379) == 6379


def test_worker_keeps_the_model_cache_on_a_named_volume(compose, services):
    worker = services["worker"]
    mounts = dict(v.split(":")[:2] for v in worker["volumes"])
    named = {source: target for source, target in mounts.items() if source in (compose.get("volumes") or {})}
    assert named, "the worker has no named volume"
    env = environment(worker)
    for variable in ("HF_HOME", "ALLINONE_CACHE_DIR"):
        path = Path(resolve(env[variable]) or "")
        on_volume = any(path.is_relative_to(target) for target in named.values())
        assert on_volume, f"{variable}={path} is not on a volume"


def test_worker_healthcheck_runs_worker_health_for_this_host(services):
    health = services["worker"]["healthcheck"]
    test = health["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert "worker.health" in " ".join(test) and "--this-host" in " ".join(test)
    # worker.health's own Redis timeout must end before Docker gives up on the check
    words = " ".join(test[1:]).split()
    timeout = float(words[words.index("--timeout") + 1]) if "--timeout" in words else 3.0
    assert timeout < seconds(health["timeout"])
    # The first start downloads the model: not "unhealthy" meanwhile
    assert seconds(health["start_period"]) >= 300


def test_worker_stop_grace_outlasts_a_reply(services):
    worker = services["worker"]
    reply_bound = float(resolve(environment(worker)["ALLINONE_REPLY_TIMEOUT_SECONDS"]) or 0)
    assert reply_bound >= Settings.model_fields["reply_timeout_seconds"].default
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert seconds(worker["stop_grace_period"]) > reply_bound


def test_worker_restarts_and_has_resource_hints(services):
    worker = services["worker"]
    assert worker["restart"] == "unless-stopped"
    assert float(worker["cpus"]) >= 1 and worker["mem_limit"]
    # torch threads follow the CPU quota, not the host's core count
    assert int(resolve(environment(worker)["ALLINONE_THREADS"]) or 0) <= float(worker["cpus"])


def test_flower_and_the_producer_start_only_in_a_profile(services):
    assert services["flower"]["profiles"] == ["monitoring"]
    assert "5555" in " ".join(map(str, services["flower"]["ports"]))
    assert services["producer"]["profiles"] == ["tools"]
    for name in ("redis", "worker"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"


def test_the_web_app_is_the_front_door_on_loopback_after_redis(services):
    web = services["web"]
    assert "profiles" not in web, "the web app starts with a plain `docker compose up`"
    assert web["image"] == services["worker"]["image"] and web["depends_on"]["redis"]["condition"] == "service_healthy"
    assert web["command"][:3] == ["python", "-m", "producer.web"] and "0.0.0.0" in web["command"]
    port = web["command"][web["command"].index("--port") + 1]
    assert [resolve(p) for p in web["ports"]] == [f"127.0.0.1:8000:{port}"]
    assert "/healthz" in " ".join(web["healthcheck"]["test"]) and f":{port}/" in " ".join(web["healthcheck"]["test"])
    assert urlparse(resolve(environment(web)["ALLINONE_REDIS_URL"]) or "").hostname == "redis"


def test_prometheus_scrapes_the_workers_and_the_web_app_where_they_serve_metrics(services):
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    config_mount = next(v for v in prometheus["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((PROJECT_ROOT / config_mount.split(":")[0]).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_port = int(resolve(environment(services["worker"])["ALLINONE_METRICS_PORT"]) or 0)
    (workers,) = jobs["allinone-worker"]["dns_sd_configs"]
    assert workers["names"] == ["worker"] and workers["port"] == worker_port > 0  # every replica of the service
    web_port = services["web"]["command"][services["web"]["command"].index("--port") + 1]
    assert jobs["allinone-web"]["static_configs"][0]["targets"] == [f"web:{web_port}"]


def test_every_allinone_variable_is_a_setting(compose, dockerfile):
    names = allinone_variables(
        (PROJECT_ROOT / "docker-compose.yml").read_text(), compose, (PROJECT_ROOT / "Dockerfile").read_text()
    )
    assert "ALLINONE_MODEL" in names and "ALLINONE_REDIS_URL" in names
    assert unknown_settings(names) == set()


def test_a_misspelt_variable_is_caught():
    assert unknown_settings({"ALLINONE_MODEL", "ALLINONE_MAX_NEW_TOKEN", "ALLINONE_REPLY_TIMEOUT"}) == {
        "ALLINONE_MAX_NEW_TOKEN",
        "ALLINONE_REPLY_TIMEOUT",
    }


@pytest.mark.parametrize("service", ["worker", "producer"])
def test_compose_defaults_are_valid_settings(services, service, monkeypatch):
    # Given the user's environment sets nothing: the values compose passes must validate
    for key, value in environment(services[service]).items():
        if key.startswith("ALLINONE_") and value is not None:
            monkeypatch.setenv(key, resolve(value) or "")
    s = Settings(_env_file=None)
    assert s.redis_url == "redis://redis:6379/0"
    if service == "worker":
        assert s.model == "Qwen/Qwen1.5-0.5B-Chat"
        # A task must finish before Redis hands its message to another worker
        assert s.visibility_timeout_seconds > s.reply_timeout_seconds


# ------------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_base_user_volume_and_command(dockerfile, final_stage):
    assert from_image(final_stage, global_args(dockerfile)) == "python:3.11-slim"
    users = [args for keyword, args in final_stage if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(keyword == "VOLUME" and "/models" in args for keyword, args in final_stage)
    env = " ".join(args for keyword, args in final_stage if keyword == "ENV")
    assert "HF_HOME=/models/" in env and "ALLINONE_CACHE_DIR=/models/" in env
    assert ("STOPSIGNAL", "SIGTERM") in final_stage
    assert final_stage[-1] == ("CMD", '["python", "-m", "worker"]')
    health = [args for keyword, args in final_stage if keyword == "HEALTHCHECK"]
    assert health and "worker.health" in health[0]


def test_every_stage_starts_from_the_base_image_argument(dockerfile):
    for stage in stages(dockerfile):
        assert stage[0][1].split()[0] == "${BASE_IMAGE}"


def test_dockerfile_builds_with_the_classic_builder():
    assert classic_builder_problems((PROJECT_ROOT / "Dockerfile").read_text()) == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("# syntax=docker/dockerfile:1\nFROM x\n", "syntax"),
        ("FROM x\nRUN --mount=type=cache,target=/root/.cache/pip pip install y\n", "RUN --mount"),
        ("FROM x\nCOPY --chmod=755 a /b\n", "COPY --chmod"),
        ("FROM x\nRUN <<EOF\n", "heredoc"),
    ],
)
def test_a_buildkit_only_dockerfile_is_caught(text, problem):
    assert any(problem in p for p in classic_builder_problems(text)), classic_builder_problems(text)


def test_the_image_copies_whole_folders_that_are_in_the_context(dockerfile, final_stage):
    sources = [src for stage in stages(dockerfile) for src in copy_sources(stage)]
    # The packages are being split into subpackages: a single module copied by name would go missing.
    for src in sources:
        assert "/" not in src.rstrip("/"), f"COPY {src}: copy the whole folder"
    names = {src.rstrip("/") for src in sources}
    assert {"worker", "producer", "pyproject.toml", "celeryconfig.py"} <= names
    assert "heads" in {src.rstrip("/") for src in copy_sources(final_stage)}
    patterns = dockerignore_patterns()
    for src in names:
        matches = list(PROJECT_ROOT.glob(src))
        assert matches or src == "README.m[d]", f"COPY {src}: not in the repository"
        for path in matches:
            relative = path.relative_to(PROJECT_ROOT).as_posix()
            assert not dockerignored(relative, patterns), f"COPY {src}: .dockerignore'd"


def test_the_package_folders_reach_the_build_context_whole():
    patterns = dockerignore_patterns()
    for folder in ("worker", "producer", "heads"):
        for path in (PROJECT_ROOT / folder).rglob("*"):
            rel = path.relative_to(PROJECT_ROOT).as_posix()
            if path.is_file() and "__pycache__" not in rel and not rel.endswith(".pyc"):
                assert not dockerignored(rel, patterns), f"{rel} is left out of the image"


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("worker/tools/data/dev.jsonl", False),  # package data
        ("heads/smollm2-135m-instruct.safetensors", False),
        ("wheelhouse/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl", False),
        ("README.md", False),
        (".venv/lib/python3.11/site-packages/torch/__init__.py", True),
        (".git/config", True),
        (".env", True),
        ("tests/test_compose.py", True),
        ("scripts/compose-test.sh", True),
        ("worker/__pycache__/engine.cpython-311.pyc", True),
        ("models/SmolLM2-135M-Instruct.Q4_1.gguf", True),
        ("worker/SmolLM2-135M-Instruct.Q4_1.gguf", True),
        ("data/in.jsonl", True),
        ("messages.jsonl", True),
        ("model.safetensors", True),
        ("out/results.jsonl", True),
    ],
)
def test_dockerignore_keeps_package_data_and_heads_and_drops_local_state(path, ignored):
    assert dockerignored(path, dockerignore_patterns()) is ignored


def test_the_wheelhouse_is_an_option_of_the_build_stage_only(dockerfile, final_stage, services):
    build_stages = stages(dockerfile)[:-1]
    assert any("wheelhouse" in " ".join(copy_sources(stage)) for stage in build_stages)
    assert not any("wheelhouse" in src for src in copy_sources(final_stage)), "the wheels would stay in the image"
    assert any(k == "ARG" and a.startswith("PIP_NO_INDEX=0") for stage in build_stages for k, a in stage)
    # The folder exists in a clean clone, so COPY wheelhouse/ never fails
    assert (PROJECT_ROOT / "wheelhouse" / "README.md").is_file()
    assert "!/wheelhouse/README.md" in (PROJECT_ROOT / ".gitignore").read_text().splitlines()
    for name in ("worker", "producer"):
        assert "PIP_NO_INDEX" in services[name]["build"]["args"]


def test_dockerfile_installs_torch_pinned_from_the_cpu_index_first(dockerfile):
    assert torch_problems(dockerfile) == []


def test_the_worker_extra_pins_the_same_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extra = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["worker"]
    assert [d for d in extra if re.match(r"^torch(?![a-z])", d)] == [f"torch=={TORCH_VERSION}"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("RUN pip install torch\nRUN pip install '.[worker]'", "unpinned"),
        (f"RUN pip install torch=={TORCH_VERSION}\nRUN pip install '.[worker]'", "without --index-url"),
        (f"RUN pip install --index-url {CPU_INDEX} 'torch>=2'\nRUN pip install '.[worker]'", "unpinned"),
        (f"RUN pip install .[worker]\nRUN pip install --index-url {CPU_INDEX} torch=={TORCH_VERSION}",
         "after"),
        ("RUN pip install '.[worker]'", "never installed"),
        (f"RUN pip install --index-url {CPU_INDEX} torch=={TORCH_VERSION} && pip install torchaudio torch",
         "unpinned"),
    ],
)
def test_a_dockerfile_with_a_risky_torch_is_caught(text, problem):
    assert any(problem in p for p in torch_problems(instructions(text))), torch_problems(instructions(text))


def test_dockerignore_keeps_local_state_out_of_the_context():
    ignored = {line.strip() for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", ".env", ".pytest_cache", "*.egg-info"} <= ignored
    for needed in ("pyproject.toml", "worker", "producer", "celeryconfig.py", "README.md", "heads", "wheelhouse"):
        assert needed not in ignored
        assert not dockerignored(needed, dockerignore_patterns())


# ------------------------------------------------------------------------------------------------ test override


def test_the_users_compose_file_holds_nothing_of_the_test(services):
    text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    for word in ("gguf", "SmolLM", "compose-test", "COMPOSE_TEST", "allinone-local"):
        assert word not in text
    assert resolve(environment(services["worker"])["HF_HUB_OFFLINE"]) == "0"


def test_the_test_stack_publishes_no_host_port(test_override):
    # Other Redis servers own this machine's 6379 during the tests
    assert test_override["services"]["redis"]["ports"] is RESET
    for service in test_override["services"].values():
        assert "ports" not in service or service["ports"] is RESET


def test_the_test_stack_runs_the_offline_demo_model_from_a_read_only_mount(test_override):
    worker = test_override["services"]["worker"]
    env = environment(worker)
    model = env["ALLINONE_MODEL"] or ""
    assert model.endswith(".gguf") and env["HF_HUB_OFFLINE"] == "1"
    mounts = [v.rsplit(":", 2) for v in worker["volumes"]]
    assert [model, "ro"] in [m[1:] for m in mounts], "the GGUF file is not mounted read-only where the model points"
    # A relative head is read from the image's working directory, where the Dockerfile copies heads/
    head = env["ALLINONE_SENTIMENT_HEAD"] or ""
    assert head.startswith("heads/") and (PROJECT_ROOT / head).is_file()


def test_the_test_stack_has_its_own_image_tag(services, test_override):
    tag = test_override["services"]["worker"]["image"]
    assert tag != services["worker"]["image"], "the test would replace the user's image"
    assert test_override["services"]["producer"]["image"] == tag


def test_the_test_stack_settings_are_valid_and_redeliver_fast(services, test_override, monkeypatch):
    merged = {**environment(services["worker"]), **environment(test_override["services"]["worker"])}
    assert unknown_settings({k for k in merged if k.startswith("ALLINONE_")}) == set()
    for key, value in merged.items():
        if key.startswith("ALLINONE_") and value is not None:
            monkeypatch.setenv(key, resolve(value) or "")
    s = Settings(_env_file=None)
    # Short, so the kill test ends in seconds; above the longest task, so no message runs twice
    assert s.reply_timeout_seconds < s.visibility_timeout_seconds <= 60
    worker = {**services["worker"], **test_override["services"]["worker"]}
    grace = seconds(worker["stop_grace_period"])
    assert grace > s.reply_timeout_seconds


# ------------------------------------------------------------------------------------------------ README


def compose_section_commands() -> list[list[str]]:
    """The words after ``docker compose`` of each command in the README's compose section's code blocks."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Running with docker compose", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if "docker" in words and words[words.index("docker") + 1 :][:1] == ["compose"]:
                commands.append(words[words.index("docker") + 2 :])
    return commands


def command_shape(words: list[str]) -> str:
    """Subcommands, services and options up to the first value a user chooses (an id, a text): what a run of
    the same command shares with the README's."""
    shape = []
    for word in words:
        if word == "-T":  # no TTY: how a script runs it, the same command otherwise
            continue
        if not re.fullmatch(r"-{1,2}[a-z-]+|[a-z]+|[a-z]+=\d+", word):
            break
        shape.append(word)
    return " ".join(shape)


def test_the_readme_compose_commands_are_the_ones_the_compose_test_runs():
    script = (PROJECT_ROOT / "scripts" / "compose-test.sh").read_text()
    # Every call of the script's compose function (docker compose with the test's project and files)
    ran = {command_shape(m.split()) for m in re.findall(r"(?<![\w-])compose ([^|>\n]*)", script)}
    commands = compose_section_commands()
    assert len(commands) >= 6
    for words in commands:
        shape = command_shape(words)
        assert any(r == shape or r.startswith(shape + " ") for r in ran), f"README: docker compose {shape}"


class _UniqueKeys(yaml.SafeLoader):
    """A YAML loader that refuses a mapping key written twice (Docker Compose refuses such a file)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        written = list(node.value)  # as written, before merge keys (<<) bring in the anchor's entries
        self.flatten_mapping(node)
        for key_node, _ in written:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.test.yml"])
def test_no_key_is_written_twice(name):
    _UniqueKeys.add_constructor("!reset", lambda loader, node: None)
    _UniqueKeys.add_constructor("!override", lambda loader, node: None)
    yaml.load((PROJECT_ROOT / name).read_text(), Loader=_UniqueKeys)  # noqa: S506


def test_a_key_written_twice_is_caught():
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'A'"):
        yaml.load("x:\n  A: 1\n  A: 2\n", Loader=_UniqueKeys)  # noqa: S506
