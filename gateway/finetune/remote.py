"""A job's run on a trainer off the gateways (a GPU node of the mesh): ``python -m gateway.finetune.remote``, with
``GATEWAY_TRAINER_URL`` (the job's report URL) and ``GATEWAY_TRAINER_TOKEN`` (its run's token) in the environment,
or given as ``--url`` and ``--token``.

It asks the gateways what to train, fetches the job's files (and the checkpoint it resumes from), trains with
``gateway.finetune.train`` in a process of its own, and reports as it goes: every step, every checkpoint (its files
first), the adapter's files and ``done``, or ``failed`` with why; a ``beat`` when the trainer has been quiet for a
while. An answer of 409 (the job was cancelled, or a newer run took it) stops the training, and so does SIGTERM.
The gateways behind the URL may restart: a report that cannot be delivered is tried again for a few minutes.

Needs the ``train`` extra on the node; nothing of the gateway's config, stores or storage.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

RETRY_SECONDS = 300.0  # how long a report is tried again while the gateways cannot be reached


class Stopped(Exception):
    """The gateways said stop (409), or refused the run (401, 404)."""


class Gateways:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str = "", body: bytes | Path | None = None,
             kind: str = "application/json") -> bytes:
        """One call, tried again while the gateways cannot answer; a file (a Path) is sent as it is read."""
        deadline = time.monotonic() + RETRY_SECONDS
        pause = 0.5
        while True:
            headers = {"Authorization": f"Bearer {self.token}", "Content-Type": kind}
            data = body
            if isinstance(body, Path):
                headers["Content-Length"] = str(body.stat().st_size)
                data = open(body, "rb")
            request = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=120) as answer:
                    return answer.read()
            except urllib.error.HTTPError as error:
                text = error.read().decode(errors="replace")[:500]
                if error.code in (401, 404, 409):
                    raise Stopped(f"{error.code}: {text}") from None
                if error.code < 500 or time.monotonic() > deadline:
                    raise RuntimeError(f"{method} {path or '/'}: {error.code} {text}") from None
            except (urllib.error.URLError, OSError) as error:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the gateways at {self.url} cannot be reached: {error}") from None
            finally:
                if isinstance(body, Path):
                    data.close()
            time.sleep(pause)
            pause = min(pause * 2, 10.0)

    def report(self, **event) -> None:
        self.call("POST", "/events", json.dumps(event).encode())

    def fetch(self, path: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.call("GET", path))

    def put_folder(self, path: str, folder: Path) -> list[str]:
        names = []
        for item in sorted(folder.iterdir()):
            if item.is_file():
                self.call("PUT", f"{path}/{item.name}", item, "application/octet-stream")
                names.append(item.name)
        return names


def run(gateways: Gateways, workdir: Path) -> int:
    spec = json.loads(gateways.call("GET"))
    if not spec.get("base"):
        gateways.report(event="failed", message=f"no weights for the base model '{spec.get('model')}' on this node")
        return 1
    data = workdir / "data"
    gateways.fetch("/data/train.jsonl", data / "train.jsonl")
    if spec["validation"]:
        gateways.fetch("/data/validation.jsonl", data / "validation.jsonl")
    resume = None
    if spec.get("resume"):
        for name in spec["resume"]["files"]:
            gateways.fetch(f"/resume/{name}", workdir / "resume" / name)
        resume = {"path": str(workdir / "resume"), "step": spec["resume"]["step"]}
    train_spec = {"base": spec["base"], "train": str(data / "train.jsonl"), "resume": resume,
                  "validation": str(data / "validation.jsonl") if spec["validation"] else None,
                  "output": str(workdir / "adapter"), "checkpoints": str(workdir / "checkpoints"),
                  "hyperparameters": spec["hyperparameters"], "seed": spec["seed"]}
    (workdir / "spec.json").write_text(json.dumps(train_spec))
    errors = open(workdir / "stderr.log", "wb")
    trainer = subprocess.Popen([sys.executable, "-m", "gateway.finetune.train", str(workdir / "spec.json")],
                               stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: _end(trainer, 143))
    try:
        done = _follow(gateways, trainer, float(spec.get("beat_seconds") or 5.0))
        if trainer.wait() != 0:
            lines = (workdir / "stderr.log").read_text(errors="replace").strip().splitlines()
            gateways.report(event="failed", message=lines[-1] if lines else f"the trainer exited with "
                                                                             f"{trainer.returncode}")
            return 1
        gateways.put_folder("/adapter", workdir / "adapter")
        gateways.report(event="done", trained_tokens=done.get("trained_tokens"), steps=done.get("steps"))
        return 0
    except Stopped as stop:
        print(f"stopped by the gateways: {stop}", file=sys.stderr)
        _end(trainer, None)
        return 0
    finally:
        errors.close()
        if trainer.poll() is None:
            _end(trainer, None)


def _follow(gateways: Gateways, trainer: subprocess.Popen, beat_seconds: float) -> dict:
    """Report the trainer's lines as they come, and a beat when it is quiet."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in iter(trainer.stdout.readline, b"")] +
                     [lines.put(None)], daemon=True).start()
    done: dict = {}
    while True:
        try:
            line = lines.get(timeout=beat_seconds)
        except queue.Empty:
            gateways.report(event="beat")
            continue
        if line is None:
            return done
        try:
            event = json.loads(line)
        except ValueError:
            continue
        kind = event.get("event")
        if kind == "step":
            gateways.report(event="step", step=event["step"], total_steps=event["total_steps"], loss=event["loss"],
                            epoch=event.get("epoch"))
        elif kind == "checkpoint":
            gateways.put_folder(f"/checkpoints/{int(event['step'])}", Path(event["path"]))
            gateways.report(event="checkpoint", step=int(event["step"]), loss=event.get("loss"),
                            valid_loss=event.get("valid_loss"))
        elif kind == "done":
            done = event


def _end(trainer: subprocess.Popen, exit_code: int | None) -> None:
    if trainer.poll() is None:
        try:
            os.killpg(trainer.pid, signal.SIGTERM)
            trainer.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(trainer.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if exit_code is not None:
        sys.exit(exit_code)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway.finetune.remote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("GATEWAY_TRAINER_URL"), help="the job's report URL")
    parser.add_argument("--token", default=os.environ.get("GATEWAY_TRAINER_TOKEN"), help="the run's token")
    parser.add_argument("--workdir", default=None, help="where the run's files are kept (default: a temp folder)")
    args = parser.parse_args()
    if not args.url or not args.token:
        parser.error("the job's report URL and the run's token are needed (GATEWAY_TRAINER_URL, "
                     "GATEWAY_TRAINER_TOKEN)")
    gateways = Gateways(args.url, args.token)
    try:
        with tempfile.TemporaryDirectory(prefix="gateway-run-", dir=args.workdir) as folder:
            code = run(gateways, Path(folder))
    except Stopped as stop:
        print(f"stopped by the gateways: {stop}", file=sys.stderr)
        code = 0
    except Exception as exc:  # said to the gateways, so that the job fails with why rather than waiting
        message = f"{type(exc).__name__}: {exc}"[:1000]
        print(message, file=sys.stderr)
        try:
            gateways.report(event="failed", message=message)
        except Exception:
            pass
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
