"""Unified Procedure Steps (PS3.4 CC, IHE AI Workflow for Imaging): every AI job as a UPS workitem.

`workitems` holds the state machine, the UPS attributes and the events owed to subscribers (the job
table drives it: `sync`); `dimse` serves them to peers (N-CREATE, N-SET, N-GET, N-ACTION, C-FIND on
the listener's AE); `events` sends the N-EVENT-REPORTs; `rest` is UPS-RS (PS3.18) on the web app.
"""
