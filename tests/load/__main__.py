"""`python -m tests.load`: the load tests (`run.py`).

locust is imported first: it patches the standard library for gevent, which must happen before
anything imports `ssl` or `socket` (httpx, MLflow).
"""

import locust  # noqa: F401

from tests.load.run import main

raise SystemExit(main())
