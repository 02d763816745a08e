"""`fleetpki node add`: the home of another `fleetpki serve` node on the same CA and registry."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from enroll_server.cli.console import stdout_console
from enroll_server.cli.exit_codes import ExitCode, fail
from enroll_server.cli.options import HomeOpt, initialized_layout

app = typer.Typer(
    help="Nodes: more `fleetpki serve` processes on the same CA and PostgreSQL registry.",
    no_args_is_help=True,
)
console = stdout_console(soft_wrap=True)


@app.command("add")
def add(
    hostname: Annotated[
        list[str],
        typer.Option(
            "--hostname",
            help="A name the node is reached by (repeatable): its TLS certificate's SANs.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="The new node's home (absent or empty).")],
    public_host: Annotated[
        str,
        typer.Option("--public-host", help="The name in its URLs (default: the first --hostname)."),
    ] = "",
    home: HomeOpt = None,
) -> None:
    """Prepare a node's home from this one: the CA files it needs, a TLS server certificate of
    its own for --hostname, the same registry. Copy DIR to the node and run `fleetpki serve
    --home DIR` there."""
    from enroll_server.home.layout import HomeError
    from enroll_server.home.node import add_node

    layout = initialized_layout(home)
    try:
        node = add_node(layout.root, out, tuple(hostname), datetime.now(UTC), public_host)
    except HomeError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}", ExitCode.FAILED)
    names = ", ".join(hostname)
    console.print(f"node home {node.layout.root}: TLS server certificate for {names}")
    console.print(f"copied: {', '.join(node.copied)}")
    console.print(f"next: copy {node.layout.root} to the node, then `fleetpki serve --home DIR`")
