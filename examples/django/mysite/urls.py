"""Django's login and logout, the page, the publishing view and the webhook receiver.
Everything under /ws/ never gets here: asgi.py sends it to wsfanout."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from mysite import views

urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.page, name="page"),
    path("publish", views.publish, name="publish"),
    path("hooks/wsfanout", views.webhook, name="webhook"),
    path("hooks/seen", views.seen, name="seen"),
]
