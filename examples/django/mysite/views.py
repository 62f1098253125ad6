"""The page, a view that publishes through wsfanout, and the receiver of its webhooks."""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from mysite.chat import chat
from mysite.models import WebhookEvent
from wsfanout import (
    MessageTooLargeError,
    PublishError,
    ServiceUnavailableError,
    UnknownGroupError,
    UnknownUserError,
    verify_webhook,
)

# What each refusal of wsfanout's becomes here; any other PublishError is a bad message (400).
STATUS = {
    UnknownGroupError: 404,
    UnknownUserError: 404,
    MessageTooLargeError: 413,
    ServiceUnavailableError: 503,
}


@login_required
def page(request: HttpRequest) -> HttpResponse:
    """The page that connects to /ws/ as the logged-in user and lists what arrives."""
    groups = [group.name for group in request.user.groups.all()]
    return render(request, "chat.html", {"groups": groups})


@login_required
@require_POST
def publish(request: HttpRequest) -> JsonResponse:
    """Publish the form's ``text`` to its ``group``, or to everyone when it names none.

    A plain (sync) view: Django runs it in a thread, and ``publish_sync`` hands the work to
    wsfanout's event loop and waits for its answer. The CSRF check is Django's own: the page
    posts the form with its token."""
    group = request.POST.get("group", "")
    # wsfanout takes any group this app's code names (it is the authority on its users'
    # groups): who may post where is this view's to decide.
    if group and not request.user.groups.filter(name=group).exists():
        return JsonResponse(
            {"error": "forbidden", "detail": f"you are not in {group!r}"}, status=403
        )
    item: dict[str, Any] = {"type": "group", "group": group} if group else {"type": "broadcast"}
    item |= {"text": request.POST.get("text", ""), "from": request.user.get_username()}
    try:
        accepted = chat.publish_sync(item)
    except PublishError as exc:
        status = STATUS.get(type(exc), 400)
        return JsonResponse({"error": exc.code, "detail": exc.detail}, status=status)
    return JsonResponse({"accepted": accepted}, status=202)


@csrf_exempt  # wsfanout is no browser: the signature is what proves the post is its
@require_POST
def webhook(request: HttpRequest) -> JsonResponse:
    """Keep each event wsfanout posts once; refuse what it did not sign (401)."""
    secret = settings.WSFANOUT_WEBHOOK_SECRET
    timestamp = request.headers.get("X-Wsfanout-Timestamp")
    signature = request.headers.get("X-Wsfanout-Signature")
    if not secret or not verify_webhook(secret, request.body, timestamp, signature):
        return JsonResponse({"error": "unauthorized", "detail": "bad signature"}, status=401)
    try:
        events = json.loads(request.body)["events"]
        rows = [
            WebhookEvent(
                id=str(e["id"]), type=e["type"], user=e["user"], time=float(e["time"]), event=e
            )
            for e in events
        ]
    except (ValueError, KeyError, TypeError):
        detail = 'expected {"events": [{"id", "type", "user", "time", ...}, ...]}'
        return JsonResponse({"error": "bad_request", "detail": detail}, status=400)
    # A retried batch comes again with the same ids: the ones already kept are skipped.
    WebhookEvent.objects.bulk_create(rows, ignore_conflicts=True)
    return JsonResponse({"received": len(rows)})


@login_required
def seen(request: HttpRequest) -> JsonResponse:
    """The events received so far, oldest first: the example's window onto its table (a
    real site would show them to its staff only, if at all)."""
    return JsonResponse({"events": [row.event for row in WebhookEvent.objects.all()]})
