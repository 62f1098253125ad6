"""What the webhook receiver keeps: each lifecycle event once, by its id."""

from __future__ import annotations

from django.db import models


class WebhookEvent(models.Model):
    """One event wsfanout posted (``connected``, ``online``, …), as it came."""

    # The event's own id: a retried batch repeats ids, and the primary key drops the repeats.
    id = models.CharField(primary_key=True, max_length=200)
    type = models.CharField(max_length=20)
    user = models.CharField(max_length=150)
    time = models.FloatField()  # when it happened, seconds since the epoch
    event = models.JSONField()  # the whole event (its connection, close code, group, …)

    class Meta:
        ordering = ("time",)

    def __str__(self) -> str:
        return f"{self.type} {self.user}"
