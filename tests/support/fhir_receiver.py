"""A real FHIR server stand-in for the FHIR destination tests, run as its own process.

``POST /fhir`` takes a transaction Bundle, validates it with the same FHIR models the node uses
(``fhir.resources`` R4B), stores every request body under ``--store`` (``NNNN.json``, repeats included)
and answers a ``transaction-response``. Conditional creates are honoured: an entry whose
``ifNoneExist`` identifier was already created answers ``200 OK`` and is not created again
(``created.json`` lists what was). An invalid bundle gets 400 with an OperationOutcome. ``--fail N``
answers 503 to the first N requests. ``--ready FILE`` is written once it listens.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fhir.resources.R4B.bundle import Bundle

MAX_BODY = 4 * 1024 * 1024


def make_handler(store: Path, fail: int):
    lock = threading.Lock()
    state = {"requests": 0, "created": {}}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            if self.path.rstrip("/") != "/fhir" or length > MAX_BODY:
                self._send(404 if length <= MAX_BODY else 413, {"resourceType": "OperationOutcome", "issue": []})
                return
            raw = self.rfile.read(length)
            with lock:
                state["requests"] += 1
                n = state["requests"]
                (store / f"{n:04d}.json").write_bytes(raw)
                if n <= fail:
                    self._send(503, {"resourceType": "OperationOutcome", "issue": []})
                    return
                try:
                    bundle = Bundle.model_validate_json(raw)
                    if bundle.type != "transaction":
                        raise ValueError(f"bundle type {bundle.type}")
                except Exception as e:
                    issue = {"severity": "error", "code": "invalid", "diagnostics": str(e)[:500]}
                    self._send(400, {"resourceType": "OperationOutcome", "issue": [issue]})
                    return
                entries = []
                created = state["created"]
                for e in bundle.entry or []:
                    key = f"{e.request.url}?{e.request.ifNoneExist}"
                    if e.request.ifNoneExist and key in created:
                        entries.append({"response": {"status": "200 OK", "location": created[key]}})
                        continue
                    loc = f"{e.request.url}/{len(created) + 1}"
                    created[key] = loc
                    entries.append({"response": {"status": "201 Created", "location": loc}})
                (store / "created.json").write_text(json.dumps(created, indent=1))
            self._send(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": entries})

    return Handler


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--fail", type=int, default=0)
    p.add_argument("--ready", type=Path)
    a = p.parse_args()
    a.store.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", a.port), make_handler(a.store, a.fail))
    if a.ready:
        a.ready.write_text("ready")
    server.serve_forever()


if __name__ == "__main__":
    main()
