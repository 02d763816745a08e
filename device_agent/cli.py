"""`fleetpki-agent`: run / enroll / status on the command line (argparse: no extra deps)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from device_agent import __version__
from device_agent.agent import Agent
from device_agent.config import AgentConfig, load_config
from device_agent.errors import ConfigError
from device_agent.events import AgentEvent, EventKind
from device_agent.exit_codes import ExitCode
from device_agent.state_lock import AgentBusy, StateLock

if TYPE_CHECKING:
    import argparse

log = logging.getLogger("fleetpki.agent")

EPILOG = """\
exit codes:
  0  stopped on request / command succeeded
  1  crash (unexpected error; systemd restarts the agent)
  2  bad command line
  3  revoked or refused by the service or the broker (not restarted); a suspended
     device does not exit: `run` waits until the operator resumes it
  4  agent.toml, the trust anchor, the token file, the factory birth certificate
     (idevid_cert / idevid_key) or the state folder is unusable
  5  no valid certificate and no token: write a new token from the operator to the
     token file, then run `fleetpki-agent enroll --config ...` (or restart the agent)
  6  another fleetpki-agent process (a running agent, or an enroll) uses the state
     folder; nothing was changed: stop it first (systemd restarts `run` later)
"""


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="fleetpki-agent",
        description="fleetpki device agent: EST enrollment, mTLS MQTT, automatic renewal.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "enroll if needed, then stay connected, renewing the certificate by itself"),
        (
            "enroll",
            "enroll now (with the token or the factory birth certificate) and exit; "
            "use --force after a revocation",
        ),
        ("status", "print identity, certificate serial and expiry, next renewal, last connection"),
    ):
        cmd = sub.add_parser(
            name,
            help=text,
            description=text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cmd.add_argument("--config", "-c", type=Path, required=True, help="path to agent.toml")
        cmd.add_argument("--verbose", "-v", action="store_true", help="debug logging")
        if name == "enroll":
            cmd.add_argument(
                "--force",
                action="store_true",
                help="re-enroll with the token or birth certificate even if a valid certificate is "
                "stored",
            )
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


# Options each command takes besides --config/-c and --verbose/-v (see _parser).
_FLAGS = {"run": (), "enroll": ("--force",), "status": ("--json",)}


def _plain_args(argv: Sequence[str]) -> SimpleNamespace | None:
    """The command lines systemd and scripts use (`run --config PATH`, flags spelled out, each
    once), parsed without argparse; None for anything else, which argparse then handles (help,
    usage errors, abbreviations, `--`). Exactly what argparse would return for the same line.

    Why: argparse and gettext are a third of a MiB of RSS that a device agent, idle for weeks,
    would keep for having read its command line once.
    """
    if not argv or argv[0] not in _FLAGS:
        return None
    command, rest = argv[0], list(argv[1:])
    values: dict[str, Any] = {"command": command, "config": None, "verbose": False}
    values.update({flag[2:]: False for flag in _FLAGS[command]})
    seen: set[str] = set()
    while rest:
        arg = rest.pop(0)
        if arg.startswith("--config="):
            arg, rest = "--config", [arg.removeprefix("--config="), *rest]
        name = {"-c": "--config", "-v": "--verbose"}.get(arg, arg)
        if name in seen:
            return None
        seen.add(name)
        if name == "--config":
            # A value that looks like an option is argparse's call (it may refuse it).
            if not rest or not rest[0] or rest[0].startswith("-"):
                return None
            values["config"] = Path(rest.pop(0))
        elif name == "--verbose" or name in _FLAGS[command]:
            values[name[2:]] = True
        else:
            return None
    if values["config"] is None:
        return None
    return SimpleNamespace(**values)


async def _serve(agent: Agent, command: str, force: bool) -> ExitCode:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    if command == "enroll":
        return await agent.enroll(force=force)
    return await agent.run()


def _enroll_outcome(agent: Agent, enrolled: bool) -> str:
    """What `enroll` did, in one line for stdout."""
    ident = agent.identity
    assert ident is not None
    held = f"certificate serial {ident.serial_hex}, valid until {ident.not_after.isoformat()}"
    if enrolled:
        renewal = ident.next_renewal.isoformat()
        return f"{agent.device_id}: enrolled: {held}; next renewal at {renewal}"
    return (
        f"{agent.device_id}: already enrolled ({held}): nothing to do "
        "(`enroll --force` re-enrolls with the token or birth certificate)"
    )


def _run_locked(config: AgentConfig, command: str, force: bool) -> int:
    """run/enroll while holding the state folder's lock (device_agent.state_lock)."""
    enrolled: list[AgentEvent] = []

    def on_event(event: AgentEvent) -> None:
        if event.kind is EventKind.ENROLLED:
            enrolled.append(event)

    agent = Agent(config, on_event=on_event)
    code = asyncio.run(_serve(agent, command, force))
    if command == "enroll" and code == ExitCode.OK and agent.identity is not None:
        print(_enroll_outcome(agent, bool(enrolled)), flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    line = sys.argv[1:] if argv is None else list(argv)
    args = _plain_args(line) or _parser().parse_args(line)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("fleetpki.agent.mqtt").setLevel(logging.WARNING)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    if args.command == "status":
        from device_agent.status import format_report, status_report

        report, code = status_report(config, datetime.now(UTC))
        print(json.dumps(report, indent=2) if args.json else format_report(report))
        return code
    lock = StateLock(config.state_dir)
    try:
        lock.acquire()
    except AgentBusy as exc:
        log.error("%s: %s", config.device_id, exc)
        return ExitCode.BUSY
    except OSError as exc:
        # Before anything is enrolled: a token is never spent on a key that cannot be kept.
        why = exc.strerror or str(exc)
        log.error(
            "%s",
            ConfigError(config.path, "state.dir", f"cannot write {config.state_dir}: {why}"),
        )
        return ExitCode.CONFIG
    try:
        return _run_locked(config, args.command, getattr(args, "force", False))
    except KeyboardInterrupt:
        return ExitCode.OK
    except Exception:
        log.exception("%s: crashed", config.device_id)
        return ExitCode.CRASH
    finally:
        lock.release()


if __name__ == "__main__":
    sys.exit(main())
