"""Settings: globals, per-storage OPTIONS, host entries, and the system checks."""
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from resto_celery import conf
from resto_celery.checks import check_settings
from resto_celery.storage import DistributedStorage, HybridStorage


def test_defaults_keep_django_resto_meaning():
    options = conf.resolve()
    assert options.hosts == ()
    assert options.timeout == 2
    assert options.fatal_exceptions is True
    assert options.show_traceback is False


@override_settings(RESTO_MEDIA_HOSTS=["m1:8080"], RESTO_TIMEOUT=5, RESTO_FATAL_EXCEPTIONS=False)
def test_global_settings_are_read_when_the_storage_is_constructed():
    storage = HybridStorage()
    assert storage.hosts == ["m1:8080"]
    assert storage.options.timeout == 5
    assert storage.options.fatal_exceptions is False


@override_settings(RESTO_MEDIA_HOSTS=["m1:8080"], RESTO_TIMEOUT=5)
def test_storage_options_override_global_settings():
    storage = HybridStorage(hosts=["m2"], timeout=0.5, show_traceback=True)
    assert storage.hosts == ["m2"]
    assert storage.options.timeout == 0.5
    assert storage.options.show_traceback is True


def test_unknown_storage_option_is_named_in_the_error():
    with pytest.raises(ImproperlyConfigured, match="'hostz'"):
        HybridStorage(hostz=["m1"])


def test_filesystem_options_pass_through_to_the_master(tmp_path):
    storage = HybridStorage(location=str(tmp_path), base_url="/files/", file_permissions_mode=0o640)
    assert storage.location == str(tmp_path)
    assert storage.url("a.txt") == "/files/a.txt"


@override_settings(MEDIA_URL="/media/")
def test_host_port_entry_takes_scheme_and_path_from_media_url():
    host = conf.parse_host("media-1:8080", media_url="https://cdn.example.com/uploads/")
    assert host.name == "media-1:8080"
    assert host.base_url == "https://media-1:8080/uploads/"


def test_host_port_entry_with_relative_media_url_is_http():
    assert conf.parse_host("media-1", media_url="/media/").base_url == "http://media-1/media/"


def test_full_url_entry_keeps_its_own_scheme_port_and_path():
    host = conf.parse_host("https://media-2.internal:8443/files", media_url="/media/")
    assert host.base_url == "https://media-2.internal:8443/files/"
    assert host.name == "https://media-2.internal:8443/files/"


def test_credentials_in_a_url_become_basic_auth_and_leave_the_url():
    host = conf.parse_host("https://user:p%40ss@media-2:8443/media/")
    assert host.auth == ("user", "p@ss")
    assert "p%40ss" not in host.base_url and "user" not in host.base_url
    assert "p@ss" not in repr(host) and "p%40ss" not in host.name


def test_dict_entry_gives_name_auth_headers_and_ca_bundle():
    host = conf.parse_host(
        {
            "url": "https://media-3/media/",
            "name": "media-3",
            "headers": {"Authorization": "Bearer s3cret"},
            "ca_bundle": "/etc/ssl/internal.pem",
        }
    )
    assert host.name == "media-3"
    assert host.headers == {"Authorization": "Bearer s3cret"}
    assert host.ca_bundle == "/etc/ssl/internal.pem"
    assert "s3cret" not in repr(host)


@pytest.mark.parametrize(
    "entry, message",
    [
        ("ftp://media/", "http or https"),
        ("media-1/media", "host\\[:port\\]"),
        ("media-1:http", "invalid port"),
        ({"name": "x"}, "'url'"),
        ({"url": "m1", "token": "x"}, "'token'"),
        ({"url": "m1", "auth": "user:pass"}, "\\(user, password\\) pair"),
        (42, "string or a dict"),
    ],
)
def test_bad_host_entries_are_refused_with_a_clear_error(entry, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        conf.parse_host(entry)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("timeout", 0, "positive number"),
        ("timeout", "2", "positive number"),
        ("fatal_exceptions", "yes", "True or False"),
        ("hosts", "media-1:8080", "list of host entries"),
        ("hosts", ["m1", "m1"], "more than once"),
    ],
)
def test_bad_option_values_name_the_setting(option, value, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        conf.resolve({option: value})


def test_distributed_storage_needs_hosts():
    with pytest.raises(ImproperlyConfigured, match="at least one media host"):
        DistributedStorage(hosts=[])


def test_storages_are_deconstructible_for_migrations():
    path, _, kwargs = HybridStorage(hosts=["m1"], timeout=3).deconstruct()
    assert path == "resto_celery.storage.HybridStorage"
    assert kwargs == {"hosts": ["m1"], "timeout": 3}
    path, _, kwargs = DistributedStorage(hosts=["m1"]).deconstruct()
    assert path == "resto_celery.storage.DistributedStorage"


def _check_ids(**settings):
    with override_settings(**settings):
        return [message.id for message in check_settings()]


def test_check_reports_bad_global_settings():
    assert "resto_celery.E001" in _check_ids(RESTO_TIMEOUT=-1)


def test_check_reports_bad_storage_options():
    storages = {
        "default": {"BACKEND": "resto_celery.storage.HybridStorage", "OPTIONS": {"hots": ["m1"]}},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    assert _check_ids(STORAGES=storages) == ["resto_celery.E002"]


def test_check_warns_when_a_replicated_storage_has_no_hosts():
    storages = {"default": {"BACKEND": "resto_celery.storage.HybridStorage"}}
    assert _check_ids(STORAGES=storages, RESTO_MEDIA_HOSTS=[]) == ["resto_celery.W001"]


def test_check_warns_about_credentials_over_plain_http():
    assert "resto_celery.W002" in _check_ids(RESTO_MEDIA_HOSTS=["http://u:p@media-1/media/"])


def test_check_reports_a_missing_ca_bundle():
    assert "resto_celery.E003" in _check_ids(
        RESTO_MEDIA_HOSTS=["https://media-1/media/"], RESTO_CA_BUNDLE="/nonexistent/ca.pem"
    )


def test_valid_configuration_passes_the_checks():
    storages = {"default": {"BACKEND": "resto_celery.storage.HybridStorage", "OPTIONS": {"hosts": ["m1:80"]}}}
    assert _check_ids(STORAGES=storages) == []


def test_check_refuses_two_async_storages_sharing_a_host_name_with_different_masters(tmp_path):
    def async_storage(location):
        options = {"hosts": ["m1:80"], "location": str(location)}
        return {"BACKEND": "resto_celery.storage.AsyncStorage", "OPTIONS": options}

    storages = {"default": async_storage(tmp_path / "a"), "other": async_storage(tmp_path / "b")}
    assert _check_ids(STORAGES=storages, RESTO_REDIS_URL="redis://127.0.0.1:1/0") == ["resto_celery.E004"]


def test_check_asks_for_a_redis_url_when_the_broker_is_not_redis():
    storages = {"default": {"BACKEND": "resto_celery.storage.AsyncStorage", "OPTIONS": {"hosts": ["m1:80"]}}}
    ids = _check_ids(STORAGES=storages, CELERY_BROKER_URL="amqp://guest@127.0.0.1//", RESTO_REDIS_URL=None)
    assert ids == ["resto_celery.E005"]
    redis_url = "redis://127.0.0.1:6379/0"
    assert _check_ids(STORAGES=storages, CELERY_BROKER_URL="amqp://guest@127.0.0.1//", RESTO_REDIS_URL=redis_url) == []


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("lease_ttl", 1, "must be longer than"),
        ("max_retries", -1, "whole number"),
        ("redis_url", "http://x", "redis:// URL"),
        ("queue", "", "queue name"),
        ("bulk_queue", "", "queue name"),
        ("bulk_queue", {"m1": 3}, "queue name"),
    ],
)
def test_bad_async_options_are_refused(option, value, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        conf.resolve({option: value})


def test_a_timeout_longer_than_the_lease_ttl_is_allowed_for_storages_without_leases():
    options = conf.resolve({"timeout": 60}, leases=False)
    assert (options.timeout, options.lease_ttl) == (60, 60)


def test_a_storage_with_leases_needs_a_lease_ttl_longer_than_its_timeout():
    with pytest.raises(ImproperlyConfigured, match=r"RESTO_LEASE_TTL .* must be longer than RESTO_TIMEOUT"):
        conf.resolve({"timeout": 60})


def test_check_accepts_a_global_timeout_longer_than_the_lease_ttl():
    assert _check_ids(RESTO_TIMEOUT=60) == []


@pytest.mark.parametrize("where", ["RESTO_TIMEOUT", "OPTIONS"])
def test_check_reports_an_async_storage_whose_lease_ttl_does_not_outlive_its_timeout(where):
    options = {"hosts": ["m1:80"], **({"timeout": 60} if where == "OPTIONS" else {})}
    storages = {"default": {"BACKEND": "resto_celery.storage.AsyncStorage", "OPTIONS": options}}
    with override_settings(STORAGES=storages, RESTO_TIMEOUT=60 if where == "RESTO_TIMEOUT" else 2,
                           RESTO_REDIS_URL="redis://127.0.0.1:1/0"):
        messages = check_settings()
    assert [(m.id, "must be longer than" in m.msg) for m in messages] == [("resto_celery.E002", True)]


def test_bulk_work_shares_the_live_queue_unless_it_has_a_queue_of_its_own():
    assert conf.resolve({"queue": "resto-{host}"}).bulk_queue_for("m1") == "resto-m1"
    assert conf.resolve({"bulk_queue": "bulk-{host}"}).bulk_queue_for("m1") == "bulk-m1"
    options = conf.resolve({"queue": "live", "bulk_queue": {"m1": "slow"}})
    assert (options.bulk_queue_for("m1"), options.bulk_queue_for("m2")) == ("slow", "live")


def test_queue_may_name_one_queue_per_host():
    assert conf.resolve({"queue": "resto-{host}"}).queue_for("m1") == "resto-m1"
    options = conf.resolve({"queue": {"m1": "fast"}})
    assert options.queue_for("m1") == "fast" and options.queue_for("m2") == "resto"


# Kinds of host: WebDAV and Tahoe-LAFS

WRITE_CAP = "URI:DIR2:abcdefghijklmnopqrstuvwxyz:0123456789abcdefghijklmnopqrstuvwxyz0123456789abcd"
READ_CAP = "URI:DIR2-RO:zyxwvutsrqponmlkjihgfedcba:0123456789abcdefghijklmnopqrstuvwxyz0123456789abcd"


def test_a_ca_bundle_in_a_host_entry_must_be_a_path():
    with pytest.raises(ImproperlyConfigured, match="'ca_bundle' of media host https://m1/media/ must be a path"):
        conf.parse_host({"url": "https://m1/media/", "ca_bundle": True})


def test_a_url_holding_a_tahoe_write_cap_is_refused():
    with pytest.raises(ImproperlyConfigured, match="holds a Tahoe-LAFS write cap") as raised:
        conf.parse_host({"url": f"http://n:3456/uri/{WRITE_CAP}/", "kind": "tahoe", "dircap": WRITE_CAP})
    assert "abcdefghijklmnop" not in str(raised.value)


def test_a_url_whose_password_is_not_percent_encoded_is_refused():
    with pytest.raises(ImproperlyConfigured, match="not percent-encoded: write '/', '\\?' and '#' in it as %2F"):
        conf.parse_host("https://user:pa/ss@media-1/media/")


def test_a_host_entry_is_plain_http_unless_its_kind_says_otherwise():
    assert conf.parse_host("m1:8080").kind == "http"
    assert conf.parse_host({"url": "http://dav:8080/media/", "kind": "webdav"}).kind == "webdav"


def test_a_tahoe_entry_names_the_node_and_keeps_the_write_cap_out_of_its_repr():
    host = conf.parse_host({"url": "http://127.0.0.1:3456", "kind": "tahoe", "dircap": WRITE_CAP})
    assert (host.kind, host.name, host.base_url) == ("tahoe", "http://127.0.0.1:3456/", "http://127.0.0.1:3456/")
    assert host.dircap == WRITE_CAP
    assert "DIR2:" not in repr(host)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"url": "http://n:3456/", "kind": "tahoe"}, "needs 'dircap', a read-write directory cap"),
        ({"url": "http://n:3456/", "kind": "tahoe", "dircap": READ_CAP}, "the one given is a read-only cap"),
        ({"url": "http://n:3456/", "kind": "tahoe", "dircap": WRITE_CAP, "readcap": WRITE_CAP}, "'readcap'"),
        (
            {"url": "http://n:3456/", "kind": "tahoe", "dircap": WRITE_CAP, "auth": ("u", "p")},
            "the cap is the credential",
        ),
        ({"url": "http://n:3456/", "kind": "ftp"}, "must be one of 'http', 'webdav', 'tahoe'"),
        ({"url": "http://n:8080/media/", "dircap": WRITE_CAP}, "only apply to kind 'tahoe'"),
    ],
)
def test_bad_tahoe_and_kind_entries_are_refused_without_echoing_a_cap(entry, message):
    with pytest.raises(ImproperlyConfigured, match=message) as raised:
        conf.parse_host(entry)
    assert "abcdefghijklmnop" not in str(raised.value) and "zyxwvuts" not in str(raised.value)


@pytest.mark.parametrize("backend", ["HybridStorage", "DistributedStorage"])
def test_a_storage_without_leases_accepts_a_timeout_longer_than_the_lease_ttl(backend):
    storages = {"default": {"BACKEND": f"resto_celery.storage.{backend}", "OPTIONS": {"hosts": ["m1:80"]}}}
    assert _check_ids(STORAGES=storages, RESTO_TIMEOUT=60) == []


@pytest.mark.parametrize("option", ["queue", "redis_url", "lease_ttl", "publish", "master_url"])
def test_a_synchronous_backend_refuses_an_option_only_async_storage_uses(option):
    value = {"queue": "q", "redis_url": "redis://127.0.0.1:6379/0", "lease_ttl": 60, "publish": "inline",
             "master_url": "/m/"}[option]
    for backend in (HybridStorage, DistributedStorage):
        with pytest.raises(ImproperlyConfigured, match=f"'{option}'.* only apply to AsyncStorage"):
            backend(hosts=["http://127.0.0.1:1/"], **{option: value})


def test_async_storage_takes_its_own_options():
    from resto_celery.storage import AsyncStorage

    storage = AsyncStorage(hosts=["http://127.0.0.1:1/"], queue="q", publish="inline")
    assert (storage.options.queue, storage.options.publish) == ("q", "inline")
