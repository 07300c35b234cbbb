"""/openapi.json describes every route; /docs renders it from local assets."""

import json
import re

import pytest
from jsonschema import ValidationError
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate
from swagger_ui_bundle import swagger_ui_path

from llm_service import openapi
from llm_service.limits import UNLIMITED_BLUEPRINTS
from llm_service.pipeline import SECURITY_HEADERS

pytestmark = pytest.mark.mock_llm

COMMON_STATUSES = {"400", "405", "500"}
BODY_STATUSES = {"400", "413", "415", "422"}


@pytest.fixture
def spec(client):
    return client.get("/openapi.json").json


def operations(spec):
    """Yield ``(path, method, operation)`` for every operation of ``spec``."""
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def served_routes(app):
    """Yield ``(openapi path, method, endpoint)`` for every route the app serves."""
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            yield path, method.lower(), rule.endpoint


def test_document_is_valid_openapi(spec):
    validate(spec)
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"] == "llm-service"


def test_every_route_is_documented_by_its_view(app, spec):
    missing = []
    for path, method, endpoint in served_routes(app):
        operation = spec["paths"].get(path, {}).get(method)
        declared = openapi.is_documented(app.view_functions[endpoint])
        if operation is None or not declared or "default" in operation["responses"]:
            missing.append(f"{method.upper()} {path} ({endpoint})")
    assert not missing, "routes without @documented(...): " + ", ".join(missing)


def test_nothing_documented_that_is_not_served(app, spec):
    served = {(path, method) for path, method, _ in served_routes(app)}
    documented = {(path, method) for path, method, _ in operations(spec)}
    assert documented == served


def test_operation_ids_are_unique(spec):
    ids = [operation["operationId"] for _, _, operation in operations(spec)]
    assert len(ids) == len(set(ids))


def test_every_operation_documents_the_shared_answers(spec):
    for path, method, operation in operations(spec):
        responses = operation["responses"]
        assert set(responses) >= COMMON_STATUSES, (method, path)
        for status, response in responses.items():
            headers = response["headers"]
            assert "X-Correlation-ID" in headers, (method, path, status)
            assert "X-Process-Time" in headers, (method, path, status)
        assert "Allow" in responses["405"]["headers"]
        if "requestBody" in operation:
            assert set(responses) >= BODY_STATUSES, (method, path)


def test_errors_use_the_contract_and_list_their_codes(spec):
    message = spec["paths"]["/llm/message"]["post"]["responses"]
    for status in ("400", "404", "413", "415", "422", "429", "500", "502", "503"):
        schema = message[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "`validation_error`" in message["422"]["description"]
    assert "`model_not_found`" in message["404"]["description"]
    assert "`upstream_rejected_request`" in message["400"]["description"]
    error = spec["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"code", "message"}
    assert "details" in error["properties"]


def test_rate_limits_are_documented_only_where_they_apply(app, spec):
    for path, method, operation in operations(spec):
        endpoint = app.url_map.bind("").match(path, method.upper())[0]
        limited = endpoint.rpartition(".")[0] not in UNLIMITED_BLUEPRINTS
        responses = operation["responses"]
        assert ("429" in responses) == limited, (method, path)
        if limited:
            assert "Retry-After" in responses["429"]["headers"]
            assert "X-RateLimit-Remaining" in responses["200"]["headers"]


def test_upstream_failures_only_where_the_upstream_is_called(spec):
    live = spec["paths"]["/health/live"]["get"]["responses"]
    assert not {"502", "504"} & set(live)
    # Its only 503 is the one every route answers while the server stops.
    assert "`server_shutting_down`" in live["503"]["description"]
    assert "upstream" not in live["503"]["description"]
    health = spec["paths"]["/health"]["get"]["responses"]
    assert health["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Health"
    }
    assert "Retry-After" in health["503"]["headers"]
    message = spec["paths"]["/llm/message"]["post"]["responses"]
    assert {"502", "503", "504"} <= set(message)
    assert set(message["200"]["content"]) == {"application/json", "text/event-stream"}


def test_request_body_comes_from_the_schema(spec):
    body = spec["paths"]["/llm/message"]["post"]["requestBody"]
    assert body["required"] is True
    schema = body["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/MessageRequest"}
    request = spec["components"]["schemas"]["MessageRequest"]
    assert request["required"] == ["messages"]
    assert request["additionalProperties"] is False
    assert request["properties"]["stop"]["oneOf"][1]["maxItems"] == 4


def test_max_tokens_bound_is_the_setting(app_factory):
    # Regression (schemathesis positive_data_acceptance): the document said
    # nothing of the upper bound, so valid-looking max_tokens got a 422.
    client = app_factory(MAX_MAX_TOKENS=777).test_client()
    spec = client.get("/openapi.json").json
    max_tokens = spec["components"]["schemas"]["MessageRequest"]["properties"][
        "max_tokens"
    ]
    assert max_tokens["maximum"] == 777
    too_many = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 778}
    assert client.post("/llm/message", json=too_many).status_code == 422


def test_correlation_header_is_documented_as_never_refused(client, spec):
    # Regression (schemathesis negative_data_rejection): a pattern on the
    # request header promised a refusal the gateway never makes.
    parameter = spec["components"]["parameters"]["X-Correlation-ID"]
    assert parameter["in"] == "header"
    assert "pattern" not in parameter["schema"]
    response = client.get("/health/live", headers={"X-Correlation-ID": "{}"})
    assert response.status_code == 200
    assert response.headers["X-Correlation-ID"] != "{}"


def test_document_is_built_once_per_app(app, monkeypatch):
    calls = []
    build = openapi.build_spec
    monkeypatch.setattr(
        openapi, "build_spec", lambda app: calls.append(app) or build(app)
    )
    client = app.test_client()
    first = client.get("/openapi.json").json
    second = client.get("/openapi.json").json
    assert first == second
    assert len(calls) == 1


def test_a_new_route_appears_without_more_work(app_factory):
    from flask import Blueprint

    from llm_service.openapi import documented

    extra = Blueprint("extra", __name__)

    @extra.get("/extra/<int:item>")
    @documented(errors=("not_found",))
    def item(item):
        """Fetch one item."""
        return {"item": item}

    app = app_factory()
    app.register_blueprint(extra)
    spec = app.test_client().get("/openapi.json").json
    operation = spec["paths"]["/extra/{item}"]["get"]
    assert operation["summary"] == "Fetch one item."
    assert operation["tags"] == ["extra"]
    assert {"200", "404", "429"} <= set(operation["responses"])
    assert operation["parameters"][0]["name"] == "item"


def test_an_undeclared_view_promises_nothing(app_factory):
    from flask import Blueprint

    extra = Blueprint("extra", __name__)

    @extra.get("/extra")
    def undeclared():
        """Not described."""
        return {}

    app = app_factory()
    app.register_blueprint(extra)
    spec = app.test_client().get("/openapi.json").json
    responses = spec["paths"]["/extra"]["get"]["responses"]
    assert responses == {"default": {"description": openapi.UNDECLARED}}
    validate(spec)


def test_unknown_error_codes_are_refused():
    with pytest.raises(ValueError, match="no_such_code"):
        openapi.documented(errors=("no_such_code",))


def test_index_links_to_the_documentation(client):
    links = client.get("/").json["links"]
    assert links["docs"] == "/docs"
    assert links["openapi"] == "/openapi.json"


# -- /docs ---------------------------------------------------------------------


def test_docs_page_loads_only_local_assets(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources, page
    assert all(source.startswith("/docs/") for source in sources), sources
    assert "<script>" not in page  # no inline script: the CSP forbids it


def test_docs_policy_is_relaxed_only_as_far_as_swagger_ui_needs(client):
    policy = client.get("/docs").headers["Content-Security-Policy"]
    directives = dict(
        part.strip().split(" ", 1) for part in policy.split(";") if part.strip()
    )
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["img-src"] == "'self' data:"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in policy


@pytest.mark.parametrize("path", ["/openapi.json", "/health/live", "/docs/init.js"])
def test_other_routes_keep_the_strict_policy(client, path):
    response = client.get(path)
    assert response.status_code == 200
    strict = SECURITY_HEADERS["Content-Security-Policy"]
    assert response.headers["Content-Security-Policy"] == strict


@pytest.mark.parametrize("name", sorted(openapi.ASSETS))
def test_assets_come_from_the_installed_package(client, name):
    # Files are streamed: closing the response closes the file.
    with client.get(f"/docs/{name}") as response:
        assert response.status_code == 200
        assert response.mimetype == openapi.ASSETS[name]
        assert response.data == (swagger_ui_path / name).read_bytes()


@pytest.mark.parametrize("name", ["index.html", "swagger-initializer.js", "..%2f"])
def test_only_listed_assets_are_served(client, name):
    response = client.get(f"/docs/{name}")
    assert response.status_code == 404
    assert response.json["error"]["code"] == "not_found"


def test_init_script_points_at_the_document_and_no_validator(client):
    script = client.get("/docs/init.js")
    assert script.mimetype == "text/javascript"
    text = script.get_data(as_text=True)
    assert 'url: "/openapi.json"' in text
    assert "validatorUrl: null" in text


def test_docs_and_document_are_never_rate_limited(app_factory):
    client = app_factory(RATE_LIMIT_REQUESTS=1).test_client()
    for path in ["/openapi.json", "/docs", "/docs/init.js"] * 3:
        response = client.get(path)
        assert response.status_code == 200, path
        assert "X-RateLimit-Limit" not in response.headers
    assert client.post("/llm/message", json={}).status_code == 422
    assert client.post("/llm/message", json={}).status_code == 429


# -- answers match the document ------------------------------------------------


def resolved(spec, node):
    """Return ``node`` with every local ``$ref`` of ``spec`` replaced by its target."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = spec
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return resolved(spec, target)
        return {key: resolved(spec, value) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(spec, item) for item in node]
    return node


def assert_documented(spec, path, method, response):
    """Check ``response`` against what ``spec`` promises for the operation."""
    answers = spec["paths"][path][method]["responses"]
    documented = resolved(spec, answers[str(response.status_code)])
    for name, header in documented["headers"].items():
        if header.get("required"):
            assert name in response.headers, name
    schema = documented["content"][response.mimetype]["schema"]
    OAS30Validator(schema).validate(response.json)


@pytest.mark.parametrize(
    ("method", "path", "url", "body", "status"),
    [
        ("get", "/", "/", None, 200),
        ("get", "/health/live", "/health/live", None, 200),
        ("post", "/llm/message", "/llm/message", {}, 422),
        ("post", "/llm/message", "/llm/message", {"messages": "hi", "x": 1}, 422),
        ("post", "/v1/chat/completions", "/v1/chat/completions", {}, 422),
        ("post", "/v1/embeddings", "/v1/embeddings", {}, 422),
        ("get", "/docs/{name}", "/docs/missing.js", None, 404),
    ],
)
def test_answers_match_the_document(client, spec, method, path, url, body, status):
    response = client.open(url, method=method.upper(), json=body)
    assert response.status_code == status
    assert_documented(spec, path, method, response)


def test_openai_routes_document_openai_errors(spec):
    for path, method, operation in operations(spec):
        if not path.startswith("/v1/"):
            continue
        schema = operation["responses"]["422" if method == "post" else "400"]
        name = schema["content"]["application/json"]["schema"]["$ref"]
        assert name == "#/components/schemas/OpenAIErrorResponse", (method, path)


def test_a_wrong_error_shape_would_be_caught(client, spec):
    # The check above can fail: the gateway's contract is not OpenAI's shape.
    response = client.post("/llm/message", json={})
    with pytest.raises(ValidationError):
        assert_documented(spec, "/v1/embeddings", "post", response)


def test_assets_are_revalidated_not_downloaded_again(client):
    with client.get("/docs/swagger-ui-bundle.js") as first:
        etag = first.headers["ETag"]
    with client.get(
        "/docs/swagger-ui-bundle.js", headers={"If-None-Match": etag}
    ) as again:
        assert again.status_code == 304
        assert again.data == b""


def test_docs_show_no_internal_words(spec):
    """Tag texts come from module docstrings: no Flask or project jargon there."""
    words = json.dumps([spec["info"], spec.get("tags", [])]).lower()
    for internal in ("blueprint", "seed"):
        assert internal not in words
