"""A real MLLP receiver for the HL7 destination tests, run as its own process (``python hl7_receiver.py``).

It is hl7apy's `MLLPServer`: every ORU^R01 is parsed and validated against HL7 2.5.1 (strict) with
hl7apy, written to ``--store`` (one file per message received, in arrival order, repeats included), and
answered with an ACK whose MSA-1 is the next code of ``--answers`` (the last one repeats), e.g.
``AE,AA``: the first message gets an application error, the rest are accepted. A message that does not
validate gets ``AR`` and is stored under ``invalid-*``. ``--ready FILE`` is written once it listens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import threading
from pathlib import Path

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

_lock = threading.Lock()
_count = itertools.count(1)


def _ack(msh, code: str, text: str = "") -> str:
    ack = Message("ACK", version="2.5.1", validation_level=VALIDATION_LEVEL.TOLERANT)
    ack.msh.msh_3 = "RECEIVER"
    ack.msh.msh_4 = "TEST"
    ack.msh.msh_5 = msh.msh_3.to_er7() if msh is not None else ""
    ack.msh.msh_6 = msh.msh_4.to_er7() if msh is not None else ""
    ack.msh.msh_7 = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")
    ack.msh.msh_9 = "ACK^R01^ACK"
    ack.msh.msh_10 = f"ACK{next(_count)}"
    ack.msh.msh_11 = "P"
    ack.msa.msa_1 = code
    ack.msa.msa_2 = msh.msh_10.to_er7() if msh is not None else ""
    if text:
        ack.msa.msa_3 = text
    return ack.to_mllp()


def make_handlers(store: Path, answers: list[str]):
    class OruHandler(AbstractHandler):
        def reply(self):
            with _lock:
                n = len(list(store.glob("*.hl7"))) + 1
                try:
                    msg = parse_message(self.incoming_message, validation_level=VALIDATION_LEVEL.STRICT)
                    msg.validate()
                except Exception as e:  # not a valid ORU^R01 2.5.1: rejected
                    (store / f"invalid-{n:04d}.hl7").write_text(self.incoming_message, encoding="utf-8")
                    return _ack(None, "AR", f"invalid: {type(e).__name__}"[:80])
                (store / f"{n:04d}.hl7").write_text(self.incoming_message, encoding="utf-8")
                code = answers[min(n, len(answers)) - 1]
                return _ack(msg.msh, code, "" if code == "AA" else "test receiver says " + code)

    class ErrHandler(AbstractErrorHandler):
        def reply(self):
            return _ack(None, "AR", type(self.exc).__name__)

    return {"ORU^R01^ORU_R01": (OruHandler,), "ERR": (ErrHandler,)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--answers", default="AA")
    p.add_argument("--ready", type=Path)
    a = p.parse_args()
    a.store.mkdir(parents=True, exist_ok=True)
    server = MLLPServer("127.0.0.1", a.port, make_handlers(a.store, a.answers.split(",")), timeout=10)
    if a.ready:
        a.ready.write_text("ready")
    server.serve_forever()


if __name__ == "__main__":
    main()
