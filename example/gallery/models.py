from django.db import models


class Document(models.Model):
    """An uploaded file, stored by the default storage: AsyncStorage."""

    title = models.CharField(max_length=200)
    file = models.FileField(upload_to="documents/")
    uploaded_at = models.DateTimeField(auto_now_add=True)

    def __str__(self):
        return self.title
