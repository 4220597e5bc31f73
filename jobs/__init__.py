"""Entry points: `python -m jobs.<name>` locally or via `ray job submit`.

Importing this package makes every job's console show URI credentials as *** (pipeline.storage)."""
from pipeline.storage import guard_console

guard_console()
