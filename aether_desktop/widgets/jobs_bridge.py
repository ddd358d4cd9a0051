"""JobsBridge: the jobs services (repository, dispatcher) as Qt signals and a JobsView source.

Services call :meth:`notify_changed` (JobWatcher's ``on_change``) and
:meth:`set_dispatcher_active` (Dispatcher's ``on_role``); the bridge reloads the job
list on the qasync loop, coalescing bursts into one query, and tells its listeners.
Widget actions become tasks whose outcome comes back through ``done(ok, text)``.
It is also the Jobs tab's placement-model source: the runtime calls
:meth:`set_model_info` and :meth:`set_retrain_progress`; the view's "Retrain
placement model" button calls :meth:`retrain_model`.
It may be folded into QtState later; it holds no Qt widgets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from PySide6.QtCore import QObject, Signal

from aether_desktop.services.jobs import JobRecord
from aether_desktop.services.jobtypes import JobRequest
from aether_desktop.services.scheduler_model import model_summary
from aether_desktop.widgets.state import TaskSet

log = logging.getLogger(__name__)

Done = Callable[[bool, str], None]


class JobsBridge(QObject):
    jobs_changed = Signal()
    # level ("info" | "ok" | "warning" | "error"), text: same shape as QtState.notice.
    notice = Signal(str, str)
    dispatcher_role_changed = Signal(bool)
    model_changed = Signal()

    def __init__(
        self,
        *,
        list_jobs: Callable[[], Awaitable[Sequence[JobRecord]]],
        submit: Callable[[JobRequest], Awaitable[Any]],
        cancel: Callable[[str], Awaitable[str]],
        resubmit: Callable[[str], Awaitable[Any]],
        fetch_log: Callable[[str], Awaitable[str]],
        retrain_model: Callable[[], Awaitable[str]] | None = None,
        clock: Callable[[], float] = time.time,
        parent: QObject | None = None,
    ) -> None:
        """Pass the services' bound methods: ``repo.list_jobs``, ``repo.submit``,
        ``dispatcher.cancel``, ``repo.resubmit``, ``dispatcher.job_log``, and the
        runtime's ``retrain_model`` (returns the new model's summary)."""
        super().__init__(parent)
        self._list = list_jobs
        self._submit = submit
        self._cancel = cancel
        self._resubmit = resubmit
        self._fetch_log = fetch_log
        self._retrain = retrain_model
        self._clock = clock
        self._model_meta: dict[str, Any] | None = None
        self._model_status = ""
        self._retraining = False
        self._model_listeners: list[Callable[[], None]] = []
        self._jobs: list[JobRecord] = []
        self._listeners: list[Callable[[], None]] = []
        self._tasks = TaskSet()
        self._loading = False
        self._dirty = False
        self._dispatching = False
        self.jobs_changed.connect(self._on_jobs_changed)
        self.model_changed.connect(self._on_model_changed)

    # ------------------------------------------------------------------ service side

    def notify_changed(self, job_ids: frozenset[str] = frozenset()) -> None:
        """Jobs changed somewhere (an empty set means "maybe all"): reload soon."""
        if self._loading:
            self._dirty = True  # one more reload after the current one, however many changes came in
            return
        self._loading = True
        self._tasks.spawn(self._reload_until_clean())

    def set_dispatcher_active(self, active: bool) -> None:
        if active != self._dispatching:
            self._dispatching = active
            self.dispatcher_role_changed.emit(active)
            self.notice.emit(
                "info", "this station dispatches jobs" if active else "another station dispatches jobs"
            )

    @property
    def dispatching(self) -> bool:
        return self._dispatching

    def set_model_info(self, meta: dict[str, Any]) -> None:
        """The placement model now in use (its sidecar: version, validation figures)."""
        self._model_meta = dict(meta)
        self.model_changed.emit()

    def set_retrain_progress(self, level: str, text: str) -> None:
        """A retrain step ("info"), its result ("ok") or failure ("error"), automatic or not."""
        self._model_status = text if level != "ok" else ""
        self._retraining = level == "info"
        if level != "info":
            self.notice.emit(level, text)
        self.model_changed.emit()

    async def reload(self) -> bool:
        """Load the job list now; False (and a notice) if the services could not answer."""
        try:
            self._jobs = list(await self._list())
        except Exception as exc:
            # A UI boundary: the database may be down; say so and keep the old list.
            log.warning("jobs: reload failed: %s", exc)
            self.notice.emit("warning", f"jobs list not updated: {exc}")
            return False
        self.jobs_changed.emit()
        return True

    async def _reload_until_clean(self) -> None:
        try:
            while True:
                self._dirty = False
                if not await self.reload() or not self._dirty:
                    return
        finally:
            self._loading = False

    def close(self) -> None:
        self._tasks.cancel_all()

    # ------------------------------------------------------------------ JobsModelSource (widgets)

    def list_jobs(self) -> Sequence[JobRecord]:
        return self._jobs

    def now(self) -> float:
        return self._clock()

    def add_listener(self, fn: Callable[[], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def submit(self, req: JobRequest, done: Done | None = None) -> None:
        """Store a job from the dialog (connect ``JobDialog.submitted`` here)."""
        self._run(self._submit(req), lambda _r: f"{req.id} submitted", done)

    def cancel(self, job_id: str, done: Done) -> None:
        self._run(self._cancel(job_id), str, done)

    def resubmit(self, job_id: str, done: Done) -> None:
        self._run(
            self._resubmit(job_id), lambda rec: f"resubmitted {job_id} as {getattr(rec, 'id', rec)}", done
        )

    def fetch_log(self, job_id: str, done: Done) -> None:
        self._run(self._fetch_log(job_id), lambda text: text or "(the log is empty)", done, notify=False)

    # ------------------------------------------------------------------ PlacementModelSource (widgets)

    def model_info(self) -> dict[str, Any] | None:
        return self._model_meta

    def model_summary(self) -> str | None:
        """Version and validation figures in one line; None until the model is loaded."""
        return None if self._model_meta is None else model_summary(self._model_meta)

    def model_status(self) -> str:
        """The retrain in progress or the last failure, in words; empty when idle and fine."""
        return self._model_status

    def retraining(self) -> bool:
        return self._retraining

    def can_retrain(self) -> bool:
        return self._retrain is not None

    def add_model_listener(self, fn: Callable[[], None]) -> None:
        self._model_listeners.append(fn)

    def remove_model_listener(self, fn: Callable[[], None]) -> None:
        if fn in self._model_listeners:
            self._model_listeners.remove(fn)

    def retrain_model(self, done: Done) -> None:
        """Retrain now; progress arrives through set_retrain_progress, the result through ``done``."""
        if self._retrain is None:
            done(False, "retraining is not available here")
            return
        if self._retraining:
            done(False, "the placement model is already being retrained")
            return
        self._retraining = True
        self.model_changed.emit()

        def finished(ok: bool, text: str) -> None:
            # Progress callbacks normally clear this; a failure before the first one must too.
            self._retraining = False
            if not ok:
                self._model_status = f"retrain failed: {text}"
                self.notice.emit("error", self._model_status)
            self.model_changed.emit()
            done(ok, text)

        # The runtime's progress listener already posts the result as a notice.
        self._run(self._retrain(), str, finished, notify=False)

    # ------------------------------------------------------------------ internals

    def _run(
        self, aw: Awaitable[Any], describe: Callable[[Any], str], done: Done | None, *, notify: bool = True
    ) -> None:
        async def runner() -> None:
            try:
                result = await aw
            except Exception as exc:
                # A UI boundary: whatever failed (host offline, refused, database down)
                # becomes a message for the operator instead of a lost task.
                log.warning("jobs action failed: %s", exc)
                self._finish(done, False, str(exc) or type(exc).__name__, notify)
                return
            self._finish(done, True, describe(result), notify)
            self.notify_changed()

        self._tasks.spawn(runner())

    def _finish(self, done: Done | None, ok: bool, text: str, notify: bool) -> None:
        if done is not None:
            done(ok, text)
        if notify:
            self.notice.emit("ok" if ok else "error", text)

    def _on_jobs_changed(self) -> None:
        for fn in list(self._listeners):
            fn()

    def _on_model_changed(self) -> None:
        for fn in list(self._model_listeners):
            fn()
