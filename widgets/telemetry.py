"""The telemetry panel: pick a policy, inject a fault, and watch each layer's level, statistic and alarms."""
from __future__ import annotations

import html
import math
from collections.abc import Sequence

import ipywidgets as w
import pandas as pd
from bokeh.models import (
    CDSView,
    ColumnDataSource,
    FactorRange,
    GroupFilter,
    HoverTool,
    LogAxis,
    LogScale,
    Range1d,
    Span,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure

from adaptive_kit.telemetry import (
    FAULT_KINDS,
    KINDS,
    LAYER_KINDS,
    LEVELS,
    QUIET_KINDS,
    EpisodeSpec,
    Fault,
    RulePolicy,
    Run,
    Telemetry,
    Workload,
    layer_candidates,
    run,
    workload,
)

from .common import LivePlot, Panel, ThrottledStream, control_row, panel_layout
from .plots import colour_key, house_style, set_title

STATS = ("norm", "std", "mean", "min", "max", "zero_frac", "nonfinite")
STATIC_LEVELS = tuple(lv for lv in LEVELS if lv != "off")
POLICIES = (*(("static " + lv, lv) for lv in STATIC_LEVELS), ("rule", "rule"))  # (label, value)
LEVEL_COLORS = {"off": "#f2f2f2", "macro": "#c6dbef", "meso": "#4292c6", "micro": "#fd8d3c", "raw": "#d62728"}
LOSS_ROW = "loss"
DEFAULT_LAYER = "(default)"


def fault_options() -> list[tuple[str, str]]:
    """Dropdown options for every fault kind, the quiet ones (that pooled statistics barely see) marked."""
    return [("none", "none"), *((f"{k} (quiet)" if k in QUIET_KINDS else k, k) for k in FAULT_KINDS)]


class LevelMap(ThrottledStream):
    """A steps x (kind, layer) map of the level each layer was seen at, with the alarms on top.

    ``push`` buffers one step (a level per row, and the step's alarms) and streams at most every
    ``min_interval_s``; :meth:`flush` draws the rest. Rows are ``"<kind> <layer>"`` and a last
    ``loss`` row for alarms on the loss; an alarm on pooled (``*``) statistics marks every row of
    its kind with a hollow diamond: it says *that* something is wrong there, not *where*.

    Attributes:
        rows: the row names, top to bottom.
        source: ``step``, ``row``, ``level`` per cell (one coloured glyph per level draws it).
        alarms: ``step``, ``row``, ``detector``, ``marker`` per alarm mark.
        fault_line: a vertical ``Span`` at the injected fault's step (hidden when none).
        widget: the ``BokehModel`` to put in a layout.
    """

    def __init__(self, rows: Sequence[str], *, rollover: int = 20000, min_interval_s: float = 0.25,
                 width: int = 600, height: int | None = None) -> None:
        self.rows = [*rows, LOSS_ROW]
        self.source = ColumnDataSource(self._empty_cells())
        self.alarms = ColumnDataSource(self._empty_alarms())
        fig = figure(title="level per layer and step (× and ◇: alarms; dashed line: the fault)", width=width,
                     height=height or 90 + 18 * len(self.rows), x_axis_label="step",
                     y_range=FactorRange(*reversed(self.rows)), tools="pan,xwheel_zoom,reset,save")
        cells = {lv: fig.rect("step", "row", width=1, height=0.9, color=color, source=self.source,
                              view=CDSView(filter=GroupFilter(column_name="level", group=lv)))
                 for lv, color in LEVEL_COLORS.items()}  # one glyph per level: a fixed colour
        colour_key(fig, LEVEL_COLORS, side="above")
        marks = fig.scatter("step", "row", marker="marker", size=11, line_color="black", line_width=2,
                            fill_color=None, source=self.alarms)
        fig.add_tools(
            HoverTool(renderers=list(cells.values()), tooltips=[("step", "@step"), ("", "@row"), ("level", "@level")]),
            HoverTool(renderers=[marks], tooltips=[("step", "@step"), ("", "@row"), ("alarm", "@detector")]))
        self.fault_line = Span(location=0, dimension="height", line_color="black", line_dash="dashed",
                               line_width=2, visible=False)
        fig.add_layout(self.fault_line)
        house_style(fig)
        super().__init__(fig, min_interval_s=min_interval_s, rollover=rollover)

    @staticmethod
    def _empty_cells() -> dict[str, list]:
        return {"step": [], "row": [], "level": []}

    @staticmethod
    def _empty_alarms() -> dict[str, list]:
        return {"step": [], "row": [], "detector": [], "marker": []}

    def push(self, step: int, levels: dict[str, str], alarms: Sequence = ()) -> None:
        """Add one step: ``levels`` maps row -> level; ``alarms`` are the step's :class:`Alarm` s."""
        items: list[tuple] = [("cell", step, r, lv) for r, lv in levels.items()]
        for a in alarms:
            if a.kind not in KINDS:
                items.append(("mark", step, LOSS_ROW, a.detector, "x"))
            elif a.layer == "*":
                items.extend(("mark", step, r, a.detector, "diamond") for r in self.rows if r.startswith(f"{a.kind} "))
            else:
                items.append(("mark", step, f"{a.kind} {a.layer}", a.detector, "x"))
        self._add(*items)

    def _columns(self, pending: list) -> dict[ColumnDataSource, dict[str, list]]:
        cells = [c[1:] for c in pending if c[0] == "cell"]
        marks = [m[1:] for m in pending if m[0] == "mark"]
        out: dict[ColumnDataSource, dict[str, list]] = {}
        if cells:
            steps, rows, levels = zip(*cells)
            out[self.source] = {"step": list(steps), "row": list(rows), "level": list(levels)}
        if marks:
            steps, rows, detectors, markers = zip(*marks)
            out[self.alarms] = {"step": list(steps), "row": list(rows), "detector": list(detectors),
                                "marker": list(markers)}
        return out

    def _empty(self) -> dict[ColumnDataSource, dict[str, list]]:
        return {self.source: self._empty_cells(), self.alarms: self._empty_alarms()}

    def levels_at(self, step: int) -> dict[str, str]:
        """Row -> level drawn at ``step`` (after :meth:`flush`)."""
        d = self.source.data
        return {r: lv for s, r, lv in zip(d["step"], d["row"], d["level"]) if s == step}


class TelemetryPanel(Panel):
    """Pick a policy (a static level, or the rule policy with its look period), inject a fault, run, watch.

    The level map shows, per layer and step, the level the policy chose and the alarms; under
    the rule policy the coarse (macro) steps are broken by a meso look at every layer every
    ``look every`` steps, a layer whose look was bad is looked at again at once, and an alarmed
    layer stays at meso until quiet. The per-layer plots show the chosen statistic of every layer
    at the steps it was seen (at ``macro`` only the pooled ``*`` line exists); changing the
    statistic redraws the last run from its records. Drive it headless: set the widgets'
    ``value`` and call ``panel.run_button.click()``; the last
    :class:`~adaptive_kit.telemetry.Run` is in :attr:`result`.

    Args:
        model: one of the kit's episode models (``"mlp"``, ``"cnn"``) or your own
            :class:`~adaptive_kit.telemetry.Workload`.
        steps: training steps of a run (the ``steps`` slider's start).
        seed: seeds the initialisation, the batches and the fault.
    """

    def __init__(self, model: str | Workload = "mlp", steps: int = 150, seed: int = 0) -> None:
        self.workload, self.seed = workload(model), seed
        probe = Telemetry(self.workload.build(), "off")
        self.layers = {k: list(probe.layers[k]) for k in KINDS}
        probe.close()
        self.policy = w.Dropdown(options=POLICIES, value="rule", description="policy",
                                 layout=w.Layout(width="200px"))
        self.look_every = w.IntSlider(value=4, min=0, max=16, description="look every",
                                      continuous_update=False, tooltip="rule: steps between meso looks (0: never)")
        self.fault = w.Dropdown(options=fault_options(), value="none", description="fault")
        self.fault_layer = w.Dropdown(options=[DEFAULT_LAYER], value=DEFAULT_LAYER, description="layer")
        self.fault_step = w.IntSlider(value=steps // 2, min=0, max=steps - 1, description="at step",
                                      continuous_update=False)
        self.steps = w.IntSlider(value=steps, min=20, max=max(1000, steps), step=10, description="steps",
                                 continuous_update=False)
        self.stat = w.Dropdown(options=STATS, value="norm", description="statistic")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.level_map = LevelMap([f"{k} {n}" for k in KINDS for n in self.layers[k]])
        self.plots = {k: LivePlot([*self.layers[k], "*"], title=f"{k}: per-layer {self.stat.value} (dots: steps seen)",
                                  y_label=self.stat.value, labels={"*": "all (pooled)", **{n: f"layer {n}" for n in self.layers[k]}}, width=600, height=240)
                      for k in KINDS}
        for p in self.plots.values():  # a layer seen every few steps is a dot, not a line
            for i, name in enumerate(p.series):
                p.figure.scatter(p.x_name, name, source=p.source, size=4, color=Category10_10[i % 10])
        self.bytes_plot = LivePlot(["bytes"], title="bytes sent per step", y_label="bytes (B, log)", y_log=True,
                                   width=600, height=200)
        self.alarm_box = w.HTML("<i>no run yet</i>")
        self.out = w.Output()
        self.result: Run | None = None
        self._history: list[tuple[int, list]] = []  # (step, observations) of the last run
        self._alarms: list = []  # alarms of the last (or current) run, as they fire
        self.steps.observe(lambda ch: setattr(self.fault_step, "max", ch["new"] - 1), names="value")
        self.fault.observe(lambda _: self._fault_layers(), names="value")
        self.policy.observe(lambda ch: setattr(self.look_every, "disabled", ch["new"] != "rule"), names="value")
        self.stat.observe(lambda _: self.redraw(), names="value")
        self.run_button.on_click(lambda _: self.run())
        self._fault_layers()
        tabs = w.Tab(children=[self.plots[k].widget for k in KINDS])
        for i, k in enumerate(KINDS):
            tabs.set_title(i, k)
        self.widget = panel_layout(
            "Telemetry granularity",
            [self.policy, self.look_every],
            [control_row(self.fault, self.fault_layer, self.fault_step, self.steps),
             control_row(self.stat, self.run_button), self.level_map.widget, tabs,
             self.bytes_plot.widget, self.alarm_box],
            self.out)

    def _fault_layers(self) -> None:
        """Offer the layers the chosen fault can act on (none for faults of a batch or the optimiser)."""
        kind = self.fault.value
        names = layer_candidates(self.workload.build(), kind) if kind in LAYER_KINDS else []
        keep = self.fault_layer.value
        self.fault_layer.options = [DEFAULT_LAYER, *names]
        self.fault_layer.value = keep if keep in names else DEFAULT_LAYER
        self.fault_layer.disabled = not names

    def spec(self) -> EpisodeSpec:
        """The episode the controls describe."""
        fault = None
        if self.fault.value != "none":
            layer = None if self.fault_layer.value == DEFAULT_LAYER else self.fault_layer.value
            fault = Fault(self.fault.value, int(self.fault_step.value), layer=layer, seed=self.seed)
        return EpisodeSpec(self.workload, fault, int(self.steps.value), seed=self.seed)

    def run(self) -> Run:
        """Train with the current controls, streaming levels, statistics, bytes and alarms."""
        spec = self.spec()
        choice = self.policy.value
        policy = RulePolicy(look_every=int(self.look_every.value)) if choice == "rule" else None
        for p in (*self.plots.values(), self.bytes_plot, self.level_map):
            p.clear()
        self.level_map.rollover = spec.steps * len(self.level_map.rows)
        self.level_map.fault_line.location = spec.fault.step if spec.fault else 0
        self.level_map.fault_line.visible = spec.fault is not None
        self._history.clear()
        self._alarms.clear()
        self.run_button.disabled = True
        try:
            # under a policy the collector starts off: the policy's first plan sets step 0's levels
            self.result = run(spec, "off" if policy else choice, policy=policy, on_step=self._on_step,
                              progress=True)
        finally:
            for p in (*self.plots.values(), self.bytes_plot, self.level_map):
                p.flush()
            self.run_button.disabled = False
        self._show_alarms()
        with self.out:
            print(self.summary())
        return self.result

    def summary(self) -> str:
        """One line on the last run: alarms, the first one after the fault, bytes, accuracy."""
        r = self.result
        if r is None:
            return "no run yet"
        f = r.spec.fault
        after = [a for a in r.suite.alarms if f is not None and a.step >= f.step]
        found = (f"; first alarm after the fault: {after[0].detector} on {after[0].kind} "
                 f"{after[0].layer or '(loss)'} at step {after[0].step} (delay {after[0].step - f.step})"
                 if after else ("; the fault was not found" if f else ""))
        return (f"{r.spec.label}: {len(r.suite.alarms)} alarms{found}; "
                f"{sum(r.tel.bytes.values()) / r.spec.steps:,.0f} bytes/step; test accuracy {r.test_accuracy:.1%}")

    def _on_step(self, record, alarms, observations) -> None:
        self._history.append((record.step, observations))
        self._alarms.extend(alarms)
        self.level_map.push(record.step, self.levels_seen(observations), alarms)
        self._push(record.step, observations)
        self.bytes_plot.push(record.step, bytes=sum(record.bytes.values()))
        if alarms:
            self._show_alarms()

    def levels_seen(self, observations) -> dict[str, str]:
        """Row -> level of one step, from its observations: a layer's own row, else the pooled
        ``*`` row of its kind (macro), else off."""
        seen = {(o.kind, o.layer): o.level for o in observations}
        return {f"{k} {n}": seen.get((k, n)) or ("macro" if (k, "*") in seen else "off")
                for k in KINDS for n in self.layers[k]}

    def _push(self, step: int, observations) -> None:
        stat = self.stat.value
        per_kind: dict[str, dict[str, float]] = {k: {} for k in KINDS}
        for o in observations:
            if o.kind not in per_kind:  # the loss has its own row and plot elsewhere
                continue
            value = getattr(o, stat)
            per_kind[o.kind][o.layer] = value if value is not None and math.isfinite(value) else math.nan
        for kind, values in per_kind.items():
            if values:
                self.plots[kind].push(step, **values)

    def redraw(self) -> None:
        """Redraw the last run's per-layer plots with the chosen statistic."""
        for kind, p in self.plots.items():
            p.clear()
            set_title(p.figure, f"{kind}: per-layer {self.stat.value} (dots: steps seen)")
            p.figure.yaxis.axis_label = self.stat.value
        for step, observations in self._history:
            self._push(step, observations)
        for p in self.plots.values():
            p.flush()

    def _show_alarms(self) -> None:
        alarms = self._alarms
        if not alarms:
            self.alarm_box.value = "<b>alarms:</b> none"
            return
        rows = "".join(f"<tr><td>{a.step}</td><td>{a.detector}</td><td>{a.kind}</td><td>{html.escape(a.layer)}</td>"
                       f"<td>{a.level}</td><td>{html.escape(a.evidence)}</td></tr>" for a in alarms[:12])
        self.alarm_box.value = ("<b>alarms</b><table><tr><th>step</th><th>detector</th><th>kind</th>"
                                f"<th>layer</th><th>level</th><th>evidence</th></tr>{rows}</table>")


def cost_ladder_figure(ladder: pd.DataFrame, *, width: int = 560, height: int = 300):
    """Two bars per level: time per step against a plain step (left axis) and bytes per step (right, log).

    ``ladder`` is indexed by level with columns ``x_step`` and ``bytes_per_step``.
    """
    levels = [str(lv) for lv in ladder.index]
    sent = [float(b) for b in ladder["bytes_per_step"]]
    low = min((b for b in sent if b > 0), default=1.0) / 3
    fig = figure(x_range=FactorRange(*[(lv, m) for lv in levels for m in ("time", "bytes")]),
                 title="what each level costs and sends per step", width=width, height=height,
                 y_axis_label="time per step (x a plain step)", tools="save",
                 y_range=Range1d(0, 1.15 * max(float(v) for v in ladder["x_step"])))
    fig.extra_y_ranges = {"bytes": Range1d(low, 3 * max(sent))}
    fig.extra_y_scales = {"bytes": LogScale()}
    fig.add_layout(LogAxis(y_range_name="bytes", axis_label="bytes per step (B, log)"), "right")
    fig.vbar(x=[(lv, "time") for lv in levels], top=list(ladder["x_step"]), width=0.8, color=Category10_10[0])
    fig.vbar(x=[(lv, "bytes") for lv in levels], top=[max(b, low) for b in sent], bottom=low, width=0.8,
             color=Category10_10[1], y_range_name="bytes")
    fig.xaxis.major_label_orientation = 0.9
    colour_key(fig, {"time": Category10_10[0], "bytes": Category10_10[1]})
    return house_style(fig)
