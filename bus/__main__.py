"""``python -m bus``: the same as the ``bus`` command."""

from bus._cli import main

raise SystemExit(main())
