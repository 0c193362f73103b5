"""Issue 24, bullets 5 and 6: what ``contrib/`` ships to run bridge_kit for real.

No Docker and no systemd run here, so each file is checked as far as this
machine allows: the unit by ``systemd-analyze verify`` (where installed) and by
bridge_kit's own CLI parser; the Dockerfile's steps run in a plain venv the way
the image runs them; the compose file against the config it mounts; the Grafana
dashboard's queries against the metric names a real AppService serves.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import venv
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge_kit import AppService, AppServiceConfig, Config, HomeserverConfig
from bridge_kit.app.runner import ExitCode
from bridge_kit.cli.main import _build_parser
from bridge_kit.cli.run import run as run_command
from tests.conftest import TestHomeserver

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
UNIT = CONTRIB / "systemd" / "bridge-kit.service"
DOCKERFILE = CONTRIB / "docker" / "Dockerfile"
COMPOSE = CONTRIB / "docker" / "compose.yaml"
DASHBOARD = CONTRIB / "grafana" / "bridge-kit.json"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

# -- systemd ---------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> its values in order (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def test_the_units_execstart_is_a_run_command_bridge_kits_parser_accepts() -> None:
    [exec_start] = unit_settings(UNIT.read_text())["Service.ExecStart"]
    executable, *argv = shlex.split(exec_start)
    assert Path(executable).is_absolute() and Path(executable).name == "bridge-kit"
    args = _build_parser().parse_args(argv)
    assert args.command is run_command
    assert args.config == "/etc/bridge-kit/config.yaml"


def test_the_unit_restarts_on_failure_but_not_after_a_set_up_error() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["Service.Restart"] == ["on-failure"]
    assert settings["Service.RestartPreventExitStatus"] == [str(int(ExitCode.SETUP))]
    assert settings["Service.User"] == ["bridge-kit"]
    assert settings["Service.StateDirectory"] == ["bridge-kit"]
    for hardening in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "RestrictSUIDSGID"):
        assert settings[f"Service.{hardening}"] == ["yes"], hardening
    assert settings["Service.ProtectSystem"] == ["strict"]


def test_systemd_analyze_verify_finds_nothing_to_say_about_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # verify insists that the executable exists: point ExecStart at this venv's
    # bridge-kit, which is what /opt/bridge-kit/bin/bridge-kit is on a server.
    [exec_start] = unit_settings(UNIT.read_text())["Service.ExecStart"]
    installed = Path(sys.executable).parent / "bridge-kit"
    assert installed.exists(), installed
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(shlex.split(exec_start)[0], str(installed)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for an unknown key or a bad value: it only complains.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


# -- Docker ----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, arguments = (pending + line).partition(" ")
        instructions.append((word.upper(), arguments.strip()))
        pending = ""
    return instructions


def instruction(name: str) -> list[str]:
    return [args for word, args in dockerfile_instructions(DOCKERFILE.read_text()) if word == name]


def image_command() -> list[str]:
    [cmd] = instruction("CMD")
    command: list[str] = json.loads(cmd)
    return command


def exposed_port() -> int:
    [port] = instruction("EXPOSE")
    return int(port)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def compose_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((COMPOSE.parent / "config.yaml").read_text())
    return data


def test_the_image_runs_the_daemon_on_data_config_as_a_non_root_user() -> None:
    assert instruction("FROM") == ["python:3.11-slim"]
    assert image_command() == ["bridge-kit", "run", "-c", "/data/config.yaml"]
    [user] = instruction("USER")
    assert user not in ("root", "0")
    [healthcheck] = instruction("HEALTHCHECK")
    assert f"http://127.0.0.1:{exposed_port()}/_bridge_kit/health" in healthcheck


async def run_healthcheck(port: int) -> int:
    """The image's HEALTHCHECK command, aimed at ``port``; its exit status."""
    [healthcheck] = instruction("HEALTHCHECK")
    command = json.loads(healthcheck.partition("CMD ")[2])
    assert command[:2] == ["python", "-c"]
    code = command[2].replace(f":{exposed_port()}/", f":{port}/")
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
    return await asyncio.wait_for(process.wait(), 30)


async def test_the_healthcheck_passes_on_a_running_app_only(
    synapse: TestHomeserver, tmp_path: Path
) -> None:
    async with app_on(synapse, tmp_path / "bridge.db"):
        assert await run_healthcheck(synapse.appservice_port) == 0
    assert await run_healthcheck(synapse.appservice_port) != 0


def copy_build_context(destination: Path) -> None:
    """What ``COPY . /src`` copies: the checkout without the .dockerignore's paths."""
    ignore_file = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
    patterns = [
        line.strip().removeprefix("**/").removeprefix("/")
        for line in ignore_file.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(*patterns))


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain venv with the Dockerfile's RUN steps done in it, from a copy of the checkout."""
    base = tmp_path_factory.mktemp("image")
    # pip itself comes from this environment (``pip --python``): ensurepip would take
    # longer than the install, and the image's own pip is not what is tested.
    venv.create(base / "venv", with_pip=False)
    source = base / "src"
    [copy] = instruction("COPY")
    assert copy == ". /src"
    copy_build_context(source)
    assert not (source / ".git").exists() and (source / "pyproject.toml").exists()
    for step in instruction("RUN"):
        program, *argv = shlex.split(step)
        if program == "useradd":
            continue  # needs root, and a venv has no users
        assert program == "pip", f"a RUN step this test does not know how to run: {step}"
        pip = [sys.executable, "-m", "pip", "--python", str(base / "venv" / "bin" / "python")]
        subprocess.run([*pip, *argv], cwd=source, check=True, timeout=600)
    return base / "venv"


def in_image(venv_dir: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the image would: its programs from the venv, nothing from this one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    program = shutil.which(argv[0], path=env["PATH"])
    assert program is not None and program.startswith(str(venv_dir)), argv[0]
    return subprocess.run(
        [program, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_the_dockerfiles_steps_install_a_working_bridge_kit(
    image_venv: Path, tmp_path: Path
) -> None:
    help_run = in_image(image_venv, [*image_command()[:2], "--help"], tmp_path)
    assert help_run.returncode == 0, help_run.stderr
    assert "-c CONFIG" in help_run.stdout
    # the postgres extra, which the compose file's store needs
    postgres = in_image(image_venv, ["python", "-c", "import asyncpg"], tmp_path)
    assert postgres.returncode == 0, postgres.stderr
    # No source checkout leaks in: the venv's bridge_kit is the installed copy.
    where = in_image(
        image_venv, ["python", "-c", "import bridge_kit; print(bridge_kit.__file__)"], tmp_path
    )
    assert str(image_venv) in where.stdout, where.stdout


@pytest.mark.slow
def test_the_documented_set_up_passes_check_in_the_image(image_venv: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"  # the bridge-data volume, mounted at /data
    data.mkdir()
    generate = documented_generate_registration()
    registration = data / "registration.yaml"
    made = in_image(image_venv, [*generate[:-1], str(registration)], tmp_path)
    assert made.returncode == 0, made.stderr
    config = compose_config()
    config["appservice"]["registration"] = str(registration)
    (data / "config.yaml").write_text(yaml.safe_dump(config))
    checked = in_image(image_venv, ["bridge-kit", "check", "-c", str(data / "config.yaml")], data)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "error" not in checked.stdout + checked.stderr


def documented_generate_registration() -> list[str]:
    """The ``bridge-kit generate-registration`` line of docs/deploy.md, run in the image."""
    [line] = [
        line for line in DEPLOY_DOC.read_text().splitlines() if "generate-registration" in line
    ]
    argv = shlex.split(line.rstrip("\\"))
    start = argv.index("bridge-kit")
    command = argv[start:]
    assert command[-2:] == ["-o", "/data/registration.yaml"], command
    return command


def named_volume(service: dict[str, Any], target: str) -> str:
    """The volume (or host path) ``service`` mounts at ``target``."""
    for volume in service["volumes"]:
        source, mounted, *_ = volume.split(":")
        if mounted == target:
            return str(source)
    raise AssertionError(f"nothing is mounted at {target}: {service['volumes']}")


def test_the_compose_file_runs_synapse_postgres_and_the_image() -> None:
    services = compose()["services"]
    assert set(services) == {"synapse", "postgres", "bridge"}
    assert services["synapse"]["image"].startswith("matrixdotorg/synapse")
    assert services["postgres"]["image"].startswith("postgres")
    build = services["bridge"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert services["bridge"]["command"] == image_command()
    assert set(services["bridge"]["depends_on"]) == {"synapse", "postgres"}


def test_the_bridges_config_paths_are_the_compose_files_volumes() -> None:
    services = compose()["services"]
    bridge, synapse = services["bridge"], services["synapse"]
    config_path = image_command()[-1]
    assert named_volume(bridge, config_path) == "./config.yaml"
    config = compose_config()
    registration = Path(config["appservice"]["registration"])
    data_volume = named_volume(bridge, str(registration.parent))
    assert data_volume in compose()["volumes"]
    # Synapse reads the same file from the same volume, where deploy.md says.
    synapse_side = next(
        volume.split(":")[1] for volume in synapse["volumes"] if volume.startswith(data_volume)
    )
    assert f"app_service_config_files: [{synapse_side}/{registration.name}]" in (
        DEPLOY_DOC.read_text()
    )
    # The registration's url (deploy.md) reaches the port the bridge listens on.
    url = documented_generate_registration()
    assert url[url.index("--url") + 1] == f"http://bridge:{config['appservice']['port']}"
    assert config["appservice"]["port"] == exposed_port()
    assert config["homeserver"]["url"] == "http://synapse:8008"


def test_the_compose_store_is_the_postgres_service(tmp_path: Path) -> None:
    services = compose()["services"]
    postgres = services["postgres"]["environment"]
    store = services["bridge"]["environment"]["BRIDGE_KIT__APPSERVICE__STORE"]
    user, password, database = (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"]
    )  # fmt: skip
    assert store == f"postgresql://{user}:{password}@postgres/{database}"
    # The config loads with the compose file's environment (files checked above).
    config = Config.load(
        COMPOSE.parent / "config.yaml",
        services["bridge"]["environment"],
        check_files=False,
    )
    assert config.appservice.store == store


# -- Grafana ---------------------------------------------------------------------------

# Words of PromQL that look like metric names but are not.
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_PROMQL_WORDS |= {"and", "or", "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects: identifiers that are not functions, labels
    (inside ``{}`` or a ``by (...)`` list), ranges, strings or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)
    return {name for name in names if name.lower() not in _PROMQL_WORDS}


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[str]:
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        yield from (target["expr"] for target in panel.get("targets", []))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["query"]["query"]


def label_values_metric(query: str) -> str:
    """``label_values(metric, label)`` is Grafana's, not PromQL: its metric."""
    match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query)
    return match.group(1) if match else query


def served_names(metrics_text: str) -> set[str]:
    """Every series name /metrics serves, including a labelled family with no series yet."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        names |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
        names |= {sample.name for sample in family.samples}
    return names


def app_on(homeserver: TestHomeserver, store: Path) -> AppService:
    """An AppService as the daemon builds it, listening where ``homeserver`` pushes."""
    return AppService(
        Config(
            homeserver=HomeserverConfig(url=homeserver.url),
            appservice=AppServiceConfig(
                registration=str(homeserver.registration_path),
                store=f"sqlite:///{store}",
                port=homeserver.appservice_port,
            ),
        )
    )


@pytest.fixture
async def metrics_text(synapse: TestHomeserver, tmp_path: Path) -> AsyncIterator[str]:
    async with (
        app_on(synapse, tmp_path / "bridge.db"),
        aiohttp.ClientSession() as http,
        http.get(f"{synapse.appservice_url}/metrics") as response,
    ):
        assert response.status == 200
        yield await response.text()


def test_promql_metric_names_finds_the_selected_metrics_only() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, event_type) (rate(a_bucket{instance=~"x"}'
        "[$__rate_interval]))) / sum(rate(b_total[5m])) and on (job) c offset 5m"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c"}


async def test_every_metric_the_dashboard_queries_is_served(metrics_text: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [label_values_metric(query) for query in dashboard_queries(dashboard)]
    used = set().union(*(promql_metric_names(query) for query in queries))
    served = served_names(metrics_text)
    assert used - served == set()
    # and the other way round: no metric family is left off the dashboard (the
    # _created series are prometheus_client's creation timestamps, not metrics)
    families = {
        f.name
        for f in text_string_to_metric_families(metrics_text)
        if not f.name.endswith("_created")
    }
    unused = {f for f in families if not any(name.startswith(f) for name in used)}
    assert unused == set()
