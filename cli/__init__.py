"""The command line, the top floor (ft.cli): `ft` (main.py) and its command table (commands.py), the demo and the
synthetic clips it makes, the finetrainers flag table and its translator, `ft inspect` and `ft estimate`. It imports
the stages lazily, inside the commands; nothing below imports it."""
