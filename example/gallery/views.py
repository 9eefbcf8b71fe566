from django import forms
from django.shortcuts import redirect, render

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
