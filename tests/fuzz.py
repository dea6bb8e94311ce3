"""`make fuzz` (`python -m tests.fuzz`): property-based fuzzing of every operation in a real
`contentml serve`'s `/openapi.json` with schemathesis. Not part of `make test` (pytest collects
only `test_*.py`).

1. A state folder with trained models: `--home`, else a temporary one. `contentml demo
   --families FAMILIES` trains each family's champion where it has none (about 10 minutes for
   all five on 2 cores), and calls each once.
2. `contentml serve` on a free loopback port with the callers' and the admin token
   (`CONTENTML_API_TOKEN`, `CONTENTML_ADMIN_TOKEN`). The fuzzing sends the admin token, which
   opens every route, the admin routes too.
3. Auth: every operation, called without a token and with a wrong one, answers 401 (but the
   health, probe and metrics paths, `serving.admission.OPEN_PATHS`); each admin route, called
   with the callers' token, answers 403.
4. schemathesis over every operation of the server's schema: examples, coverage, fuzzing and
   stateful phases, positive and negative data, at most `--max-examples` cases per operation
   and phase, check `not_a_server_error`.

Every request and answer goes to a HAR file (`--report-dir`); the summary counts the answers
by status and operation, and lists each 5xx with a curl command that sends it again (the token
as `$CONTENTML_API_TOKEN`: use the admin token). Exit status 1 when any answer was >= 500, an
auth check failed, or schemathesis itself could not test an operation.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydantic
from starlette.routing import compile_path

from contentml.names import NICHE_MODEL_PREFIX
from contentml.settings import Settings
from entrypoints.demo import FAMILIES, free_port, model_server
from serving.admission import ADMIN_ROUTES, OPEN_PATHS
from serving.backend.batch.models import BatchRequest
from serving.backend.channels import ChannelPoint, QuarantineRequest
from serving.backend.tasks import TASKS
from serving.model_server.niche import TrendingVideo
from serving.model_server.openai_schema import ChatCompletionRequest, CompletionRequest
from serving.model_server.quality import QualityRequest
from training.revenue.experiment import Metric, Policy
from training.trend.model import MIN_HISTORY, TrendRequest

WORKERS = 2
"""schemathesis' concurrent callers: one per core (the server and the generator share them)."""

REQUEST_TIMEOUT_SECONDS = 60.0
"""Longer than any route's SLA (a script's is 30 s): a request still open then is a hang."""

HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})

PATH_PARAMETER = "fuzz"
"""What the auth check puts in a path's parameters (refused before any name is read)."""


def _say(message: str) -> None:
    print(f"[fuzz] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    """The schema's path template, e.g. `/v1/models/{model}:predict`."""

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def operations(schema: dict[str, Any]) -> list[Operation]:
    return [
        Operation(method.upper(), path)
        for path, item in schema.get("paths", {}).items()
        for method in item
        if method in HTTP_METHODS
    ]


# --- the schema the fuzzing reads ----------------------------------------------------------
# Several routes read their body themselves (KServe's V1 routes, OpenAI's, the CrisisManager's
# and the rewards), so the server's schema says nothing of it, and schemathesis would send them
# no body at all. The schema given to schemathesis adds the bodies their code parses, and the
# names the server holds, so that its positive cases reach the predictors and its negative ones
# are near misses.

REVENUE_INSTANCE = {
    "type": "object",
    "properties": {
        # `contentml.names.revenue_experiment_name`'s, shorter.
        "experiment": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,40}$"},
        "arms": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,20}$"},
            "minItems": 2,
            "maxItems": 5,
            "uniqueItems": True,
        },
        "metric": {"enum": [m.value for m in Metric]},
        "policy": {"enum": [p.value for p in Policy]},
    },
    "required": ["experiment", "arms"],
    "additionalProperties": False,
}
"""What `serving.model_server.revenue.RevenueModel` parses (by hand: it has no pydantic type)."""

REWARDS = "/v1/experiments/{experiment}/rewards"

BODIES: dict[tuple[str, str], type[pydantic.BaseModel] | dict] = {
    ("POST", "/openai/v1/completions"): CompletionRequest,
    ("POST", "/openai/v1/chat/completions"): ChatCompletionRequest,
    ("POST", "/v1/channels/{channel_id}/metrics"): ChannelPoint,
    ("POST", "/v1/channels/{channel_id}/quarantine"): QuarantineRequest,
}
"""Operations whose body the schema leaves out -> what their code parses."""

V1_PREDICT = "/v1/models/{model_name}:predict"
BATCH = "/batch/{task}"


def instance_schema(model: str) -> type[pydantic.BaseModel] | dict | None:
    """The V1 instance a served model parses; None: it answers no V1 call (`script`)."""
    if model.startswith(NICHE_MODEL_PREFIX) or model == "niche":
        return TrendingVideo
    return {"trend": TrendRequest, "quality": QualityRequest, "revenue": REVENUE_INSTANCE}.get(
        model
    )


class _Components:
    """JSON schemas of pydantic types, their definitions added to the schema's components."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schemas = schema.setdefault("components", {}).setdefault("schemas", {})

    def __call__(self, body: type[pydantic.BaseModel] | dict) -> dict[str, Any]:
        if isinstance(body, dict):
            return body
        found = body.model_json_schema(ref_template="#/components/schemas/fuzz.{model}")
        for name, definition in found.pop("$defs", {}).items():
            self.schemas[f"fuzz.{name}"] = definition
        return found


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _concrete(
    paths: dict[str, Any], template: str, parameter: str, value: str, body: dict[str, Any]
) -> None:
    """A path of its own for `template`'s POST with `parameter` set to `value`, taking
    `body`."""
    operation = paths.get(template, {}).get("post")
    if operation is None:
        return
    paths[template.replace(f"{{{parameter}}}", value)] = {
        "post": {
            **operation,
            "operationId": f"{operation['operationId']}_{value}",
            "parameters": [p for p in operation.get("parameters", []) if p["name"] != parameter],
            "requestBody": _json_body(body),
        }
    }


def rewards(arms: list[str]) -> dict[str, Any]:
    """A rewards body: one `{"arm", "reward"}` or a list of them, for one of `arms`."""
    reward = {
        "type": "object",
        "properties": {
            "arm": {"enum": arms} if arms else {"type": "string"},
            "reward": {"type": "number"},
        },
        "required": ["arm", "reward"],
        "additionalProperties": False,
    }
    return {"anyOf": [reward, {"type": "array", "items": reward, "minItems": 1}]}


def complete(schema: dict[str, Any], models: list[str], experiments: list[dict[str, Any]]) -> dict:
    """`schema` with the bodies of `BODIES`, a V1 `:predict` path per served model with its
    instances, a batch path per task with its items, a rewards body for the experiments' arms,
    and the served models and existing experiments as the values of the path parameters naming
    them (schemathesis' negative cases then try other names)."""
    schema = json.loads(json.dumps(schema))
    json_schema = _Components(schema)
    openai_model = {"enum": [m for m in models if instance_schema(m) is None] or ["script"]}
    paths = schema["paths"]
    for (method, path), body in BODIES.items():
        operation = paths.get(path, {}).get(method.lower())
        if operation is not None and "requestBody" not in operation:
            body_schema = json_schema(body)
            if path.startswith("/openai/"):
                body_schema["properties"]["model"] = openai_model
            operation["requestBody"] = _json_body(body_schema)
    operation = paths.get(REWARDS, {}).get("post")
    if operation is not None and "requestBody" not in operation:
        arms = sorted({arm for experiment in experiments for arm in experiment["arms"]})
        operation["requestBody"] = _json_body(rewards(arms))
    names = {"model_name": models, "experiment": sorted(e["name"] for e in experiments)}
    for item in paths.values():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and names.get(parameter["name"]):
                    parameter["schema"] = {"type": "string", "enum": names[parameter["name"]]}
    for model in models:
        if (instance := instance_schema(model)) is not None:
            instance = json_schema(instance)
            if model == "trend":
                # Its length is checked after parsing: too few values are refused before the
                # model is reached.
                instance["properties"]["history"] = {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": MIN_HISTORY,
                    "maxItems": 4 * MIN_HISTORY,
                }
            body = {
                "type": "object",
                "properties": {"instances": {"type": "array", "items": instance, "minItems": 1}},
                "required": ["instances"],
            }
            _concrete(paths, V1_PREDICT, "model_name", model, body)
    for task, spec in TASKS.items():
        # A batch item is the task route's body with an `id`.
        item = json_schema(spec.body)
        item["properties"]["id"] = {"type": "string", "minLength": 1, "maxLength": 40}
        item["required"] = [*item.get("required", []), "id"]
        body = json_schema(BatchRequest)
        body["properties"]["items"] = {
            "type": "array",
            "items": item,
            "minItems": 1,
            "maxItems": 5,
        }
        _concrete(paths, BATCH, "task", task.value, body)
    return schema


# --- the state folder and the server ---------------------------------------------------------


def train(settings: Settings, families: list[str], log: Path) -> None:
    """Each family's champion where `settings.home` has none: `contentml demo`, which also
    calls every family once (a broken champion fails here, not as a fuzzing finding)."""
    _say(f"training {', '.join(families)} where {settings.home} has no champion (log: {log})")
    with log.open("ab") as output:
        result = subprocess.run(
            [sys.executable, "-m", "entrypoints.cli", "demo", "--families", ",".join(families)],
            env={**os.environ, **settings.to_env()},
            stdout=output,
            stderr=output,
        )
    if result.returncode != 0:
        sys.stderr.write(log.read_text(errors="replace")[-3000:])
        raise RuntimeError(f"`contentml demo` failed (exit {result.returncode}); its log: {log}")


@contextlib.contextmanager
def served(settings: Settings, log: Path) -> Iterator[str]:
    """`contentml serve` (every model, no batch workers: the fuzzing only submits jobs) on a
    free port with `settings`' tokens; yields its URL once it is ready."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The script route's self-hosted provider is this same server.
    settings = dataclasses.replace(settings, serving_url=url)
    _say(f"starting `contentml serve` on port {port} (its log: {log})")
    try:
        with model_server(settings, port, "--workers", "0", log=log) as url:
            yield url
    except (RuntimeError, TimeoutError):
        sys.stderr.write(log.read_text(errors="replace")[-3000:])
        raise


def server_state(url: str, token: str) -> tuple[dict[str, Any], list[str], list[dict]]:
    """The server's OpenAPI schema, the models it serves and the experiments it holds."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        schema = http.get("/openapi.json").raise_for_status().json()
        models = http.get("/v2/models").raise_for_status().json()["models"]
        found = http.get("/v1/experiments").raise_for_status().json()["experiments"]
    return schema, sorted(models), found


# --- auth --------------------------------------------------------------------------------


def auth_problems(url: str, ops: list[Operation], callers_token: str) -> list[str]:
    """Each operation that answered other than 401 without a token or with a wrong one, and
    each admin route that answered other than 403 with the callers' token."""
    problems = []
    bearer = {
        "no token": None,
        "a wrong token": secrets.token_urlsafe(16),
        "the callers' token": callers_token,
    }
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_SECONDS) as http:
        for op in ops:
            if op.path in OPEN_PATHS:
                continue
            path = re.sub(r"\{[^}]+\}", PATH_PARAMETER, op.path)
            admin = any(m == op.method and r.fullmatch(path) for m, r in ADMIN_ROUTES)
            for name, token in bearer.items():
                if token != callers_token:
                    expected = 401
                elif admin:
                    expected = 403
                else:
                    continue  # the callers' token opens the rest: the fuzzing finds out
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                status = http.request(op.method, path, headers=headers, json={}).status_code
                if status != expected:
                    problems.append(f"{op} with {name}: {status}, not {expected}")
    return problems


# --- schemathesis ------------------------------------------------------------------------


REPOSITORY_ROUTES = r"^/v2/repository/"
"""KServe's load and unload, fuzzed last and on their own: a served model unloaded (the
stateful phase finds the names in answers) turns every later call of it into a 404."""

RUNS = {
    "routes": ("--exclude-path-regex", REPOSITORY_ROUTES),
    "repository": ("--include-path-regex", REPOSITORY_ROUTES),
}
"""The schemathesis runs, in order: name -> the operations it tests."""


@dataclass(frozen=True)
class Outcome:
    exit_status: int
    report: dict[str, Any]
    """schemathesis' JSON report."""
    har: Path
    """Every request and answer."""


def run_schemathesis(
    url: str, token: str, schema_file: Path, report_dir: Path, config: argparse.Namespace
) -> dict[str, Outcome]:
    """Each of `RUNS` over the schema in `schema_file`."""
    # Its crash cache (what `st replay` reads) in the report folder, not in the working tree.
    config_file = report_dir / "schemathesis.toml"
    config_file.write_text(f"[cache]\ndirectory = {json.dumps(str(report_dir / 'cache'))}\n")
    outcomes = {}
    for name, selection in RUNS.items():
        har, report = report_dir / f"{name}.har", report_dir / f"{name}.json"
        command = [
            *(sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_file)),
            *("run", str(schema_file), "--url", url, *selection),
            *("--header", f"Authorization: Bearer {token}"),
            *("--checks", "not_a_server_error", "--mode", "all"),
            *("--max-examples", str(config.max_examples), "--workers", str(WORKERS)),
            *("--request-timeout", str(REQUEST_TIMEOUT_SECONDS), "--continue-on-failure"),
            *("--report", "json,har", "--report-json-path", str(report)),
            *("--report-har-path", str(har), "--generation-database", "none", "--no-color"),
        ]
        if config.seed is not None:
            command += ["--seed", str(config.seed)]
        _say(f"schemathesis ({name}): at most {config.max_examples} cases per operation and phase")
        # Its own summary (failures with curl commands, warnings, the seed) goes to our stderr.
        result = subprocess.run(command, stdout=sys.stderr)
        outcomes[name] = Outcome(result.returncode, json.loads(report.read_text()), har)
    return outcomes


# --- the summary -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerError:
    operation: str
    status: int
    curl: str
    answer: str


def template_of(method: str, path: str, ops: list[Operation]) -> str:
    """`METHOD TEMPLATE` of the schema's path that `path` matches (KServe's `:predict` routes
    too); schemathesis also tries methods the schema does not list."""
    # The schema's own method first, and a model's own `:predict` path before the template.
    for op in sorted(ops, key=lambda op: (op.method != method, "{" in op.path)):
        if compile_path(op.path)[0].fullmatch(path):
            return f"{method} {op.path}"
    return f"{method} {path}"


def curl(request: dict[str, Any], url: str) -> str:
    """The request as a curl command, with the server's URL and (admin) token left to the
    shell's `$URL` and `$CONTENTML_API_TOKEN`."""
    command = ["curl", "-sS", "-X", request["method"]]
    post = request.get("postData")
    if post is not None:
        command += ["-H", f"Content-Type: {post.get('mimeType', 'application/json')}"]
        command += ["--data-binary", post.get("text", "")]
    path = request["url"].removeprefix(url)
    return (
        f'{shlex.join(command)} -H "Authorization: Bearer $CONTENTML_API_TOKEN" '
        f'"$URL"{shlex.quote(path)}'
    )


def summarize(
    hars: list[Path], url: str, ops: list[Operation]
) -> tuple[dict[str, Any], list[ServerError]]:
    """Answers by status and by operation, and every answer >= 500."""
    entries = [entry for har in hars for entry in json.loads(har.read_text())["log"]["entries"]]
    statuses: collections.Counter[int] = collections.Counter()
    per_operation: dict[str, collections.Counter[int]] = collections.defaultdict(
        collections.Counter
    )
    errors = []
    for entry in entries:
        request, status = entry["request"], entry["response"]["status"]
        path = httpx.URL(request["url"]).path
        operation = template_of(request["method"], path, ops)
        statuses[status] += 1
        per_operation[operation][status] += 1
        if status >= 500:
            answer = entry["response"].get("content", {}).get("text", "")
            errors.append(ServerError(operation, status, curl(request, url), answer[:500]))
    figures = {
        "requests": len(entries),
        "statuses": dict(sorted(statuses.items())),
        "per_operation": {op: dict(sorted(c.items())) for op, c in sorted(per_operation.items())},
    }
    return figures, errors


def kinds_of(errors: list[ServerError]) -> dict[tuple[str, int, str], list[ServerError]]:
    """The errors by operation, status and answer, the names and numbers it quotes left out."""
    kinds: dict[tuple[str, int, str], list[ServerError]] = collections.defaultdict(list)
    for error in errors:
        reason = re.sub(r"'[^']*'|\d+", "_", error.answer[:200])
        kinds[error.operation, error.status, reason].append(error)
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--max-examples", type=int, default=200, help="per operation and phase")
    parser.add_argument("--seed", type=int, default=None, help="default: a new one, printed")
    parser.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help="families trained and called first (the others' routes answer 503: no champion)",
    )
    parser.add_argument(
        "--home", type=Path, default=None, help="state folder kept between runs (default: temp)"
    )
    parser.add_argument("--report-dir", type=Path, default=Path(".contentml/fuzz"))
    config = parser.parse_args(argv)
    if config.max_examples < 1:
        parser.error("--max-examples must be at least 1")
    started = time.monotonic()
    report_dir = config.report_dir.resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        home = config.home or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        environ = {**os.environ, "CONTENTML_HOME": str(home)}
        # The demo's own calls send no token.
        environ |= {"CONTENTML_API_TOKEN": "", "CONTENTML_ADMIN_TOKEN": ""}
        settings = Settings.from_env(environ)
        train(settings, config.families.split(","), report_dir / "train.log")
        trained = time.monotonic() - started
        callers, admin = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        with_tokens = dataclasses.replace(settings, api_token=callers, admin_token=admin)
        url = stack.enter_context(served(with_tokens, report_dir / "server.log"))
        served_schema, models, experiments = server_state(url, callers)
        ops = operations(served_schema)
        (report_dir / "openapi.json").write_text(json.dumps(served_schema, indent=1))
        fuzzed_schema = complete(served_schema, models, experiments)
        schema_file = report_dir / "fuzzed-openapi.json"
        schema_file.write_text(json.dumps(fuzzed_schema, indent=1))
        _say(f"{len(ops)} operations; checking that each wants its token")
        refused_wrongly = auth_problems(url, ops, callers)
        fuzz_started = time.monotonic()
        outcomes = run_schemathesis(url, admin, schema_file, report_dir, config)
        fuzzed = time.monotonic() - fuzz_started
        hars = [outcome.har for outcome in outcomes.values()]
        figures, errors = summarize(hars, url, operations(fuzzed_schema))
    summary = {
        "operations": len(ops),
        "operations_fuzzed": len(operations(fuzzed_schema)),
        **figures,
        "server_errors": len(errors),
        "auth_problems": refused_wrongly,
        "schemathesis": {
            name: {
                "exit": outcome.exit_status,
                "errors": outcome.report.get("errors", []),
                "seed": outcome.report.get("seed"),
            }
            for name, outcome in outcomes.items()
        },
        "seconds": {
            "training": round(trained, 1),
            "fuzzing": round(fuzzed, 1),
            "total": round(time.monotonic() - started, 1),
        },
    }
    errors_file = report_dir / "server-errors.json"
    errors_file.write_text(json.dumps([dataclasses.asdict(e) for e in errors], indent=1))
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    for (operation, status, _), found in kinds_of(errors).items():
        shortest = min(found, key=lambda e: len(e.curl))
        _say(f"{len(found)} x {status} {operation}, e.g. {shortest.answer!r}\n    {shortest.curl}")
    for problem in refused_wrongly:
        _say(f"auth: {problem}")
    seeds = ", ".join(str(o.report.get("seed")) for o in outcomes.values())
    _say(
        f"{summary['requests']:,} requests over {len(ops)} operations "
        f"({summary['operations_fuzzed']} with the paths added) in {fuzzed:.0f} s "
        f"(seeds {seeds}): {summary['statuses']}; {len(errors)} answers >= 500 "
        f"({errors_file}), {len(refused_wrongly)} auth problems; reports in {report_dir}"
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "per_operation"}))
    # schemathesis exits 1 for its failures (the 5xx counted above); other statuses, or errors
    # in its report (an operation it could not test, a request timed out), are failures too.
    broken = [o for o in outcomes.values() if o.exit_status not in (0, 1) or o.report["errors"]]
    failed = errors or refused_wrongly or broken
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
