"""The ComfyUI executor: runs a pipeline in a running ComfyUI (with the MusubiTuner pack) by
submitting its exported workflow to /prompt and following it over the websocket, emitting the
same Events as the local executor; cancel() asks ComfyUI to interrupt."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Iterable

from ..errors import PipelineError, Problem
from . import events as ev
from .local import RunResult

EVENT_MESSAGE = "musubi_pipe.event"  # sent by comfy_adapter.base.Run for every executor event


class ComfyExecutor:
    def __init__(self, url: str, timeout_s: float = 7 * 24 * 3600):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._cancel = threading.Event()
        self._prompt_id = ""

    def _post(self, path: str, data: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:2000]
            raise PipelineError([Problem(f"ComfyUI refused the workflow ({exc.code}): {detail}", path="--comfy-url",
                                         fix="check that the MusubiTuner nodes are installed in that ComfyUI and up to date")]) from None
        except (urllib.error.URLError, OSError) as exc:
            raise PipelineError([Problem(f"cannot reach ComfyUI at {self.url}: {exc}", path="--comfy-url",
                                         fix="start ComfyUI, or give its address with --comfy-url http://host:port")]) from None

    def cancel(self) -> None:
        """Stop the run: ComfyUI's interrupt stops the node, which ends every process it started."""
        self._cancel.set()
        try:
            self._post("/interrupt", {"prompt_id": self._prompt_id} if self._prompt_id else {})
        except PipelineError:
            pass

    def run(self, pipeline: str | Path, listeners: Iterable[ev.Listener] = ()) -> RunResult:
        import websocket

        from ..comfy_adapter.export import export_workflow

        listeners = list(listeners)

        def emit(e: ev.Event) -> None:
            for listener in listeners:
                listener(e)

        prompt = export_workflow(pipeline, "api")
        client_id = uuid.uuid4().hex
        try:
            ws = websocket.create_connection(self.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}", timeout=30)
        except (OSError, websocket.WebSocketException) as exc:
            raise PipelineError([Problem(f"cannot open ComfyUI's websocket at {self.url}: {exc}", path="--comfy-url",
                                         fix="start ComfyUI, or give its address with --comfy-url http://host:port")]) from None
        result = RunResult("failed", None)
        try:
            answer = self._post("/prompt", {"prompt": prompt, "client_id": client_id})
            if answer.get("node_errors"):
                raise PipelineError([Problem(f"ComfyUI rejected node {node}: {json.dumps(err)[:500]}", path="--comfy-url",
                                             fix="update the MusubiTuner nodes in that ComfyUI to this musubi-pipe version")
                                     for node, err in answer["node_errors"].items()])
            self._prompt_id = answer["prompt_id"]
            if self._cancel.is_set():
                self.cancel()
            ws.settimeout(1.0)
            failed_step = ""
            while True:
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if isinstance(raw, bytes):
                    continue  # previews and progress text: the events carry the same facts
                msg = json.loads(raw)
                data = msg.get("data") or {}
                kind = msg.get("type")
                if kind == EVENT_MESSAGE:
                    e = ev.Event(**data["event"])
                    if e.kind == ev.STEP_END:
                        result.steps[e.step] = e.data.get("status", "")
                        if e.data.get("status") != "succeeded":
                            failed_step = e.step
                    elif e.kind == ev.STEP_SKIPPED:
                        result.steps.setdefault(e.step, "skipped")
                    if e.kind not in (ev.PLAN, ev.RUN_END):  # one PLAN/RUN_END per node run; ours frame the whole
                        emit(e)
                    continue
                if data.get("prompt_id") != self._prompt_id:
                    continue
                if kind == "execution_start":
                    emit(ev.Event(ev.PLAN, data={"steps": [], "skipped": [], "prompt_id": self._prompt_id, "url": self.url}))
                elif kind == "execution_success":
                    result.status = "succeeded"
                    break
                elif kind == "execution_interrupted":
                    result.status = "cancelled"
                    break
                elif kind == "execution_error":
                    message = data.get("exception_message", "").strip()
                    step = failed_step or message.split(":", 1)[0]
                    if not failed_step:
                        emit(ev.Event(ev.STEP_END, step=step, data={"status": "failed", "cause": message, "fix": ""}))
                    result.status = "failed"
                    result.steps[step] = "failed"
                    break
            emit(ev.Event(ev.RUN_END, data={"status": result.status, "prompt_id": self._prompt_id}))
            return result
        finally:
            ws.close()


def run_via_comfy(pipeline: str | Path, url: str, listeners: Iterable[ev.Listener] = ()) -> RunResult:
    """Run a pipeline file in the ComfyUI at `url`; Ctrl-C (KeyboardInterrupt) interrupts it there."""
    executor = ComfyExecutor(url)
    try:
        return executor.run(pipeline, listeners)
    except KeyboardInterrupt:
        executor.cancel()
        raise
