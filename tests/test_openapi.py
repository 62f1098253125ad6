"""The OpenAPI document (``src/wsfanout/openapi.json``) against real hypercorn on a real
socket: schemathesis sends what the document allows, and what it forbids, to every
``/api/`` route, and checks each answer's status, content type and body against it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR

from tests.conftest import DEMO_USERS
from tests.server import Server, demo_server

KEY = "openapi-test-key"
DOCUMENT: dict[str, Any] = json.loads(
    resources.files("wsfanout").joinpath("openapi.json").read_text()
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    # A path parameter that breaks its pattern is a 404 (unknown_user / unknown_group), and
    # 404 is among the statuses this check takes as a refusal: no false alarms from that rule.
    negative_data_rejection,
]
EXAMPLES = 50  # per operation and mode (26 in all): about 15 s
METHODS = ("get", "put", "post", "delete", "patch")
EXISTING = {"username": sorted(DEMO_USERS), "group": ["boys", "girls"], "name": ["boys", "girls"]}
# A request each keyed route would accept, but for the key.
PATH_PARAMETERS = {"username": "greg", "group": "boys", "name": "boys"}
BODIES: dict[str, Any] = {
    "publish": {"type": "broadcast", "text": "hello"},
    "createUser": {"username": "keyless", "password": "keyless-password"},
    "setPassword": {"password": "greg-password-2"},
    "createGroup": {"name": "keyless"},
    "online": {"users": ["greg"]},
}


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


KEYED = [
    pytest.param(path, method, id=operation["operationId"])
    for path, method, operation in operations(DOCUMENT)
    if operation.get("security") == [{"apiKey": []}]
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_db: Path) -> Iterator[Server]:
    """One server for the module with the API on: the demo users and groups."""
    env = {"WSFANOUT_API_KEYS": KEY, "WSFANOUT_RATE_LIMIT": "0"}
    with demo_server(tmp_path_factory.mktemp("openapi"), demo_db, env) as running:
        yield running


@pytest.fixture(scope="module")
def api(server: Server) -> schemathesis.BaseSchema:
    """The document as the running server serves it.

    Each request carries the key and a session cookie (below), so schemathesis is told not
    to make up credentials: it would blame a made-up header it never sent for a refusal.
    """
    config = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
    return schemathesis.openapi.from_url(server.http_url + "/api/openapi.json", config=config)


@pytest.fixture(scope="module")
def cookies(server: Server) -> dict[str, str]:
    """A logged-in user's session cookie, so the directory answers more than 401."""
    name, _, value = server.login("amanda").partition("=")
    return {name: value}


def patterns(value: Any) -> Iterator[str]:
    """Every ``pattern`` in a schema (or in the whole document)."""
    if isinstance(value, dict):
        if isinstance(value.get("pattern"), str):
            yield value["pattern"]
        for inner in value.values():
            yield from patterns(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from patterns(inner)


def test_the_document_is_valid_openapi_3_1() -> None:
    """A valid OpenAPI 3.1 document whose schemas are valid JSON Schema, patterns and all."""
    assert DOCUMENT["openapi"] == "3.1.0"
    # schemathesis's copy of the official OpenAPI 3.1 schema.
    errors = [f"{e.instance_path}: {e.message}" for e in OPENAPI_31_VALIDATOR.iter_errors(DOCUMENT)]
    assert errors == []
    for name, schema in DOCUMENT["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    found = list(patterns(DOCUMENT))
    assert len(found) > 2
    for pattern in found:  # hypothesis generates strings from them with Python's re
        re.compile(pattern)


def test_the_document_served_is_the_one_in_the_package(server: Server) -> None:
    """GET /api/openapi.json needs no key and answers the packaged document."""
    response = requests.get(server.http_url + "/api/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == DOCUMENT


def fuzzed(document: dict[str, Any]) -> Iterator[Any]:
    """(path, method, mode) for each operation: positive data for all, negative data for
    those with something to get wrong (parameters or a body). Deletions come last, so the
    users and groups they remove are there for the others."""
    ordered = sorted(operations(document), key=lambda found: found[1] == "delete")
    for path, method, operation in ordered:
        label = f"{method.upper()} {path}"
        yield pytest.param(path, method, GenerationMode.POSITIVE, id=f"{label} positive")
        takes = "parameters" in document["paths"][path] or {"parameters", "requestBody"} & set(
            operation
        )
        if takes:
            yield pytest.param(path, method, GenerationMode.NEGATIVE, id=f"{label} negative")


def cases(
    operation: schemathesis.APIOperation[Any, Any, Any, Any], mode: GenerationMode
) -> st.SearchStrategy[Any]:
    """Schemathesis's cases for the operation; in positive mode, half of them name users and
    groups that exist (made-up names are all 404s), so successes are checked too."""
    generated = operation.as_strategy(mode)
    names = re.findall(r"{(\w+)}", operation.path)
    if mode is not GenerationMode.POSITIVE or not names:
        return generated
    known = st.fixed_dictionaries({name: st.sampled_from(EXISTING[name]) for name in names})
    return st.one_of(
        generated, known.flatmap(lambda params: operation.as_strategy(mode, path_parameters=params))
    )


# Parametrized by hand over the operations (the packaged document names them; the run uses
# the one the server serves, the same, as the test above makes sure): schemathesis's own
# schemathesis.pytest.from_fixture reads ``request.node._nodeid``, which pytest 9 no longer
# has, and its schema.parametrize() gives every operation the same node id under pytest 9.
@pytest.mark.parametrize(("path", "method", "mode"), list(fuzzed(DOCUMENT)))
def test_every_answer_is_documented(
    api: schemathesis.BaseSchema,
    cookies: dict[str, str],
    path: str,
    method: str,
    mode: GenerationMode,
) -> None:
    """Every answer has a status, a content type and a body the document gives; bad requests
    are refused; nothing is a 5xx."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=cases(api[path][method.upper()], mode))
    def exchange(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(
            headers={"Authorization": f"Bearer {KEY}"}, cookies=cookies, checks=CHECKS
        )

    exchange()


@pytest.mark.parametrize(("path", "method"), KEYED)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key", f"Basic {KEY}", "Bearer "],
    ids=["none", "wrong", "basic", "empty"],
)
def test_every_keyed_route_refuses_a_missing_or_wrong_key(
    api: schemathesis.BaseSchema, path: str, method: str, authorization: str | None
) -> None:
    """Without the right key every admin route and publish answer 401 as documented."""
    documented = DOCUMENT["paths"][path][method]
    assert "401" in documented["responses"]
    names = re.findall(r"{(\w+)}", path)
    body = BODIES.get(documented["operationId"])
    case = api[path][method.upper()].Case(
        path_parameters={name: PATH_PARAMETERS[name] for name in names},
        **({} if body is None else {"body": body, "media_type": "application/json"}),
    )
    headers = {} if authorization is None else {"Authorization": authorization}
    response = case.call(headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == ['Bearer realm="wsfanout"']
    assert response.json()["code"] == "unauthorized"
    case.validate_response(
        response,
        checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
    )


# Requests the fuzzer makes seldom or never, each answered as the document says: (method,
# target as sent, the operation it names, the status).
EDGES = [
    # str.isdigit() takes "²", which int() refuses.
    pytest.param("GET", "/api/users?limit=%C2%B2", "/api/users", 400, id="limit-superscript"),
    # A username that breaks the rule, refused by the router: still a coded error.
    pytest.param("GET", "/api/users/a%5Cb", "/api/users/{username}", 404, id="backslash"),
    # An empty username, not the route /api/users/{username} with username "password".
    pytest.param(
        "PUT", "/api/users//password", "/api/users/{username}/password", 404, id="empty-username"
    ),
    # A username holding a slash, not the route that takes "edge" out of "edges".
    pytest.param(
        "DELETE",
        "/api/users/edge%2Fgroups%2Fedges",
        "/api/users/{username}",
        404,
        id="slash-in-username",
    ),
]


@pytest.fixture(scope="module")
def edge(server: Server) -> Iterator[None]:
    """User "edge" in group "edges", made through the API; afterwards, still there and in it."""
    auth = {"Authorization": f"Bearer {KEY}"}
    made: list[tuple[str, dict[str, Any]]] = [
        ("/api/groups", {"name": "edges"}),
        ("/api/users", {"username": "edge", "password": "edge-password", "groups": ["edges"]}),
    ]
    for path, body in made:
        response = requests.post(server.http_url + path, json=body, headers=auth, timeout=10)
        assert response.status_code == 201, response.text
    yield
    response = requests.get(server.http_url + "/api/users/edge", headers=auth, timeout=10)
    assert response.json()["groups"] == ["edges"]


@pytest.mark.parametrize(("method", "target", "path", "status"), EDGES)
@pytest.mark.usefixtures("edge")
def test_edge_requests_are_answered_as_documented(
    api: schemathesis.BaseSchema, server: Server, method: str, target: str, path: str, status: int
) -> None:
    """Odd requests the fuzzer seldom makes get the status and the body the document gives."""
    body = {"password": "edge-password"} if method == "PUT" else None
    response = requests.request(
        method,
        server.http_url + target,
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert response.status_code == status, response.text
    # The case is only for the validation (and its report): the values this target holds.
    raw_path, _, query = target.partition("?")
    template = re.sub(r"{(\w+)}", r"(?P<\1>[^/]*)", path)
    found = re.fullmatch(template, raw_path)
    assert found is not None
    case = api[path][method].Case(
        path_parameters={name: unquote(value) for name, value in found.groupdict().items()},
        query=dict(parse_qsl(query)),
    )
    case.validate_response(
        response,
        checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
    )
