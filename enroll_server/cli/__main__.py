"""`python -m enroll_server.cli`: the `fleetpki` command."""

from enroll_server.cli import main

main()
