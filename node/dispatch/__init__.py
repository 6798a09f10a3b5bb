"""Dispatch: result objects back to the PACS (or any destination), reliably.

- `node.dispatch.outbox` — the durable outbox: claim due items by lease, record each answer,
  backoff and dead letter, listing and manual retry;
- `node.dispatch.senders` — how each destination type is sent to (C-STORE, STOW-RS) and how
  its answers are classified.
"""
