"""Small command-line tools, run with ``python -m ovseg_lab.tools.<name>``."""
