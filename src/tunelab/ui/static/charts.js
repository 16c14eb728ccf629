// Line charts with the vendored uPlot: several series over a shared x axis (steps), updated in place.
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"];

// Align (x, y) point lists of several series on the union of their x values (null where a series has none).
function alignSeries(pointLists) {
  const xs = [...new Set(pointLists.flatMap(p => p.map(q => q[0])))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  const ys = pointLists.map(points => {
    const col = new Array(xs.length).fill(null);
    points.forEach(([x, y]) => { col[index.get(x)] = y; });
    return col;
  });
  return [xs, ...ys];
}

class LineChart {
  constructor(el, title, names, opts = {}) {
    this.el = el; this.title = title; this.names = names; this.opts = opts; this.plot = null;
  }
  update(pointLists) {
    const data = alignSeries(pointLists);
    this.el.dataset.points = String(data[0].length);  // for tests and screen readers: how many x values drawn
    if (!data[0].length) { this.el.textContent = this.opts.empty || ""; return; }
    if (!this.plot) {
      this.el.textContent = "";
      const width = Math.max(300, this.el.clientWidth || 420);
      this.plot = new uPlot({
        title: this.title, width, height: 210,
        scales: { x: { time: false }, y: this.opts.log ? { distr: 3 } : {} },
        axes: [{ label: this.opts.xlabel || "step" }, { size: 64, values: (u, vals) => vals.map(v => v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(1) : fmt(v)) }],
        series: [{ label: this.opts.xlabel || "step" }, ...this.names.map((n, i) => ({
          label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true,
          dash: (this.opts.dashed || []).includes(i) ? [6, 4] : undefined,
          points: { show: !!this.opts.points || (this.opts.dashed || []).includes(i), size: 6 },
        }))],
      }, data, this.el);
    } else {
      this.plot.setData(data);
    }
  }
}

// (step, value) points of one metric key from metrics.jsonl records; a later record for a step wins.
function pointsOf(records, key, filter) {
  const m = new Map();
  records.forEach(r => {
    if (typeof r[key] === "number" && typeof r.step === "number" && (!filter || filter(r))) m.set(r.step, r[key]);
  });
  return [...m.entries()].sort((a, b) => a[0] - b[0]);
}
