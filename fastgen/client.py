"""A Python client for the REST API: submit, status, wait, download, cancel.

It imports no torch, so the UI and remote scripts stay light::

    client = FastgenClient("http://127.0.0.1:8000", api_key=None)
    job = client.submit({"prompt": "a red circle", "model": "tiny-sd"})
    status = client.wait(job["id"], on_progress=print)
    client.download(job["id"], "out.png")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "cancelled")


class ServiceError(Exception):
    """The service answered with an error; ``status_code`` and the service's own message are kept."""

    def __init__(self, status_code: int, message: str, detail: list[dict] | None = None):
        self.status_code, self.message, self.detail = status_code, message, detail or []
        super().__init__(f"{status_code}: {message}")


class FastgenClient:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __enter__(self) -> FastgenClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def submit(self, request: dict[str, Any]) -> dict[str, Any]:
        """Queue a job; returns its id and URLs at once."""
        return self._json("POST", "/v1/jobs", json=request)

    def status(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/jobs/{job_id}")

    def models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/models")

    def loras(self) -> list[dict[str, Any]]:
        """The service's LoRA library: one entry per adapter (or its error, for an unreadable file)."""
        return self._json("GET", "/v1/loras")

    def wait(
        self,
        job_id: str,
        timeout_s: float = 600.0,
        poll_s: float = 0.2,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the job ends; returns its final status (check ``status`` for succeeded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if on_progress is not None and status.get("progress"):
                on_progress(status["progress"])
            if status["status"] in FINAL:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status['status']} after {timeout_s}s")
            time.sleep(poll_s)

    def result_bytes(self, job_id: str, index: int = 0) -> tuple[bytes, str]:
        """The bytes and media type of the result's file ``index`` (image ``index``; a video is 0)."""
        response = self.http.get(f"/v1/jobs/{job_id}/result", params={"index": index})
        _raise_for_error(response)
        return response.content, response.headers["content-type"]

    def result_zip(self, job_id: str) -> bytes:
        """Every file of the result and its ``result.json`` as one ZIP archive."""
        response = self.http.get(f"/v1/jobs/{job_id}/result.zip")
        _raise_for_error(response)
        return response.content

    def download(self, job_id: str, path: str | Path, index: int = 0) -> Path:
        """Stream the result's file ``index`` to ``path``."""
        path = Path(path)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/result", params={"index": index}) as response:
            if response.is_error:
                response.read()
                _raise_for_error(response)
            with path.open("wb") as f:
                for chunk in response.iter_bytes():
                    f.write(chunk)
        return path

    def _json(self, method: str, url: str, **kwargs) -> Any:
        response = self.http.request(method, url, **kwargs)
        _raise_for_error(response)
        return response.json()


def _raise_for_error(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text}
    raise ServiceError(response.status_code, body.get("error", response.reason_phrase), body.get("detail"))
