"""`python -m daemon` is the `atoll` command."""

from daemon.cli import main

main()
