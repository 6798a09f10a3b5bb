"""Non-finite floats (NaN, ±inf) never reach JSON or the database: they become null.

A model output may be NaN (e.g. super-resolution's consistency error when it was skipped). JSON has
no NaN: Python writes a bare ``NaN`` that PostgreSQL's json type and every strict parser refuse, and
Starlette's JSON responses raise on it. So every float that is stored or answered passes `finite`:

- the engine's JSON serializer (`json_dumps`, set by `node.db.database.make_engine`) for every JSON
  column (job timings, model versions, finding details ...), SQLite and PostgreSQL alike;
- `null_non_finite_floats`, a mapper hook on every table, for plain Float columns
  (a finding's probability, a worklist score ...);
- the web app's response class (`node.web.app.SafeJSONResponse`) as the last line of defence.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sqlalchemy import Float, event, inspect


def finite(value: Any) -> Any:
    """`value` with every non-finite float (also numpy's) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if type(value).__module__ == "numpy":
        item = getattr(value, "item", None)
        if item is not None and getattr(value, "ndim", 1) == 0:
            return finite(item())
        tolist = getattr(value, "tolist", None)
        if tolist is not None:
            return finite(tolist())
    return value


def json_dumps(value: Any) -> str:
    """JSON text of `value` with non-finite floats as null (never a bare NaN)."""
    return json.dumps(finite(value), allow_nan=False)


def null_non_finite_floats(_mapper: Any, _connection: Any, target: Any) -> None:
    """Before a row is inserted or updated: a non-finite value of a Float column becomes None."""
    state = inspect(target)
    for attr in state.mapper.column_attrs:
        col = attr.columns[0]
        if isinstance(col.type, Float):
            v = getattr(target, attr.key, None)
            if isinstance(v, float) and not math.isfinite(v):
                setattr(target, attr.key, None)


def install(base: type) -> None:
    """Hooks `null_non_finite_floats` on every mapped class of `base` (once)."""
    if not event.contains(base, "before_insert", null_non_finite_floats):
        event.listen(base, "before_insert", null_non_finite_floats, propagate=True)
        event.listen(base, "before_update", null_non_finite_floats, propagate=True)
