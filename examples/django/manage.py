#!/usr/bin/env python
"""Django's command line for this project (migrate, shell, runserver is not enough: serve it
with an ASGI server, see README.md)."""

from __future__ import annotations

import os
import sys

from django.core.management import execute_from_command_line

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    execute_from_command_line(sys.argv)
