"""A trial's storage writes in one transaction each time it writes, where Optuna spends one per call.

On Optuna's RDB storage every call is a transaction of its own: a pool checkout (with its pre-ping), a
select of the trial (still RUNNING?), the write, the commit. A worker's trial of the toy study made 38
of them (``benchmarks/search.py --count``; PostgreSQL counted 78, pre-pings included): one per parameter
suggested (ten), per user attr (six), three for one constraint (Optuna's ``set_constraint`` reads the
trial's system attrs before it writes), six for optuna-dashboard's note (its ``save_note`` reads every
system attr of the study twice, a read that grows with the study: every trial's note is kept there) and
one for the responses artifact. With :func:`batched`, :func:`tell` (no reads of the trial) and
``next_trial``'s counting query, a trial makes 8.8 transactions where it made 41, and the time outside
evaluation on PostgreSQL fell from 120 to 45 ms a trial (README, "Benchmarks").

:func:`batched` makes each such run of writes one transaction:

- within ``with batched(study, trial) as batch:``, the writes to ``trial`` made through the trial or the
  study's storage (Optuna's ``suggest_*`` and ``set_user_attr``, a sampler's system attrs such as TPE's
  ``tpe:relative_params``, ``optuna.artifacts.upload_artifact``, :func:`safesearch.dashboard.
  record_constraint_list`) are held back and written together when the block ends, or sooner: before any
  other use of the storage (a read, a write to anything else), so that every read sees every write made
  before it, as without batching. What a sampler reads, and so what it samples, is unchanged;
- :meth:`TrialBatch.set_constraint` is ``Trial.set_constraint`` (a constraint already set is kept, with
  Optuna's warning), the check made inside that transaction instead of by a read of its own;
- :meth:`TrialBatch.save_note` is optuna-dashboard's ``save_note`` for the trial (:func:`save_note`).

Nothing stored differs: the same rows and values, the parameters in the order they were suggested (a
trial's params are read back in insertion order), each attr with Optuna's JSON. A value that Optuna
would refuse is refused at the same call (JSON, a parameter's distribution against the one this process
has seen). Optuna's ``_CachedStorage`` keeps its cache as its own calls keep it (the distribution of
each parameter name; trial attrs are not cached while the trial runs). A block that raises still writes
what it held (as the calls would have, one by one), once, without waiting out a storage outage, and the
block's own error goes on.

On a :class:`~safesearch.reconnect.ReconnectingStorage` the transaction is made again after a lost
connection, like any call: a parameter or attr written twice is the same row (``ON CONFLICT``), and what
was decided in the first attempt (a note's version, which constraints were new) is not decided again.

Elsewhere (a ``grpc://`` storage proxy, whose API is one call per write; any storage that is not Optuna's
RDBStorage; a database other than SQLite and PostgreSQL) every call goes through as it is.

:func:`save_note` is optuna-dashboard's ``save_note`` for a trial or the study in one transaction that
reads only that note's own keys (``dashboard:<trial id>:note_ver``, ``dashboard:<trial id>:note_str:<i>``,
or the study's), writing the same keys and values the dashboard's would. :func:`tell` is ``study.tell``
without its reads of the trial.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility, distribution_to_json
from optuna.storages import RDBStorage
from optuna.trial import TrialState


def _rdb_of(storage: Any) -> tuple[RDBStorage | None, Any]:
    """(the RDBStorage behind ``storage``, Optuna's ``_CachedStorage`` around it or None), or (None, None)
    where writes cannot be batched (not an RDBStorage; a database other than SQLite or PostgreSQL)."""
    cache = storage if isinstance(getattr(storage, "_backend", None), RDBStorage) else None
    rdb = cache._backend if cache is not None else storage
    if not isinstance(rdb, RDBStorage):
        return None, None
    dialect = rdb.engine.dialect.name
    if dialect == "postgresql" or (dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0)):
        return rdb, cache
    return None, None


# The INSERT statements, built once per (dialect, table, kind): executed with many rows each (executemany:
# psycopg sends them in one pipeline), and compiled once (a statement built anew per call is compiled anew).
_STATEMENTS: dict[tuple[str, str, str], Any] = {}


def _statement(rdb: RDBStorage, model: Any, kind: str, keys: Sequence[str]) -> Any:
    """``INSERT`` into ``model``'s table that, on a row with the same ``keys``, replaces ``value_json``
    (``kind`` "upsert", what Optuna's attr setters do) or leaves the stored row (``kind`` "keep", what its
    ``set_trial_param`` does with a parameter the trial has already)."""
    dialect = rdb.engine.dialect.name
    key = (dialect, model.__tablename__, kind)
    stmt = _STATEMENTS.get(key)
    if stmt is None:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        stmt = insert(model.__table__)
        if kind == "upsert":
            stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={"value_json": stmt.excluded.value_json})
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
        _STATEMENTS[key] = stmt
    return stmt


def _upsert(session: Any, rdb: RDBStorage, model: Any, owner: str, rows: list[dict[str, Any]]) -> None:
    """``rows`` (``owner`` id, key, value_json) written as Optuna's attr setters write one: insert, or
    replace the value of the key; in order (the rows' ids keep it)."""
    session.execute(_statement(rdb, model, "upsert", (owner, "key")), rows)


class _Note:
    """A pending optuna-dashboard note (see :func:`save_note`): its version is decided by the first attempt
    of the transaction, so that one made again after a lost commit does not count it twice."""

    def __init__(self, trial_id: int | None, body: str) -> None:
        self.trial_id = trial_id
        self.body = body
        self.version: int | None = None


def _write_notes(session: Any, rdb: RDBStorage, study_id: int, notes: Sequence[_Note]) -> None:
    """optuna-dashboard's ``save_note`` (0.21: ``save_note_with_version``), reading only the note's keys.

    It sets ``note_ver`` to the stored version + 1, the body's chunks (``split_body``), and blanks the
    stored chunks past the new body's last (those a longer earlier note left)."""
    from optuna.storages._rdb import models
    from optuna_dashboard._note import note_str_key_prefix, note_ver_key, split_body

    model = models.StudySystemAttributeModel
    for note in notes:
        ver_key, prefix = note_ver_key(note.trial_id), note_str_key_prefix(note.trial_id)
        stored = dict(
            session.query(model.key, model.value_json)
            .filter(model.study_id == study_id)
            .filter((model.key == ver_key) | model.key.startswith(prefix, autoescape=True))
        )
        if note.version is None:
            note.version = (json.loads(stored[ver_key]) if ver_key in stored else 0) + 1
        chunks = split_body(note.body, note.trial_id)
        old = {k for k in stored if k.startswith(prefix)}
        rows = {ver_key: note.version, **chunks}
        rows.update({f"{prefix}{i}": "" for i in range(len(chunks), len(old | set(chunks)))})
        _upsert(session, rdb, model, "study_id",
                [{"study_id": study_id, "key": k, "value_json": json.dumps(v)} for k, v in rows.items()])


def _run(rdb: RDBStorage, write: Any) -> None:
    """``write(session)`` in one transaction; on a reconnecting storage made again after a lost connection."""
    from optuna.storages._rdb.storage import _create_scoped_session

    def once() -> None:
        with _create_scoped_session(rdb.scoped_session) as session:
            write(session)

    again = getattr(rdb, "call_reconnecting", None)
    if again is not None:
        again(once)
    else:
        once()


def _note_keys() -> bool:
    """Whether the installed optuna-dashboard's note keys can be written here (its ``_note`` module)."""
    try:
        from optuna_dashboard._note import note_str_key_prefix, note_ver_key, split_body  # noqa: F401
    except ImportError:
        return False
    return True


def save_note(study: optuna.Study, trial_id: int | None, body: str) -> None:
    """``body`` as the optuna-dashboard note of the trial ``trial_id`` (None: of the study), as
    ``optuna_dashboard.save_note`` saves it (same keys, same values), in one transaction that reads only
    that note's keys (the dashboard's reads every system attr of the study, twice). A trial's note may be
    saved whatever its state: notes are study attrs. Storages that cannot batch take the dashboard's own."""
    rdb, _ = _rdb_of(study._storage)
    if rdb is None or not _note_keys():
        from optuna_dashboard import save_note as dashboard_save_note

        if trial_id is None:
            dashboard_save_note(study, body)
        else:
            # What save_note reads of a trial (a whole optuna.Trial would read the trial from the storage).
            dashboard_save_note(_TrialRef(study, trial_id), body)  # type: ignore[arg-type]
        return
    note = _Note(trial_id, body)
    _run(rdb, lambda session: _write_notes(session, rdb, study._study_id, [note]))


class _TrialRef:
    """What ``optuna_dashboard.save_note`` uses of a trial: its storage, its study and its id."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.study, self.storage, self._trial_id = study, study._storage, trial_id


def tell(study: optuna.Study, trial: optuna.Trial, values: Sequence[float] | None = None,
         state: TrialState | None = None) -> None:
    """``study.tell(trial, values, state)`` without its two reads of the trial (a RUNNING trial is not
    cached: each is a transaction of six queries).

    Optuna's tell reads the trial to check it is RUNNING and to hand the sampler's ``after_trial`` the
    trial as stored, and reads it again for the copy it returns. Here the trial as stored is the one
    this process holds: read when it was asked, kept up to date by Optuna's own ``Trial`` methods and by
    :func:`batched` (every write to a RUNNING trial goes through one of them), so it is handed to the
    sampler as it is. On a storage whose writes are not batched, Optuna's read stays. The RUNNING check is the write's own: a trial another worker failed meanwhile
    raises ``UpdateFinishedTrialError`` there (Optuna's read would raise a ValueError first). The other
    checks, the sampler call and the write are Optuna's."""
    try:
        from optuna.study._tell import _tell_with_warning
    except ImportError:  # another Optuna: its own tell
        study.tell(trial, values, state)
        return
    storage = study._storage
    if _rdb_of(storage)[0] is None:  # writes not batched (a storage proxy): the held trial may lack some
        _tell_with_warning(study=study, trial=trial, value_or_values=values, state=state, skip_if_finished=False)
        return
    held = copy.copy(trial._cached_frozen_trial)
    # Attrs as stored: through JSON (a Trial caches the value it was given, e.g. a dict with int keys).
    held.user_attrs = {k: json.loads(json.dumps(v)) for k, v in held.user_attrs.items()}
    held.system_attrs = {k: json.loads(json.dumps(v)) for k, v in held.system_attrs.items()}
    held.params, held.distributions = dict(held.params), dict(held.distributions)
    held.intermediate_values = dict(held.intermediate_values)
    study._storage = _Known(storage, trial._trial_id, held)  # type: ignore[assignment]
    try:
        _tell_with_warning(study=study, trial=trial, value_or_values=values, state=state, skip_if_finished=False)
    finally:
        study._storage = storage


class _Known:
    """A storage whose ``get_trial`` of one trial returns that trial as this process holds it (once)."""

    def __init__(self, storage: Any, trial_id: int, frozen: optuna.trial.FrozenTrial) -> None:
        self._ss_storage, self._ss_trial_id, self._ss_frozen = storage, trial_id, frozen

    def get_trial(self, trial_id: int) -> optuna.trial.FrozenTrial:
        frozen, self._ss_frozen = self._ss_frozen, None
        if trial_id == self._ss_trial_id and frozen is not None:
            return frozen
        return self._ss_storage.get_trial(trial_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ss_storage, name)


class TrialBatch:
    """The writes to one trial held back within :func:`batched`; :meth:`flush` writes them."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, rdb: RDBStorage | None, cache: Any) -> None:
        self.study, self.trial = study, trial
        self.trial_id: int = trial._trial_id
        self._rdb, self._cache = rdb, cache
        self._study_id: int = study._study_id
        self._params: list[tuple[str, float, BaseDistribution, str]] = []
        self._user: dict[str, str] = {}  # key -> value_json
        # key -> [value_json, only if absent (a constraint), value (for the trial's cache)]
        self._system: dict[str, list[Any]] = {}
        self._notes: list[_Note] = []
        self._open = rdb is not None

    @property
    def holds(self) -> bool:
        return bool(self._params or self._user or self._system or self._notes)

    # -- what the storage seen within the block holds back --------------------------------------------

    def hold_param(self, name: str, value: float, distribution: BaseDistribution) -> None:
        cached = self._cached_distribution(name)
        if cached is not None:  # checked where Optuna's call checks it; an unseen name at the flush
            check_distribution_compatibility(cached, distribution)
        self._params.append((name, value, distribution, distribution_to_json(distribution)))

    def hold_user_attr(self, key: str, value: Any) -> None:
        self._user[key] = json.dumps(value)

    def hold_system_attr(self, key: str, value: Any) -> None:
        self._system[key] = [json.dumps(value), False, value]

    def knows_trial(self) -> bool:
        """Whether Optuna's cache knows the trial (its set_trial_param needs that: else it goes through)."""
        if self._cache is None:
            return True
        with self._cache._lock:
            return self.trial_id in self._cache._trial_id_to_study_id_and_number

    def _cached_distribution(self, name: str) -> BaseDistribution | None:
        if self._cache is None:
            return None
        with self._cache._lock:
            info = self._cache._studies.get(self._study_id)
            return info.param_distribution.get(name) if info is not None else None

    # -- what the caller asks of the batch -------------------------------------------------------------

    def set_constraint(self, key: str, value: float) -> None:
        """``trial.set_constraint(key, value)``: the same checks at once; stored with the batch unless the
        trial has that constraint already (then Optuna's warning, and the stored value is kept)."""
        if not self._open:
            self.trial.set_constraint(key, value)
            return
        from optuna.study._constrained_optimization import _CONSTRAINTS_KEY

        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"The `value` argument is of type '{type(value)}' but supposed to be a float.") from None
        if math.isnan(value):
            raise ValueError(f"Attempted to set a constraint for {key!r}, but NaN is not allowed.")
        name = f"{_CONSTRAINTS_KEY}:{key}"
        if name in self._system:  # set within this batch: as Optuna's second call, kept and warned of
            _warn_constraint_set(key)
            return
        self._system[name] = [json.dumps(value), True, value]

    def save_note(self, body: str) -> None:
        """The trial's optuna-dashboard note (:func:`save_note`), saved with the batch."""
        if not self._open or not _note_keys():
            save_note(self.study, self.trial_id, body)
            return
        self._notes.append(_Note(self.trial_id, body))

    # -- writing ---------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what is held in one transaction (nothing held: nothing done)."""
        if not self._open or not self.holds:
            return
        rdb = self._rdb
        assert rdb is not None
        params, user, system, notes = self._params, self._user, self._system, self._notes
        # Decided by the first attempt: which constraints are new (a retry finds its own rows).
        new_constraints: set[str] | None = None
        # Names this process has not seen (before the cache's lock is taken: it is not reentrant).
        unseen = [(name, dist) for name, _, dist, _ in params if self._cached_distribution(name) is None]
        from optuna.storages._rdb import models

        def write(session: Any) -> None:
            nonlocal new_constraints
            if params or user or system:
                trial = models.TrialModel.find_or_raise_by_id(self.trial_id, session)
                rdb.check_trial_is_updatable(self.trial_id, trial.state)
            if params:
                self._check_distributions(session, unseen)
                rows = [{"trial_id": self.trial_id, "param_name": name, "param_value": value,
                         "distribution_json": dist_json} for name, value, _, dist_json in params]
                # In suggestion order (the params' ids keep it; a trial's params are read back in that
                # order); a parameter the trial has already is left, as Optuna's set_trial_param leaves it.
                session.execute(_statement(rdb, models.TrialParamModel, "keep", ("trial_id", "param_name")), rows)
            if user:
                _upsert(session, rdb, models.TrialUserAttributeModel, "trial_id",
                        [{"trial_id": self.trial_id, "key": k, "value_json": v} for k, v in user.items()])
            if system:
                if new_constraints is None:
                    asked = [k for k, (_, if_absent, _) in system.items() if if_absent]
                    found = set()
                    if asked:
                        model = models.TrialSystemAttributeModel
                        found = {k for (k,) in session.query(model.key).filter(model.trial_id == self.trial_id)
                                 .filter(model.key.in_(asked))}
                    new_constraints = set(asked) - found
                rows = [{"trial_id": self.trial_id, "key": k, "value_json": v}
                        for k, (v, if_absent, _) in system.items() if not if_absent or k in new_constraints]
                if rows:
                    _upsert(session, rdb, models.TrialSystemAttributeModel, "trial_id", rows)
            if notes:
                _write_notes(session, rdb, self._study_id, notes)

        if params and self._cache is not None:
            with self._cache._lock:  # as Optuna's set_trial_param: the write and its cache entry together
                _run(rdb, write)
                info = self._cache._studies.get(self._study_id)
                if info is not None:
                    for name, _, dist, _ in params:
                        info.param_distribution.setdefault(name, dist)
        else:
            _run(rdb, write)
        self._params, self._user, self._system, self._notes = [], {}, {}, []
        # The trial as this process holds it (Optuna's Trial keeps its params, user attrs and constraints)
        # gets the other system attrs written (a sampler's, an artifact's) too: tell hands it to the sampler.
        held = self.trial._cached_frozen_trial.system_attrs
        for k, (_, if_absent, value) in system.items():
            if not if_absent or (new_constraints is not None and k in new_constraints):
                held[k] = value
            else:
                _warn_constraint_set(k.split(":", 1)[1])

    def _check_distributions(self, session: Any, unseen: Sequence[tuple[str, BaseDistribution]]) -> None:
        """Optuna's check of a parameter against the study's earlier trials, for the names this process has
        not seen yet (those it has were checked when held): one query per such name, as Optuna's."""
        from optuna import distributions
        from optuna.storages._rdb import models

        for name, dist in unseen:
            previous = (
                session.query(models.TrialParamModel.distribution_json)
                .join(models.TrialModel)
                .filter(models.TrialModel.study_id == self._study_id)
                .filter(models.TrialParamModel.param_name == name)
                .first()
            )
            if previous is not None:
                check_distribution_compatibility(distributions.json_to_distribution(previous[0]), dist)

    def close(self) -> None:
        self._open = False


def _warn_constraint_set(key: str) -> None:
    """Optuna's warning for a constraint set twice (its ``optuna_warn``, which hides Optuna's frames)."""
    message = f"The constraint value is ignored because this constraint `{key=}` is already set."
    try:
        from optuna._warnings import optuna_warn
    except ImportError:
        import warnings

        warnings.warn(message, UserWarning, stacklevel=3)
        return
    optuna_warn(message)


class _Holding:
    """A storage as seen within :func:`batched`: the batch's trial's writes are held back; any other use of
    the storage first writes them, then goes through."""

    def __init__(self, storage: Any, batch: TrialBatch) -> None:
        self._ss_storage = storage
        self._ss_batch = batch

    def _ss_holds(self, trial_id: int, param: bool = False) -> bool:
        """Whether a write to ``trial_id`` is held back; if not, what is held is written first."""
        batch = self._ss_batch
        if batch._open and trial_id == batch.trial_id and (not param or batch.knows_trial()):
            return True
        batch.flush()
        return False

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        if self._ss_holds(trial_id, param=True):
            self._ss_batch.hold_param(param_name, param_value_internal, distribution)
            return
        self._ss_storage.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if self._ss_holds(trial_id):
            self._ss_batch.hold_user_attr(key, value)
            return
        self._ss_storage.set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if self._ss_holds(trial_id):
            self._ss_batch.hold_system_attr(key, value)
            return
        self._ss_storage.set_trial_system_attr(trial_id, key, value)

    def __getattr__(self, name: str) -> Any:
        self._ss_batch.flush()
        return getattr(self._ss_storage, name)


@contextlib.contextmanager
def batched(study: optuna.Study, trial: optuna.Trial) -> Iterator[TrialBatch]:
    """Hold back ``trial``'s writes within the block and write them in one transaction (see the module
    docstring); on storages that cannot batch, the block runs as it is."""
    rdb, cache = _rdb_of(study._storage)
    batch = TrialBatch(study, trial, rdb, cache)
    if rdb is None:
        yield batch
        return
    storage, trial_storage = study._storage, trial.storage
    study._storage = _Holding(storage, batch)  # type: ignore[assignment]
    trial.storage = study._storage if trial_storage is storage else _Holding(trial_storage, batch)
    ok = False
    try:
        yield batch
        ok = True
    finally:
        study._storage, trial.storage = storage, trial_storage
        if ok:
            try:
                batch.flush()
            finally:
                batch.close()
        else:
            # The block raised: what it held is written, as its calls would have been, once (no wait
            # for an outage), and the block's own error goes on.
            from safesearch.reconnect import impatient

            with impatient(), contextlib.suppress(Exception):
                batch.flush()
            batch.close()
