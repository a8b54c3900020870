// Read what a JupyterLab page shows: cells and their outputs, bokeh plots and their pixels, the
// data behind the plots, and the frame rate and data age of a live plot. Injected into every page
// the browser tests open (playwright `add_init_script`); it touches nothing until called.
// Needs the lab started with --LabApp.expose_app_in_browser=True (window.jupyterapp).
window.akProbe = (() => {
  const notebook = () => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    if (!w || !w.content || !w.sessionContext) throw new Error("the current tab is not a notebook");
    return w;
  };
  const cells = () => notebook().content.widgets;

  // Every element under root, through open shadow roots (bokeh draws inside them).
  const deepAll = (root, out = []) => {
    for (const el of root.querySelectorAll("*")) {
      out.push(el);
      if (el.shadowRoot) deepAll(el.shadowRoot, out);
    }
    return out;
  };

  // The cell (index) whose node holds el, or -1.
  const cellOf = (el) => {
    try {
      return cells().findIndex((c) => c.node.contains(el));
    } catch (e) {
      return -1;  // a page that is not a notebook (a standalone bokeh page)
    }
  };

  // Pixels unlike the canvas's most common colour (its background), and distinct colours.
  const ink = (canvas) => {
    const { width, height } = canvas;
    if (!width || !height) return { width, height, ink: 0, colours: 0 };
    const px = canvas.getContext("2d").getImageData(0, 0, width, height).data;
    const counts = new Map();
    for (let i = 0; i < px.length; i += 4) {
      const key = px[i + 3] === 0 ? -1 : ((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
      counts.set(key, (counts.get(key) || 0) + 1);
    }
    let background = 0;
    for (const n of counts.values()) background = Math.max(background, n);
    return { width, height, ink: 1 - background / (width * height), colours: counts.size };
  };

  // A bokeh root view's canvases, grouped by figure: each figure draws on a stack of layers
  // (primary, overlays), so a figure's ink is the most any of its layers holds.
  const figures = (view) => {
    const groups = new Map();
    for (const el of [view.el, ...deepAll(view.el.shadowRoot || view.el)]) {
      if (el.tagName !== "CANVAS" || el.width < 50 || el.height < 50) continue;
      const key = el.parentNode;
      const best = groups.get(key);
      const here = ink(el);
      if (!best || here.ink > best.ink) groups.set(key, here);
    }
    return [...groups.values()];
  };

  // Order-sensitive FNV-1a hash of every column of every ColumnDataSource in the documents.
  const hashSources = (docs) => {
    let h = 0x811c9dc5;
    const feed = (s) => {
      for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 16777619);
    };
    let rows = 0;
    for (const doc of docs) {
      const sources = [...doc.all_models].filter((m) => m.data !== undefined && m.selected !== undefined);
      sources.sort((a, b) => (a.id < b.id ? -1 : 1));
      for (const src of sources) {
        for (const name of Object.keys(src.data).sort()) {
          feed(name);
          const col = src.data[name];
          for (const v of col) feed(String(v));
          rows += col.length;
        }
      }
    }
    return { hash: (h >>> 0).toString(16), rows };
  };

  // Per figure of a document: its title and how many rows its glyphs draw (graphs: nodes and edges).
  const figureRows = (doc) => [...doc.all_models].filter((m) => m.type === "Figure").map((f) => {
    let rows = 0;
    for (const r of f.renderers) {
      const sources = r.node_renderer ? [r.node_renderer.data_source, r.edge_renderer.data_source]
        : (r.data_source ? [r.data_source] : []);
      for (const s of sources) rows += s.get_length() || 0;
    }
    return { title: f.title ? String(f.title.text ?? f.title) : "", rows };
  });


  // -- house style (widgets/plots.py): what a reader sees of each figure ------------------------------
  // Plot views under a root view (rows, columns, grids of figures).
  const plotViews = (view, out = []) => {
    if (view.frame && view.computed_renderer_views) out.push(view);
    for (const child of view.child_views || []) plotViews(child, out);
    return out;
  };
  const arr = (a) => (a && typeof a.length === "number" ? a : null);
  // Screen points of a glyph view where its data is drawn (canvas px), per glyph kind:
  // `range` points must lie in the frame, `cover` points (denser: along lines) must not be under a legend.
  const glyphPoints = (gv) => {
    const type = gv.model.type;
    const pts = [];
    const pairs = (xs, ys) => {
      xs = arr(xs); ys = arr(ys);
      if (!xs || !ys) return;
      for (let i = 0; i < Math.min(xs.length, ys.length); i++) pts.push([xs[i], ys[i], i]);
    };
    const mid = (a, b) => (arr(a) && arr(b) ? Array.from(a, (v, i) => (v + b[i]) / 2) : null);
    if (type === "VBar") pairs(gv.sx || mid(gv.sleft, gv.sright), gv.stop);
    else if (type === "HBar") { const sy = gv.sy || mid(gv.stop, gv.sbottom); pairs(gv.sleft, sy); pairs(gv.sright, sy); }
    else if (type === "Quad") { pairs(gv.sleft, gv.stop); pairs(gv.sright, gv.sbottom); }
    else if (type === "Segment") { pairs(gv.sx0, gv.sy0); pairs(gv.sx1, gv.sy1); }
    else if (type === "VArea") { pairs(gv.sx, gv.sy1); pairs(gv.sx, gv.sy2); }
    else if (type === "MultiLine" && gv.sxs && gv.sys) {
      const n = gv.sxs.length;
      for (let i = 0; i < n; i++) {
        const xs = gv.sxs.get ? gv.sxs.get(i) : gv.sxs[i], ys = gv.sys.get ? gv.sys.get(i) : gv.sys[i];
        for (let j = 0; j < Math.min(xs.length, ys.length); j++) pts.push([xs[j], ys[j], i]);
      }
    } else pairs(gv.sx, gv.sy);
    return pts.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  };
  // Points along a line glyph's segments too (a line can cross a legend between two vertices).
  const coverPoints = (gv, pts) => {
    if (gv.model.type !== "Line" && gv.model.type !== "MultiLine") return pts;
    const out = [];
    for (let i = 0; i < pts.length; i++) {
      out.push(pts[i]);
      const next = pts[i + 1];
      if (next && next[2] === pts[i][2] || (next && gv.model.type === "Line"))
        for (let t = 1; t < 8; t++) out.push([pts[i][0] + (next[0] - pts[i][0]) * t / 8, pts[i][1] + (next[1] - pts[i][1]) * t / 8]);
    }
    return out;
  };
  const glyphViews = (pv) => {
    const out = [];
    for (const rv of pv.computed_renderer_views) {
      if (!rv.model.visible) continue;
      if (rv.node_view) out.push([rv.node_view, rv.node_view.glyph], [rv.edge_view, rv.edge_view.glyph]);
      else if (rv.glyph && rv.glyph.model) out.push([rv, rv.glyph]);
    }
    return out;
  };
  let measurer = null;
  const textWidth = (text, style, size, face) => {
    measurer = measurer || document.createElement("canvas").getContext("2d");
    measurer.font = `${style || "normal"} ${size || "13px"} ${face || "helvetica"}`;
    return Math.max(0, ...String(text).split("\n").map((line) => measurer.measureText(line).width));
  };
  const label = (t) => (t == null ? "" : typeof t === "string" ? t : (t.text ?? String(t)));
  const name = (pv) => `figure "${label(pv.model.title && pv.model.title.text).replace(/\n/g, " ")}"`;

  // Every house-style rule one figure breaks, as sentences.
  const figureProblems = (pv) => {
    const problems = [];
    const frame = pv.frame.bbox;
    const width = pv.model.width || pv.canvas_view.bbox.width, height = pv.model.height || pv.canvas_view.bbox.height;
    const title = pv.model.title;
    if (title && label(title.text)) {
      const w = textWidth(label(title.text), title.text_font_style, title.text_font_size, title.text_font);
      if (w > width) problems.push(`${name(pv)}: title ${w.toFixed(0)} px wide in a ${width} px figure`);
    }
    const axes = [...pv.model.below, ...pv.model.above].map((a) => [a, width])
      .concat([...pv.model.left, ...pv.model.right].map((a) => [a, height]));
    for (const [axis, room] of axes) {
      if (!axis.visible || !("axis_label" in axis) || !label(axis.axis_label)) continue;
      const w = textWidth(label(axis.axis_label), axis.axis_label_text_font_style, axis.axis_label_text_font_size,
                          axis.axis_label_text_font);
      if (w > room) problems.push(`${name(pv)}: axis label "${label(axis.axis_label)}" ${w.toFixed(0)} px in ${room} px`);
    }
    const legends = pv.computed_renderer_views.filter((v) => v.model.type === "Legend" && v.model.visible)
      .map((v) => v.bbox).filter((b) => b && b.width > 0 && b.height > 0);
    const tol = 2;
    for (const [rv, gv] of glyphViews(pv)) {
      const pts = glyphPoints(gv);
      const out = pts.filter(([x, y]) => x < frame.left - tol || x > frame.right + tol || y < frame.top - tol
                                          || y > frame.bottom + tol);
      if (out.length) {
        problems.push(`${name(pv)}: ${out.length} of ${pts.length} points of a ${gv.model.type} outside the visible `
                      + `range (first at ${out[0][0].toFixed(0)}, ${out[0][1].toFixed(0)}; frame ${frame.left.toFixed(0)}..`
                      + `${frame.right.toFixed(0)} x ${frame.top.toFixed(0)}..${frame.bottom.toFixed(0)})`);
      }
      const dense = coverPoints(gv, pts);
      for (const b of legends) {
        const under = dense.filter(([x, y]) => x > b.left && x < b.right && y > b.top && y < b.bottom);
        if (under.length) problems.push(`${name(pv)}: the legend covers ${under.length} points of a ${gv.model.type}`);
      }
      void rv;
    }
    return problems;
  };

  const roots = (cell) => [...window.Bokeh.index].filter((v) => cell == null || cellOf(v.el) === cell);

  return {
    // House-style problems of every figure (of one cell, or all when null): titles or axis labels
    // wider than their figure, glyph data outside the visible range, legends over glyphs.
    layoutProblems(cell) {
      if (!window.Bokeh) return [];
      const out = [];
      for (const root of roots(cell)) {
        for (const pv of plotViews(root)) {
          // a figure in a hidden tab has no layout (its frame is 0 x 0, its glyphs keep stale screen
          // positions): it is checked when its tab is open
          const shown = pv.el.getBoundingClientRect();
          if (!shown.width || !shown.height || !pv.frame.bbox.width || !pv.frame.bbox.height) continue;
          for (const p of figureProblems(pv)) out.push(`cell ${cellOf(root.el)}: ${p}`);
        }
      }
      return out;
    },
    // How many figures the house-style check looked at (of one cell, or all when null).
    figureCount(cell) {
      if (!window.Bokeh) return 0;
      return roots(cell).reduce((n, root) => n + plotViews(root).length, 0);
    },
    cellOf,
    ink,
    // Per cell: index, type, execution count, error outputs, whether it shows widgets / bokeh,
    // and the text of any widget or bokeh rendering failure on the page.
    cells() {
      return cells().map((c, index) => {
        const m = c.model;
        const outputs = m.type === "code" ? m.outputs.toJSON() : [];
        const text = c.node.innerText || "";
        return {
          index,
          type: m.type,
          executionCount: m.type === "code" ? m.executionCount : null,
          errors: outputs.filter((o) => o.output_type === "error").map((o) => `${o.ename}: ${o.evalue}`),
          widgets: outputs.some((o) => o.data && o.data["application/vnd.jupyter.widget-view+json"]),
          renderFailures: ["Error displaying widget", "Error rendering Bokeh", "Failed to render"]
            .filter((s) => text.includes(s)),
        };
      });
    },
    kernelStatus() {
      const k = notebook().sessionContext.session && notebook().sessionContext.session.kernel;
      return k ? k.status : "none";
    },
    // Mark cell i's node so that playwright can find it: [data-ak-cell="i"].
    markCells() {
      cells().forEach((c, i) => c.node.setAttribute("data-ak-cell", String(i)));
      return cells().length;
    },
    // Per bokeh root (of one cell, or all when null): its cell, model type and its figures' ink.
    plots(cell) {
      if (!window.Bokeh) return [];
      return roots(cell).map((v) => ({ cell: cellOf(v.el), type: v.model.type, figures: figures(v),
                                       data: v.model.document ? figureRows(v.model.document) : [],
                                       visible: v.el.getBoundingClientRect().width > 0 }));
    },
    // A hash of the data behind every plot in the cell (all cells when null).
    signature(cell) {
      if (!window.Bokeh) return { hash: "", rows: 0 };
      return hashSources(new Set(roots(cell).map((v) => v.model.document)));
    },
    // Start counting animation frames and, per frame, whether the ColumnDataSource named
    // `source` grew; its `time` column (seconds since the epoch, when the data was made) gives
    // the age of what the frame shows: newest and oldest of the rows that arrived.
    startLive(source) {
      const docs = new Set([...window.Bokeh.index].map((v) => v.model.document));
      const src = [...docs].map((d) => d.get_model_by_name(source)).find((m) => m);
      if (!src) throw new Error(`no ColumnDataSource named ${source} on the page`);
      const live = { frames: 0, updates: 0, newest: [], oldest: [], gaps: [], t0: performance.now(), stop: false };
      let seen = src.data.time.length;
      let last = live.t0;
      const frame = (t) => {
        if (live.stop) return;
        live.frames += 1;
        live.gaps.push(t - last);
        last = t;
        const times = src.data.time;
        if (times.length !== seen) {
          const now = Date.now() / 1000;
          // streamed rows are appended: the new ones are the tail (all of them if the data was replaced)
          const fresh = Array.from(times).slice(times.length > seen ? seen : 0);
          if (fresh.length) {
            live.updates += 1;
            live.newest.push(now - Math.max(...fresh));
            live.oldest.push(now - Math.min(...fresh));
          }
          seen = times.length;
        }
        requestAnimationFrame(frame);
      };
      requestAnimationFrame(frame);
      window.__akLive = live;
      return seen;
    },
    stopLive() {
      const live = window.__akLive;
      live.stop = true;
      const seconds = (performance.now() - live.t0) / 1000;
      return { seconds, frames: live.frames, updates: live.updates, newest: live.newest, oldest: live.oldest,
               longest_frame_ms: Math.max(0, ...live.gaps) };
    },
  };
})();
