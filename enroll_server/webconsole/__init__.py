"""The operator web console, under /console/ on the admin listener: the fleet at a glance
and every operator action, in a browser, as safe as the CLI (see app.py for the gate)."""

from enroll_server.webconsole.app import build_console_app
from enroll_server.webconsole.context import CONSOLE_PREFIX

__all__ = ["CONSOLE_PREFIX", "build_console_app"]
