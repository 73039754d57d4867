"""ComfyUI's real front end in headless Chromium (Debian's package): the pack's nodes and its web
extension load; every example opens without errors, readable (below the top bar, no overlaps, its
Note shown) and with its widget values where the server expects them; its thumbnail is served; a
test-double training run queued from the page draws the trainer's loss chart and shows the
samples in a Preview Image node, with no warning from this pack.

Screenshots go to $MUSUBI_PIPE_SHOTS (default: the test's temporary folder)."""
from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest

from cdp import Browser, chromium
from make_examples import REPO, all_edits, api_prompt, examples
from test_comfy_server import PACK_NODES

EXTENSION = "/extensions/musubi-pipe/musubi_pipe.js"
VUE_NODES = "Comfy.VueNodes.Enabled"  # the front end's new node renderer ("Nodes 2.0"), off by default


def offline(message: str) -> bool:
    """The front end's failed requests to the internet (this machine is offline), e.g. for
    api.comfy.org/comfy-nodes/MusubiTuner_.../node."""
    return "net::ERR_" in message and "https://" in message and "127.0.0.1" not in message


def local_errors(page, since: int = 0) -> list[str]:
    return [e for e in page.errors()[since:] if not offline(e)]


def pack_warnings(page) -> list[str]:
    """Console warnings and errors that come from this pack or its websocket messages."""
    return [m for m in page.messages(("warning", "error")) if not offline(m) and
            ("musubi" in m.lower() or "unhandled message" in m.lower() or "unknown message type" in m.lower())]


def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("MUSUBI_PIPE_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(page, path: Path) -> None:
    path.write_bytes(base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"]))


@pytest.fixture(scope="module")
def page(comfy, test_root):
    # test_root first: the model pickers list the test's model files when the page loads
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
        # the default renderer, even if an interrupted session left the new one on (a server-side user setting)
        browser.evaluate(f"app.extensionManager.setting.set('{VUE_NODES}', false)")
        yield browser
    finally:
        browser.close()


def reload(page) -> None:
    page.evaluate("window.__stale = true")
    page.call("Page.reload")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if page.evaluate("!window.__stale && Boolean(window.app && window.app.graph && window.LiteGraph && window.musubiPipe)"):
                return
        except RuntimeError:  # the old page's context went away mid-call
            pass
        time.sleep(0.25)
    raise AssertionError("the ComfyUI app did not start again after a reload")


def load(page, workflow: dict) -> None:
    page.evaluate(f"app.loadGraphData({json.dumps(workflow)})")
    page.wait_for("app.graph._nodes.length > 0", 10)
    time.sleep(0.5)  # DOM widgets (the notes) are placed on the next frames


def test_every_pack_node_and_the_extension_load(page, comfy):
    registered = set(page.evaluate("Object.keys(LiteGraph.registered_node_types)"))
    assert PACK_NODES <= registered, sorted(PACK_NODES - registered)
    assert EXTENSION in comfy.get("/extensions")
    assert page.wait_for("window.musubiPipe && window.musubiPipe.charts", 10), "web/musubi_pipe.js did not run"
    assert page.evaluate("app.extensions.some(e => e.name === 'musubi_pipe.loss_chart')")
    ours = [e for e in local_errors(page) if "musubi" in e.lower()]
    assert ours == []


def test_every_example_is_a_template_with_a_thumbnail(page, comfy, tmp_path):
    listed = comfy.get("/workflow_templates")["musubi-pipe"]
    assert sorted(listed) == sorted(examples())
    for name in listed:
        # the URL the template browser builds for a custom node's template (no "-1" suffix, .jpg)
        found = page.evaluate(f"""fetch('/api/workflow_templates/musubi-pipe/{name}.jpg').then(async r =>
            r.ok ? createImageBitmap(await r.blob()).then(b => [r.headers.get('content-type'), b.width, b.height]) : r.status)""")
        assert isinstance(found, list), f"{name}.jpg: HTTP {found}"
        kind, width, height = found
        assert kind == "image/jpeg" and width >= 256 and height >= 160, found
        assert (REPO / "example_workflows" / f"{name}.jpg").stat().st_size < 80_000  # small enough to commit
    # and the template browser itself shows them: Templates -> musubi-pipe, one loaded card image each
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    assert page.wait_for("[...document.querySelectorAll('span')].some(e => e.textContent.trim() === 'musubi-pipe')", 20)
    page.evaluate("[...document.querySelectorAll('span')].find(e => e.textContent.trim() === 'musubi-pipe').click()")
    cards = "[...document.querySelectorAll('[role=dialog] img')]"  # the front end shows them as blob: URLs
    assert page.wait_for(f"{cards}.length === {len(listed)} && {cards}.every(i => i.complete && i.naturalWidth > 0)", 20), \
        page.evaluate(f"{cards}.map(i => [i.src, i.alt, i.complete, i.naturalWidth])")
    screenshot(page, shots(tmp_path) / "template-browser.png")
    reload(page)  # closes the dialog (it has no labelled close button to press)


LAYOUT = """(() => {
  const ds = app.canvas.ds, T = LiteGraph.NODE_TITLE_HEIGHT, rect = app.canvas.canvas.getBoundingClientRect();
  const screen = (x, y) => [(x + ds.offset[0]) * ds.scale + rect.left, (y + ds.offset[1]) * ds.scale + rect.top];
  return app.graph._nodes.map(n => {
    const [left, top] = screen(n.pos[0], n.pos[1] - T), [right] = screen(n.pos[0] + n.size[0], 0);
    // what the user sees at the title's left, middle and right (the canvas, unless a bar covers it);
    // titles near the top only: the minimap and zoom controls float over the bottom right
    const seen = top > 0 && top < 300 ? [left + 8, (left + right) / 2, right - 8]
      .filter(x => x > 0 && x < innerWidth).map(x => document.elementFromPoint(x, top + 6) === app.canvas.canvas) : [];
    return {id: n.id, type: n.type, title: n.title, box: [n.pos[0], n.pos[1] - T, n.size[0], n.size[1] + T],
            size: [...n.size], min: [...n.computeSize()], seen};
  });
})()"""


@pytest.mark.parametrize("name", sorted(examples()))
def test_an_example_opens_readable_and_without_errors(page, comfy, name, tmp_path):
    before = len(page.errors())
    workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    load(page, workflow)
    types = page.evaluate("app.graph._nodes.map(n => n.type)")
    assert sorted(types) == sorted(n["type"] for n in workflow["nodes"])
    # every link arrived: inputs that the file links are linked in the editor too
    linked = page.evaluate("app.graph._nodes.reduce((s, n) => s + (n.inputs || []).filter(i => i.link != null).length, 0)")
    assert linked == len(workflow["links"])
    # each widget holds the value the file gives it by the server's input order (what the tests queue)
    prompt = api_prompt(workflow, comfy.get("/object_info"))
    shown = page.evaluate("Object.fromEntries(app.graph._nodes.map(n => [n.id, Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))]))")
    for node_id, node in prompt.items():
        for widget, value in node["inputs"].items():
            if not isinstance(value, list):
                assert shown[node_id][widget] == value, (node_id, node["class_type"], widget)
    # the notes show, with their text, in the page
    notes = [n for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, f"{name}: no Note node"
    page_text = page.evaluate("document.body.innerText")
    for note in notes:
        first_line = note["widgets_values"][0].splitlines()[0].lstrip("# ")
        assert first_line in page_text, f"{name}: the note {first_line!r} is not shown"
    for edit in all_edits(examples()[name]):
        assert any(f"*{edit.widget}*" in n["widgets_values"][0] for n in notes), f"{name}: no note names {edit.widget}"
        assert edit.what in page_text, f"{name}: the note's {edit.widget!r} line does not show as written"
    # readable: nothing under the top bar or side bar, no overlaps, no widget cut off
    layout = page.evaluate(LAYOUT)
    for node in layout:
        assert all(node["seen"]), f"{name}: {node['title']}'s title is hidden under a bar: {node}"
        assert node["box"][1] >= 100, f"{name}: {node['title']} starts above y=100"
        assert node["size"][0] >= node["min"][0] and node["size"][1] >= node["min"][1], f"{name}: {node['title']} is cut off: {node}"
    for i, a in enumerate(layout):
        for b in layout[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["box"], b["box"]
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay, f"{name}: {a['title']} overlaps {b['title']}"
    errors = local_errors(page, before)
    assert errors == [], errors
    assert pack_warnings(page) == []
    screenshot(page, shots(tmp_path) / f"{name}.png")


VUE_LAYOUT = """[...document.querySelectorAll('[data-node-id]')].map(e => {
  const r = e.getBoundingClientRect(), hit = document.elementFromPoint(r.left + 12, r.top + 6);
  return {id: e.dataset.nodeId, box: [r.left, r.top, r.right, r.bottom], seen: r.top > 300 || r.left + 12 > innerWidth || hit?.closest('[data-node-id]') === e};
})"""


def test_the_examples_are_readable_in_the_new_node_renderer(page, tmp_path):
    """Nodes 2.0 sizes nodes to their content (the notes' text is larger there): still no overlaps,
    no title under a bar."""
    page.evaluate(f"app.extensionManager.setting.set('{VUE_NODES}', true)")
    try:
        for name in sorted(examples()):
            workflow = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
            load(page, workflow)
            assert page.wait_for(f"document.querySelectorAll('[data-node-id]').length === {len(workflow['nodes'])}", 10)
            layout = page.evaluate(VUE_LAYOUT)
            for i, a in enumerate(layout):
                assert a["seen"], f"{name}: node {a['id']}'s title is hidden under a bar"
                for b in layout[i + 1:]:
                    (al, at, ar, ab), (bl, bt, br, bb) = a["box"], b["box"]
                    assert ar <= bl or br <= al or ab <= bt or bb <= at, f"{name}: nodes {a['id']} and {b['id']} overlap"
            screenshot(page, shots(tmp_path) / f"{name}-vue.png")
    finally:
        page.evaluate(f"app.extensionManager.setting.set('{VUE_NODES}', false)")


def _set_widgets(page, values: dict[tuple[str, str], object]) -> None:
    for (node_id, widget), value in values.items():
        ok = page.evaluate(f"""(() => {{ const w = app.graph.getNodeById({int(node_id)})?.widgets?.find(w => w.name === {json.dumps(widget)});
            if (!w) return false; w.value = {json.dumps(value)}; w.callback?.(w.value); return true; }})()""")
        assert ok, f"no widget {widget} on node {node_id}"


@pytest.mark.parametrize("renderer", ["litegraph", "vue"])
def test_a_training_run_draws_the_loss_chart_and_shows_the_samples(page, clips, record, unique, tmp_path, renderer):
    page.evaluate(f"app.extensionManager.setting.set('{VUE_NODES}', {json.dumps(renderer == 'vue')})")
    try:
        _training_run(page, clips, unique, shots(tmp_path), "" if renderer == "litegraph" else "-vue")
    finally:  # a setting of the server's user: the next tests (and people) get the default renderer
        page.evaluate(f"app.extensionManager.setting.set('{VUE_NODES}', false)")


def _training_run(page, clips, unique, folder: Path, suffix: str) -> None:
    from test_comfy_examples import FRESH_NAME, user_edits

    workflow = json.loads((REPO / "example_workflows" / "lora_training.json").read_text())
    load(page, workflow)
    trainer = next(n["id"] for n in workflow["nodes"] if n["type"].endswith("Trainer"))
    previews = {n["title"]: n["id"] for n in workflow["nodes"] if n["type"] == "PreviewImage"}
    # the note's edits only (and a fresh name): the double trains the shipped 16 epochs in a few seconds,
    # long enough for several of the pack's progress messages (4 a second at most)
    _set_widgets(page, {**user_edits("lora_training", clips=str(clips)), FRESH_NAME["lora_training"]: unique})
    page.evaluate("""(() => { window.__ended = null;
        for (const kind of ['execution_success', 'execution_error', 'execution_interrupted'])
          window.comfyAPI.api.api.addEventListener(kind, e => { window.__ended = [kind, e.detail]; }); })()""")
    before = len(page.errors())
    page.evaluate("app.queuePrompt(0, 1)")
    assert page.wait_for(f"window.musubiPipe.charts.get('{trainer}')?.points.length > 0", 180), \
        f"no loss point reached the chart; ended: {page.evaluate('JSON.stringify(window.__ended)')}"
    page.wait_for(f"window.musubiPipe.charts.get('{trainer}').points.length >= 4 || window.__ended", 30)  # a line to look at
    page.evaluate(f"app.canvas.centerOnNode(app.graph.getNodeById({trainer}))")  # for the screenshots
    screenshot(page, folder / f"training-mid-run{suffix}.png")
    assert page.wait_for("window.__ended", 240), "the run did not end"
    ended = page.evaluate("window.__ended")
    assert ended[0] == "execution_success", ended
    chart = page.evaluate(f"""(() => {{ const c = window.musubiPipe.charts.get('{trainer}');
        const d = c.canvas.getContext('2d').getImageData(0, 0, c.canvas.width, c.canvas.height).data;
        let line = 0; for (let i = 0; i < d.length; i += 4) if (d[i + 2] > 200 && d[i] < 120) line++;
        return {{points: c.points.length, line, text: c.text, attached: app.graph.getNodeById({trainer}).widgets.includes(c.widget)}}; }})()""")
    assert chart["points"] > 1 and chart["line"] > 50 and chart["attached"], chart
    assert chart["text"].startswith("done"), chart
    for title, node_id in previews.items():
        assert page.wait_for(f"app.nodeOutputs['{node_id}']?.images?.length > 0", 20), f"nothing shown in {title}"
    # the Samples preview shows the samples the trainer made (their size), not the "no samples" note
    sizes = page.evaluate(f"""(async () => {{
        const size = async i => {{ const r = await fetch(`/view?filename=${{encodeURIComponent(i.filename)}}&subfolder=${{encodeURIComponent(i.subfolder)}}&type=${{i.type}}`);
                                   const b = await createImageBitmap(await r.blob()); return [b.width, b.height]; }};
        return [await size(app.nodeOutputs['{previews["Samples"]}'].images[0]), await size(app.nodeOutputs['{trainer}'].images[0])]; }})()""")
    assert sizes[0] == sizes[1], f"the Samples preview is {sizes[0]}, the trainer's samples {sizes[1]}"
    screenshot(page, folder / f"training-done{suffix}.png")
    assert local_errors(page, before) == []
    assert pack_warnings(page) == []
