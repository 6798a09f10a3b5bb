"""Web users: argon2-hashed passwords, two roles (radiologist, admin), every change audited."""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.database import utcnow
from node.errors import UserError
from worklists import audit
from worklists.tables import ROLES, User

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10
# verified against when the user does not exist, so a wrong name costs as long as a wrong password
_DUMMY_HASH = "$argon2id$v=19$m=65536,t=3,p=4$3+O7S0XsQkwi8M5IGjv1mw$PUYo1kVpmlV5wySmOYnz8ix46z6RA+C30VitdNxEdkc"


def hasher() -> PasswordHasher:
    return PasswordHasher()


def validate_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must be at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise UserError("the password is longer than 1024 characters")


def add_user(session: Session, *, username: str, password: str, role: str, actor: str = "system") -> User:
    """Creates a user; refuses a bad name, an unknown role, a short password or a taken name."""
    if not USERNAME_RE.match(username or ""):
        raise UserError("a username is 1-64 characters: letters, digits and . _ @ - (starting with a letter or digit)")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    validate_password(password)
    if session.scalars(select(User).where(User.username == username)).first() is not None:
        raise UserError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hasher().hash(password), role=role, active=True, created_at=utcnow())
    session.add(user)
    session.flush()
    audit.record(session, actor=actor, action="user.create", entity_type="user", entity_id=username, new=role)
    return user


def set_password(session: Session, *, username: str, password: str, actor: str = "system") -> User:
    user = session.scalars(select(User).where(User.username == username)).first()
    if user is None:
        raise UserError(f"no user {username!r}")
    validate_password(password)
    user.password_hash = hasher().hash(password)
    user.session_epoch = (user.session_epoch or 0) + 1  # every session and token issued before ends
    audit.record(session, actor=actor, action="user.password", entity_type="user", entity_id=username)
    return user


def end_sessions(session: Session, *, username: str, actor: str, action: str = "user.sessions_ended") -> User:
    """Ends every session and bearer token of `username` (raises its session epoch)."""
    user = session.scalars(select(User).where(User.username == username)).first()
    if user is None:
        raise UserError(f"no user {username!r}")
    old = user.session_epoch or 0
    user.session_epoch = old + 1
    audit.record(session, actor=actor, action=action, entity_type="user", entity_id=username, old=old, new=old + 1)
    return user


def set_active(session: Session, *, username: str, active: bool, actor: str = "system") -> User:
    user = session.scalars(select(User).where(User.username == username)).first()
    if user is None:
        raise UserError(f"no user {username!r}")
    old = user.active
    user.active = active
    audit.record(
        session, actor=actor, action="user.active", entity_type="user", entity_id=username, old=old, new=active
    )
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this name and password, or None (same cost whether or not the name exists)."""
    user = session.scalars(select(User).where(User.username == username)).first()
    ph = hasher()
    try:
        ph.verify(user.password_hash if user is not None else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or not user.active:
        return None
    if ph.check_needs_rehash(user.password_hash):
        user.password_hash = ph.hash(password)
    return user


def list_users(session: Session) -> list[dict]:
    return [
        {"username": u.username, "role": u.role, "active": u.active, "created_at": u.created_at.isoformat()}
        for u in session.scalars(select(User).order_by(User.username))
    ]
