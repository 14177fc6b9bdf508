"""/openapi.json is complete enough for tools: every reference resolves, every operation lists the errors it can
answer, the keys are security schemes, and a real OpenAPI fuzzer (schemathesis) finds no server error and no
response that breaks the document."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from services import Api, service_env

pytestmark = pytest.mark.timeout(300)
KEY = "k-fuzz"
# Checks left out, and why: positive_data_acceptance (some door rules cannot be said in JSON Schema: width x height
# against the pixel limit, model defaults against the limits, LoRA names the library holds); use_after_free
# (DELETE cancels a job, whose status stays readable); allow_header_conformance (Starlette's 405 names only the
# methods of the first route on a path).
EXCLUDED_CHECKS = "positive_data_acceptance,use_after_free,allow_header_conformance"
FUZZ_SECONDS = 60


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("openapi")
    env = service_env(data_dir, api_keys=f"{KEY}=fuzzer", models="fastgen-shapes,tiny-sd,tiny-wan")
    api = Api(env, data_dir / "api.log")
    yield SimpleNamespace(api=api, data_dir=data_dir, document=httpx.get(f"{api.url}/openapi.json").json())
    api.stop()


def _refs(node, found: list[str]) -> list[str]:
    if isinstance(node, dict):
        found += [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)
    return found


def _resolve(document: dict, ref: str):
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_every_reference_resolves_and_the_body_schema_is_complete(service):
    document = service.document
    refs = _refs(document, [])
    assert refs and all(_resolve(document, ref) is not None for ref in refs)
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = _resolve(document, body["$ref"])
    assert schema["properties"]["steps"]["anyOf"][0]["maximum"] == 100 and schema["additionalProperties"] is False
    sparse = _resolve(document, "#/components/schemas/BodySparseAttentionOptions")
    assert any(branch.get("required") == ["mode"] for branch in sparse["anyOf"])  # settings only with a mode
    assert {"fastgen-shapes", "tiny-sd", "tiny-wan"} == set(schema["properties"]["model"]["anyOf"][0]["enum"])


def test_every_operation_lists_its_errors_and_the_keys_are_security_schemes(service):
    paths = service.document["paths"]
    expected = {
        ("post", "/v1/jobs"): {"202", "401", "413", "415", "422", "503"},
        ("get", "/v1/jobs/{job_id}"): {"200", "401", "404", "503"},
        ("delete", "/v1/jobs/{job_id}"): {"202", "401", "404", "503"},
        ("get", "/v1/jobs/{job_id}/result"): {"200", "401", "404", "409", "410", "503"},
        ("get", "/healthz"): {"200", "503"},
    }
    for (method, path), codes in expected.items():
        assert codes <= set(paths[path][method]["responses"]), (method, path)
        assert paths[path][method]["responses"]["503" if "503" in codes else "401"]["content"]
    schemes = service.document["components"]["securitySchemes"]
    assert {scheme["type"] for scheme in schemes.values()} == {"http", "apiKey"}
    assert paths["/v1/schema"]["get"].get("security"), "the schema endpoint needs a key like every /v1 call"


@pytest.mark.slow
def test_a_fuzzer_finds_no_server_error_and_no_response_that_breaks_the_document(service, tmp_path):
    command = [
        str(Path(sys.executable).with_name("st")),  # the environment's own, activated or not
        "run",
        f"{service.api.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {KEY}",
        "--checks",
        "all",
        "--exclude-checks",
        EXCLUDED_CHECKS,
        "--max-examples",
        "25",
        "--max-time",
        str(FUZZ_SECONDS),
        "--seed",
        "17",
        "--report-dir",
        str(tmp_path),
    ]
    if not Path(command[0]).exists():
        pytest.fail(f"schemathesis is not installed for {sys.executable} (pip install -e '.[test]')")
    run = subprocess.run(command, capture_output=True, text=True, timeout=FUZZ_SECONDS + 120, cwd=tmp_path)
    report = run.stdout[-6000:]
    assert run.returncode == 0, report
    assert " passed" in report and "failures" not in report.split("SUMMARY")[-1].lower(), report
    assert "Traceback" not in (service.data_dir / "api.log").read_text()
