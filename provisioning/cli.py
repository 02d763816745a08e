"""`fleetpki batch ...`: the operator commands for factory lots (a typer sub-app)."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode
from enroll_server.cli.exit_codes import fail as _fail
from enroll_server.cli.options import HomeOpt, JsonOpt, ReasonOpt
from enroll_server.home.config import ConfigError, ServerConfig, load_config
from enroll_server.home.layout import HomeError, HomeLayout, registry_location, resolve_home
from enroll_server.pki.errors import PkiError, UnsupportedKey
from enroll_server.pki.keys import parse_key_type
from enroll_server.registry import Registry, RegistryError, UnknownBatch, UnknownDevice
from fleetpki.atomic_file import PUBLIC_MODE, atomic_writer
from fleetpki.clock import utc_now
from fleetpki.duration import InvalidDuration, format_duration, parse_duration
from fleetpki.identity import DeviceId, InvalidIdentifier
from provisioning.batch import BatchRequest, BatchResult, IdevidOptions, create_batch, new_batch_id
from provisioning.errors import ProvisioningError
from provisioning.host_check import unresolvable
from provisioning.lifecycle import (
    BatchSummary,
    ReissuedToken,
    TokenPurpose,
    export_manifest,
    list_batches,
    reissue_token,
    revoke_batch,
    show_batch,
)
from provisioning.manufacturer import DEFAULT_MANUFACTURER

app = typer.Typer(
    help="Factory batches: provision a lot, follow it, reissue tokens, revoke it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = stdout_console()
err = Console(stderr=True)
ACTOR = "cli"


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@contextmanager
def _errors() -> Iterator[None]:
    """One place that turns the error trees into a message and an exit code."""
    try:
        yield
    except (UnknownBatch, UnknownDevice) as exc:
        _fail(str(exc), ExitCode.NOT_FOUND)
    except (
        ProvisioningError,
        RegistryError,
        InvalidIdentifier,
        InvalidDuration,
        HomeError,
        ConfigError,
    ) as exc:
        _fail(str(exc), ExitCode.USAGE)
    except PkiError as exc:
        _fail(str(exc), ExitCode.FAILED)
    except KeyboardInterrupt:
        _fail("interrupted; nothing of the batch was kept", ExitCode.INTERRUPTED)
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}", ExitCode.FAILED)


@contextmanager
def _home(home: Path | None) -> Iterator[tuple[HomeLayout, ServerConfig, Registry]]:
    """The home's layout and config (no CA key needed) and its registry, opened."""
    with _errors():
        layout = HomeLayout(resolve_home(home))
        if not layout.config.exists():
            raise HomeError(layout.root, "not initialized: run `fleetpki init --home` first")
        config = load_config(layout.config)
        registry = Registry.open(registry_location(layout, config))
    try:
        with _errors():
            yield layout, config, registry
    finally:
        registry.close()


class _Bars:
    """Rich progress bars on stderr, one per phase; silent when stderr is not a terminal."""

    _LABELS = {
        "bundles": "writing bundles",
        "sync": "syncing to disk",
        "registry": "registering",
        "publish": "publishing",
        "revoke": "revoking",
    }

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<16}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            disable=not err.is_terminal,
        )
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        task = self._tasks.get(phase)
        if task is None:
            task = self.progress.add_task(self._LABELS.get(phase, phase), total=total)
            self._tasks[phase] = task
        self.progress.update(task, completed=done, total=total)

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _duration(value: str | None) -> timedelta | None:
    return None if value is None else parse_duration(value)


@app.command()
def create(
    home: HomeOpt = None,
    count: Annotated[
        int | None, typer.Option("--count", "-n", help="Number of devices (ids from --prefix).")
    ] = None,
    prefix: Annotated[str, typer.Option(help="Id prefix; ids are PREFIX + 000001...")] = "dev-",
    start: Annotated[int, typer.Option(help="First sequence number.")] = 1,
    ids_from: Annotated[
        Path | None,
        typer.Option("--ids-from", help="CSV of manufacturer serials (first column) as ids."),
    ] = None,
    token_ttl: Annotated[
        str | None, typer.Option(help="Token lifetime, e.g. 7d (default: the home's config).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default: ./<batch id>).")
    ] = None,
    tar: Annotated[bool, typer.Option("--tar", help="One tar per device, not a folder.")] = False,
    force: Annotated[bool, typer.Option(help="Write into a non-empty --out folder.")] = False,
    batch_id: Annotated[
        str | None, typer.Option("--batch-id", help="Batch id (default: lot-<time>-<random>).")
    ] = None,
    note: Annotated[str, typer.Option(help="Free text kept with the batch.")] = "",
    key_type: Annotated[
        str, typer.Option("--key-type", help="Key type the devices generate.")
    ] = "ec-p256",
    idevid: Annotated[
        bool, typer.Option("--idevid", help="Factory birth certificates instead of tokens.")
    ] = False,
    manufacturer: Annotated[
        str, typer.Option(help="Manufacturer CA for --idevid (created on first use).")
    ] = DEFAULT_MANUFACTURER,
    idevid_csrs: Annotated[
        Path | None,
        typer.Option("--idevid-csrs", help="PEM file of factory CSRs (CN = device id)."),
    ] = None,
    idevid_key_type: Annotated[
        str, typer.Option(help="Key type of birth keys generated here (no --idevid-csrs).")
    ] = "ec-p256",
    est_url: Annotated[
        list[str] | None,
        typer.Option(
            "--est-url",
            help="An EST base URL the bundles name (repeatable: several nodes; the agent "
            "fails over among them). Default: the home's own.",
        ),
    ] = None,
    broker: Annotated[
        list[str] | None,
        typer.Option(
            "--broker",
            help="A broker host:port the bundles name (repeatable, as --est-url).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Provision a factory lot: ids, tokens or birth certificates, bundles, manifest.csv.

    All or nothing: on any error or Ctrl-C nothing of the lot is kept.
    """
    now = utc_now()
    with _home(home) as (layout, config, registry):
        if idevid_csrs is not None and not idevid:
            _fail("--idevid-csrs needs --idevid")
        options = None
        if idevid:
            try:
                birth_key = parse_key_type(idevid_key_type)
            except UnsupportedKey as exc:
                _fail(exc.reason)
            options = IdevidOptions(manufacturer, idevid_csrs, birth_key)
        batch = batch_id or new_batch_id(now)
        request = BatchRequest(
            count=count,
            prefix=prefix,
            start=start,
            serials=ids_from,
            token_ttl=_duration(token_ttl),
            out_dir=out_dir if out_dir is not None else Path.cwd() / batch,
            tar=tar,
            force=force,
            batch_id=batch,
            note=note,
            device_key_type=key_type,
            idevid=options,
            est_urls=tuple(est_url or ()),
            brokers=tuple(broker or ()),
        )
        started = time.perf_counter()
        with _Bars() as bars:
            result = create_batch(
                registry, layout, config, request, now=now, actor=ACTOR, progress=bars
            )
        elapsed = time.perf_counter() - started
    _print_created(result, elapsed, as_json)
    why = unresolvable(config.public_host)
    if why is not None:
        err.print(
            f"warning: the bundles send devices to {config.public_host!r}, which does not "
            f"resolve from here ({why}); check the name devices will use (`public_host` in "
            f"{layout.config}, or `fleetpki init --public-host`)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _print_created(result: BatchResult, elapsed: float, as_json: bool) -> None:
    if as_json:
        _emit_json({**result.to_json(), "seconds": round(elapsed, 3)})
        return
    rate = result.count / elapsed if elapsed > 0 else 0.0
    if result.resumed:
        out.print(
            f"[green]finished[/green] batch [bold]{result.batch_id}[/bold] "
            f"({result.kind.value}, {result.count} devices): an interrupted run had registered "
            "it; its bundles are now in place"
        )
    else:
        out.print(
            f"[green]created[/green] batch [bold]{result.batch_id}[/bold] ({result.kind.value}): "
            f"{result.count} devices in {elapsed:.1f} s ({rate:,.0f}/s)"
        )
    out.print(f"  bundles   {result.out_dir}")
    out.print(f"  manifest  {result.manifest}")
    if result.token_expires_at is not None:
        out.print(f"  tokens expire {result.token_expires_at.isoformat(timespec='seconds')}")


def _summary_row(summary: BatchSummary) -> list[str]:
    c = summary.counts
    return [
        summary.batch.batch_id,
        summary.batch.kind.value,
        *(str(c[k]) for k in ("total", "provisioned", "enrolled", "token_expired", "revoked")),
    ]


# Creation time and suspended devices are in `show` and --json: the table keeps to 80 columns.
_COLUMNS = ("kind", "total", "provisioned", "enrolled", "expired", "revoked")


@app.command("list")
def list_(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """All batches with their devices by state."""
    with _home(home) as (_, _cfg, registry):
        summaries = list_batches(registry, utc_now())
    if as_json:
        _emit_json([s.to_json() for s in summaries])
        return
    table = Table(box=None, pad_edge=False)
    table.add_column("batch", no_wrap=True)
    for name in _COLUMNS:
        table.add_column(name, justify="left" if name == "kind" else "right")
    for summary in summaries:
        table.add_row(*_summary_row(summary))
    out.print(table)


@app.command()
def show(
    batch_id: Annotated[str, typer.Argument(help="Batch id.")],
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One batch: provisioned, enrolled, token expired, suspended, revoked."""
    with _home(home) as (_, _cfg, registry):
        summary = show_batch(registry, batch_id, utc_now())
    if as_json:
        _emit_json(summary.to_json())
        return
    batch = summary.batch
    out.print(f"batch [bold]{batch.batch_id}[/bold] ({batch.kind.value})")
    out.print(f"  created    {batch.created_at.isoformat(timespec='seconds')}")
    out.print(f"  token ttl  {format_duration(batch.token_ttl)}")
    if batch.note:
        out.print(f"  note       {batch.note}", highlight=False, markup=False)
    for key in ("total", "provisioned", "enrolled", "token_expired", "suspended", "revoked"):
        out.print(f"  {key.replace('_', ' '):<14} {summary.counts[key]:>9}")


_TtlOpt = Annotated[str | None, typer.Option(help="Token lifetime (default: config).")]
_OutOpt = Annotated[Path, typer.Option("--out", help="Write the new bundle to OUT/<device id>/.")]
_StdoutOpt = Annotated[
    bool, typer.Option("--stdout", help="Print the token instead of writing a bundle.")
]
_ForceOpt = Annotated[bool, typer.Option(help="Replace an existing bundle.")]
_KeyTypeOpt = Annotated[str, typer.Option(help="Device key type in agent.toml.")]


def _print_token(result: ReissuedToken, to_stdout: bool, as_json: bool) -> None:
    expires = result.expires_at.isoformat(timespec="seconds")
    cut_off = [f"{s:x}" for s in result.cut_off]
    if as_json:
        data: dict[str, Any] = {
            "device_id": result.device_id.value,
            "token_expires_at": expires,
            "bundle": None if result.bundle is None else str(result.bundle),
            "revoked_serials": cut_off,
        }
        if to_stdout:
            data["token"] = result.token
        _emit_json(data)
        return
    if cut_off:
        err.print(
            f"{result.device_id}: {len(cut_off)} certificate(s) cut off (superseded): "
            + ", ".join(cut_off),
            highlight=False,
        )
    if to_stdout:
        # Asked for explicitly: stdout is the token and nothing else (pipe it to the device).
        sys.stdout.write(result.token + "\n")
    else:
        out.print(f"[green]new token[/green] for {result.device_id} in {result.bundle}")
        out.print(f"  expires {expires}; the previous token no longer works")


def _device_token(
    purpose: TokenPurpose,
    device_id: str,
    home: Path | None,
    ttl: str | None,
    out_dir: Path,
    to_stdout: bool,
    force: bool,
    key_type: str,
    as_json: bool,
) -> None:
    now = utc_now()
    with _home(home) as (layout, config, registry):
        result = reissue_token(
            registry,
            layout,
            config,
            DeviceId.parse(device_id),
            ttl=_duration(ttl),
            now=now,
            out_dir=None if to_stdout else out_dir,
            force=force,
            device_key_type=key_type,
            purpose=purpose,
        )
    _print_token(result, to_stdout, as_json)


def _device_token_command(
    purpose: TokenPurpose, doc: str, force_opt: object = _ForceOpt
) -> Callable[..., None]:
    """`fleetpki batch reissue-token` and `device rekey|readmit`: one command shape, told apart
    by the token's purpose (and what --force allows)."""

    def command(
        device_id: Annotated[str, typer.Argument(help="Device id.")],
        home: HomeOpt = None,
        ttl: _TtlOpt = None,
        out_dir: _OutOpt = Path("."),
        to_stdout: _StdoutOpt = False,
        force: _ForceOpt = False,
        key_type: _KeyTypeOpt = "ec-p256",
        as_json: JsonOpt = False,
    ) -> None:
        _device_token(purpose, device_id, home, ttl, out_dir, to_stdout, force, key_type, as_json)

    command.__doc__ = doc
    command.__annotations__ = {**command.__annotations__, "force": force_opt}
    return command


reissue_token_ = app.command("reissue-token")(
    _device_token_command(
        TokenPurpose.REISSUE,
        """A new one-time token for a device; its previous token dies at once. Its enrollment cuts
    off every older certificate of the device.""",
        Annotated[
            bool,
            typer.Option(help="Replace an existing bundle; allow enrolled and IDevID devices."),
        ],
    )
)


device_rekey = _device_token_command(
    TokenPurpose.REKEY,
    """Re-key a device: cut off every certificate of it now (revoked, reason superseded:
    refused by EST, the broker, CRL and OCSP) and give it a new one-time token to enroll
    anew with a new key.""",
)
device_readmit = _device_token_command(
    TokenPurpose.READMIT,
    """Undo a mistaken revocation: the device gets a new one-time token and may enroll again
    under its id with a new key; its revoked certificates stay revoked (CRL, OCSP).""",
)


@app.command()
def revoke(
    batch_id: Annotated[str, typer.Argument(help="Batch id.")],
    reason: ReasonOpt,
    home: HomeOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Revoke the whole lot: every device and certificate of the batch."""
    now = utc_now()
    with _home(home) as (_, _cfg, registry):
        summary = show_batch(registry, batch_id, now)
        if not (yes or as_json) and not typer.confirm(
            f"Revoke all {summary.counts['total']} devices of batch {batch_id}?", err=True
        ):
            _fail("not confirmed; nothing revoked", ExitCode.FAILED)
        started = time.perf_counter()
        with _Bars() as bars:
            revoked = revoke_batch(
                registry, batch_id, reason=reason, now=now, actor=ACTOR, progress=bars
            )
        elapsed = time.perf_counter() - started
    if as_json:
        _emit_json({"batch_id": batch_id, "revoked_devices": revoked, "seconds": elapsed})
    else:
        out.print(f"[red]revoked[/red] {revoked} devices of batch {batch_id} ({elapsed:.1f} s)")


@app.command()
def export(
    batch_id: Annotated[str, typer.Argument(help="Batch id.")],
    home: HomeOpt = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write to this file (default: stdout).")
    ] = None,
    tar: Annotated[bool, typer.Option("--tar", help="Bundle paths as <id>.tar.")] = False,
) -> None:
    """The batch's manifest again (device id, bundle, token expiry, state); no tokens."""
    with _home(home) as (_, _cfg, registry):
        if out_file is None:
            export_manifest(registry, batch_id, sys.stdout, tar=tar)
            return
        # A fresh temp name (O_EXCL, O_NOFOLLOW) renamed over the target: a symlink planted at
        # either is never written through.
        with atomic_writer(out_file, PUBLIC_MODE) as raw:
            fh = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            rows = export_manifest(registry, batch_id, fh, tar=tar)
            fh.flush()
            fh.detach()
    err.print(f"{rows} devices written to {out_file}")
