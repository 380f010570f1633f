"""The clinic's model: a patient of a tenant, with protected fields (ssn,
searchable, and notes) when served through cmk-proxy. The table is created
by the test harness (plaintext or encrypted schema), not by migrations."""

from django.db import models


class Patient(models.Model):
    tenant_id = models.CharField(max_length=63)
    name = models.CharField(max_length=200)
    ssn = models.CharField(max_length=11)
    notes = models.TextField(null=True)

    class Meta:
        app_label = "clinic"
        db_table = "patients"
        managed = False
