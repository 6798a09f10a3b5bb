"""The node's web app served over real HTTP (uvicorn on a free localhost port, in a thread).

`WebServer(settings, db).start()` serves `node.web.app.create_app(settings, db)` with the same
uvicorn configuration as ``msknode web`` (`node.web.app.uvicorn_config`: forwarded headers only from
``MSKNODE_TRUSTED_PROXIES``); `stop()` shuts it down. Registered with `support.servers.track`.
Also: `login_form` (the login page's form, like a browser) and `token` (``POST /api/auth/token``).
"""

from __future__ import annotations

import re
import threading
import time

import httpx

from support.env import free_port
from support.servers import track, untrack


class WebServer:
    def __init__(self, settings, db):
        self.settings, self.db = settings, db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = None
        self._thread: threading.Thread | None = None
        self._token: int | None = None
        self.app = None

    def start(self, timeout: float = 30.0) -> WebServer:
        import uvicorn

        from node.web.app import create_app, uvicorn_config

        self.app = create_app(self.settings, self.db)
        config = uvicorn_config(self.settings, self.app, port=self.port)
        config.host = "127.0.0.1"
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"web-{self.port}", daemon=True)
        self._thread.start()
        self._token = track(f"web server :{self.port}", self.stop)
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the web server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        untrack(self._token)
        self._token = None

    def __enter__(self) -> WebServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


def login_form(client: httpx.Client, username: str, password: str, **kw) -> httpx.Response:
    """What a browser does: GET /login (nonce cookie), POST the form. Returns the POST's answer."""
    page = client.get("/login", **kw)
    nonce = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": nonce, "next": "/worklist"},
        follow_redirects=False,
        **kw,
    )


def token(client: httpx.Client, username: str, password: str, **kw) -> httpx.Response:
    return client.post("/api/auth/token", json={"username": username, "password": password}, **kw)
