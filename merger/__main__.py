"""`python -m merger ...`, as launchers such as `accelerate launch -m merger apply ...` run it."""

from merger.cli import main

main()
