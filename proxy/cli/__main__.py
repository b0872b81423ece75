"""``python -m proxy.cli``: the pgwarden command without its console script."""

from proxy.cli.main import main

raise SystemExit(main())
