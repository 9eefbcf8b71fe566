"""Filters of the admin pages: ``{% load resto_admin %}``."""
from datetime import timedelta

from django import template
from django.utils import timezone
from django.utils.html import escape
from django.utils.safestring import mark_safe
from django.utils.timesince import timesince

register = template.Library()


@register.filter
def ago(value):
    """``"3 minutes ago"``; ``"just now"`` under a minute (never "0 minutes ago")."""
    if not value:
        return ""
    if timezone.now() - value < timedelta(minutes=1):
        return "just now"
    return f"{timesince(value)} ago"


@register.filter
def age(value):
    """How long ago ``value`` was, without "ago": ``"3 minutes"``; ``"under a minute"``."""
    if not value:
        return ""
    if timezone.now() - value < timedelta(minutes=1):
        return "under a minute"
    return timesince(value)


@register.filter
def breakable_url(value):
    """``value``, escaped, free to wrap after each ``/``: a long host URL takes two short
    lines in a narrow column instead of widening it."""
    return mark_safe(escape(value).replace("/", "/<wbr>"))  # escape() leaves no "/" in an entity
