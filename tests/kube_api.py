"""A Kubernetes API server for the tests, as far as a trainer's Jobs go: ``python tests/kube_api.py --port N --token
T``. It speaks the API's documented paths and shapes (batch/v1 Jobs, v1 Secrets, Status objects for errors) and
"schedules" a Job by running its first container's command and args here, with the container's env (secretKeyRef
read from the Secrets it was given), once the Secret it needs exists. A Job's status follows its process: active,
then a Complete or Failed condition. DELETE kills the process and deletes the Job's owned Secrets. Every request is
appended to ``--log`` as a JSON line, so that a test can read what the gateway sent."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

JOBS = "/apis/batch/v1/namespaces/{ns}/jobs"
SECRETS = "/api/v1/namespaces/{ns}/secrets"


class Cluster:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.jobs: dict[tuple[str, str], dict] = {}
        self.secrets: dict[tuple[str, str], dict] = {}
        self.processes: dict[tuple[str, str], subprocess.Popen] = {}

    def start(self, key: tuple[str, str]) -> None:
        """The pod: waits for the Secrets its env names (as a kubelet does), then runs the container."""
        job = self.jobs[key]
        container = job["spec"]["template"]["spec"]["containers"][0]
        deadline = time.monotonic() + 30
        env = dict(os.environ)
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            while (key[0], ref["name"]) not in self.secrets and time.monotonic() < deadline:
                time.sleep(0.05)
            secret = self.secrets.get((key[0], ref["name"]))
            if secret is None:
                self._condition(key, "Failed", "CreateContainerConfigError", f"secret {ref['name']} not found")
                return
            env[item["name"]] = secret["stringData"][ref["key"]]
        with self.lock:
            if key not in self.jobs:  # deleted meanwhile
                return
            process = subprocess.Popen([*container.get("command", []), *container.get("args", [])], env=env,
                                       start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.processes[key] = process
            job["status"] = {"active": 1, "startTime": _now()}
        code = process.wait()
        if code == 0:
            self._condition(key, "Complete", "Completed", "")
        elif code > 0:
            self._condition(key, "Failed", "BackoffLimitExceeded", f"Job has reached the specified backoff limit "
                                                                   f"(exit code {code})")

    def _condition(self, key, kind: str, reason: str, message: str) -> None:
        with self.lock:
            job = self.jobs.get(key)
            if job is not None:
                job["status"] = {"conditions": [{"type": kind, "status": "True", "reason": reason,
                                                 "message": message, "lastTransitionTime": _now()}],
                                 "succeeded" if kind == "Complete" else "failed": 1}

    def delete(self, key) -> bool:
        with self.lock:
            job = self.jobs.pop(key, None)
            process = self.processes.pop(key, None)
            if job is None:
                return False
            for secret_key, secret in list(self.secrets.items()):
                owners = secret["metadata"].get("ownerReferences") or []
                if any(o.get("uid") == job["metadata"]["uid"] for o in owners):
                    del self.secrets[secret_key]
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason,
            "code": code}


def handler(cluster: Cluster, token: str, log_path: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def _route(self, method: str) -> None:
            body = self._body() if method in ("POST", "DELETE") else None
            with open(log_path, "a") as log:
                log.write(json.dumps({"method": method, "path": self.path, "body": body}) + "\n")
            if self.headers.get("Authorization") != f"Bearer {token}":
                return self._send(401, _status(401, "Unauthorized", "Unauthorized"))
            parts = self.path.strip("/").split("/")
            if method == "POST" and self.path.startswith("/apis/batch/v1/namespaces/") and parts[-1] == "jobs":
                namespace, name = parts[4], body["metadata"]["name"]
                if (namespace, name) in cluster.jobs:
                    return self._send(409, _status(409, "AlreadyExists", f'jobs.batch "{name}" already exists'))
                body["metadata"]["uid"] = str(uuid.uuid4())
                body["status"] = {}
                cluster.jobs[(namespace, name)] = body
                threading.Thread(target=cluster.start, args=((namespace, name),), daemon=True).start()
                return self._send(201, body)
            if method == "POST" and self.path.startswith("/api/v1/namespaces/") and parts[-1] == "secrets":
                cluster.secrets[(parts[3], body["metadata"]["name"])] = body
                return self._send(201, {**body, "stringData": None})
            if self.path.startswith("/apis/batch/v1/namespaces/") and len(parts) == 7 and parts[5] == "jobs":
                key = (parts[4], parts[6])
                if method == "GET":
                    job = cluster.jobs.get(key)
                    return self._send(200, job) if job else self._send(
                        404, _status(404, "NotFound", f'jobs.batch "{key[1]}" not found'))
                if method == "DELETE":
                    return self._send(200, _status(200, "", "")) if cluster.delete(key) else self._send(
                        404, _status(404, "NotFound", f'jobs.batch "{key[1]}" not found'))
            return self._send(404, _status(404, "NotFound", "the server could not find the requested resource"))

        def do_GET(self) -> None:
            self._route("GET")

        def do_POST(self) -> None:
            self._route("POST")

        def do_DELETE(self) -> None:
            self._route("DELETE")

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    cluster = Cluster()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(cluster, args.token, args.log))

    def stop(*_):
        for key in list(cluster.jobs):
            cluster.delete(key)
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    server.serve_forever()


if __name__ == "__main__":
    main()
