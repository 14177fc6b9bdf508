"""The thin paths import no torch, diffusers or transformers: each is checked in a fresh interpreter.

The API process, the client, the CLI with ``--url`` and the commands that need no model (``models``, ``schema``,
a refused request) would otherwise pay seconds of imports for a job that takes a fraction of one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from services import Api, service_env, wait_until

from fastgen.lora.synthetic import write_lora

pytestmark = pytest.mark.timeout(240)
HEAVY = ("torch", "diffusers", "transformers")
MODEL = "fastgen-shapes"
TINY_JOB = ["-m", MODEL, "-s", "2", "-W", "32", "-H", "32", "--seed", "1"]


def fresh(code: str, data_dir: Path) -> dict:
    """Run ``code`` in a new interpreter; the ``report`` dict it fills comes back with the heavy modules it loaded."""
    script = f"import json, sys\nreport = {{}}\n{code}\nreport['heavy'] = [m for m in {HEAVY!r} if m in sys.modules]\n"
    script += "print(json.dumps(report))"
    env = {**service_env(data_dir), "GRADIO_ANALYTICS_ENABLED": "False"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def cli(args: list[str], data_dir: Path) -> dict:
    """``fastgen.cli.main(args)`` in a fresh interpreter: its exit code, output and the heavy modules it loaded."""
    code = f"""
        import contextlib, io
        from fastgen.cli import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            report["rc"] = main({args!r})
        report["stdout"], report["stderr"] = out.getvalue(), err.getvalue()
    """
    return fresh(textwrap.dedent(code), data_dir)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """`fastgen serve` in embedded mode with one worker, offering only the shipped model."""
    data_dir = tmp_path_factory.mktemp("thin-service")
    api = Api(service_env(data_dir, models=MODEL), data_dir / "serve.log", workers=1)
    yield SimpleNamespace(url=api.url, log=api.process.log)
    api.stop()


API_PROCESS = """
import os
from pathlib import Path
from fastapi.testclient import TestClient
from fastgen.api import create_api
from fastgen.settings import Settings

app = create_api(Settings(data_dir=Path(os.environ["FASTGEN_DATA_DIR"])), ui_api_url="http://127.0.0.1:9")
http = TestClient(app)
paths = ("/v1/models", "/v1/loras", "/v1/schema", "/healthz", "/metrics", "/ui/")
report["codes"] = {path: http.get(path).status_code for path in paths}
report["loras"] = [lora["name"] for lora in http.get("/v1/loras").json()]
job = http.post("/v1/jobs", json={"prompt": "a cat", "steps": 2, "loras": [{"name": "ink"}]})
report["submitted"] = job.status_code
report["status"] = http.get(job.json()["status_url"]).json()["status"]
report["refused"] = http.post("/v1/jobs", json={"prompt": "a cat", "steps": 500}).status_code
"""


def test_the_api_process_with_default_settings_never_imports_torch(tmp_path):
    """create_api and every route the door serves: job queue, job store, LoRA listing, models, Celery, the page."""
    write_lora(tmp_path / "loras" / "ink.safetensors", {"unet.up.attn2.to_k.lora_A.weight": torch.zeros(4, 768)})
    report = fresh(API_PROCESS, tmp_path)
    assert set(report["codes"].values()) == {200}, report["codes"]
    assert report["loras"] == ["complement", "ink", "large", "reverse"]  # the shipped adapters, and the file put here
    assert (report["submitted"], report["status"], report["refused"]) == (202, "queued", 422)
    assert report["heavy"] == []


@pytest.mark.parametrize(
    ("args", "rc", "says"),
    [
        (["models"], 0, MODEL),
        (["schema"], 0, '"steps"'),
        (["generate", "a cat", "-s", "500"], 2, "error: steps: must be at most 100 (FASTGEN_MAX_STEPS), got 500"),
    ],
    ids=["models", "schema", "validation-error"],
)
def test_commands_that_need_no_model_never_import_torch(tmp_path, args, rc, says):
    report = cli(args, tmp_path)
    assert report["rc"] == rc and says in report["stdout"] + report["stderr"], report
    assert report["heavy"] == []


@pytest.mark.parametrize("command", ["generate", "models", "loras"])
def test_the_cli_through_a_service_never_imports_torch(service, tmp_path, command):
    out = tmp_path / "out.png"
    args = {"generate": ["generate", "a red circle", *TINY_JOB, "-o", str(out)], "models": ["models"]}
    report = cli([*args.get(command, [command]), "--url", service.url], tmp_path)
    assert report["rc"] == 0, (report, service.log())
    assert report["heavy"] == []
    if command == "generate":
        assert out.read_bytes().startswith(b"\x89PNG") and "steps=2" in report["stdout"]


def test_models_with_url_lists_the_services_models(service, tmp_path):
    """The service offers one model; this machine's own listing would show every built-in."""
    env = {**service_env(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "fastgen", "models", "--url", service.url]
    listed = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    models = json.loads(listed.stdout)
    assert [m["name"] for m in models] == [MODEL] and models[0]["kind"] == "image"
    table = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and table.stdout.split()[0] == MODEL, table.stderr


def test_generate_through_a_service_ends_its_progress_line_and_says_where_the_file_went(service, tmp_path):
    env = {**service_env(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "fastgen", "generate", "a red circle", *TINY_JOB, "--url", service.url, "--json"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "step 2/2  ETA   0.0s\n" in run.stderr, run.stderr  # drawn to the end even if polling missed steps
    result = json.loads(run.stdout)
    written = Path(result["output"])
    assert written.parent == tmp_path and written.read_bytes().startswith(b"\x89PNG")
    assert f"no -o given: wrote {written.name}" in run.stderr


def test_several_images_through_a_service_are_each_written_with_its_seed(service, tmp_path):
    env = {**service_env(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    out = tmp_path / "shapes.png"
    command = [sys.executable, "-m", "fastgen", "generate", "a red circle", *TINY_JOB, "-n", "2", "--seed", "8"]
    run = subprocess.run(
        [*command, "-o", str(out), "--url", service.url], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    first, second = (tmp_path / "shapes_0.png", tmp_path / "shapes_1.png")
    assert first.read_bytes() != second.read_bytes() and first.read_bytes().startswith(b"\x89PNG")
    assert [line.split()[0] for line in run.stdout.splitlines()] == [str(first), str(second)]
    assert " seed=8 " in run.stdout.splitlines()[0] and " seed=9 " in run.stdout.splitlines()[1]


def test_the_service_starts_calmly(service):
    """What starts and where to open it; no banner, no lines that read like failures."""
    wait_until(lambda: "ready." in service.log(), 120, "the worker to be ready")
    log = service.log()
    assert "web page: http://" in log and "API docs: http://" in log
    for noise in ("[queues]", "faiss.loader", "SecurityWarning", "No hostname was supplied", "Traceback", "WARNING: "):
        assert noise not in log, (noise, log)
    start = log[: log.index("ready.")].splitlines()  # the start only: other tests' jobs may have logged since
    assert len(start) <= 12, log
