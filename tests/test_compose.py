"""docker-compose.yml, validated as data (no Docker engine runs here): services, mounts, commands.

tests/test_compose_media_server.py runs its media server configuration with a real nginx.
"""
import ipaddress
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

LONG_RUNNING = ("redis", "postgres", "media-1", "media-2", "web", "worker", "beat")
ONE_SHOT = ("media-init", "migrate")
APP = ("web", "worker", "beat")
MEDIA_SERVERS = ("media-1", "media-2")

# The address pools a Docker daemon picks networks from unless told otherwise.
DOCKER_DEFAULT_POOLS = [ipaddress.ip_network(f"172.{n}.0.0/16") for n in range(17, 32)] + [
    ipaddress.ip_network("192.168.0.0/16")
]


def write_rules(compose):
    """The media servers' access rules for methods other than GET: [("deny", "10.0.0.1"), ...]."""
    content = compose["configs"]["media_server"]["content"]
    [block] = re.findall(r"limit_except GET \{(.*?)\}", content, re.S)
    lines = (line.split("#")[0].strip() for line in block.splitlines())
    return [tuple(line.rstrip(";").split()) for line in lines if line]


def network(compose):
    """The (subnet, gateway) declared for the stack's default network."""
    [config] = compose["networks"]["default"]["ipam"]["config"]
    return ipaddress.ip_network(config["subnet"]), ipaddress.ip_address(config["gateway"])


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_stack_has_every_service(compose):
    assert set(compose["services"]) == set(LONG_RUNNING) | set(ONE_SHOT)


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
    for name in ("migrate", "web"):
        assert compose["services"][name]["command"][:2] == ["python", "manage.py"]
    assert (example / "manage.py").is_file()
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


# Start-up order and health ---------------------------------------------------------------


def test_postgres_is_healthy_once_pg_isready_answers_over_tcp(compose):
    """Over TCP: the image's first-start initialisation server listens on the Unix socket only."""
    test = compose["services"]["postgres"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "pg_isready"
    assert test[test.index("-h") + 1] == "127.0.0.1"
    assert test[test.index("-d") + 1] == compose["services"]["postgres"]["environment"]["POSTGRES_DB"]


def test_redis_is_healthy_once_it_answers_pong(compose):
    """redis-cli exits 0 on an error reply too (LOADING), so the check reads the answer."""
    test = compose["services"]["redis"]["healthcheck"]["test"]
    assert test == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]


def test_media_servers_are_healthy_once_they_answer_their_health_location(compose):
    content = compose["configs"]["media_server"]["content"]
    assert "location = /healthz {" in content
    for name in MEDIA_SERVERS:
        test = compose["services"][name]["healthcheck"]["test"]
        assert test[:2] == ["CMD", "curl"] and "-f" in test[2]
        assert test[-1] == "http://127.0.0.1/healthz"


def test_migrations_run_once_in_a_one_shot_service_after_postgres_is_healthy(compose):
    migrate = compose["services"]["migrate"]
    assert migrate["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert migrate["build"] == compose["services"]["web"]["build"]
    assert migrate["environment"] == compose["services"]["web"]["environment"]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}


def test_only_the_migrate_service_migrates(compose):
    for name in APP:
        assert "migrate" not in " ".join(compose["services"][name]["command"]), name


def test_the_app_starts_after_migrate_succeeded_and_postgres_and_redis_are_healthy(compose):
    for name in APP:
        conditions = {
            service: rule["condition"] for service, rule in compose["services"][name]["depends_on"].items()
        }
        assert conditions["migrate"] == "service_completed_successfully"
        assert conditions["postgres"] == conditions["redis"] == "service_healthy"


def test_the_app_does_not_wait_for_the_media_servers_to_be_healthy(compose):
    """Replication rides out media host outages (retries, reconcile): started is enough."""
    for name in APP:
        depends_on = compose["services"][name]["depends_on"]
        assert {depends_on[host]["condition"] for host in MEDIA_SERVERS} == {"service_started"}


def test_long_running_services_restart_unless_stopped(compose):
    for name in LONG_RUNNING:
        assert compose["services"][name]["restart"] == "unless-stopped", name


def test_one_shot_services_are_never_restarted(compose):
    for name in ONE_SHOT:
        assert compose["services"][name].get("restart", "no") == "no", name


def test_every_service_waited_for_as_healthy_has_a_healthcheck(compose):
    for service in compose["services"].values():
        for name, rule in service.get("depends_on", {}).items():
            if rule["condition"] == "service_healthy":
                assert compose["services"][name]["healthcheck"]["test"], name


# Media volumes ---------------------------------------------------------------------------


def test_media_volumes_are_given_to_the_nginx_worker_user_before_the_media_servers_start(compose):
    """The official nginx image runs its workers as `nginx`; Docker creates volumes root-owned."""
    init = compose["services"]["media-init"]
    assert init["entrypoint"][:2] == ["chown", "nginx:nginx"]
    mounts = dict(volume.split(":") for volume in init["volumes"])
    assert sorted(init["entrypoint"][2:]) == sorted(mounts[name] for name in MEDIA_SERVERS)
    for name in MEDIA_SERVERS:
        server = compose["services"][name]
        assert server["image"] == init["image"]  # the same image, so the same `nginx` user
        assert f"{name}:/srv/media" in server["volumes"]
        assert server["depends_on"]["media-init"] == {"condition": "service_completed_successfully"}


def test_the_ownership_step_runs_as_root(compose):
    assert compose["services"]["media-init"]["user"] == "root"


def test_media_servers_serve_the_volume_folder(compose):
    assert "alias /srv/media/;" in compose["configs"]["media_server"]["content"]


# Write access ----------------------------------------------------------------------------


def test_the_stack_network_declares_a_subnet_outside_dockers_default_pools(compose):
    subnet, gateway = network(compose)
    assert gateway in subnet
    for pool in DOCKER_DEFAULT_POOLS:
        assert not subnet.overlaps(pool), pool


def test_every_service_is_on_the_declared_network_or_on_none(compose):
    for name, service in compose["services"].items():
        assert "networks" not in service, name  # so the default network, the declared one
        assert service.get("network_mode", "none") == "none", name


def test_media_servers_accept_writes_from_exactly_the_declared_subnet(compose):
    subnet, _ = network(compose)
    rules = write_rules(compose)
    assert [address for action, address in rules if action == "allow"] == [str(subnet)]
    assert rules[-1] == ("deny", "all")


def test_the_host_cannot_write_through_the_network_gateway(compose):
    """Published ports reach the media servers from the gateway: it may read, not write."""
    subnet, gateway = network(compose)
    rules = write_rules(compose)
    assert rules.index(("deny", str(gateway))) < rules.index(("allow", str(subnet)))
