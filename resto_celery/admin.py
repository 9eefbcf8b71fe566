"""The failure dashboard: per-host figures, the Replica list, and actions to repair.

Viewing needs the ``view`` permission on ``Replica``; actions need ``change``. Every action
is a POST with CSRF, says what it did (messages) and is logged.
"""
import logging

from django.apps import apps
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.formats import date_format
from django.utils.html import format_html
from django.utils.text import Truncator
from django.views.decorators.http import require_POST

from . import operations, status
from .models import Replica, ReplicationDashboard
from .registry import UnknownHost

logger = logging.getLogger(__name__)

VIEW, CHANGE = "resto_celery.view_replica", "resto_celery.change_replica"


def can_view(request):
    return request.user.is_active and request.user.is_staff and (
        request.user.has_perm(VIEW) or request.user.has_perm(CHANGE)
    )


def can_change(request):
    return request.user.is_active and request.user.is_staff and request.user.has_perm(CHANGE)


@admin.register(Replica)
class ReplicaAdmin(admin.ModelAdmin):
    list_display = ("path", "host", "state_badge", "attempts", "short_error", "last_error_at", "last_success_at")
    list_filter = ("state", "host")
    search_fields = ("path",)
    date_hierarchy = "last_error_at"
    list_per_page = 100
    show_full_result_count = False  # no COUNT(*) over millions of rows on every search
    actions = ["retry_selected"]
    readonly_fields = [
        "host", "path", "state", "fingerprint", "attempts", "error", "last_error_at",
        "last_success_at", "pending_since", "retry_at", "task_id", "failed_task_id", "updated_at",
    ]
    fieldsets = [
        (None, {"fields": ["path", "host", "state", "attempts", "retry_at"]}),
        ("Last error", {"fields": ["error", "last_error_at", "pending_since"]}),
        ("Last success", {"fields": ["last_success_at", "fingerprint", "task_id", "failed_task_id", "updated_at"]}),
    ]

    def has_add_permission(self, request):
        return False  # rows are written by workers only

    def has_change_permission(self, request, obj=None):
        # A row is a record, written by workers: its page is a view page (no Save buttons),
        # whoever looks. Without an object (the list) "change" still gates the retry action.
        return False if obj is not None else super().has_change_permission(request)

    @admin.display(description="state", ordering="state")
    def state_badge(self, replica):
        return format_html('<span class="resto-state resto-{}">{}</span>', replica.state, replica.get_state_display())

    @admin.display(description="last error")
    def short_error(self, replica):
        # The host has its own column: keep the error's reason in view. A synced row's
        # error is history: say so, so that no one reads it as the row's present state.
        reason = Truncator(replica.last_error).chars(100)
        if reason and _resolved(replica):
            return format_html('<span class="resto-resolved">resolved since; was: {}</span>', reason)
        return reason

    @admin.display(description="last error")
    def error(self, replica):
        """The last error, labelled as history once a success followed it."""
        if not replica.last_error:
            return "none"
        if _resolved(replica):
            return format_html(
                '<span class="resto-resolved">Resolved: synced at {}, after this error at {}:</span><br>{}',
                _when(replica.last_success_at), _when(replica.last_error_at), replica.last_error,
            )
        return replica.last_error

    @admin.action(permissions=["change"], description="Retry selected replicas now")
    def retry_selected(self, request, queryset):
        try:
            sent = operations.retry(queryset, user=request.user)
        except UnknownHost as error:
            self.message_user(request, str(error), messages.ERROR)
            return
        self.message_user(request, f"Re-sent {sent} replication task(s); the workers will report back here.")

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), "task_results": self._task_results(object_id)}
        return super().change_view(request, object_id, form_url, extra_context)

    @staticmethod
    def _task_results(object_id):
        """The Celery results of the tasks this row names (the last one, the last failed one),
        found by id: retries keep their task's id, and a successful task needs no result.
        None without django-celery-results in ``INSTALLED_APPS`` (a site of HybridStorage or
        DistributedStorage only: no Celery task, no results)."""
        replica = Replica.objects.filter(pk=object_id).first()
        if replica is None or not apps.is_installed("django_celery_results"):
            return None
        TaskResult = apps.get_model("django_celery_results", "TaskResult")
        ids = {replica.task_id, replica.failed_task_id} - {""}
        return list(TaskResult.objects.filter(task_id__in=ids).order_by("-date_done"))


def _when(value):
    if value is None:
        return "an unknown time"
    return date_format(timezone.localtime(value) if timezone.is_aware(value) else value, "DATETIME_FORMAT")


def _resolved(replica):
    """Whether the row's last error is history: the row is synced, by a success after it."""
    return replica.state == Replica.State.SYNCED and replica.last_success_at is not None and (
        replica.last_error_at is None or replica.last_success_at >= replica.last_error_at
    )


@admin.register(ReplicationDashboard)
class ReplicationDashboardAdmin(admin.ModelAdmin):
    """One row per media host: how far behind it is, why, and buttons to repair it."""

    def has_module_permission(self, request):
        return can_view(request)

    def has_view_permission(self, request, obj=None):
        return can_view(request)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_urls(self):
        wrap = self.admin_site.admin_view
        return [
            path("", wrap(self.changelist_view), name="resto_celery_replicationdashboard_changelist"),
            path("retry-failed/", wrap(require_POST(self.retry_failed_view)), name="resto_celery_retry_failed"),
            path("resync/", wrap(require_POST(self.resync_view)), name="resto_celery_resync"),
            path("allow-deletes/", wrap(require_POST(self.allow_deletes_view)), name="resto_celery_allow_deletes"),
        ]

    def changelist_view(self, request, extra_context=None):
        if not can_view(request):
            raise PermissionDenied
        statuses = status.host_statuses()
        context = {
            **self.admin_site.each_context(request),
            "title": "Replication dashboard",
            "opts": self.model._meta,
            "statuses": statuses,
            "masters": status.master_statuses(),
            "totals": status.totals(statuses),
            "can_change": can_change(request),
            "replica_changelist": reverse("admin:resto_celery_replica_changelist"),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/resto_celery/dashboard.html", context)

    def retry_failed_view(self, request):
        host = self._host_for_action(request)
        count = operations.retry_failed(host, user=request.user)
        messages.success(request, f"Re-sent {count} failed replication task(s) for {host}.")
        return self._back()

    def resync_view(self, request):
        host = self._host_for_action(request)
        count = operations.mark_for_resync(host, user=request.user)
        messages.success(
            request, f"Marked {count} file(s) on {host} for a full resync; a reconcile has been queued."
        )
        return self._back()

    def allow_deletes_view(self, request):
        host = self._host_for_action(request)
        operations.allow_deletes(host, user=request.user)
        messages.success(
            request, f"Queued a reconcile pass that may delete beyond the brake on {host}; the banner goes once it ran."
        )
        return self._back()

    def _host_for_action(self, request):
        if not can_change(request):
            raise PermissionDenied
        host = request.POST.get("host", "")
        if host not in status.configured_hosts():
            raise PermissionDenied(f"{host!r} is not a configured media host.")
        return host

    def _back(self):
        return HttpResponseRedirect(reverse("admin:resto_celery_replicationdashboard_changelist"))
