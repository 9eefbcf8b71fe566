"""docker-compose.yml, validated as data (no Docker engine runs here): services, mounts, commands."""
import json
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_stack_has_every_service(compose):
    assert set(compose["services"]) == {"redis", "postgres", "media-1", "media-2", "web", "worker", "beat"}


def test_media_servers_use_the_nginx_config_the_tests_use(compose):
    for name in ("media-1", "media-2"):
        mounts = [volume.split(":") for volume in compose["services"][name]["volumes"]]
        [(source, target, mode)] = [m for m in mounts if m[0].startswith("./")]
        assert source == "./resto_celery/testing/nginx_media.conf" and (ROOT / source).is_file()
        assert mode == "ro"
        assert f"include {target};" in compose["configs"]["media_server"]["content"]


def test_every_named_volume_is_declared(compose):
    declared = set(compose["volumes"])
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("./", "/")):
                assert source in declared, source


def test_the_app_services_share_the_master_copy_and_build_the_example_image(compose):
    for name in ("web", "worker", "beat"):
        service = compose["services"][name]
        assert "master:/srv/var" in service["volumes"]
        assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_the_app_replicates_to_the_compose_media_servers(compose):
    env = compose["services"]["worker"]["environment"]
    hosts = json.loads(env["RESTO_DEMO_HOSTS"])
    assert [host.split("/")[2] for host in hosts] == ["media-1", "media-2"]
    assert env["RESTO_DEMO_REDIS_URL"].startswith("redis://redis:")
    assert env["RESTO_DEMO_POSTGRES_HOST"] == "postgres"


def test_the_commands_exist(compose):
    """Each app command names a real entry point: manage.py, or the example's Celery app."""
    example = ROOT / "example"
    web = " ".join(compose["services"]["web"]["command"])
    assert "python manage.py migrate" in web and (example / "manage.py").is_file()
    for name in ("worker", "beat"):
        command = compose["services"][name]["command"]
        assert command[:3] == ["celery", "-A", "demo_site"] and command[3] == name
        assert (example / "demo_site" / "celery.py").is_file()
    worker = compose["services"]["worker"]["command"]
    assert worker[worker.index("-Q") + 1] == "resto"


def test_the_dockerfile_installs_the_package_and_the_example(compose):
    dockerfile = (ROOT / "example" / "Dockerfile").read_text()
    sources = [src for line in dockerfile.splitlines() if line.startswith("COPY") for src in shlex.split(line)[1:-1]]
    assert "resto_celery" in sources and "example" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
