"""Faults and bad input answered cleanly, over real HTTP: a hung or dead Redis, unreadable records and files,
damaged artifacts, and the door's strictness and limits. Nothing broken is served as a success."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from services import Api, RedisServer, service_env, wait_until

pytestmark = pytest.mark.timeout(240)
KEY = "k-alice"
FAULT_BOUND_S = 6.0  # the longest any endpoint may take to say a store is down


def quick(**fields) -> dict:
    return {"prompt": "a red circle", "model": "tiny-sd", "width": 64, "height": 64, "steps": 2, "seed": 1, **fields}


def timed(client: httpx.Client, method: str, path: str, **kwargs) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = client.request(method, path, **kwargs)
    return response, time.monotonic() - start


ENDPOINTS = [
    ("POST", "/v1/jobs", {"json": quick()}),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef", {}),
    ("DELETE", "/v1/jobs/0123456789abcdef0123456789abcdef", {}),
    ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef/result", {}),
    ("GET", "/healthz", {}),
]


@pytest.fixture()
def redis_service(tmp_path):
    """A Redis of its own (this test stops it) and an API on it, no workers."""
    server = RedisServer(tmp_path)
    api = Api(service_env(tmp_path / "data", broker_url=server.url), tmp_path / "api.log")
    yield SimpleNamespace(server=server, api=api)
    try:
        os.kill(server.process.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    api.stop()
    server.stop()


def test_a_hung_or_dead_redis_is_a_503_naming_the_cause_on_every_endpoint_within_seconds(redis_service):
    with httpx.Client(base_url=redis_service.api.url, timeout=30) as client:
        assert client.post("/v1/jobs", json=quick()).status_code == 202
        for fault in ("hung", "down"):
            if fault == "hung":
                os.kill(redis_service.server.process.pid, signal.SIGSTOP)  # answers nothing, like a partition
            else:
                os.kill(redis_service.server.process.pid, signal.SIGCONT)
                redis_service.server.stop()
            for method, path, kwargs in ENDPOINTS:
                response, seconds = timed(client, method, path, **kwargs)
                assert response.status_code == 503, (fault, method, path, response.text)
                assert "unreachable" in response.json()["error"] and seconds < FAULT_BOUND_S, (fault, path, seconds)
            response, seconds = timed(client, "GET", "/metrics")
            assert response.status_code == 200 and seconds < FAULT_BOUND_S, (fault, response.text, seconds)
            assert 'fastgen_metrics_source_up{source="jobs"} 0' in response.text
            assert 'fastgen_metrics_source_up{source="cache"} 0' in response.text
            assert client.get("/v1/models").status_code == 200  # what needs no store still answers


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    """An embedded-mode API with keys, low limits, one unreadable model and a corrupt cache file; no workers."""
    data_dir = tmp_path_factory.mktemp("door")
    broken = data_dir / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{ not json")
    (data_dir / "cache.sqlite3").write_bytes(b"this is not a database" * 100)
    env = service_env(
        data_dir,
        api_keys=f"{KEY}=alice",
        max_steps="4",
        max_body_bytes="65536",
        models=f"tiny-sd,{broken},someone/offline-model",
    )
    api = Api(env, data_dir / "api.log")
    client = httpx.Client(base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"})
    yield SimpleNamespace(api=api, client=client, data_dir=data_dir)
    client.close()
    api.stop()


def test_a_model_default_over_a_limit_is_refused_at_the_door_naming_the_field(door):
    response = door.client.post("/v1/jobs", json={"prompt": "a red circle", "model": "tiny-sd"})
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["field"] == "steps" and "default of 20" in problem["message"]
    assert "FASTGEN_MAX_STEPS" in problem["message"] and "at most 4" in problem["message"]
    assert door.client.post("/v1/jobs", json=quick(steps=4)).status_code == 202


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"steps": True}, "steps", "an integer"),
        ({"seed": True}, "seed", "an integer"),
        ({"steps": "2"}, "steps", "not a string"),
        ({"guidance": "2.5"}, "guidance", "a number"),
        ({"model": ""}, "model", "must not be empty"),
        ({"accelerate": {"fuse_qkv": 1}}, "accelerate.fuse_qkv", "true or false"),
    ],
)
def test_the_door_is_strict_about_types(door, body, field, words):
    response = door.client.post("/v1/jobs", json={**quick(), **body})
    assert response.status_code == 422, response.text
    assert any(p["field"] == field and words in p["message"] for p in response.json()["detail"]), response.text


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ('{"prompt": "a", "guidance": NaN}', "finite number"),
        ('{"prompt": "a", "guidance": Infinity}', "finite number"),
        ('{"prompt": "\\ud800 a lone surrogate"}', "surrogate"),
        ('{"prompt": "a"', "not valid JSON"),
    ],
)
def test_messages_say_what_is_wrong(door, raw, words):
    response = door.client.post("/v1/jobs", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and words in response.json()["error"], response.text
    assert "must be >= 0" not in response.text and "hex escape" not in response.text


def test_a_body_that_is_not_json_is_a_415(door):
    body = json.dumps(quick()).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = door.client.post("/v1/jobs", content=body, headers=headers)
        assert response.status_code == 415 and "application/json" in response.json()["error"], response.text


def test_an_oversized_body_is_a_413_before_it_is_read_whole_chunked_or_not(door):
    big = b'{"prompt": "' + b"a" * 200_000 + b'"}'
    response = door.client.post("/v1/jobs", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "FASTGEN_MAX_BODY_BYTES" in response.json()["error"]

    def chunks():  # no Content-Length: the limit must hold on what arrives
        yield b'{"prompt": "'
        for _ in range(50):
            yield b"a" * 8192
        yield b'"}'

    response = door.client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert door.client.get("/healthz").status_code == 200


def test_a_404_does_not_echo_a_huge_id(door):
    response = door.client.get(f"/v1/jobs/{'x' * 60_000}")  # httpx's URL limit is 64 kB
    assert response.status_code == 404 and len(response.text) < 300, response.text[:300]


def test_every_v1_call_needs_a_key_the_schema_too(door):
    for path in ("/v1/schema", "/v1/models", "/v1/loras", "/v1/jobs/abc"):
        assert httpx.get(door.api.url + path).status_code == 401, path
        assert httpx.get(door.api.url + path, headers={"X-API-Key": KEY}).status_code in (200, 404), path
    assert door.client.get("/v1/schema").json()["properties"]["steps"]["anyOf"][0]["maximum"] == 4


def test_one_unreadable_model_is_listed_as_unusable_and_the_others_still_work(door):
    response = door.client.get("/v1/models")
    assert response.status_code == 200, response.text
    entries = {entry["name"]: entry for entry in response.json()}
    assert entries["tiny-sd"]["usable"] is True and entries["tiny-sd"]["kind"] == "image"
    broken = entries[str(door.data_dir / "broken-model")]
    assert broken["usable"] is False and "cannot be read as JSON" in broken["error"]
    offline = entries["someone/offline-model"]
    assert offline["usable"] is False and "not downloaded here" in offline["error"], offline


def test_a_corrupt_result_record_fails_only_its_own_job(door):
    broken, fine = (door.client.post("/v1/jobs", json=quick()).json()["id"] for _ in range(2))
    record = door.data_dir / "queue" / "results" / f"celery-task-meta-{broken}"
    record.write_bytes(b"\xff\xfe{ not json")
    status = door.client.get(f"/v1/jobs/{broken}")
    assert status.status_code == 200 and status.json()["status"] == "failed", status.text
    assert "damaged" in status.json()["error"]
    assert door.client.get(f"/v1/jobs/{broken}/result").status_code == 409
    assert door.client.delete(f"/v1/jobs/{broken}").status_code == 202
    assert door.client.get(f"/v1/jobs/{fine}").json()["status"] in ("queued", "cancelled")


def test_metrics_still_answer_when_the_cache_store_is_unreadable(door):
    response = door.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert 'fastgen_metrics_source_up{source="cache"} 0' in response.text
    assert 'fastgen_metrics_source_up{source="jobs"} 1' in response.text and "fastgen_queue_depth" in response.text


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    """One real job run to the end by a real worker (embedded mode), and where its file lies."""
    data_dir = tmp_path_factory.mktemp("artifacts")
    api = Api(service_env(data_dir, models="tiny-sd"), data_dir / "api.log", workers=1)
    client = httpx.Client(base_url=api.url, timeout=30)
    job_id = client.post("/v1/jobs", json=quick()).json()["id"]
    status = wait_until(lambda: _final(client, job_id), 180, "the job to finish", 0.2)
    assert status["status"] == "succeeded", status
    (artifact,) = status["result"]["artifacts"]
    path = data_dir / "artifacts" / job_id / artifact["name"]
    yield SimpleNamespace(client=client, id=job_id, artifact=artifact, path=path, original=path.read_bytes())
    client.close()
    api.stop()


def _final(client: httpx.Client, job_id: str) -> dict | None:
    status = client.get(f"/v1/jobs/{job_id}").json()
    return status if status["status"] in ("succeeded", "failed", "cancelled") else None


@pytest.mark.parametrize("damage", ["truncated", "grown", "replaced", "missing"])
def test_a_damaged_artifact_is_a_clear_error_never_a_broken_200(finished_job, damage):
    job, path = finished_job, finished_job.path
    intact = job.client.get(f"/v1/jobs/{job.id}/result")
    assert intact.status_code == 200 and intact.content == job.original
    assert len(job.original) == job.artifact["bytes"] and len(job.artifact["sha256"]) == 64
    try:
        _damage(path, damage, job.original)
        response = job.client.get(f"/v1/jobs/{job.id}/result")
        assert response.status_code == 410, (damage, response.status_code)
        assert response.headers["content-type"] == "application/json"
        assert ("no longer" if damage == "missing" else "damaged") in response.json()["error"]
    finally:
        Path(path).write_bytes(job.original)


def _damage(path: Path, how: str, original: bytes) -> None:
    if how == "truncated":
        path.write_bytes(original[: len(original) // 2])
    elif how == "grown":
        path.write_bytes(original + b"\0" * 100)
    elif how == "replaced":
        path.write_bytes(bytes(reversed(original)))  # same size, other bytes
    else:
        path.unlink()
