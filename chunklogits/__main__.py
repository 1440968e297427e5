"""``python -m chunklogits``: the main job (see ``chunklogits.cli``)."""

from .cli import main

raise SystemExit(main())
