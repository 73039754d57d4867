"""A small ComfyUI client for the tests: queue a prompt, follow it over the websocket, read history."""
from __future__ import annotations

import json
import struct
import time
import urllib.error
import urllib.request
import uuid


class ComfyClient:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, data: dict | None = None, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(data or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 120, on_message=None) -> "Outcome":
        """Queue an API-format prompt and follow it to the end; every websocket message is kept."""
        import websocket

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(self.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}", timeout=timeout)
        try:
            status, answer = self.post("/prompt", {"prompt": prompt, "client_id": client_id})
            if status != 200 or answer.get("node_errors"):
                raise AssertionError(f"ComfyUI refused the prompt ({status}): {json.dumps(answer)[:2000]}")
            pid = answer["prompt_id"]
            messages = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ws.settimeout(max(0.1, deadline - time.monotonic()))
                raw = ws.recv()
                if isinstance(raw, bytes):
                    kind = struct.unpack(">I", raw[:4])[0]
                    msg = {"type": "binary", "kind": kind, "bytes": raw[4:]}
                    if kind == 3:  # progress text: node id length, node id, text
                        n = struct.unpack(">I", raw[4:8])[0]
                        msg = {"type": "progress_text", "node": raw[8:8 + n].decode(), "text": raw[8 + n:].decode("utf-8", "replace")}
                else:
                    msg = json.loads(raw)
                messages.append(msg)
                if on_message:
                    on_message(msg)
                data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
                if data.get("prompt_id") == pid and msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    break
            # ComfyUI stores the history just after it sends the final message: wait for it.
            history: dict = {}
            for _ in range(100):
                history = self.get(f"/history/{pid}").get(pid, {})
                if history.get("status", {}).get("completed") is not None:
                    break
                time.sleep(0.05)
            return Outcome(pid, messages, history, status)
        finally:
            ws.close()


class Outcome:
    def __init__(self, prompt_id, messages, history, status):
        self.prompt_id, self.messages, self.history, self.status = prompt_id, messages, history, status

    @property
    def ended(self) -> str:
        for m in reversed(self.messages):
            if m.get("type") in ("execution_success", "execution_error", "execution_interrupted"):
                return m["type"]
        return ""

    def error(self) -> dict:
        for m in self.messages:
            if m.get("type") == "execution_error":
                return m["data"]
        return {}

    def texts(self, node: str | None = None) -> list[str]:
        return [m["text"] for m in self.messages if m.get("type") == "progress_text" and (node is None or m["node"] == node)]

    def progress(self, node: str) -> list[tuple[int, int]]:
        return [(m["data"]["value"], m["data"]["max"]) for m in self.messages
                if m.get("type") == "progress" and m["data"].get("node") == node]

    def outputs(self, node: str) -> dict:
        return self.history.get("outputs", {}).get(node, {})
