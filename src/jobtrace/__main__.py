"""`python -m jobtrace` is the `jobtrace` command."""

from jobtrace.cli import main

main()
