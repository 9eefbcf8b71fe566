"""Settings: the global ``RESTO_*`` settings, per-storage ``OPTIONS`` and media host entries.

Every option has a global setting (``RESTO_MEDIA_HOSTS``...) and a lower-case name that
``STORAGES[alias]["OPTIONS"]`` may use instead (``hosts``...). Settings are read when a
storage is constructed, never at import time, so ``override_settings`` works in tests.
"""
import numbers
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils.functional import Promise

from .storage_host import build_storage
from .tahoe import WRITE_CAP, redact as redact_write_caps

#: option name -> (global setting, default). The documentation of each is in the README.
SETTINGS = {
    "hosts": ("RESTO_MEDIA_HOSTS", ()),
    "timeout": ("RESTO_TIMEOUT", 2),
    "fatal_exceptions": ("RESTO_FATAL_EXCEPTIONS", True),
    "show_traceback": ("RESTO_SHOW_TRACEBACK", False),
    "ca_bundle": ("RESTO_CA_BUNDLE", None),
    # AsyncStorage: the Celery protocol.
    "redis_url": ("RESTO_REDIS_URL", None),
    "queue": ("RESTO_QUEUE", "resto"),
    # Bulk work (reconcile, resync --via-queue, the dashboard's actions, a returning host's
    # backlog): None shares the queue of live changes, behind them (resto_celery.lanes); a
    # queue of its own lets a worker of its own, at a lower CPU priority, take it.
    "bulk_queue": ("RESTO_BULK_QUEUE", None),
    "max_retries": ("RESTO_MAX_RETRIES", 6),
    "retry_backoff": ("RESTO_RETRY_BACKOFF", 2),
    "retry_backoff_max": ("RESTO_RETRY_BACKOFF_MAX", 300),
    "lease_ttl": ("RESTO_LEASE_TTL", 60),
    "breaker_threshold": ("RESTO_BREAKER_THRESHOLD", 5),
    "breaker_cooldown": ("RESTO_BREAKER_COOLDOWN", 30),
    "failed_retry_after": ("RESTO_FAILED_RETRY_AFTER", 300),
    # The deletion brake: one reconcile or resync pass deletes at most this share of a host's files.
    "max_delete_share": ("RESTO_MAX_DELETE_SHARE", 0.1),
    # Read-your-writes: url() of a file not yet on every host points here (the master copy).
    "master_url": ("RESTO_MASTER_URL", None),
    # How save()/delete() send their change: "background" (the process's publisher thread,
    # the request does not wait for the broker) or "inline" (before save() returns).
    "publish": ("RESTO_PUBLISH", "background"),
}

PUBLISH_MODES = ("background", "inline")

#: Options only AsyncStorage uses: the synchronous backends refuse them in their OPTIONS
#: (as global settings they are shared by every backend, so they are not refused there).
ASYNC_ONLY = (
    "redis_url", "queue", "bulk_queue", "max_retries", "retry_backoff", "retry_backoff_max", "lease_ttl",
    "breaker_threshold", "breaker_cooldown", "failed_retry_after", "master_url", "publish",
)

#: Options that are a number of seconds (> 0), and options that are a count (>= 0).
SECONDS = ("timeout", "retry_backoff", "retry_backoff_max", "lease_ttl", "breaker_cooldown", "failed_retry_after")
COUNTS = ("max_retries", "breaker_threshold")

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

HOST_ENTRY_KEYS = {
    "url", "name", "auth", "headers", "ca_bundle", "kind", "dircap", "readcap", "public_url",
    "storage", "alias", "options", "checksum",
}

#: Kinds of media host: plain HTTP PUT/DELETE (nginx's dav module), WebDAV (collections
#: made with MKCOL, listed with PROPFIND), a Tahoe-LAFS grid (its node's web API) and any
#: Django storage (an S3 bucket through django-storages...: :mod:`resto_celery.storage_host`).
HOST_KINDS = ("http", "webdav", "tahoe", "storage")
TAHOE_ONLY_KEYS = ("dircap", "readcap", "public_url")
#: The keys of a ``"storage"`` host entry; it has no URL, credentials or headers of its own
#: (the storage's options hold them).
STORAGE_ENTRY_KEYS = ("kind", "name", "storage", "alias", "options", "public_url", "checksum")
STORAGE_ONLY_KEYS = ("storage", "alias", "options", "checksum")
TAHOE_WRITE_CAPS = ("URI:DIR2:", "URI:DIR2-MDMF:")
TAHOE_READ_CAPS = ("URI:DIR2-RO:", "URI:DIR2-MDMF-RO:")


@dataclass(frozen=True)
class MediaHost:
    """One media server, as resolved from a host entry.

    ``name`` identifies the host in logs, task messages and ``Replica`` rows; ``base_url``
    is where files live (ends with ``/``; empty for a ``"storage"`` host). Neither ever
    contains credentials: those stay in ``auth``, ``headers`` and ``storage_options``, which
    are left out of ``repr()``.
    """

    name: str
    base_url: str
    auth: tuple | None = field(default=None, repr=False)
    headers: dict = field(default_factory=dict, repr=False, hash=False)
    ca_bundle: str | None = None
    #: ``"http"``, ``"webdav"`` or ``"tahoe"`` (then ``base_url`` is the node's web API).
    kind: str = "http"
    #: Tahoe: the read-write directory cap, a secret (never in ``repr()``, logs or messages).
    dircap: str | None = field(default=None, repr=False)
    #: Tahoe: the read-only cap of the same directory (asked of the node when not given).
    readcap: str | None = None
    #: Tahoe: the base URL of the gateway that serves downloads (default: ``base_url``).
    #: Storage: the base URL that ``url()`` hands out (the bucket's public URL or a CDN's).
    public_url: str | None = None
    #: Storage: the dotted path of the storage class, or (``alias``) a ``STORAGES`` alias.
    storage: str | None = None
    alias: str | None = None
    #: Storage: the class's options; they hold credentials (never in ``repr()``, logs or messages).
    storage_options: dict = field(default_factory=dict, repr=False, hash=False)
    #: Storage: send a checksum of the master's bytes with each upload, for the store to check.
    checksum: bool = True

    @property
    def scheme(self):
        return urlsplit(self.base_url).scheme


@dataclass(frozen=True)
class Options:
    """The resolved options of one storage."""

    hosts: tuple
    timeout: float
    fatal_exceptions: bool
    show_traceback: bool
    ca_bundle: str | None
    redis_url: str | None
    queue: object
    bulk_queue: object
    max_retries: int
    retry_backoff: float
    retry_backoff_max: float
    lease_ttl: float
    breaker_threshold: int
    breaker_cooldown: float
    failed_retry_after: float
    max_delete_share: float
    master_url: object
    publish: str

    def host(self, name):
        """Return the :class:`MediaHost` called ``name``, or raise ``KeyError``."""
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"No media host named {name!r}; configured: {[h.name for h in self.hosts]}")

    def queue_for(self, host, bulk=False):
        """The Celery queue for tasks of ``host``: ``queue`` is a name (``{host}`` in it is
        replaced by the host's name) or a dict from host names to queues (default ``resto``).
        With ``bulk``, the queue of its bulk work (:meth:`bulk_queue_for`)."""
        if bulk:
            return self.bulk_queue_for(host)
        if isinstance(self.queue, dict):
            return self.queue.get(host, SETTINGS["queue"][1])
        return self.queue.replace("{host}", host)

    def bulk_queue_for(self, host):
        """The Celery queue for the bulk work of ``host``: ``bulk_queue`` as ``queue`` is read
        (a name with ``{host}``, or a dict); when it is None, or a dict without the host, the
        host's :meth:`queue_for` (the bulk lane then rides behind the live one)."""
        if isinstance(self.bulk_queue, dict):
            return self.bulk_queue.get(host) or self.queue_for(host)
        if self.bulk_queue is None:
            return self.queue_for(host)
        return self.bulk_queue.replace("{host}", host)


def resolve(options=None, *, media_url=None, leases=True):
    """Resolve per-storage ``options`` over the global settings into :class:`Options`.

    ``leases`` says whether the storage takes leases (AsyncStorage): only then must
    ``lease_ttl`` outlive ``timeout`` (see :func:`check_leases`); the other backends refuse
    the options only AsyncStorage uses (:data:`ASYNC_ONLY`).
    Raises :class:`~django.core.exceptions.ImproperlyConfigured` naming the option at fault;
    no message ever shows a credential (see :func:`describe_entry`).
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(SETTINGS))
    if unknown:
        raise ImproperlyConfigured(
            f"Unknown resto_celery option(s) {', '.join(map(repr, unknown))}; "
            f"known options are {', '.join(sorted(SETTINGS))}."
        )
    unused = [key for key in ASYNC_ONLY if key in options]
    if unused and not leases:
        raise ImproperlyConfigured(
            f"Option(s) {', '.join(map(repr, unused))} only apply to AsyncStorage; this backend would ignore them."
        )
    values = {
        key: options[key] if key in options else getattr(settings, setting, default)
        for key, (setting, default) in SETTINGS.items()
    }
    for key in SECONDS:
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value <= 0:
            raise ImproperlyConfigured(f"{_label(key)} must be a positive number of seconds, not {value!r}.")
    for key in COUNTS:
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ImproperlyConfigured(f"{_label(key)} must be a whole number >= 0, not {value!r}.")
    if leases:
        check_leases(values["lease_ttl"], values["timeout"])
    master_url = values["master_url"]
    if master_url is not None and not (
        isinstance(master_url, Promise) or (isinstance(master_url, str) and master_url.endswith("/"))
    ):
        raise ImproperlyConfigured(f"{_label('master_url')} must be a URL ending with '/', or None.")
    share = values["max_delete_share"]
    if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0 <= share <= 1:
        raise ImproperlyConfigured(f"{_label('max_delete_share')} must be a share between 0 and 1, not {share!r}.")
    redis_url = values["redis_url"]
    if redis_url is not None and not (isinstance(redis_url, str) and redis_url.startswith(REDIS_SCHEMES)):
        raise ImproperlyConfigured(f"{_label('redis_url')} must be a redis:// URL, not {describe_entry(redis_url)}.")
    if not _queue_setting(values["queue"]):
        raise ImproperlyConfigured(f"{_label('queue')} must be a queue name or a dict of host names to queues.")
    if values["bulk_queue"] is not None and not _queue_setting(values["bulk_queue"]):
        raise ImproperlyConfigured(
            f"{_label('bulk_queue')} must be None (bulk work shares the live queue), a queue name or a dict of "
            f"host names to queues."
        )
    if values["publish"] not in PUBLISH_MODES:
        raise ImproperlyConfigured(
            f"{_label('publish')} must be one of {', '.join(map(repr, PUBLISH_MODES))}, not {values['publish']!r}."
        )
    for key in ("fatal_exceptions", "show_traceback"):
        if not isinstance(values[key], bool):
            raise ImproperlyConfigured(f"{_label(key)} must be True or False, not {values[key]!r}.")
    ca_bundle = values["ca_bundle"]
    if ca_bundle is not None and not isinstance(ca_bundle, str):
        raise ImproperlyConfigured(f"{_label('ca_bundle')} must be a path to a PEM file or None.")
    hosts = values["hosts"]
    if isinstance(hosts, (str, bytes, dict)) or not hasattr(hosts, "__iter__"):
        raise ImproperlyConfigured(f"{_label('hosts')} must be a list of host entries, not {describe_entry(hosts)}.")
    media_url = settings.MEDIA_URL if media_url is None else media_url
    parsed = tuple(parse_host(entry, media_url=media_url, ca_bundle=ca_bundle) for entry in hosts)
    names = [host.name for host in parsed]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ImproperlyConfigured(f"{_label('hosts')} lists {', '.join(duplicates)} more than once.")
    values["hosts"] = parsed
    for key in SECONDS:
        values[key] = float(values[key])
    return Options(**values)


def _public_url(entry, host):
    """The ``public_url`` of a host entry as a base URL (ending with ``/``), or None."""
    public_url = entry.get("public_url")
    if public_url is None:
        return None
    if not isinstance(public_url, str):
        raise ImproperlyConfigured(f"The 'public_url' of {host} must be a URL string.")
    try:
        return _parse_url_entry(public_url.strip(), None).base_url
    except ImproperlyConfigured as error:
        raise ImproperlyConfigured(f"The 'public_url' of {host}: {error}") from None


def _queue_setting(value):
    """Whether ``value`` is a queue name or a dict of host names to queue names."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items())
    return isinstance(value, str) and bool(value)


def check_leases(lease_ttl, timeout):
    """Raise :class:`ImproperlyConfigured` unless a lease outlives any request made under it.

    Only storages that take leases (AsyncStorage) need it: ``resolve(..., leases=True)``.
    """
    if lease_ttl <= timeout:
        raise ImproperlyConfigured(
            f"{_label('lease_ttl')} ({lease_ttl}s) must be longer than {_label('timeout')} "
            f"({timeout}s): a lease must outlive any request made under it."
        )


def parse_host(entry, *, media_url="/media/", ca_bundle=None):
    """Turn one host entry into a :class:`MediaHost`.

    An entry is ``"host[:port]"`` (scheme and path prefix taken from ``MEDIA_URL``, as in
    django-resto), a full base URL (``"https://media-2.internal:8443/media/"``; user and
    password in it become basic auth and are removed from the URL), or a dict with ``url``
    (either form) and optionally ``name``, ``auth`` (a ``(user, password)`` pair),
    ``headers`` (e.g. ``{"Authorization": "Bearer ..."}``), ``ca_bundle`` and ``kind``
    (``"http"``, the default, ``"webdav"`` or ``"tahoe"``). A Tahoe-LAFS host's ``url`` is
    its node's web API (``"http://127.0.0.1:3456/"``); it needs ``dircap``, the read-write
    directory cap the files go under, and may give ``readcap`` (its read-only cap) and
    ``public_url`` (the gateway that serves downloads, default ``url``).

    A ``"storage"`` host is any Django storage (:mod:`resto_celery.storage_host`): the entry
    gives ``storage``, the dotted path of its class, with ``options`` (keyword arguments,
    e.g. django-storages' S3Storage ``bucket_name``, ``endpoint_url``, ``access_key``...), or
    ``alias``, a ``STORAGES`` alias; ``name`` (required with ``storage``; default the alias),
    ``public_url`` (the base URL that ``url()`` hands out: the bucket's or a CDN's; default the
    storage's own ``url()``) and ``checksum`` (default True: each upload carries a checksum of
    the master's bytes that the store checks).

    A bad entry raises :class:`ImproperlyConfigured` naming it by :func:`describe_entry`,
    so the message never shows a password, header, cap or any other value that may be one.
    """
    if isinstance(entry, dict):
        return _parse_dict_entry(entry, media_url, ca_bundle)
    if not isinstance(entry, str) or not entry.strip():
        hint = ""
        if isinstance(entry, (tuple, list)):
            hint = " To give credentials, write a dict: {'url': ..., 'auth': (user, password)}."
        raise ImproperlyConfigured(f"A media host entry must be a string or a dict, not {describe_entry(entry)}.{hint}")
    entry = entry.strip()
    if "://" in entry:
        return _parse_url_entry(entry, ca_bundle)
    return _parse_hostport_entry(entry, media_url, ca_bundle)


#: The values of a dict host entry that :func:`describe_entry` shows (URLs redacted); it
#: shows the others by their key only.
SHOWN_ENTRY_KEYS = ("url", "name", "kind", "public_url", "ca_bundle", "storage", "alias")


def describe_entry(entry):
    """A label for a host entry (or any setting value) that is safe in messages and logs.

    A string is shown as a URL by :func:`describe_url` (user info, query and fragment
    replaced by ``***``, Tahoe-LAFS write caps hidden). A dict is shown by its keys, with
    the values of ``url``, ``name``, ``kind``, ``public_url`` and ``ca_bundle`` only
    (``{'url': 'https://***@media-1/media/', 'auth': ...}``). A list or tuple is shown by
    its type and length, a number, bool or None as itself, anything else by its type.
    """
    if isinstance(entry, str):
        return repr(describe_url(entry.strip()))
    if isinstance(entry, dict):
        items = []
        for key, value in entry.items():
            shown = describe_entry(value) if key in SHOWN_ENTRY_KEYS and isinstance(value, str) else "..."
            items.append(f"{describe_entry(key)}: {shown}")
        return "{" + ", ".join(items) + "}"
    if entry is None or isinstance(entry, (bool, numbers.Number)):
        return repr(entry)
    if isinstance(entry, (list, tuple, set, frozenset)):
        return f"a {type(entry).__name__} of {len(entry)} item(s)"
    return f"a {type(entry).__name__} object"


def describe_url(text):
    """``text`` (a URL or ``host[:port]``) with anything that may be a secret replaced.

    Everything up to the last ``@`` after the scheme (the user info, whatever characters the
    password holds) becomes ``***``, and so does a query string or fragment; Tahoe-LAFS
    write caps are hidden. ``"https://user:pw@media-1/media/"`` gives ``"https://***@media-1/media/"``.
    """
    scheme, sep, rest = text.partition("://")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        head = scheme + sep
    else:
        head, rest = "", text
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    for mark in "?#":
        if mark in rest:
            rest = rest.partition(mark)[0] + mark + "***"
    return redact_write_caps(head + rest)


def _parse_dict_entry(entry, media_url, ca_bundle):
    unknown = [key for key in entry if key not in HOST_ENTRY_KEYS]
    if unknown:
        raise ImproperlyConfigured(
            f"Media host entry {describe_entry(entry)} has unknown key(s) {', '.join(map(describe_entry, unknown))}; "
            f"known keys are {', '.join(sorted(HOST_ENTRY_KEYS))}."
        )
    if entry.get("kind") == "storage":
        return _parse_storage_entry(entry)
    misplaced = [key for key in STORAGE_ONLY_KEYS if key in entry]
    if misplaced:
        raise ImproperlyConfigured(
            f"Media host entry {describe_entry(entry)}: {', '.join(map(repr, misplaced))} only apply to kind 'storage'."
        )
    url = entry.get("url")
    kind = entry.get("kind", "http")
    if kind not in HOST_KINDS:
        where = describe_url(url.strip()) if isinstance(url, str) else describe_entry(entry)
        raise ImproperlyConfigured(
            f"The 'kind' of media host {where} must be one of {', '.join(map(repr, HOST_KINDS))}, "
            f"not {describe_entry(kind)}."
        )
    if not isinstance(url, str):
        raise ImproperlyConfigured(f"Media host entry {describe_entry(entry)} needs a 'url' string.")
    where = describe_url(url.strip())
    ca_bundle = entry.get("ca_bundle", ca_bundle)
    if ca_bundle is not None and not isinstance(ca_bundle, str):
        raise ImproperlyConfigured(f"The 'ca_bundle' of media host {where} must be a path to a PEM file or None.")
    if kind == "tahoe":
        return _parse_tahoe_entry(entry, ca_bundle)
    misplaced = [key for key in TAHOE_ONLY_KEYS if key in entry]
    if misplaced:
        raise ImproperlyConfigured(
            f"Media host {where}: {', '.join(map(repr, misplaced))} only apply to kind 'tahoe'."
        )
    host = parse_host(url, media_url=media_url, ca_bundle=ca_bundle)
    auth = entry.get("auth", host.auth)
    if auth is not None and not (
        isinstance(auth, (tuple, list)) and len(auth) == 2 and all(isinstance(p, str) for p in auth)
    ):
        raise ImproperlyConfigured(f"The 'auth' of media host {host.name} must be a (user, password) pair.")
    headers = entry.get("headers", {})
    if not isinstance(headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ImproperlyConfigured(f"The 'headers' of media host {host.name} must map strings to strings.")
    name = entry.get("name", host.name)
    if not isinstance(name, str) or not name:
        raise ImproperlyConfigured(f"The 'name' of media host {host.name} must be a non-empty string.")
    return MediaHost(
        name=name,
        base_url=host.base_url,
        auth=tuple(auth) if auth else None,
        headers=dict(headers),
        ca_bundle=host.ca_bundle,
        kind=kind,
    )


def _parse_tahoe_entry(entry, ca_bundle):
    """A Tahoe-LAFS host: the node's web API URL, a write cap (secret), optional read cap."""
    node = _parse_url_entry(entry["url"].strip(), ca_bundle)
    label = entry.get("name", node.name)
    if not isinstance(label, str) or not label:
        raise ImproperlyConfigured(f"The 'name' of media host {node.name} must be a non-empty string.")
    dircap = entry.get("dircap")
    if not isinstance(dircap, str) or not dircap.startswith(TAHOE_WRITE_CAPS):
        read_only = isinstance(dircap, str) and dircap.startswith(TAHOE_READ_CAPS)
        kind = "a read-only cap" if read_only else "missing or not a cap"
        # Never echo the value: it may be a secret pasted into the wrong key.
        raise ImproperlyConfigured(
            f"Tahoe-LAFS media host {label} needs 'dircap', a read-write directory cap "
            f"({' or '.join(c + '...' for c in TAHOE_WRITE_CAPS)}); the one given is {kind}."
        )
    if any(char in dircap for char in "/?#% "):
        raise ImproperlyConfigured(f"The 'dircap' of Tahoe-LAFS media host {label} is not a valid cap.")
    readcap = entry.get("readcap")
    if readcap is not None and not (isinstance(readcap, str) and readcap.startswith(TAHOE_READ_CAPS)):
        raise ImproperlyConfigured(
            f"The 'readcap' of Tahoe-LAFS media host {label} must be a read-only directory cap "
            f"({' or '.join(c + '...' for c in TAHOE_READ_CAPS)})."
        )
    public_url = _public_url(entry, f"Tahoe-LAFS media host {label}")
    if entry.get("headers") or entry.get("auth") or node.auth:
        raise ImproperlyConfigured(f"Tahoe-LAFS media host {label}: the cap is the credential; no auth or headers.")
    return MediaHost(
        name=label, base_url=node.base_url, ca_bundle=node.ca_bundle, kind="tahoe",
        dircap=dircap, readcap=readcap, public_url=public_url,
    )


def _parse_storage_entry(entry):
    """Any Django storage as a media host: a class and its options, or a ``STORAGES`` alias.

    The storage is built here once, so that a bad class, option or alias is reported by
    ``manage.py check`` (:func:`resto_celery.storage_host.build_storage`); its options are
    never shown (they hold the credentials).
    """
    shown = describe_entry(entry)
    extra = [key for key in entry if key not in STORAGE_ENTRY_KEYS]
    if extra:
        raise ImproperlyConfigured(
            f"Media host entry {shown} of kind 'storage' cannot have {', '.join(map(describe_entry, extra))}: "
            f"the storage's own options hold its address and credentials."
        )
    path, alias = entry.get("storage"), entry.get("alias")
    if (path is None) == (alias is None):
        raise ImproperlyConfigured(
            f"Media host entry {shown} of kind 'storage' needs either 'storage' (the dotted path of a storage class, "
            f"e.g. 'storages.backends.s3.S3Storage') or 'alias' (a STORAGES alias), not both."
        )
    for key, value in (("storage", path), ("alias", alias)):
        if value is not None and not (isinstance(value, str) and value):
            raise ImproperlyConfigured(f"The {key!r} of media host entry {shown} must be a non-empty string.")
    options = entry.get("options", {})
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise ImproperlyConfigured(f"The 'options' of media host entry {shown} must be a dict of keyword arguments.")
    if alias is not None and options:
        raise ImproperlyConfigured(
            f"Media host entry {shown}: 'options' go with 'storage'; an alias takes the OPTIONS of STORAGES[{alias!r}]."
        )
    name = entry.get("name", alias)
    if not isinstance(name, str) or not name.strip():
        raise ImproperlyConfigured(
            f"Media host entry {shown} of kind 'storage' needs a 'name' (what logs, tasks and Replica rows call it, "
            f"e.g. 's3-eu'): never derived from its options, which may hold credentials."
        )
    public_url = _public_url(entry, f"media host {name}")
    checksum = entry.get("checksum", True)
    if not isinstance(checksum, bool):
        raise ImproperlyConfigured(f"The 'checksum' of media host {name} must be True or False.")
    host = MediaHost(
        name=name, base_url="", kind="storage", public_url=public_url, storage=path, alias=alias,
        storage_options=dict(options), checksum=checksum,
    )
    build_storage(host)  # raises ImproperlyConfigured, naming the host, for a bad class, option or alias
    return host


def _parse_url_entry(entry, ca_bundle):
    shown = describe_entry(entry)
    parts = _split(entry, shown)
    if parts.scheme not in ("http", "https"):
        raise ImproperlyConfigured(f"Media host URL {shown} must use http or https, not {parts.scheme!r}.")
    if "@" in entry.partition("://")[2] and "@" not in parts.netloc:
        raise ImproperlyConfigured(
            f"Media host URL {shown} has a user name or password that is not percent-encoded: "
            f"write '/', '?' and '#' in it as %2F, %3F and %23."
        )
    if WRITE_CAP.search(entry):
        raise ImproperlyConfigured(
            f"Media host URL {shown} holds a Tahoe-LAFS write cap: give the node's web API as 'url' "
            f"and the cap as 'dircap' in a dict entry with kind 'tahoe'."
        )
    _check_port(parts, shown)
    if not parts.hostname:
        raise ImproperlyConfigured(f"Media host URL {shown} has no host name.")
    if parts.query or parts.fragment:
        raise ImproperlyConfigured(f"Media host URL {shown} must not have a query string or a fragment.")
    netloc = parts.netloc.rpartition("@")[2]
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    base_url = urlunsplit((parts.scheme, netloc, path, "", ""))
    auth = (unquote(parts.username), unquote(parts.password or "")) if parts.username else None
    return MediaHost(name=base_url, base_url=base_url, auth=auth, ca_bundle=ca_bundle)


def _parse_hostport_entry(entry, media_url, ca_bundle):
    if any(char in entry for char in "/?#@ "):
        shown = describe_url(entry)
        raise ImproperlyConfigured(
            f"Media host entry {shown!r} must be 'host[:port]' or a full URL such as "
            f"'https://{re.split('[/?#]', shown)[0]}/media/'."
        )
    shown = describe_entry(entry)
    media = urlsplit(media_url or "/")
    scheme = media.scheme or "http"
    path = media.path if media.path.endswith("/") else media.path + "/"
    base_url = urlunsplit((scheme, entry, path, "", ""))
    _check_port(_split(base_url, shown), shown)
    return MediaHost(name=entry, base_url=base_url, ca_bundle=ca_bundle)


def _split(url, shown):
    # urlsplit's own errors may quote the host part, credentials included: never show them.
    try:
        return urlsplit(url)
    except ValueError:
        raise ImproperlyConfigured(f"Media host entry {shown} is not a valid URL.") from None


def _check_port(parts, shown):
    try:
        parts.port  # noqa: B018 - reading it is the check: urllib raises for a bad port
    except ValueError:
        raise ImproperlyConfigured(f"Media host entry {shown} has an invalid port.") from None


def _label(key):
    return f"{SETTINGS[key][0]} (option {key!r})"
