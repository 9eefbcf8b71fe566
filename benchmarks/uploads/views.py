"""The upload view: a ``ModelForm`` over a multipart POST, the model saved, its file's URL returned."""
from django import forms
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from .models import MODELS

FORMS = {
    name: forms.modelform_factory(model, fields=["title", "file"]) for name, model in MODELS.items()
}


@csrf_exempt  # the benchmark's client has no session; the settings run no middleware anyway
@require_POST
def upload(request, config):
    form = FORMS[config](request.POST, request.FILES)
    if not form.is_valid():
        return JsonResponse({"errors": form.errors}, status=400)
    item = form.save()
    return JsonResponse({"id": item.pk, "name": item.file.name, "url": item.file.url}, status=201)


def ping(request):
    return HttpResponse("ok")
