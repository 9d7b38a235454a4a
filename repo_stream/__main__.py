"""``python -m repo_stream``: see :mod:`repo_stream.cli`."""

from .cli import main

raise SystemExit(main())
