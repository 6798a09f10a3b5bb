"""A radiologist's answer to each AI finding: the study page's form and the JSON API (`worklists.feedback`).

Any logged-in user (radiologist or admin) answers for themselves; a cookie session needs the
CSRF token (form field or ``X-CSRF-Token``), a bearer token (a RIS or reporting system) none.
The answer is locked once the study is marked read (409).
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Path, Request
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from node.db.database import utcnow
from node.db.schema import Job, ResultObject, Study
from node.web.auth import Principal, api_csrf, check_csrf, principal
from worklists import feedback
from worklists.errors import EntryNotFound, InvalidChange

router = APIRouter()


class FeedbackIn(BaseModel):
    agree: bool = Field(description="true: the model is right; false: give your own answer")
    answer: str | None = Field(
        default=None, max_length=32, description="your answer on the model's scale (required when disagreeing)"
    )
    comment: str | None = Field(default=None, max_length=feedback.MAX_COMMENT, description="optional free text")


class ModelRef(BaseModel):
    name: str
    version: str
    weights_sha256: str


class FeedbackOut(BaseModel):
    """One stored answer (table ``finding_feedback``)."""

    id: int
    study_id: int
    finding_id: int | None
    finding_key: str = Field(description="the finding's identifier in the AI SR: its code, code@level per level")
    sr_sop_instance_uid: str | None = Field(description="the AI SR the finding was reported in")
    model: ModelRef
    scale: list[str] = Field(description="the model's classes, normal first")
    ai_answer: str
    ai_positive: bool
    agree: bool
    answer: str = Field(description="the radiologist's answer on the scale (the model's when agreeing)")
    answer_positive: bool
    comment: str | None
    source: str = Field(description="web (a browser session) or api (a bearer token)")
    created_by: str
    created_at: str
    updated_at: str


class FeedbackItemOut(BaseModel):
    finding_id: int
    finding_key: str
    code: str
    name: str
    level: str | None
    model: ModelRef
    shadow: bool
    scale: list[str]
    ai_answer: str
    ai_positive: bool
    probability: float | None
    mine: FeedbackOut | None = Field(description="your answer, if any")
    others: int = Field(description="how many other users answered this finding")


class StudyFeedbackOut(BaseModel):
    study_id: int
    job_id: int | None
    sr_sop_instance_uid: str | None
    locked: bool = Field(description="the study was marked read: answers no longer change")
    items: list[FeedbackItemOut]


class FeedbackByReference(FeedbackIn):
    """An answer from another system, naming the finding by the AI SR (or the study) and the finding key."""

    sr_sop_instance_uid: str | None = Field(default=None, max_length=64, description="the AI SR's SOP Instance UID")
    study_uid: str | None = Field(default=None, max_length=64, description="or the Study Instance UID")
    finding_key: str = Field(min_length=1, max_length=96, description="e.g. acl_tear, spinal_stenosis@L4-L5")


def _ctx(request: Request):
    return request.app.state.ctx


def _save(request: Request, p: Principal, study_id: int, body: FeedbackIn, *, finding_id=None, key=None):
    """Records the answer; the source is "web" for a browser session, "api" for a bearer token."""
    ctx = _ctx(request)
    source = "web" if p.via == "cookie" else "api"
    try:
        with ctx.db.session() as s:
            fb = feedback.record(
                s,
                study_id=study_id,
                actor=p.username,
                answer=feedback.Answer(agree=body.agree, answer=body.answer, comment=body.comment),
                now=utcnow(),
                finding_id=finding_id,
                key=key,
                source=source,
            )
            return feedback.as_dict(fb)
    except feedback.FeedbackLocked as exc:
        return JSONResponse({"detail": str(exc)}, status_code=409)


@router.get("/api/studies/{study_id}/feedback", tags=["feedback"], response_model=StudyFeedbackOut, responses={404: {}})
def get_feedback(request: Request, study_id: int = Path(ge=1), p: Principal = Depends(principal)):
    """The study's answerable AI findings, each with its scale, the model's answer and yours."""
    with _ctx(request).db.session() as s:
        return feedback.study_feedback(s, study_id, user=p.username)


@router.post(
    "/api/studies/{study_id}/feedback/{finding_id}",
    tags=["feedback"],
    response_model=FeedbackOut,
    responses={404: {}, 409: {}, 422: {}},
)
def set_feedback(
    request: Request,
    body: FeedbackIn,
    study_id: int = Path(ge=1),
    finding_id: int = Path(ge=1),
    p: Principal = Depends(api_csrf),
):
    """Records or changes your answer to one finding (locked once the study is marked read)."""
    return _save(request, p, study_id, body, finding_id=finding_id)


@router.post("/api/feedback", tags=["feedback"], response_model=FeedbackOut, responses={404: {}, 409: {}, 422: {}})
def post_feedback(request: Request, body: FeedbackByReference, p: Principal = Depends(api_csrf)):
    """An answer named by the AI SR's SOP Instance UID (or the Study Instance UID) and the finding key."""
    if not body.sr_sop_instance_uid and not body.study_uid:
        return JSONResponse({"detail": "sr_sop_instance_uid or study_uid is required"}, status_code=422)
    with _ctx(request).db.session() as s:
        if body.sr_sop_instance_uid:
            study_id = s.scalar(
                select(Job.study_id)
                .join(ResultObject, ResultObject.job_id == Job.id)
                .where(ResultObject.sop_instance_uid == body.sr_sop_instance_uid, ResultObject.kind == "sr")
            )
            what = f"no AI SR {body.sr_sop_instance_uid}"
        else:
            study_id = s.scalar(select(Study.id).where(Study.study_uid == body.study_uid))
            what = f"no study {body.study_uid}"
    if study_id is None:
        return JSONResponse({"detail": what}, status_code=404)
    return _save(request, p, study_id, body, key=body.finding_key)


@router.post("/studies/{study_id}/feedback", include_in_schema=False)
def form_feedback(
    request: Request,
    study_id: int,
    finding_id: int = Form(...),
    agree: str = Form(default="1", max_length=1),
    answer: str = Form(default="", max_length=32),
    comment: str = Form(default="", max_length=feedback.MAX_COMMENT),
    csrf_token: str = Form(default="", max_length=128),
    p: Principal = Depends(principal),
):
    """The study page's form (without script): back to the study with a message."""
    check_csrf(p, csrf_token)
    body = FeedbackIn(agree=agree == "1", answer=answer or None, comment=comment or None)
    target = f"/studies/{study_id}"
    try:
        out = _save(request, p, study_id, body, finding_id=finding_id)
    except (InvalidChange, EntryNotFound) as exc:
        return RedirectResponse(f"{target}?error={quote(str(exc))}#feedback", status_code=303)
    if isinstance(out, JSONResponse):
        return RedirectResponse(f"{target}?error={quote('the study was marked read: feedback is locked')}", 303)
    return RedirectResponse(f"{target}?msg={quote('feedback saved')}#feedback", status_code=303)
