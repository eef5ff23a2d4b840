"""`python -m mergesmith.cli`."""

from mergesmith.cli import main

main()
