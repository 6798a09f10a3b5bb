"""``msknode users add | list | passwd | disable | enable`` — web users (the web server itself is ``msknode web``)."""

from __future__ import annotations

import getpass
import sys

from node.commands import database, print_json_or_empty
from node.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("users", help="web users (radiologists and admins)")
    usub = p.add_subparsers(dest="users_command", metavar="ACTION")
    usub.required = True

    a = usub.add_parser("add", help="create a user (the first admin too)")
    a.add_argument("username")
    a.add_argument("--role", required=True, choices=("admin", "radiologist"))
    a.add_argument("--password-stdin", action="store_true", help="read the password from standard input (one line)")
    a.set_defaults(func=_add)

    ls = usub.add_parser("list", help="list users")
    ls.add_argument("--json", action="store_true", help="a JSON list")
    ls.set_defaults(func=_list)

    pw = usub.add_parser("passwd", help="set a user's password")
    pw.add_argument("username")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from standard input (one line)")
    pw.set_defaults(func=_passwd)

    for name, active in (("disable", False), ("enable", True)):
        d = usub.add_parser(name, help=f"{name} a user (sessions of a disabled user stop at once)")
        d.add_argument("username")
        d.set_defaults(func=_set_active, active=active)


def _read_password(args) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
        if not password:
            raise UserError("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise UserError("no terminal to prompt for the password: use --password-stdin")
    first = getpass.getpass("Password: ")
    second = getpass.getpass("Repeat password: ")
    if first != second:
        raise UserError("the passwords do not match")
    return first


def _add(args, settings) -> int:
    from node.web.users import add_user, validate_password

    password = _read_password(args)
    validate_password(password)
    with database(settings) as db, db.session() as s:
        add_user(s, username=args.username, password=password, role=args.role, actor="cli")
    print(f"user {args.username} ({args.role}) created")
    return 0


def _list(args, settings) -> int:
    from node.web.users import list_users

    with database(settings) as db, db.session() as s:
        rows = list_users(s)
    if print_json_or_empty(
        rows, as_json=args.json, empty="no users (create the first admin with: msknode users add NAME --role admin)"
    ):
        return 0
    print(f"{'user':<24} {'role':<12} {'active':<7} created (UTC)")
    for r in rows:
        print(f"{r['username']:<24} {r['role']:<12} {'yes' if r['active'] else 'no':<7} {r['created_at'][:19]}")
    return 0


def _passwd(args, settings) -> int:
    from node.web.users import set_password

    password = _read_password(args)
    with database(settings) as db, db.session() as s:
        set_password(s, username=args.username, password=password, actor="cli")
    print(f"password of {args.username} changed")
    return 0


def _set_active(args, settings) -> int:
    from node.web.users import set_active

    with database(settings) as db, db.session() as s:
        set_active(s, username=args.username, active=args.active, actor="cli")
    print(f"user {args.username} {'enabled' if args.active else 'disabled'}")
    return 0
