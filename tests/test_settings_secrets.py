"""Settings errors never show a secret (issue 18).

Every bad kind of host entry below carries a secret in every place a secret can go: the
password of its URL (plain, or holding ``/``, ``@`` or ``?`` unescaped), ``auth``,
``headers``, a Tahoe-LAFS write cap, the values of unknown keys, anything in a tuple, list
or dict where an entry belongs. Each must be refused with a message about what is wrong,
and the secret must appear nowhere an operator or an error tracker would see it: the
exception's text, ``repr`` and traceback, and ``manage.py check``'s output.
"""
import io
import traceback

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from resto_celery import conf
from resto_celery.checks import check_settings

SECRET = "S3CR3T"

URL = f"https://user:pw-{SECRET}@media-1/media/"
AUTH = ("user", f"auth-{SECRET}")
HEADERS = {"Authorization": f"Bearer {SECRET}"}
WRITE_CAP = f"URI:DIR2:{SECRET}abcdefghijklmnop:0123456789abcdefghijklmnopqrstuvwxyz"
READ_CAP = "URI:DIR2-RO:zyxwvutsrqponmlkjihgfedcba:0123456789abcdefghijklmnopqrstuvwxyz"
NODE = "http://127.0.0.1:3456/"


def _credentials(**entry):
    """A dict entry with a secret in its URL, its auth and its headers, then ``entry``."""
    return {"url": URL, "auth": AUTH, "headers": HEADERS, **entry}


def _tahoe(**entry):
    return {"url": NODE, "kind": "tahoe", "dircap": WRITE_CAP, **entry}


#: case -> (resto options, words of the error). Host entries go in the ``hosts`` option.
BAD_SETTINGS = {
    # The kind of host
    "misspelt kind": ({"hosts": [_credentials(kind="webdva")]}, "must be one of 'http', 'webdav', 'tahoe'"),
    "kind that is not a string": ({"hosts": [_credentials(kind=["webdav", SECRET])]}, "must be one of"),
    "Tahoe-only key on an HTTP host": ({"hosts": [_credentials(dircap=WRITE_CAP)]}, "only apply to kind 'tahoe'"),
    "unknown key": ({"hosts": [_credentials(token=SECRET)]}, "unknown key\\(s\\) 'token'"),
    "unknown key that is a URL": ({"hosts": [{"url": "m1", URL: AUTH}]}, "unknown key"),
    # The URL
    "invalid port": ({"hosts": [f"https://user:pw-{SECRET}@media-1:80a/media/"]}, "invalid port"),
    "invalid port in a dict": (
        {"hosts": [_credentials(url=f"https://user:pw-{SECRET}@media-1:99999/")]},
        "invalid port",
    ),
    "missing scheme": ({"hosts": [f"user:pw-{SECRET}@media-1/media/"]}, "must be 'host\\[:port\\]' or a full URL"),
    "scheme without slashes": ({"hosts": [f"https:user:pw-{SECRET}@media-1/media/"]}, "must be 'host\\[:port\\]'"),
    "scheme-relative URL": ({"hosts": [f"//user:pw-{SECRET}@media-1/media/"]}, "must be 'host\\[:port\\]'"),
    "unsupported scheme": ({"hosts": [f"ftp://user:pw-{SECRET}@media-1/media/"]}, "must use http or https"),
    "password with an unescaped slash": (
        {"hosts": [f"https://user:pw/{SECRET}@media-1/media/"]},
        "not percent-encoded",
    ),
    "password with an unescaped @": ({"hosts": [f"https://user:p@{SECRET}@media-1:x/media/"]}, "invalid port"),
    "password with an unescaped ?": ({"hosts": [f"https://user:p?{SECRET}@media-1/media/"]}, "not percent-encoded"),
    "no host name": ({"hosts": [f"https://user:pw-{SECRET}@/media/"]}, "no host name"),
    "token in the query string": ({"hosts": [f"https://media-1/media/?token={SECRET}"]}, "query string"),
    "token in the fragment": ({"hosts": [f"https://user:pw-{SECRET}@media-1/media/#{SECRET}"]}, "fragment"),
    "invalid IPv6 address": ({"hosts": [f"https://user:pw-{SECRET}@[media-1/media/"]}, "not a valid URL"),
    "character that normalizes to a delimiter": (
        {"hosts": [f"https://user:pw\uff03{SECRET}@media-1/"]},
        "not a valid URL",
    ),
    "write cap in a URL": ({"hosts": [f"https://media-1/uri/{WRITE_CAP}/"]}, "holds a Tahoe-LAFS write cap"),
    # The other keys of a dict entry
    "auth as a string": ({"hosts": [_credentials(auth=f"user:{SECRET}")]}, "\\(user, password\\) pair"),
    "auth with three parts": ({"hosts": [_credentials(auth=("user", SECRET, "realm"))]}, "\\(user, password\\) pair"),
    "headers as a list": ({"hosts": [_credentials(headers=[("Authorization", f"Bearer {SECRET}")])]}, "map strings"),
    "header that is not a string": (
        {"hosts": [_credentials(headers={"Authorization": f"Bearer {SECRET}", "X-N": 3})]},
        "map strings",
    ),
    "empty name": ({"hosts": [_credentials(name="")]}, "'name' .* non-empty string"),
    "name that is not a string": ({"hosts": [_credentials(name=("media-1", SECRET))]}, "'name' .* non-empty string"),
    "ca_bundle that is not a path": (
        {"hosts": [_credentials(ca_bundle={"password": SECRET})]},
        "'ca_bundle' .* PEM file",
    ),
    "no url": ({"hosts": [{"auth": AUTH, "headers": HEADERS, "dircap": WRITE_CAP}]}, "needs a 'url' string"),
    "url that is not a string": ({"hosts": [_credentials(url=(URL, SECRET))]}, "needs a 'url' string"),
    # Entries that are neither a string nor a dict
    "(url, auth) tuple": ({"hosts": [(URL, AUTH)]}, "must be a string or a dict, not a tuple"),
    "(url, user, password) list": ({"hosts": [[URL, "user", SECRET]]}, "must be a string or a dict, not a list"),
    "bytes": ({"hosts": [URL.encode()]}, "must be a string or a dict, not a bytes object"),
    "set": ({"hosts": [{URL}]}, "must be a string or a dict, not a set"),
    # The list of hosts itself
    "one URL instead of a list": ({"hosts": URL}, "must be a list of host entries"),
    "one dict entry instead of a list": ({"hosts": _credentials()}, "must be a list of host entries"),
    "hosts as a dict of names to URLs": ({"hosts": {"media-1": URL}}, "must be a list of host entries"),
    "hosts as a dict of URLs to credentials": ({"hosts": {URL: AUTH}}, "must be a list of host entries"),
    "same host twice": ({"hosts": [URL, f"https://other:{SECRET}@media-1/media"]}, "more than once"),
    # Tahoe-LAFS hosts
    "Tahoe host without a write cap": ({"hosts": [_tahoe(dircap=f"Bearer {SECRET}")]}, "needs 'dircap'"),
    "Tahoe write cap with a path": ({"hosts": [_tahoe(dircap=WRITE_CAP + "/sub")]}, "not a valid cap"),
    "Tahoe write cap given as the readcap": ({"hosts": [_tahoe(readcap=WRITE_CAP)]}, "'readcap'"),
    "Tahoe host with auth and headers": ({"hosts": [_tahoe(auth=AUTH, headers=HEADERS)]}, "the cap is the credential"),
    "Tahoe node URL with a password": (
        {"hosts": [_tahoe(url=f"http://user:pw-{SECRET}@127.0.0.1:3456/")]},
        "the cap is the credential",
    ),
    "Tahoe node URL with the cap in it": (
        {"hosts": [_tahoe(url=f"{NODE}uri/{WRITE_CAP}/")]},
        "holds a Tahoe-LAFS write cap",
    ),
    "Tahoe public_url with a bad port": (
        {"hosts": [_tahoe(public_url=f"https://u:pw-{SECRET}@gw:x/")]},
        "'public_url' .* invalid port",
    ),
    "Tahoe public_url that is not a string": (
        {"hosts": [_tahoe(public_url=("https://gw/", SECRET))]},
        "'public_url' .* URL string",
    ),
    "Tahoe name that is not a string": ({"hosts": [_tahoe(name={"cap": WRITE_CAP})]}, "'name' .* non-empty string"),
    "misspelt Tahoe kind": ({"hosts": [_tahoe(kind="tahoe-lafs", readcap=READ_CAP)]}, "must be one of"),
    # Other settings that may hold a password
    "redis_url that is not redis://": ({"redis_url": f"http://:{SECRET}@127.0.0.1:6379/0"}, "must be a redis:// URL"),
}


@pytest.fixture(params=list(BAD_SETTINGS))
def bad(request):
    return BAD_SETTINGS[request.param]


def _storages(options):
    return {
        "default": {"BACKEND": "resto_celery.storage.HybridStorage", "OPTIONS": options},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


def _global_settings(options):
    return {conf.SETTINGS[key][0]: value for key, value in options.items()}


def test_a_bad_setting_is_refused_for_what_is_wrong_without_showing_its_secret(bad):
    options, words = bad
    with pytest.raises(ImproperlyConfigured, match=words) as raised:
        conf.resolve(options)
    error = raised.value
    shown = [str(error), repr(error), "".join(traceback.format_exception(error))]
    assert not [text for text in shown if SECRET in text]


def test_system_checks_report_a_bad_setting_without_showing_its_secret(bad):
    options = bad[0]
    with override_settings(STORAGES=_storages(options), **_global_settings(options)):
        messages = check_settings()
    assert {message.id for message in messages} == {"resto_celery.E001", "resto_celery.E002"}
    assert not [m for m in messages if SECRET in f"{m.msg} {m.hint} {m!r}"]


def test_manage_py_check_output_never_shows_the_secret(bad):
    options = bad[0]
    out, err = io.StringIO(), io.StringIO()
    with override_settings(STORAGES=_storages(options), **_global_settings(options)):
        with pytest.raises(SystemCheckError) as raised:
            call_command("check", stdout=out, stderr=err)
    output = f"{raised.value}\n{out.getvalue()}\n{err.getvalue()}"
    assert "resto_celery.E001" in output and "resto_celery.E002" in output
    assert SECRET not in output


@pytest.mark.parametrize(
    "text, shown",
    [
        ("https://user:pw@media-1:8443/media/", "https://***@media-1:8443/media/"),
        ("https://user:p/w@d@media-1/media/", "https://***@media-1/media/"),
        ("https://media-1/media/?token=t#f", "https://media-1/media/?***"),
        ("user:pw@media-1/media/", "***@media-1/media/"),
        ("media-1:8080", "media-1:8080"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("http://n:3456/uri/URI:DIR2:abc:def/", "http://n:3456/uri/URI:<write cap redacted>/"),
    ],
)
def test_describe_url_hides_user_info_query_fragment_and_write_caps(text, shown):
    assert conf.describe_url(text) == shown


def test_describe_entry_shows_a_dict_by_its_keys_and_safe_values_only():
    entry = {"url": URL, "name": "media-1", "auth": AUTH, "headers": HEADERS, "token": SECRET}
    assert conf.describe_entry(entry) == (
        "{'url': 'https://***@media-1/media/', 'name': 'media-1', 'auth': ..., 'headers': ..., 'token': ...}"
    )


def test_describe_entry_shows_a_tuple_by_its_type_and_length_only():
    assert conf.describe_entry((URL, AUTH)) == "a tuple of 2 item(s)"
