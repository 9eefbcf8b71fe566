"""The failure dashboard end to end, in headless Chromium against a live server.

A media host refuses an upload; an operator (staff, not a superuser) logs in on a 1280 px
laptop, finds the failure on the dashboard with its buttons in view, fixes the host, presses
*Retry failed* and watches the host catch up, while a real Celery worker does the
replication. On the way: the replica's page is a view page, a healed row's old error is
labelled as such, and the media hosts serve each file with the type of its name (an image
opens in the browser instead of downloading).

The test takes screenshots of the pages it visits. They go under the test's tmp_path, or,
with ``RESTO_SCREENSHOTS=1``, to ``docs/`` (the README's pictures)::

    RESTO_SCREENSHOTS=1 .venv/bin/python -m pytest -p no:cacheprovider tests/test_admin_browser.py

It needs Debian's ``chromium`` (``apt-get install chromium``) and the ``playwright`` package,
and is skipped without them, except in CI (``CI=true``), where it fails instead. Playwright
only drives the system's Chromium: ``playwright install`` is never needed.
"""
import os
import re
from pathlib import Path
from urllib.parse import urlencode

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.base import ContentFile

from resto_celery.models import Replica
from tests.conftest import set_storages
from tests.site import wait_until

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = expect = None

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
]
DASHBOARD = "/admin/resto_celery/replicationdashboard/"
CHANGELIST = "/admin/resto_celery/replica/"
LAPTOP = {"width": 1280, "height": 800}  # with the admin's navigation sidebar open
WIDE = {"width": 1920, "height": 1080}
NARROW = {"width": 390, "height": 844}

#: What the site holds before the failure: replicated to both hosts.
EARLIER_FILES = {
    "photos/2025/harbour-at-dawn.jpg": b"\xff\xd8\xff\xe0harbour" + bytes(range(256)) * 40,
    "photos/2025/old-town-square.jpg": b"\xff\xd8\xff\xe0square" + bytes(range(256)) * 25,
    "avatars/alice.png": b"\x89PNG\r\n\x1a\nalice" + bytes(range(256)) * 4,
    "menus/spring-menu.pdf": b"%PDF-1.7\nspring menu\n" * 200,
}
#: The upload that the read-only host refuses.
FAILING_NAME = "photos/2025/night-market.jpg"
FAILING_BYTES = b"\xff\xd8\xff\xe0night market" + bytes(range(256)) * 60


def _browser_missing():
    if sync_playwright is None:
        return "the playwright package is not installed (pip install playwright)"
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (apt-get install chromium)"
    return None


@pytest.fixture
def requires_browser():
    """Skip (fail in CI) before any server is started when Chromium or Playwright is missing."""
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; CI must run the browser test")
        pytest.skip(missing)


@pytest.fixture
def launch_browser(requires_browser):
    """A function that starts Debian's Chromium, headless, driven by Playwright.

    Call it once the database work is done: Playwright's sync API runs an asyncio loop in
    this thread, and Django refuses ORM calls while it runs (SynchronousOnlyOperation);
    forcing them with DJANGO_ALLOW_ASYNC_UNSAFE would open a second connection, in the
    loop's context, that nothing closes, and the test database could not be dropped.
    """
    started = []

    def launch():
        playwright = sync_playwright().start()
        started.append(playwright)
        return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

    yield launch
    for playwright in started:
        playwright.stop()  # closes the browser too


@pytest.fixture
def screenshots(tmp_path):
    """Where screenshots go: docs/ with RESTO_SCREENSHOTS=1, else tmp_path (the repository stays clean)."""
    if os.environ.get("RESTO_SCREENSHOTS") == "1":
        return ROOT / "docs"
    folder = tmp_path / "screenshots"
    folder.mkdir()
    return folder


def _operator(username="operator", password="correct horse battery staple"):
    """A staff user who may view and repair replicas, and nothing else."""
    user = User.objects.create_user(username, password=password, is_staff=True)
    for codename in ("view_replica", "change_replica"):
        user.user_permissions.add(Permission.objects.get(codename=codename, content_type__app_label="resto_celery"))
    assert not user.is_superuser
    return username, password


def _log_in(page, base_url, username, password):
    page.goto(f"{base_url}/admin/login/?next={DASHBOARD}")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    expect(page).to_have_url(re.compile(re.escape(DASHBOARD) + "$"))
    page.wait_for_load_state()


def _host_row(page, host):
    """The dashboard's figures for ``host``, as the operator reads them (by column title)."""
    titles = [t.strip().lower() for t in page.locator("table.resto-hosts thead th").all_text_contents()]
    cells = [c.strip() for c in page.locator(f'table.resto-hosts tr[data-host="{host}"] > *').all_inner_texts()]
    assert len(cells) == len(titles), f"no row, or a malformed one, for {host}: {cells}"
    row = dict(zip(titles, cells, strict=True))
    return {
        "synced": int(row["synced"]),
        "pending": int(row["pending"]),
        "failed": int(row["failed"]),
        "last_error": row["last error"],
        "up or down": row["up or down"],
    }


def _totals(page):
    """hosts, synced, pending, failed: the figures on top of the dashboard."""
    return page.locator(".resto-totals .figure").all_inner_texts()[:4]


def _assert_fits(page, hosts):
    """The dashboard needs no sideways scroll, and every host's buttons are in the first screen."""
    overflow = page.evaluate("""() => {
        const wrap = document.querySelector('.resto-table-wrap');
        return {page: document.documentElement.scrollWidth - window.innerWidth,
                table: wrap.scrollWidth - wrap.clientWidth};
    }""")
    assert overflow == {"page": 0, "table": 0}, f"sideways scroll needed: {overflow}"
    for host in hosts:
        for button in ("Retry failed", "Full resync"):
            expect(page.locator(f'tr[data-host="{host}"] input[type=submit][value="{button}"]')).to_be_in_viewport(
                ratio=1
            )


def _dashboard_in(browser, base_url, storage_state, **context_options):
    """The dashboard in a fresh browser context (colour scheme, viewport), logged in already."""
    context = browser.new_context(storage_state=storage_state, **context_options)
    page = context.new_page()
    page.goto(f"{base_url}{DASHBOARD}")
    return context, page


@pytest.mark.django_db(transaction=True)  # the workers are other processes: they must see the rows
def test_an_operator_finds_a_failed_upload_on_the_dashboard_and_repairs_it(
    requires_browser, make_site, settings, live_server, project_celery_app, screenshots, tmp_path,
    launch_browser,
):
    # A site replicating to two media hosts, with a worker running. The live server's admin
    # must know the same hosts as the storage that saves.
    site = make_site(host_count=2, max_retries=0)
    set_storages(settings, {
        "default": {"BACKEND": "resto_celery.storage.AsyncStorage", "OPTIONS": site.storage.deconstruct()[2]},
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    })
    healthy, broken = site.hosts
    # One worker process: on SQLite (CI has no PostgreSQL) two processes recording rows at
    # once can fail with "database is locked" (update_or_create upgrades a read transaction).
    site.start_worker(concurrency=1)

    # Some files reach both hosts...
    for name, content in EARLIER_FILES.items():
        assert site.storage.save(name, ContentFile(content)) == name
    site.wait_until_drained_and_converged()

    # ...then the second host turns read-only, and the next upload fails there (403, no retry).
    broken.read_only = True
    assert site.storage.save(FAILING_NAME, ContentFile(FAILING_BYTES)) == FAILING_NAME
    wait_until(
        lambda: Replica.objects.filter(host=broken.url, path=FAILING_NAME, state="failed").exists()
        and Replica.objects.filter(host=healthy.url, path=FAILING_NAME, state="synced").exists(),
        message="the upload to fail on the read-only host and succeed on the other",
    )
    wait_until(site.drained, message="the queue to drain")
    assert FAILING_NAME not in broken.files()
    username, password = _operator()  # staff with view and change on Replica, not a superuser

    # From here on, only the browser looks at the site.
    browser = launch_browser()
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    _log_in(page, live_server.url, username, password)
    expect(page.locator("#nav-sidebar")).to_be_visible()  # the admin opens it on a laptop

    # The dashboard shows the failing host: one failed file, and why.
    expect(page.locator("#content h1")).to_have_text("Replication dashboard")  # Django 4.2 has a second h1
    assert _host_row(page, healthy.url) == {
        "synced": len(EARLIER_FILES) + 1, "pending": 0, "failed": 0, "last_error": "none", "up or down": "up",
    }
    row = _host_row(page, broken.url)
    assert (row["synced"], row["pending"], row["failed"], row["up or down"]) == (len(EARLIER_FILES), 0, 1, "up")
    assert "403 Forbidden" in row["last_error"] and FAILING_NAME in row["last_error"]
    assert row["last_error"].startswith("just now, ")  # never "0 minutes ago"
    assert _totals(page) == ["2", str(2 * len(EARLIER_FILES) + 1), "0", "1"]
    # On a 1280 px laptop, sidebar open, the repair buttons are in view: no sideways scroll.
    _assert_fits(page, [healthy.url, broken.url])
    page.screenshot(path=screenshots / "dashboard.png", full_page=True)

    # The same page on a wide screen, in the dark theme, and on a phone.
    logged_in = context.storage_state()
    wide, wide_page = _dashboard_in(browser, live_server.url, logged_in, viewport=WIDE)
    _assert_fits(wide_page, [healthy.url, broken.url])
    wide_page.screenshot(path=screenshots / "dashboard-wide.png", full_page=True)
    wide.close()
    dark, dark_page = _dashboard_in(browser, live_server.url, logged_in, viewport=LAPTOP, color_scheme="dark")
    assert _host_row(dark_page, broken.url)["failed"] == 1
    _assert_fits(dark_page, [healthy.url, broken.url])
    dark_page.screenshot(path=screenshots / "dashboard-dark.png", full_page=True)
    dark.close()
    narrow, narrow_page = _dashboard_in(
        browser, live_server.url, logged_in, viewport=NARROW, is_mobile=True, has_touch=True
    )
    assert _host_row(narrow_page, broken.url)["failed"] == 1
    narrow_page.screenshot(path=screenshots / "dashboard-narrow.png", full_page=True)
    narrow.close()

    # The failed count links to the Replica list, filtered to that host's failed files.
    page.locator(f'tr[data-host="{broken.url}"] a[href*="failed"]').click()
    expect(page).to_have_url(re.compile(re.escape(CHANGELIST) + r"\?.*state(__exact)?=failed"))
    page.wait_for_load_state()
    expect(page.locator("#result_list tbody .field-path")).to_have_text([FAILING_NAME])
    expect(page.locator("#result_list tbody .field-state_badge")).to_have_text(["failed"])
    # (the list leaves the host out of the error: it has its own column)
    expect(page.locator("#result_list tbody .field-short_error")).to_contain_text(
        [f"PUT {FAILING_NAME} failed: 403 Forbidden"]
    )
    page.screenshot(path=screenshots / "replica-changelist.png", full_page=True)

    # The failed row's page is a view page: its error, no Save buttons (the operator may change
    # replicas, but a row is a record the workers write).
    page.locator("#result_list tbody .field-path a").click()
    page.wait_for_load_state()
    expect(page.locator("#content h1")).to_have_text("View replica")
    expect(page.locator('input[name="_save"], input[name="_continue"]')).to_have_count(0)
    expect(page.locator(".field-error .readonly")).to_contain_text("403 Forbidden")
    expect(page.locator(".field-error .resto-resolved")).to_have_count(0)
    failed_row_page = page.url

    # The host is fixed; the operator presses "Retry failed" on its row.
    broken.read_only = False
    page.goto(f"{live_server.url}{DASHBOARD}")
    page.locator(f'tr[data-host="{broken.url}"] input[type=submit][value="Retry failed"]').click()
    expect(page.locator("ul.messagelist li.success")).to_have_text(
        f"Re-sent 1 failed replication task(s) for {broken.url}."
    )

    # The worker repairs the host; reloading the dashboard shows it caught up.
    def caught_up():
        page.goto(f"{live_server.url}{DASHBOARD}")
        row = _host_row(page, broken.url)
        return (row["synced"], row["pending"], row["failed"]) == (len(EARLIER_FILES) + 1, 0, 0)

    wait_until(caught_up, timeout=30, interval=0.5, message="the dashboard to show the host caught up")
    expect(page.locator(f'tr[data-host="{broken.url}"] input[value="Retry failed"]')).to_be_disabled()
    assert _totals(page) == ["2", str(2 * (len(EARLIER_FILES) + 1)), "0", "0"]
    page.screenshot(path=tmp_path / "dashboard-after-repair.png", full_page=True)  # never in docs/

    # The Replica list agrees: nothing failed, every file synced on the repaired host.
    page.goto(f"{live_server.url}{CHANGELIST}?state=failed")
    expect(page.locator("#result_list tbody .field-path")).to_have_count(0)
    page.goto(f"{live_server.url}{CHANGELIST}?{urlencode({'state': 'synced', 'host': broken.url})}")
    paths = page.locator("#result_list tbody .field-path").all_inner_texts()
    assert sorted(paths) == sorted([*EARLIER_FILES, FAILING_NAME])

    # And the host really holds the bytes, like the master and the other host.
    assert broken.read(FAILING_NAME) == FAILING_BYTES
    assert broken.files() == healthy.files() == site.master_files()

    # The healed row keeps its old error, labelled with when it happened and that it is over.
    page.goto(failed_row_page)
    expect(page.locator("#content h1")).to_have_text("View replica")
    expect(page.locator(".field-error .resto-resolved")).to_contain_text("Resolved: synced at")
    expect(page.locator(".field-error .readonly")).to_contain_text("403 Forbidden")
    page.screenshot(path=screenshots / "replica-view.png", full_page=True)

    # The media hosts serve each file with the type of its name: an image link opens in the
    # browser instead of downloading (a download makes goto() raise), a PDF is a PDF.
    for host in (healthy, broken):
        response = page.goto(host.url + FAILING_NAME)
        assert response.status == 200 and response.headers["content-type"] == "image/jpeg"
        assert page.request.get(host.url + "menus/spring-menu.pdf").headers["content-type"] == "application/pdf"
        assert [r.content_type for r in host.requests if r.method == "PUT" and r.name == FAILING_NAME][-1:] == [
            "image/jpeg"
        ]


@pytest.mark.django_db(transaction=True)
def test_a_down_host_shows_why_beside_down_since_and_a_long_error_still_fits_a_laptop(
    async_settings, async_hosts, redis_url, live_server, launch_browser,
):
    from resto_celery.broker import coordinator_for
    from resto_celery.storage import AsyncStorage

    down = async_hosts[0].url
    storage = AsyncStorage(hosts=[down], redis_url=redis_url, breaker_threshold=2)
    breaker = coordinator_for(storage.options).breaker(down)
    cause = ("connection failed: HTTPSConnectionPool(host='media-2.internal.example.org', port=443): "
             "Max retries exceeded with url: /photos/2025/a-rather-long-folder-name/night-market.jpg "
             "(Caused by SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED]')))")
    breaker.record_failure(cause)
    breaker.record_failure(cause)
    username, password = _operator()

    browser = launch_browser()
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    _log_in(page, live_server.url, username, password)
    updown = _host_row(page, down)["up or down"]
    assert updown.startswith("down since just now\nconnection failed: HTTPSConnectionPool") and "SSLError" in updown
    assert _host_row(page, async_hosts[1].url)["up or down"] == "up"
    _assert_fits(page, [down, async_hosts[1].url])
    context.close()
