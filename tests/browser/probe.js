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
  const cellOf = (el) => cells().findIndex((c) => c.node.contains(el));

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

  const roots = (cell) => [...window.Bokeh.index].filter((v) => cell == null || cellOf(v.el) === cell);

  return {
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
