"""`python -m tests.load.state`: the registry state the load tests need, made where missing, as
one JSON line `{"champion": "1", "other": "2"}`.

- A trend champion: the one in `CONTENTML_HOME`, else the training pipeline makes one (as
  `make bench` does).
- A second version to swap with it in the promote/rollback cycles: the champion's own
  artifacts registered once more (tagged `contentml.loadtest.copy_of`, reused by later runs), so
  both versions answer alike and only the swaps themselves are measured.

A separate process from the runner: locust patches the standard library for gevent, the
training pipeline should not run under that.
"""

from __future__ import annotations

import json
import sys

from mlflow.tracking import MlflowClient

from contentml import registry
from contentml.registry import Alias
from contentml.settings import Settings
from entrypoints import runner

MODEL = "trend"
COPY_TAG = "contentml.loadtest.copy_of"
"""On a version registered by the load tests: the version whose artifacts it shares."""


def champion(settings: Settings) -> str:
    client = registry.connect(settings)
    version = registry.alias_version(client, MODEL, Alias.CHAMPION)
    if version is None:
        print("[load] no trend champion yet: running the training pipeline", file=sys.stderr)
        runner.run_local(settings, "training", {"max_series": 24})
        version = registry.alias_version(client, MODEL, Alias.CHAMPION)
    if version is None:
        raise registry.RegistryError("the training pipeline made no trend champion")
    return version


def swap_partner(client: MlflowClient, champion: str) -> str:
    """The version the cycles promote: a copy of the champion, or the original where the
    champion is itself the copy (a run stopped between a promote and its rollback)."""
    current = registry.model_version(client, MODEL, champion)
    original = current.tags.get(COPY_TAG)
    if original is not None:
        return original
    for version in client.search_model_versions(f"name='{MODEL}'"):
        if version.tags.get(COPY_TAG) == champion:
            return str(version.version)
    copy = client.create_model_version(
        MODEL,
        source=current.source,
        run_id=current.run_id,
        tags={COPY_TAG: champion},
        description=f"v{champion}'s artifacts again, for the load tests' promote/rollback cycles",
        model_id=current.model_id,
    )
    return str(copy.version)


def main() -> int:
    settings = Settings.from_env()
    version = champion(settings)
    other = swap_partner(registry.connect(settings), version)
    print(json.dumps({"champion": version, "other": other}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
