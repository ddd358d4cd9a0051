"""Feature services plugged into the Station (jobs, alerts); shared by the window and --headless.

This is part of the composition root: it knows every service, and each
service knows none of the others.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from aether_desktop.services.bus import ConnState
from aether_desktop.services.fleet import FleetState
from aether_desktop.services.jobtypes import GpuCandidate
from aether_desktop.station import Station

log = logging.getLogger("aether.wiring")
T = TypeVar("T")


def fleet_candidates(fleet: FleetState) -> Callable[[], list[GpuCandidate]]:
    """The scheduler's view of the fleet: every GPU of every known host.

    An offline host's GPUs come as last reported, in state ``offline``: never placed
    on, but they keep a job that only that host could run waiting instead of rejected.
    """

    def candidates() -> list[GpuCandidate]:
        out: list[GpuCandidate] = []
        for r in fleet.rows(time.time()):
            v = r.values
            num = _num_reader(v)
            out.append(GpuCandidate(
                host=r.key[0], index=r.key[1], model=r.name, state=r.state,
                temp_c=num("temp_c", 40.0), mem_used_mib=num("mem_used_mib"),
                mem_total_mib=num("mem_total_mib"), util_pct=num("util_pct"), power_w=num("power_w"),
                power_limit_w=num("power_limit_w", 300.0), running_jobs=int(num("n_procs")),
                slowdown_temp_c=v.get("slowdown_temp_c"),
            ))
        return out

    return candidates


def _num_reader(values: dict[str, float | None]) -> Callable[..., float]:
    def num(name: str, default: float = 0.0) -> float:
        x = values.get(name)
        return default if x is None or x != x else float(x)  # x != x: NaN

    return num


class JobsRuntime:
    """Holds the jobs services once the database is open; the UI calls through it.

    Built here: the jobs store, the scheduler with its placement model, the dispatcher
    (told which hosts are alive by the live fleet, and recording each placement's
    feature rows), the job watcher, and the placement model's retrainer (automatic
    while this station dispatches; on request from the Jobs tab).
    """

    def __init__(self, station: Station, *, host_grace_s: float = 30.0) -> None:
        self.station = station
        self.host_grace_s = host_grace_s
        self.repo: Any = None
        self.dispatcher: Any = None
        self.watcher: Any = None
        self.scheduler: Any = None
        self.retrainer: Any = None
        self.model_meta: dict[str, Any] | None = None
        self.listeners: list[Callable[[frozenset[str]], None]] = []
        self.role_listeners: list[Callable[[bool], None]] = []
        # The placement model: its sidecar (version, validation figures) when it changes,
        # and the retrainer's progress as (level, text).
        self.model_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.progress_listeners: list[Callable[[str, str], None]] = []

    def _need(self, what: T | None) -> T:
        if what is None:
            reason = "history is off (--no-db)" if self.station.cfg.no_db else (
                self.station.db_error or "the database is still starting")
            raise RuntimeError(f"jobs need the database: {reason}")
        return what

    async def open(self, store: Any) -> None:
        from aether_desktop.services.dispatcher import Dispatcher
        from aether_desktop.services.job_placements import PlacementStore
        from aether_desktop.services.jobs import JobRepository, JobWatcher
        from aether_desktop.services.placement_retrain import PlacementRetrainer, placement_rows
        from aether_desktop.services.scheduler import Scheduler
        from aether_desktop.services.scheduler_model import ModelStore, load_or_bootstrap

        station = self.station
        repo = JobRepository(store.pool)
        store.add_event_hook(repo.apply_events)
        loop = asyncio.get_running_loop()
        model_dir = station.cfg.data_dir / "models"
        # First start trains on simulated jobs (seconds): off the loop so the window stays live.
        model = await loop.run_in_executor(None, lambda: load_or_bootstrap(model_dir))
        bus = station.bus
        assert bus is not None and station.dsn is not None
        self.repo = repo
        self.scheduler = Scheduler(model)
        fleet = station.fleet
        self.dispatcher = Dispatcher(
            repo, station.dsn, self.scheduler, bus, fleet_candidates(fleet),
            prefix=station.cfg.subject_prefix, operator=f"{getpass.getuser()}@{os.uname().nodename}",
            on_role=self._on_role, ready=lambda: bus.state == ConnState.CONNECTED,
            host_online=lambda host: fleet.host_online(host, time.time()), host_grace_s=self.host_grace_s,
            placement_features=placement_rows,
        )  # fmt: skip
        self.dispatcher.start()
        dispatcher = self.dispatcher
        self.retrainer = PlacementRetrainer(
            PlacementStore(store.pool), ModelStore(model_dir), model, on_model=self._on_model,
            on_progress=self._on_progress, enabled=lambda: dispatcher.active,
        )  # fmt: skip
        self.retrainer.start()
        self.watcher = JobWatcher(station.dsn, self._on_change)
        self.watcher.start()
        station.add_stopper(self.stop)
        log.info("jobs: scheduler model %s, dispatcher started", getattr(model, "version", "?"))
        self._on_model(model)
        self._on_change(frozenset())

    def _on_change(self, ids: frozenset[str]) -> None:
        if self.dispatcher is not None:
            self.dispatcher.wake()
        for fn in self.listeners:
            fn(ids)

    def _on_role(self, active: bool) -> None:
        if not self.station.stopping:  # the dispatcher gives its role up on the way out: not news
            self.station.sink.post_notice("info", "this station dispatches jobs" if active
                                          else "another station dispatches jobs; this one submits and watches")
        for fn in self.role_listeners:
            fn(active)

    def _on_model(self, model: Any) -> None:
        """A new placement model (first load or retrained): the live scheduler uses it from now on."""
        if self.scheduler is not None:
            self.scheduler.model = model
        self.model_meta = dict(model.meta)
        for fn in self.model_listeners:
            fn(self.model_meta)

    def _on_progress(self, level: str, text: str) -> None:
        # Headless, an automatic retrain's outcome goes to the log as a notice; with a
        # window the Jobs tab's bridge shows the progress and posts the notice itself.
        if not self.progress_listeners and level != "info":
            self.station.sink.post_notice("error" if level == "error" else "info", text)
        for fn in self.progress_listeners:
            fn(level, text)

    async def stop(self) -> None:
        if self.retrainer is not None:
            await self.retrainer.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.dispatcher is not None:
            await self.dispatcher.stop()

    # UI-facing calls (each says clearly why it cannot work yet).
    async def list_jobs(self) -> Sequence[Any]:
        if self.repo is None:
            return []
        return await self.repo.list_jobs()  # type: ignore[no-any-return]

    async def submit(self, req: Any) -> Any:
        rec = await self._need(self.repo).submit(req)
        if self.dispatcher is not None:
            self.dispatcher.wake()
        return rec

    async def cancel(self, job_id: str) -> str:
        return await self._need(self.dispatcher).cancel(job_id)  # type: ignore[no-any-return]

    async def resubmit(self, job_id: str) -> Any:
        return await self._need(self.repo).resubmit(job_id)

    async def fetch_log(self, job_id: str) -> str:
        return await self._need(self.dispatcher).job_log(job_id)  # type: ignore[no-any-return]

    async def retrain_model(self) -> str:
        """The Jobs tab's "Retrain placement model" button; returns the new model's summary."""
        from aether_desktop.services.scheduler_model import model_summary

        model = await self._need(self.retrainer).retrain()
        return model_summary(model.meta)


def wire_services(station: Station) -> dict[str, Any]:
    """Attach optional services to the station. Each registers its own listeners and DB hooks."""
    from aether_desktop.services.anomaly import default_model_dir
    from aether_desktop.services.detection import AlertsRuntime

    jobs = JobsRuntime(station)
    station.add_db_opener(jobs.open)
    alerts = AlertsRuntime(default_model_dir(station.cfg.data_dir))
    station.add_telemetry_listener(alerts.on_telemetry)
    station.add_db_opener(alerts.open_db)  # before the first ingest batch
    station.add_stopper(alerts.stop)
    # Spawned, not awaited: the first start trains the anomaly model in a worker thread (seconds).
    station.add_starter(lambda: station.spawn(alerts.start(), "alerts"))

    def log_alert(alert: Any) -> None:
        log.warning("alert %s: %s %s on %s: %s", alert.id, alert.severity, alert.kind, alert.host, alert.message)

    alerts.manager.on_alert_raised.connect(log_alert)
    return {"jobs": jobs, "alerts": alerts}


def wire_gui(station: Station, state: Any, window: Any, app: Any, closing: asyncio.Event,
             services: dict[str, Any]) -> None:
    """Attach the feature widgets (jobs, alerts, tray) to the window."""
    from aether_desktop.widgets.job_dialog import JobDialog
    from aether_desktop.widgets.jobs_bridge import JobsBridge
    from aether_desktop.widgets.jobs_view import JobsView

    _wire_alerts_gui(station, state, window, closing, services["alerts"])
    jobs: JobsRuntime = services["jobs"]
    bridge = JobsBridge(list_jobs=jobs.list_jobs, submit=jobs.submit, cancel=jobs.cancel,
                        resubmit=jobs.resubmit, fetch_log=jobs.fetch_log, retrain_model=jobs.retrain_model,
                        parent=window)
    jobs.listeners.append(bridge.notify_changed)
    jobs.role_listeners.append(bridge.set_dispatcher_active)
    jobs.model_listeners.append(bridge.set_model_info)
    jobs.progress_listeners.append(bridge.set_retrain_progress)
    if jobs.model_meta is not None:  # the database (and the model) may already be open
        bridge.set_model_info(jobs.model_meta)
    bridge.notice.connect(state.post_notice)
    view = JobsView(bridge, model=bridge)
    window.add_tab(view, "Jobs")
    window.jobs_view = view

    def open_dialog() -> None:
        dialog = JobDialog(window)
        dialog.submitted.connect(bridge.submit)
        dialog.open()

    from PySide6.QtGui import QAction

    act = QAction("Submit job…", window)
    act.setShortcut("Ctrl+J")
    act.triggered.connect(open_dialog)
    window.menuBar().addMenu("&Jobs").addAction(act)
    window.submit_job_action = act
    if hasattr(window, "add_toolbar_action"):
        window.add_toolbar_action(act)


def _wire_alerts_gui(station: Station, state: Any, window: Any, closing: asyncio.Event, alerts: Any) -> None:
    from aether_desktop.services.anomaly import describe
    from aether_desktop.widgets.alerts_bridge import AlertsBridge
    from aether_desktop.widgets.alerts_panel import AlertsPanel
    from aether_desktop.widgets.notifications import NotificationArea
    from aether_desktop.widgets.tray import FleetTray

    bridge = AlertsBridge(alerts.manager, parent=window)
    alerts.on_model_info.connect(bridge.model_info_changed.emit)
    alerts.on_progress.connect(lambda p: bridge.retrain_progress.emit(*p))
    if alerts.pipeline.model is not None:
        bridge.model_info_changed.emit(describe(alerts.pipeline.model))
    bridge.retrain_requested.connect(lambda: station.spawn(alerts.retrain(24), "anomaly retrain"))
    # The database may open before or after the window: recent history either way.
    panel = AlertsPanel(bridge, history=alerts.history)
    alerts.on_history.connect(panel.set_history)
    window.add_tab(panel, "Alerts")
    panel.gpu_focus_requested.connect(window.focus_gpu)
    area = NotificationArea(parent=window.centralWidget())
    area.clicked.connect(window.focus_gpu)
    tray = FleetTray(bridge, fallback=area, parent=window)
    tray.show_window_requested.connect(lambda: window.focus_gpu_window())
    tray.quit_requested.connect(closing.set)
    tray.gpu_focus_requested.connect(window.focus_gpu)
    window.alerts_panel, window.tray, window.notifications = panel, tray, area
    _wire_demo_menu(station, window)
    window.close_to_tray = bool(station.cfg.close_to_tray and tray.uses_system_tray)


def _wire_demo_menu(station: Station, window: Any) -> None:
    """Demo → Inject fault: run-time fault injection into simulated agents (inject_fault command)."""
    from PySide6.QtGui import QAction

    from aether_desktop.widgets.fault_dialog import FaultDialog

    def send(host: str, spec: str) -> None:
        async def go() -> None:
            if station.bus is None:
                station.sink.post_notice("error", "not connected to NATS")
                return
            ok, text = await station.bus.send(host, "inject_fault", spec=spec)
            station.sink.post_notice("info" if ok else "error", text.replace("inject_fault", f"fault {spec} on"))

        station.spawn(go(), "inject fault")

    def open_dialog() -> None:
        hosts = sorted(h.host for h in station.fleet.hosts())
        sel = window.selected_keys
        host, gpu = (sel[0] if sel else (None, 0))
        dialog = FaultDialog(hosts, host, gpu, parent=window)
        dialog.inject.connect(send)
        dialog.open()

    def start_demo() -> None:
        station.start_demo()
        window._state.set_demo_active(True)

    menu = window.menuBar().addMenu("&Demo")
    start = QAction("Start demo fleet", window)
    start.triggered.connect(start_demo)
    inject = QAction("Inject fault…", window)
    inject.triggered.connect(open_dialog)
    menu.addAction(start)
    menu.addAction(inject)
    window.inject_fault_action = inject
