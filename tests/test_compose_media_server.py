"""docker-compose.yml's media server, run with the system's nginx as the official image runs it.

The image's master runs as root and its workers as an unprivileged user (`user nginx;` in the
image's nginx.conf); Docker creates a named volume as a root-owned folder. Here the workers
run as `nobody`, the volume is a root-owned folder under a temporary folder, and the server
block is the compose file's own `configs.media_server.content` with its port, paths and
network moved onto this machine: the stack's subnet becomes 127.0.0.0/24 (same offsets, so
its gateway is 127.0.0.1), and requests leave from the address they would have in the stack.
"""
import grp
import http.client
import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from resto_celery.testing._support import free_port
from resto_celery.testing.nginx import NginxMediaServer

pytestmark = pytest.mark.nginx

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())

IMAGE_WORKER = "nginx"  # the official image's worker user and group
WORKER = pwd.getpwnam("nobody")  # ours: any account that is not root
WORKER_GROUP = grp.getgrgid(WORKER.pw_gid).gr_name

[_NETWORK] = COMPOSE["networks"]["default"]["ipam"]["config"]
STACK_SUBNET = ipaddress.ip_network(_NETWORK["subnet"])
LOCAL_SUBNET = ipaddress.ip_network(f"127.0.0.0/{STACK_SUBNET.prefixlen}")


def local(address):
    """The loopback address standing for a stack address: the same offset in LOCAL_SUBNET."""
    offset = int(ipaddress.ip_address(address)) - int(STACK_SUBNET.network_address)
    return str(LOCAL_SUBNET.network_address + offset)


GATEWAY = local(_NETWORK["gateway"])  # the host, through the published ports
APP = local(STACK_SUBNET.network_address + 2)  # a container of the stack (web, worker)
OUTSIDER = str(LOCAL_SUBNET.broadcast_address + 2)  # an address off the stack's network


def media_server_config(name, *, port, root):
    """The compose file's media server block for service `name`, moved onto this machine."""
    content = COMPOSE["configs"]["media_server"]["content"]
    service = COMPOSE["services"][name]
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{port};",
        f"allow {STACK_SUBNET};": f"allow {LOCAL_SUBNET};",
        f"deny {_NETWORK['gateway']};": f"deny {GATEWAY};",
    }
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):  # a file of this repository, as the include
            replacements[f"include {target};"] = f'include "{ROOT / source}";'
        else:  # the named volume, as the served folder
            replacements[f"alias {target}/;"] = f'alias "{root}/";'
    for old, new in replacements.items():
        assert content.count(old) == 1, old
        content = content.replace(old, new)
    return content


def apply_ownership_step(folder, volume):
    """Run the compose file's ownership step on the folder standing for `volume`, with the
    image's worker user replaced by ours."""
    init = COMPOSE["services"]["media-init"]
    program, owner, *targets = init["entrypoint"]
    mounts = dict(mount.split(":")[:2] for mount in init["volumes"])
    assert mounts[volume] in targets
    assert owner == f"{IMAGE_WORKER}:{IMAGE_WORKER}"
    subprocess.run([program, f"{WORKER.pw_name}:{WORKER_GROUP}", str(folder)], check=True)


@pytest.fixture
def base():
    """A temporary folder the workers can search (pytest's tmp_path is root's alone, 0700)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the nginx master runs as root and its workers as nobody")
    path = Path(tempfile.mkdtemp(prefix="resto-compose-media-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def volume(base):
    """The media-1 volume as Docker creates it: an empty folder owned by root, mode 0755."""
    folder = base / "media-1"
    folder.mkdir()
    os.chown(folder, 0, 0)
    folder.chmod(0o755)
    return folder


@pytest.fixture
def start_server(base, volume):
    servers = []

    def start():
        port = free_port()
        server = NginxMediaServer(
            volume, port=port, workdir=base / "nginx", user=f"{WORKER.pw_name} {WORKER_GROUP}",
            server_config=media_server_config("media-1", port=port, root=volume),
        ).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server, volume):
    """The media server after the stack's ownership step."""
    apply_ownership_step(volume, "media-1")
    return start_server()


def request(server, method, path, body=None, source=APP):
    """(status, body) of one request to the media location, sent from address `source`."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5, source_address=(source, 0))
    try:
        connection.request(method, server.prefix + path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_workers_run_as_the_unprivileged_user(server):
    workers = subprocess.run(
        ["ps", "-o", "user=", "--ppid", str(server.pid)], capture_output=True, text=True, check=True,
    ).stdout.split()
    assert workers and set(workers) == {WORKER.pw_name}


def test_on_a_root_owned_volume_every_put_fails_with_500(start_server, volume):
    """The bug: without the ownership step the workers cannot write into the volume."""
    server = start_server()
    assert request(server, "PUT", "a.txt", b"hello")[0] == 500
    assert request(server, "PUT", "folder/b.txt", b"hello")[0] == 500
    assert server.files() == {}
    assert "Permission denied" in server.error_log.read_text()


def test_the_ownership_step_gives_the_volume_to_the_worker_user(server, volume):
    assert (volume.stat().st_uid, volume.stat().st_gid) == (WORKER.pw_uid, WORKER.pw_gid)


def test_put_creates_a_file_with_201_and_replaces_it_with_204(server):
    assert request(server, "PUT", "a.txt", b"old")[0] == 201
    assert request(server, "PUT", "a.txt", b"new")[0] == 204
    assert server.files() == {"a.txt": b"new"}


def test_put_creates_missing_folders(server):
    assert request(server, "PUT", "a/b/c.txt", b"deep")[0] == 201
    assert server.files() == {"a/b/c.txt": b"deep"}


def test_get_serves_a_written_file(server):
    request(server, "PUT", "photo.jpg", b"\xff\xd8 bytes")
    assert request(server, "GET", "photo.jpg") == (200, b"\xff\xd8 bytes")


def test_delete_removes_a_file_with_204_then_answers_404(server):
    request(server, "PUT", "gone.txt", b"x")
    assert request(server, "DELETE", "gone.txt")[0] == 204
    assert server.files() == {}
    assert request(server, "DELETE", "gone.txt")[0] == 404


def test_the_host_through_the_gateway_reads_but_cannot_write(server):
    request(server, "PUT", "a.txt", b"by the app")
    assert request(server, "GET", "a.txt", source=GATEWAY) == (200, b"by the app")
    assert request(server, "PUT", "a.txt", b"by the host", source=GATEWAY)[0] == 403
    assert request(server, "DELETE", "a.txt", source=GATEWAY)[0] == 403
    assert server.files() == {"a.txt": b"by the app"}


def test_addresses_off_the_stack_network_read_but_cannot_write(server):
    request(server, "PUT", "a.txt", b"by the app")
    assert request(server, "GET", "a.txt", source=OUTSIDER) == (200, b"by the app")
    assert request(server, "PUT", "b.txt", b"x", source=OUTSIDER)[0] == 403
    assert request(server, "DELETE", "a.txt", source=OUTSIDER)[0] == 403
    assert server.files() == {"a.txt": b"by the app"}


def test_the_healthcheck_location_answers_204(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 204
    finally:
        connection.close()
