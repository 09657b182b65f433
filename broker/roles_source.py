"""Where the role table comes from, kept current in every worker (DESIGN.md §3 ``roles``).

``file``: roles.yaml, watched. Each worker stats the path (following symlinks) and its
resolved target every ``poll_s``, so a Kubernetes ConfigMap update, which swaps the ``..data``
symlink instead of writing the file, is seen like an edit. ``redis``: the MACed table of
:mod:`broker.roles_store`; each worker polls its revision counter (one GET) and, now and then,
re-reads the whole version to notice an edit made behind the broker's back.

Either way a new table is validated whole and swapped in with one reference assignment, so a
request sees the old table or the new one, never a mix. Anything invalid is refused whole and
the last good table stays. Each attempt is reported to ``on_reload`` (logging, metrics, audit,
cache purge live there, see :mod:`broker.roles_effects`).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from broker.errors import StoreUnavailable
from broker.policy import Problem, RoleRules, RoleTable, check_role_file, check_role_table
from broker.roles_store import RedisRoleStore, StoredVersion, TableIntegrityError

log = logging.getLogger(__name__)

POLL_S = 0.5  # well inside the 2 s (file) and 1 s (redis) the issue promises
FULL_CHECK_EVERY = 20  # redis: re-read and verify the whole version every 20 polls (10 s)


@dataclass(frozen=True)
class Reload:
    """One attempt, in one worker, to take a new table into use."""

    source: str  # file | redis
    location: str  # the file, or the Redis key
    applied: bool
    reason: str  # reloaded | invalid_table | unreadable | bad_mac | unknown_key | malformed
    #              | rollback | vanished
    before: RoleTable | None
    after: RoleTable | None = None  # set when applied
    problems: tuple[Problem, ...] = ()
    revision: int | None = None
    changed_by: str | None = None

    @property
    def outcome(self) -> str:
        return "applied" if self.applied else "refused"

    @property
    def integrity(self) -> bool:
        """True when the refusal means someone wrote the store without the broker."""
        return self.reason in {"bad_mac", "unknown_key", "malformed", "rollback", "vanished"}


OnReload = Callable[[Reload], None]


class RoleSource:
    """The role table in effect in this worker; :meth:`current` is what the exchange calls."""

    kind: ClassVar[str]
    writable: ClassVar[bool]

    def __init__(self, rules: RoleRules, *, on_reload: OnReload | None, poll_s: float) -> None:
        self.rules = rules
        self._on_reload = on_reload
        self._poll_s = poll_s
        self._table: RoleTable | None = None
        # One refresh at a time, its report included, so reports go out in the order the
        # reloads happened; readers of the table (current) never take it.
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reloads: Counter[str] = Counter()  # "applied" / "refused": for tests and metrics

    def current(self) -> RoleTable:
        """The table in effect (validated); never a partly applied one."""
        table = self._table
        if table is None:
            self.refresh()
            table = self._table
        if table is None:  # pragma: no cover - refresh always sets a table or raises
            raise StoreUnavailable("the role table is not loaded yet", retry_after=1)
        return table

    @property
    def revision(self) -> int | None:
        """The store's revision of the table in effect (None for a file)."""
        return None

    def refresh(self, *, full: bool = False) -> Reload | None:
        """Look for a new table now; return what happened (None: nothing new). ``full``
        re-reads the source even when its cheap change marker did not move."""
        # The report is made under the lock too (the poller and admin reads both refresh):
        # the gauge of the revision in effect, purges and audit records never step back.
        with self._lock:
            event = self._check(full)
            if event is None:
                return None
            self.reloads[event.outcome] += 1
            if self._on_reload is not None:
                try:
                    self._on_reload(event)
                except Exception:  # reporting must never undo or block a reload
                    log.exception("roles: reporting a reload failed")
            return event

    def refresh_or_log(self) -> None:
        """:meth:`refresh`, with a failure logged instead of raised: for callers that go on
        with the table in effect (the poller, admin reads)."""
        try:
            self.refresh()
        except StoreUnavailable as exc:
            log.warning("roles: cannot check for a new table: %s", exc.description)
        except Exception:  # no one check may stop the poller or fail a read
            log.exception("roles: checking for a new table failed")

    def _check(self, full: bool) -> Reload | None:
        raise NotImplementedError

    def start(self) -> None:
        """Poll in a daemon thread until :meth:`close` (or until this source is dropped)."""
        if self._thread is not None:
            return
        ref = weakref.ref(self)
        stop, interval = self._stop, self._poll_s
        self._thread = threading.Thread(
            target=_poll, args=(ref, stop, interval), name=f"roles-{self.kind}-watch", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()


def _poll(ref: weakref.ref[RoleSource], stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        source = ref()
        if source is None:
            return
        source.refresh_or_log()
        del source


# --- file ----------------------------------------------------------------------------------------


Stamp = tuple[str, int, int, int, int, int]  # resolved path, mtime, ctime, size, inode, dev


class FileRoleSource(RoleSource):
    """roles.yaml, watched; read-only through the API."""

    kind = "file"
    writable = False

    def __init__(
        self,
        path: Path,
        rules: RoleRules,
        *,
        on_reload: OnReload | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        """Load ``path`` now; an invalid file refuses the start (:class:`ConfigError`)."""
        super().__init__(rules, on_reload=on_reload, poll_s=poll_s)
        self.path = path
        self._stamp = self._stat()
        self._table = check_role_file(path, rules=rules).table_or_raise()
        self._bad: Stamp | None = None  # a version already refused (reported once)
        self._missing = False

    @property
    def location(self) -> str:
        return str(self.path)

    def _stat(self) -> Stamp | None:
        # stat() follows the symlinks (ConfigMap: roles.yaml -> ..data/roles.yaml, ..data ->
        # ..2024_01_01_...); the resolved path changes with every ConfigMap update even when
        # the new file's times and size look the same.
        try:
            st = os.stat(self.path)
            real = os.path.realpath(self.path)
        except OSError:
            return None
        return (real, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)

    def _check(self, full: bool) -> Reload | None:
        stamp = self._stat()
        if not full and stamp is not None and stamp in (self._stamp, self._bad):
            return None
        before = self._table
        if stamp is None:
            if self._missing:
                return None
            self._missing = True
            problem = Problem((), "cannot read: the file is missing")
            return self._refused("unreadable", before, (problem,))
        self._missing = False
        result = check_role_file(self.path, rules=self.rules)
        if result.table is None:
            self._bad = stamp
            unreadable = result.errors and result.errors[0].message.startswith(_UNREADABLE)
            return self._refused(
                "unreadable" if unreadable else "invalid_table", before, result.errors
            )
        self._stamp, self._bad = stamp, None
        if before is not None and result.table.digest == before.digest:
            return None  # touched, or comments only: the same table
        self._table = result.table
        return Reload(
            "file",
            self.location,
            applied=True,
            reason="reloaded",
            before=before,
            after=result.table,
            problems=result.warnings,
        )

    def _refused(
        self, reason: str, before: RoleTable | None, problems: tuple[Problem, ...]
    ) -> Reload:
        return Reload(
            "file", self.location, applied=False, reason=reason, before=before, problems=problems
        )


_UNREADABLE = ("cannot read", "not UTF-8")


# --- redis ---------------------------------------------------------------------------------------


class RedisRoleSource(RoleSource):
    """The MACed table in Redis, shared by replicas; editable through the API."""

    kind = "redis"
    writable = True

    def __init__(
        self,
        store: RedisRoleStore,
        rules: RoleRules,
        *,
        on_reload: OnReload | None = None,
        poll_s: float = POLL_S,
        full_check_every: int = FULL_CHECK_EVERY,
    ) -> None:
        """Nothing is read here (nothing connects in the app factory): the first
        :meth:`current` or poll loads the table."""
        super().__init__(rules, on_reload=on_reload, poll_s=poll_s)
        self.store = store
        self._revision = 0
        self._version: StoredVersion | None = None
        self._refused: str | None = None  # fingerprint of a version already refused
        self._polls = 0
        self._full_every = max(1, full_check_every)

    @property
    def location(self) -> str:
        return self.store.current_key

    @property
    def revision(self) -> int | None:
        return self._revision

    @property
    def version(self) -> StoredVersion | None:
        """The stored version in effect (None: no table has been written yet)."""
        return self._version

    def _check(self, full: bool) -> Reload | None:
        # The revision counter is the cheap marker; an edit behind the broker's back need not
        # bump it, so every few polls the whole version is re-read and verified.
        self._polls += 1
        full = full or self._polls % self._full_every == 0
        if self._table is not None and not full and self.store.revision() == self._revision:
            return None
        before = self._table
        try:
            version = self.store.read()
        except TableIntegrityError as exc:
            return self._refuse(exc.fingerprint, exc.reason, str(exc), before)
        if version is None:
            if before is None:
                self._table = RoleTable(roles=(), source=self.location)
                log.warning(
                    "roles: no role table in Redis yet (%s): every token request is denied "
                    "until an admin writes one (token-broker roles apply FILE)",
                    self.location,
                )
                return None
            if self._revision == 0:
                return None
            return self._refuse("vanished", "vanished", "the stored role table disappeared", before)
        if version.fingerprint == (self._version.fingerprint if self._version else None):
            return None
        if self._refused == version.fingerprint:
            return None
        if version.revision < self._revision:
            return self._refuse(
                version.fingerprint,
                "rollback",
                f"the stored role table went back from revision {self._revision} to "
                f"{version.revision}",
                before,
            )
        result = check_role_table(
            version.data, source=f"{self.location} revision {version.revision}", rules=self.rules
        )
        if result.table is None:
            self._refused = version.fingerprint
            self._fail_closed()
            return Reload(
                "redis",
                self.location,
                applied=False,
                reason="invalid_table",
                before=before,
                problems=result.errors,
                revision=version.revision,
                changed_by=version.changed_by,
            )
        if result.table.digest != version.digest:
            return self._refuse(
                version.fingerprint,
                "malformed",
                "the stored digest does not match its table",
                before,
            )
        self._table, self._version, self._revision = result.table, version, version.revision
        self._refused = None
        # A new revision is reported even when its table equals the last one (e.g. a table
        # restored after tampering): every worker then shows the revision it serves.
        return Reload(
            "redis",
            self.location,
            applied=True,
            reason="reloaded",
            before=before,
            after=result.table,
            problems=result.warnings,
            revision=version.revision,
            changed_by=version.changed_by,
        )

    def _refuse(
        self, fingerprint: str, reason: str, message: str, before: RoleTable | None
    ) -> Reload | None:
        if self._refused == fingerprint:
            return None
        self._refused = fingerprint
        self._fail_closed()
        return Reload(
            "redis",
            self.location,
            applied=False,
            reason=reason,
            before=before,
            problems=(Problem((), message),),
            revision=self._revision,
        )

    def _fail_closed(self) -> None:
        if self._table is None:
            # Nothing good to keep: an empty table (deny all) until a valid one lands.
            self._table = RoleTable(roles=(), source=self.location)
