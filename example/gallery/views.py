from django import forms
from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.http import HttpResponseBadRequest
from django.shortcuts import redirect, render

from . import demo_hosts
from .models import Document


class UploadForm(forms.ModelForm):
    class Meta:
        model = Document
        fields = ["title", "file"]


def upload(request):
    """Upload a file; the page lists the last uploads with their URL on the first media host."""
    form = UploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        form.save()
        return redirect("upload")
    return render(request, "gallery/upload.html", {"form": form, "documents": Document.objects.order_by("-pk")[:20]})


@staff_member_required
def hosts(request):
    """The demo's media hosts: take one down, bring it back (POST), see what each holds."""
    if request.method == "POST":
        try:
            index = int(request.POST.get("host", ""))
            host = demo_hosts.HOSTS[index - 1]
        except (ValueError, IndexError):
            return HttpResponseBadRequest("Unknown media host.")
        if request.POST.get("action") == "down":
            host.go_down()
            messages.warning(request, f"Media host {index} is down: its connections are refused.")
        else:
            host.come_back()
            messages.success(request, f"Media host {index} is back.")
        return redirect("demo-hosts")
    rows = [
        {"index": index, "url": host.url, "serving": host.serving, "files": len(host.files())}
        for index, host in enumerate(demo_hosts.HOSTS, 1)
    ]
    return render(request, "gallery/hosts.html", {"hosts": rows})
