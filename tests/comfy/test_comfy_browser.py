"""ComfyUI's real front end in headless Chromium (Debian's package): the pack's nodes are
registered and a shipped workflow opens without console errors."""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from cdp import Browser, chromium
from make_examples import REPO
from test_comfy_server import PACK_NODES


def local_errors(page, since: int = 0) -> list[str]:
    """Errors, less the front end's failed requests to the internet (this machine is offline)."""
    return [e for e in page.errors()[since:] if not ("net::ERR_" in e and "https://" in e and "127.0.0.1" not in e)]


@pytest.fixture(scope="module")
def page(comfy):
    binary = chromium()
    if binary is None:
        message = "chromium is not installed: bash .ci/comfyui.sh browser"
        if os.environ.get("MUSUBI_PIPE_REQUIRE_COMFYUI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    browser = Browser(binary)
    try:
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            browser.call(domain)
        browser.call("Page.navigate", url=comfy.url + "/")
        assert browser.wait_for("window.app && window.app.graph && window.LiteGraph", 90), "the ComfyUI app never started"
        yield browser
    finally:
        browser.close()


def test_every_pack_node_is_registered_in_the_editor(page):
    registered = set(page.evaluate("Object.keys(LiteGraph.registered_node_types)"))
    assert PACK_NODES <= registered, sorted(PACK_NODES - registered)
    ours = [e for e in local_errors(page) if "musubi" in e.lower()]
    assert ours == []


@pytest.mark.parametrize("name", ["lora_training", "inference_with_lora"])
def test_a_shipped_workflow_opens_without_errors(page, name, tmp_path):
    before = len(page.errors())
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    page.evaluate(f"app.loadGraphData({json.dumps(workflow)})")
    types = page.evaluate("app.graph._nodes.map(n => n.type)")
    assert sorted(types) == sorted(n["type"] for n in workflow["nodes"])
    # every link arrived: inputs that the file links are linked in the editor too
    linked = page.evaluate("app.graph._nodes.reduce((s, n) => s + (n.inputs || []).filter(i => i.link != null).length, 0)")
    assert linked == len(workflow["links"])
    errors = local_errors(page, before)
    assert errors == [], errors
    shot = page.call("Page.captureScreenshot", format="png")
    (tmp_path / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
