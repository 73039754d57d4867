// musubi-pipe's front end: a live loss chart on the node that trains, drawn from the pack's
// `musubi_pipe.event` websocket messages ({node, event, chart}: the format is documented in
// comfy_adapter/base.py, event_message; event is an executor Event: kind, step, phase, current,
// total, epoch, epochs, loss, ...).
// Plain JS, no build step. Registering the listener is also what keeps ComfyUI from warning
// "Unhandled message" for this pack's messages.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MESSAGE = "musubi_pipe.event";
const WIDGET = "musubi_loss_chart";
const MAX_POINTS = 2000; // beyond that, every other point is dropped (the chart stays readable)

// By node id: {points: [[step, loss]], text, widget, canvas}. Exposed for checks and debugging.
const charts = new Map();
window.musubiPipe = { charts };

function nodeFor(id) {
  const graph = app.graph;
  return graph && id != null ? graph.getNodeById(Number(id)) ?? graph.getNodeById(id) : null;
}

function chartFor(id) {
  let chart = charts.get(String(id));
  if (!chart) {
    chart = { points: [], text: "", widget: null, canvas: null, draws: 0 };
    charts.set(String(id), chart);
  }
  const node = nodeFor(id);
  if (node && (!chart.widget || !node.widgets?.includes(chart.widget))) attach(node, chart);
  return chart;
}

function attach(node, chart) {
  const canvas = document.createElement("canvas");
  canvas.style.width = "100%";
  canvas.style.height = "100%";
  canvas.dataset.musubiChart = String(node.id);
  // Not a setting: left out of the saved workflow and of the prompt.
  const widget = node.addDOMWidget(WIDGET, "musubi_chart", canvas, {
    serialize: false, hideOnZoom: false, getMinHeight: () => 140, getMaxHeight: () => 240,
  });
  widget.serialize = false;
  chart.widget = widget;
  chart.canvas = canvas;
  const [w, h] = node.computeSize();
  node.setSize([Math.max(node.size[0], w), Math.max(node.size[1], h)]);
  node.setDirtyCanvas(true, true);
}

// 4 significant digits: 0.08312, 1.250, 382.0; tiny values as 3.1e-5
function fmt(x) {
  if (x == null) return "";
  return x === 0 || Math.abs(x) >= 0.001 ? String(Number(x.toPrecision(4))) : x.toExponential(1);
}

function draw(chart) {
  const canvas = chart.canvas;
  if (!canvas) return;
  chart.draws += 1;
  // the canvas's pixels follow its size on the node, so the text stays sharp
  const W = Math.max(200, canvas.clientWidth || 400), H = Math.max(100, canvas.clientHeight || 160);
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(W * dpr) || canvas.height !== Math.round(H * dpr)) {
    canvas.width = Math.round(W * dpr);
    canvas.height = Math.round(H * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const pad = { l: 56, r: 10, t: 22, b: 22 };
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(0, 0, W, H);
  ctx.font = "12px sans-serif";
  ctx.fillStyle = "#ddd";
  ctx.fillText(chart.text || "loss: waiting for the first training step", 8, 15);
  const pts = chart.points;
  if (pts.length === 0) return;
  let x0 = pts[0][0], x1 = pts[pts.length - 1][0], y0 = Infinity, y1 = -Infinity;
  for (const [, y] of pts) { y0 = Math.min(y0, y); y1 = Math.max(y1, y); }
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5 * Math.abs(y0 || 1); y1 += 0.5 * Math.abs(y1 || 1); }
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (W - pad.l - pad.r);
  const Y = (y) => H - pad.b - ((y - y0) / (y1 - y0)) * (H - pad.t - pad.b);
  ctx.strokeStyle = "#444";
  ctx.strokeRect(pad.l, pad.t, W - pad.l - pad.r, H - pad.t - pad.b);
  ctx.fillStyle = "#999";
  ctx.fillText(fmt(y1), 4, pad.t + 10);
  ctx.fillText(fmt(y0), 4, H - pad.b);
  ctx.fillText(`step ${x0}`, pad.l, H - 6);
  const right = `step ${x1}`;
  ctx.fillText(right, W - pad.r - ctx.measureText(right).width, H - 6);
  ctx.strokeStyle = "#4fa3ff";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  pts.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
  ctx.stroke();
  if (pts.length === 1) {
    ctx.fillStyle = "#4fa3ff";
    ctx.fillRect(X(pts[0][0]) - 2, Y(pts[0][1]) - 2, 4, 4);
  }
}

// The chart's caption (the pack's progress text under the title says the rest: rate, time left).
function progressText(e) {
  const parts = [e.step, e.phase].filter(Boolean);
  if (e.epoch != null) parts.push(`epoch ${e.epoch}${e.epochs ? "/" + e.epochs : ""}`);
  if (e.current != null && e.total) parts.push(`step ${e.current}/${e.total}`);
  if (e.loss != null) parts.push(`loss ${fmt(e.loss)}`);
  return parts.join(" · ");
}

// Every kind the executor emits (executors/events.py) is handled here, even when only to ignore it.
function onEvent({ detail }) {
  const e = detail?.event;
  if (!e || detail.node == null) return;
  const id = String(detail.node);
  switch (e.kind) {
    case "plan": // a new run on this node: start a new chart
      if (charts.has(id)) draw(Object.assign(charts.get(id), { points: [], text: "" }));
      return;
    case "progress": {
      // only training steps carry the training loss (sampling/caching steps count other things)
      if (e.phase !== "training" || e.loss == null || e.current == null) {
        if (charts.has(id)) { charts.get(id).text = progressText(e); draw(charts.get(id)); }
        return;
      }
      const chart = chartFor(id);
      const last = chart.points[chart.points.length - 1];
      if (last && e.current < last[0]) chart.points = []; // the step restarted (a second training stage)
      if (!last || e.current !== last[0]) chart.points.push([e.current, e.loss]);
      if (chart.points.length > MAX_POINTS) chart.points = chart.points.filter((_, i) => i % 2 === 0);
      chart.text = progressText(e);
      draw(chart);
      return;
    }
    case "step_end":
    case "run_end": {
      const chart = charts.get(id);
      if (!chart) return;
      const status = e.data?.status;
      if (status && status !== "succeeded") chart.text = `${e.step || "run"}: ${status}${e.data?.cause ? " — " + e.data.cause : ""}`;
      else if (e.kind === "run_end") chart.text = `done · last loss ${fmt(chart.points.at(-1)?.[1])}`;
      draw(chart);
      return;
    }
    case "step_start":
    case "step_skipped":
    case "output":
    case "log":
    default:
      return; // shown by the pack's progress text and outputs; nothing to draw
  }
}

api.addEventListener(MESSAGE, onEvent);

app.registerExtension({
  name: "musubi_pipe.loss_chart",
  // a workflow loaded afresh has new node objects: charts of the old graph are dropped
  async afterConfigureGraph() {
    charts.clear();
  },
});
