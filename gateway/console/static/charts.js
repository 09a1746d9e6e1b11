// Charts drawn as SVG with the DOM's own functions: no library, nothing fetched from elsewhere.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svgNode(name, attributes, text) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes || {})) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

// The five labels of an axis from 0 to top; when the format says two of them alike ("$0.02, $0.02"), with more
// significant digits until they differ.
function tickLabels(top, format) {
  const values = [0, 1, 2, 3, 4].map((i) => (top * i) / 4);
  let labels = values.map(format);
  for (let digits = 2; new Set(labels).size < labels.length && digits <= 6; digits++) {
    const prefix = String(format(1)).startsWith("$") ? "$" : "";
    labels = values.map((v) => (v === 0 ? format(0) : prefix + Number(v.toPrecision(digits)).toString()));
  }
  return labels;
}

// Vertical bars over time or categories: points = [{label, value}].
// whole: the values are counts, so the axis is drawn in whole numbers (no "37.50" requests)
function columnChart(points, { color = "#2f6fdb", format = String, name = "", whole = false } = {}) {
  const width = 560, height = 220, left = 56, bottom = 28, top = 10;
  const chart = svgNode("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
                                 "aria-label": name, "data-chart": name, "data-points": points.length });
  let top_ = niceMax(Math.max(0, ...points.map((p) => p.value)));
  if (whole) top_ = Math.max(4, Math.ceil(top_ / 4) * 4);
  const plotHeight = height - bottom - top, plotWidth = width - left - 8;
  const ticks = tickLabels(top_, format);
  for (let i = 0; i <= 4; i++) {
    const y = top + plotHeight - (plotHeight * i) / 4;
    chart.append(svgNode("line", { x1: left, x2: width - 8, y1: y, y2: y, class: "axis" }));
    chart.append(svgNode("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, ticks[i]));
  }
  if (!points.length) {
    chart.append(svgNode("text", { x: left + plotWidth / 2, y: top + plotHeight / 2, "text-anchor": "middle" },
                         "no data in this period"));
    return chart;
  }
  const slot = plotWidth / points.length, barWidth = Math.max(2, Math.min(40, slot * 0.7));
  const every = Math.ceil(points.length / 10);
  points.forEach((point, i) => {
    const barHeight = (plotHeight * point.value) / top_;
    const x = left + i * slot + (slot - barWidth) / 2;
    const bar = svgNode("rect", { x, y: top + plotHeight - barHeight, width: barWidth, height: Math.max(0, barHeight),
                                  fill: color, "data-value": point.value, class: "bar" });
    bar.append(svgNode("title", {}, `${point.label}: ${format(point.value)}`));
    chart.append(bar);
    if (i % every === 0) {
      chart.append(svgNode("text", { x: x + barWidth / 2, y: height - 10, "text-anchor": "middle" }, point.label));
    }
  });
  return chart;
}

// Horizontal bars for a ranking: points = [{label, value}].
function barList(points, { color = "#16a085", format = String, name = "" } = {}) {
  const rowHeight = 24, width = 560, labelWidth = 170;
  const height = Math.max(1, points.length) * rowHeight + 8;
  const chart = svgNode("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img",
                                 "aria-label": name, "data-chart": name, "data-points": points.length });
  if (!points.length) {
    chart.append(svgNode("text", { x: 8, y: 18 }, "no data in this period"));
    return chart;
  }
  const most = Math.max(...points.map((p) => p.value)) || 1;
  points.forEach((point, i) => {
    const y = 4 + i * rowHeight;
    const label = point.label.length > 26 ? point.label.slice(0, 25) + "…" : point.label;
    chart.append(svgNode("text", { x: labelWidth - 8, y: y + 15, "text-anchor": "end" }, label));
    const barWidth = ((width - labelWidth - 90) * point.value) / most;
    const bar = svgNode("rect", { x: labelWidth, y: y + 3, width: Math.max(1, barWidth), height: rowHeight - 8,
                                  fill: color, rx: 3, "data-value": point.value, class: "bar" });
    bar.append(svgNode("title", {}, `${point.label}: ${format(point.value)}`));
    chart.append(bar);
    chart.append(svgNode("text", { x: labelWidth + barWidth + 6, y: y + 15 }, format(point.value)));
  });
  return chart;
}

window.charts = { columnChart, barList };
