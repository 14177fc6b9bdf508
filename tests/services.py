"""Real processes for the service tests: a Redis server, fastgen workers and the API, on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import redis

from fastgen.client import FastgenClient
from fastgen.serve import stop_process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class RedisServer:
    """A throwaway redis-server on a free loopback port, in its own process group, keeping nothing on disk."""

    def __init__(self, workdir: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server) and REDIS_URL is unset")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, *args, "--dir", str(workdir)], stdout=subprocess.DEVNULL, start_new_session=True
        )
        try:
            wait_until(self._answers, 10, "redis-server to start")
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process_group(self.process)


class TlsRedisServer(RedisServer):
    """A throwaway redis-server that speaks only TLS, with its own certificate authority (made with openssl)."""

    def __init__(self, workdir: Path):
        binary, openssl = shutil.which("redis-server"), shutil.which("openssl")
        if binary is None or openssl is None:
            raise RuntimeError("a TLS redis-server needs redis-server and openssl installed")
        self.ca = workdir / "ca.crt"
        _make_certificates(openssl, workdir)
        self.port = free_port()
        self.url = f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"
        tls = ["--tls-cert-file", workdir / "redis.crt", "--tls-key-file", workdir / "redis.key"]
        tls += ["--tls-ca-cert-file", self.ca, "--tls-auth-clients", "no"]
        args = ["--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [binary, *args, *map(str, tls), "--dir", str(workdir)], stdout=subprocess.DEVNULL, start_new_session=True
        )
        try:
            wait_until(self._answers, 10, "the TLS redis-server to start")
        except BaseException:
            exited = self.process.poll() is not None
            self.stop()
            if exited:  # it refused its TLS options: built without TLS
                raise RuntimeError("this redis-server does not serve TLS") from None
            raise

    def _answers(self) -> bool:
        import redis

        try:
            return redis.Redis.from_url(self.url, socket_timeout=0.5).ping()
        except (redis.RedisError, OSError):
            return False


def _make_certificates(openssl: str, folder: Path) -> None:
    """A CA, and a certificate it signed for 127.0.0.1."""

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    new_key = ("-newkey", "rsa:2048", "-nodes")
    run("req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=fastgen-test-ca")
    run("req", *new_key, "-keyout", "redis.key", "-out", "redis.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    signed = ("-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.cnf")
    run("x509", "-req", "-in", "redis.csr", *signed, "-out", "redis.crt", "-days", "1")


class Process:
    """A fastgen command in its own process group, with its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fastgen", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def group_alive(self) -> bool:
        """Whether any process of the group still runs (zombies, dead but unreaped, do not count)."""
        return any(state != "Z" and pgid == self.process.pid for state, pgid in _process_table())

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash would."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def stop(self) -> None:
        stop_process_group(self.process, grace_s=15)
        self._log.close()


def _process_table() -> list[tuple[str, int]]:
    """(state, process group) of every process, from /proc."""
    table = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table.append((fields[0], int(fields[2])))
    return table


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def service_env(data_dir: Path, **fastgen: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTGEN_")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", FASTGEN_DATA_DIR=str(data_dir))
    env.update({f"FASTGEN_{k.upper()}": v for k, v in fastgen.items()})
    return env


class Api:
    """`fastgen serve` over real HTTP (with no workers unless asked)."""

    def __init__(self, env: dict[str, str], log: Path, workers: int = 0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = Process(["serve", "--workers", str(workers), "--port", str(self.port)], env, log)
        try:
            wait_until(self._up, 60, f"the API on {self.url}", 0.2)
        except BaseException:
            self.stop()
            raise

    def _up(self) -> bool:
        if self.process.process.poll() is not None:
            raise RuntimeError(f"the API exited:\n{self.process.log()}")
        try:
            return httpx.get(f"{self.url}/openapi.json", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self, api_key: str | None = None) -> FastgenClient:
        return FastgenClient(self.url, api_key=api_key)

    def stop(self) -> None:
        self.process.stop()


def worker(env: dict[str, str], log: Path, models: str = "tiny-sd") -> Process:
    return Process(["worker", "--models", models], env, log)


@contextmanager
def on_redis(data_dir: Path, redis_url: str, **settings: str) -> Iterator[SimpleNamespace]:
    """One tiny-sd worker and an open API on ``redis_url`` with FASTGEN_ ``settings``; both stopped on leaving."""
    env = service_env(data_dir, broker_url=redis_url, **settings)
    sd_worker = worker(env, data_dir / "worker.log")
    api = Api(env, data_dir / "api.log")
    try:
        yield SimpleNamespace(
            api=api, worker=sd_worker, env=env, data_dir=data_dir, redis=redis.Redis.from_url(redis_url)
        )
    finally:
        api.stop()
        sd_worker.stop()


def running(client: FastgenClient, job_id: str, step: int = 1) -> bool:
    """Whether the job has reported at least ``step`` steps done."""
    return (client.status(job_id).get("progress") or {}).get("step", 0) >= step


def cancel_one_of_a_call(client: FastgenClient, first: str, second: str) -> dict:
    """Cancel ``second`` while it runs in ``first``'s call: it reads cancelled within 5 s while ``first`` goes on;
    ``first``'s final status."""
    wait_until(lambda: running(client, second, 2), 120, "the second job to run in the first's call")
    client.cancel(second)
    asked = time.monotonic()
    assert client.wait(second, timeout_s=30, poll_s=0.02)["status"] == "cancelled"
    assert time.monotonic() - asked < 5
    assert client.status(first)["status"] == "running"  # the call goes on for the other
    status = client.wait(first, timeout_s=120)
    assert status["status"] == "succeeded" and status["result"]["batch"]["others"] == [second], status
    return status
