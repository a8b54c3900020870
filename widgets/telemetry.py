"""The telemetry panel: levels per data kind, a fault injector, live per-layer plots, alarms, bytes."""
from __future__ import annotations

import html
import math

import ipywidgets as w

from adaptive_kit.telemetry import FAULT_KINDS, KINDS, LEVELS, Fault, RulePolicy, Telemetry
from adaptive_kit.telemetry.episodes import EpisodeSpec, Run, build_model, run

from .common import LivePlot, Panel, control_row, panel_layout

STATS = ("norm", "std", "mean", "min", "max", "zero_frac", "nonfinite")


class TelemetryPanel(Panel):
    """Pick a level per data kind (or the rule policy), inject a fault, run, and watch.

    Per-layer plots show the chosen statistic of every layer the current level can see: at
    ``macro`` only the pooled ``*`` line exists, which is the point. Changing the statistic
    redraws the last run from its records. Drive it headless: set the widgets' ``value`` and
    call ``panel.run_button.click()``; the last :class:`~adaptive_kit.telemetry.episodes.Run`
    is in :attr:`result`.
    """

    def __init__(self, model: str = "mlp", steps: int = 150, seed: int = 0) -> None:
        self.model, self.seed = model, seed
        probe = Telemetry(build_model(model), "off")
        self.layers = {k: list(probe.layers[k]) for k in KINDS}
        probe.close()
        self.levels = {k: w.Dropdown(options=LEVELS, value="meso", description=k,
                                     layout=w.Layout(width="180px")) for k in KINDS}
        self.policy = w.ToggleButtons(options=["static", "rule"], value="static",
                                      tooltips=["the levels above, every step",
                                                "the levels above while quiet; alarmed layers go raw"])
        self.fault = w.Dropdown(options=["none", *FAULT_KINDS], value="none", description="fault")
        self.fault_layer = w.Dropdown(options=["(default)", *self.layers["grad"]], value="(default)",
                                      description="layer")
        self.fault_step = w.IntSlider(value=steps // 2, min=0, max=steps - 1, description="at step",
                                      continuous_update=False)
        self.steps = w.IntSlider(value=steps, min=20, max=max(1000, steps), step=10, description="steps",
                                 continuous_update=False)
        self.stat = w.Dropdown(options=STATS, value="norm", description="statistic")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.plots = {k: LivePlot([*self.layers[k], "*"], title=f"{k}: per-layer statistic",
                                  width=600, height=240) for k in KINDS}
        self.bytes_plot = LivePlot(["bytes"], title="bytes sent per step", y_log=True, width=600, height=200)
        self.alarm_box = w.HTML("<i>no run yet</i>")
        self.out = w.Output()
        self.result: Run | None = None
        self._history: list[tuple[int, list]] = []  # (step, observations) of the last run
        self._alarms: list = []  # alarms of the last (or current) run, as they fire
        self.steps.observe(lambda ch: setattr(self.fault_step, "max", ch["new"] - 1), names="value")
        self.stat.observe(lambda _: self.redraw(), names="value")
        self.run_button.on_click(lambda _: self.run())
        tabs = w.Tab(children=[self.plots[k].widget for k in KINDS])
        for i, k in enumerate(KINDS):
            tabs.set_title(i, k)
        self.widget = panel_layout(
            "Telemetry granularity",
            [*self.levels.values(), self.policy],
            [control_row(self.fault, self.fault_layer, self.fault_step, self.steps),
             control_row(self.stat, self.run_button), tabs, self.bytes_plot.widget, self.alarm_box],
            self.out)

    def spec(self) -> EpisodeSpec:
        """The episode the controls describe."""
        fault = None
        if self.fault.value != "none":
            layer = None if self.fault_layer.value == "(default)" else self.fault_layer.value
            fault = Fault(self.fault.value, int(self.fault_step.value), layer=layer, seed=self.seed)
        return EpisodeSpec(self.model, fault, int(self.steps.value), seed=self.seed)

    def run(self) -> Run:
        """Train with the current controls, streaming statistics, bytes and alarms."""
        levels = {k: dd.value for k, dd in self.levels.items()}
        policy = RulePolicy(base=levels) if self.policy.value == "rule" else None
        for p in (*self.plots.values(), self.bytes_plot):
            p.clear()
        self._history.clear()
        self._alarms.clear()
        self.run_button.disabled = True
        try:
            self.result = run(self.spec(), levels, policy=policy, on_record=self._on_record, progress=True)
        finally:
            for p in (*self.plots.values(), self.bytes_plot):
                p.flush()
            self.run_button.disabled = False
        self._show_alarms()
        with self.out:
            r = self.result
            print(f"{r.spec.label}: {len(r.suite.alarms)} alarms, "
                  f"{sum(r.tel.bytes.values()) / r.spec.steps:,.0f} bytes/step, "
                  f"test accuracy {r.test_accuracy:.1%}")
        return self.result

    def _on_record(self, record, alarms, observations) -> None:
        self._history.append((record.step, observations))
        self._alarms.extend(alarms)
        self._push(record.step, observations)
        self.bytes_plot.push(record.step, bytes=sum(record.bytes.values()))
        if alarms:
            self._show_alarms()

    def _push(self, step: int, observations) -> None:
        stat = self.stat.value
        per_kind: dict[str, dict[str, float]] = {k: {} for k in KINDS}
        for o in observations:
            value = getattr(o, stat)
            per_kind[o.kind][o.layer] = value if value is not None and math.isfinite(value) else math.nan
        for kind, values in per_kind.items():
            if values:
                self.plots[kind].push(step, **values)

    def redraw(self) -> None:
        """Redraw the last run's per-layer plots with the chosen statistic."""
        for p in self.plots.values():
            p.clear()
            p.figure.title.text = f"{p.figure.title.text.split(':')[0]}: per-layer {self.stat.value}"
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

