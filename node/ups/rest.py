"""UPS-RS (PS3.18 11): the workitems as DICOMweb resources on the web app, under ``/ups-rs``.

- ``GET /ups-rs/workitems?{attribute}={value}&limit=&offset=`` — Search Transaction (11.9): matching
  workitems as a DICOM JSON array (``application/dicom+json``), ``204`` when none match;
- ``GET /ups-rs/workitems/{uid}`` — Retrieve Transaction (11.5): the workitem, ``404`` if unknown.

Behind the web app's authentication (a bearer token from ``POST /api/auth/token``, or the session
cookie): without it ``401``. Query keys are attribute keywords or tags (``ProcedureStepState``,
``00741000``), one sequence level with a dot (``InputInformationSequence.StudyInstanceUID``);
values match as in C-FIND (`node.ups.query`). A bad key or value answers ``400`` with the reason.
The Transaction UID is never returned. Every search and retrieve is in the audit log (``ups.search``,
``ups.view``), as every view of a study is.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from pydicom.datadict import dictionary_VR, tag_for_keyword

from node.ups import query, workitems
from node.ups.errors import UpsRefused
from worklists import audit

DICOM_JSON = "application/dicom+json"
MAX_LIMIT = 1000
RESERVED = {"limit", "offset", "includefield", "fuzzymatching"}
MAX_PARAMS = 50
MAX_VALUE = 1024
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")

router = APIRouter(prefix="/ups-rs", tags=["ups-rs"])
_bearer = HTTPBearer(auto_error=False, description="a token from POST /api/auth/token")
_cookie = APIKeyCookie(name="msknode_session", auto_error=False)


def authenticated(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Depends(_bearer),
    cookie: str | None = Depends(_cookie),
) -> Any:
    """The web app's principal; 401 (not a login redirect) when there is none: DICOMweb clients are programs."""
    from node.web.auth import NotAuthenticated, principal

    try:
        return principal(request, bearer, cookie)
    except NotAuthenticated as e:
        raise HTTPException(401, detail=e.reason, headers={"WWW-Authenticate": "Bearer"}) from None


def _tag(keyword: str) -> tuple[str, str]:
    """A keyword or 8-hex tag → (tag as 8 upper hex digits, VR)."""
    if _TAG_RE.match(keyword):
        tag = int(keyword, 16)
    else:
        found = tag_for_keyword(keyword)
        if found is None:
            raise ValueError(f"{keyword!r} is not a DICOM attribute keyword or tag")
        tag = found
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        raise ValueError(f"{keyword!r} is not in the DICOM dictionary") from None
    return f"{tag:08X}", vr


def _element(vr: str, value: str) -> dict[str, Any]:
    if value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    return {"vr": vr, "Value": [value]}


def query_from_params(params: list[tuple[str, str]]) -> dict[str, Any]:
    """The search's query parameters as a DICOM JSON query (raises ValueError with the reason)."""
    q: dict[str, Any] = {}
    keys = [(k, v) for k, v in params if k not in RESERVED]
    if len(keys) > MAX_PARAMS:
        raise ValueError(f"at most {MAX_PARAMS} query keys")
    for key, value in keys:
        if len(value) > MAX_VALUE:
            raise ValueError(f"{key}: value longer than {MAX_VALUE} characters")
        parts = key.split(".")
        if len(parts) > 2:
            raise ValueError(f"{key}: one sequence level at most")
        tag, vr = _tag(parts[0])
        if len(parts) == 1:
            if vr == "SQ":
                raise ValueError(f"{key}: a sequence takes a nested key (Sequence.Attribute)")
            q[tag] = _element(vr, value)
        else:
            if vr != "SQ":
                raise ValueError(f"{parts[0]} is not a sequence")
            inner, ivr = _tag(parts[1])
            item = q.setdefault(tag, {"vr": "SQ", "Value": [{}]})["Value"][0]
            item[inner] = _element(ivr, value)
    return q


def _dicom_json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


@router.get("/workitems", responses={204: {"description": "no workitem matches"}, 400: {}, 401: {}})
def search(
    request: Request,
    limit: int = Query(default=100, ge=1, le=MAX_LIMIT),
    offset: int = Query(default=0, ge=0, le=1_000_000),
    p: Any = Depends(authenticated),
):
    """Search Transaction (PS3.18 11.9): the matching workitems, oldest first."""
    try:
        q = query_from_params(list(request.query_params.multi_items()))
    except ValueError as e:
        return JSONResponse({"detail": str(e)}, status_code=400)
    ctx = request.app.state.ctx
    out: list[dict[str, Any]] = []
    skipped = 0
    with ctx.db.session() as s:
        for w in query.matches(s, q):
            if skipped < offset:
                skipped += 1
                continue
            out.append(workitems.to_json(workitems.dataset_of(w)))
            if len(out) >= limit:
                break
        # every view of patient data is audited, as the study pages are
        audit.record(
            s,
            actor=p.username,
            action="ups.search",
            entity_type="workitem",
            details={"matches": len(out), "via": "ups-rs"},
        )
    if not out:
        return Response(status_code=204)
    return _dicom_json(out)


@router.get("/workitems/{uid}", responses={404: {}, 401: {}})
def retrieve(request: Request, uid: str, p: Any = Depends(authenticated)):
    """Retrieve Transaction (PS3.18 11.5): one workitem."""
    if len(uid) > 64 or not re.match(r"^[0-9.]+$", uid):
        return JSONResponse({"detail": "not a UID"}, status_code=400)
    ctx = request.app.state.ctx
    try:
        with ctx.db.session() as s:
            ds = workitems.dataset_of(workitems.get(s, uid))
            audit.record(s, actor=p.username, action="ups.view", entity_type="workitem", entity_id=uid)
    except UpsRefused as e:
        return JSONResponse({"detail": str(e)}, status_code=e.http_status)
    return _dicom_json([workitems.to_json(ds)])
