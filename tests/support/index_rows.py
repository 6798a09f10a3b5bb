"""Index rows written the way the listener writes them (contract C1), for completeness tests.

These helpers stand for the listener in unit tests; the integration tests in
tests/test_completeness_listener.py go through the real listener instead.
"""

from __future__ import annotations

import datetime as dt
import itertools

from node.db.schema import Association, AssociationSeries, Instance, Series, Study

T0 = dt.datetime(2026, 3, 2, 8, 0, 0, tzinfo=dt.UTC)
SAGITTAL = "0\\1\\0\\0\\0\\-1"
CORONAL = "1\\0\\0\\0\\0\\-1"
AXIAL = "1\\0\\0\\0\\1\\0"
_counter = itertools.count(1)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def uid(prefix: str = "1.2.840.99999.7") -> str:
    return f"{prefix}.{next(_counter)}"


def make_study(s, *, study_uid: str | None = None, description: str | None = None, now=T0) -> Study:
    st = Study(study_uid=study_uid or uid(), study_description=description, first_received_at=now, last_received_at=now)
    s.add(st)
    s.flush()
    return st


def make_series(
    s,
    study: Study,
    *,
    description: str,
    body_part: str | None = "KNEE",
    modality: str = "MR",
    series_uid: str | None = None,
    expected: int | None = None,
    number: int | None = None,
    own_object: bool = False,
    manufacturer: str | None = "SIEMENS",
    calling_ae: str = "MODALITY",
    now=T0,
) -> Series:
    se = Series(
        study_id=study.id,
        series_uid=series_uid or uid(),
        modality=modality,
        body_part=body_part,
        series_description=description,
        series_number=number,
        manufacturer=manufacturer,
        calling_ae=calling_ae,
        expected_instances=expected,
        own_object=own_object,
        instances=0,
        state="receiving",
        first_received_at=now,
        last_received_at=now,
    )
    s.add(se)
    s.flush()
    return se


def open_association(s, *, now=T0, calling_ae: str = "MODALITY") -> Association:
    a = Association(
        calling_ae=calling_ae, called_ae="MSKNODE", peer_address="127.0.0.1", listener="test:1", started_at=now
    )
    s.add(a)
    s.flush()
    return a


def add_instances(
    s,
    series: Series,
    count: int,
    *,
    association: Association | None = None,
    now=T0,
    start: int = 0,
    spacing: float = 3.0,
    skip_positions: tuple[int, ...] = (),
    no_position: tuple[int, ...] = (),
    orientation: str | None = None,
) -> list[Instance]:
    """``count`` slices in the plane the series description names (sagittal by default, normal along x:
    slice i sits at x = i * spacing); another ``orientation`` puts slice i at i * spacing along its normal.
    """
    orientation = orientation or orientation_of(series.series_description or "")
    out = []
    index = start
    made = 0
    cos = [float(v) for v in orientation.split("\\")]
    normal = (cos[1] * cos[5] - cos[2] * cos[4], cos[2] * cos[3] - cos[0] * cos[5], cos[0] * cos[4] - cos[1] * cos[3])
    while made < count:
        if index in skip_positions:
            index += 1
            continue
        if orientation == SAGITTAL:
            pos = f"{index * spacing:.3f}\\-100\\100"
        else:
            base = (0.0, -100.0, 100.0)
            pos = "\\".join(f"{b + index * spacing * n:.3f}" for b, n in zip(base, normal))
        pos = None if index in no_position else pos
        inst = Instance(
            series_id=series.id,
            sop_instance_uid=uid(),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"{series.series_uid}/{index}.dcm",
            size=1000,
            instance_number=index + 1,
            image_position=pos,
            image_orientation=orientation,
            association_id=association.id if association is not None else None,
            received_at=now,
        )
        s.add(inst)
        out.append(inst)
        index += 1
        made += 1
    series.instances = (series.instances or 0) + count
    series.last_received_at = now
    series.study.last_received_at = now
    if association is not None:
        series.quiet_deadline = None
        if s.get(AssociationSeries, (association.id, series.id)) is None:
            s.add(AssociationSeries(association_id=association.id, series_id=series.id))
        association.instances = (association.instances or 0) + count
    s.flush()
    return out


def release(s, association: Association, *, now, quiet_seconds: float, reason: str = "released") -> None:
    """What the listener does at A-RELEASE: end the association, start its series' quiet timers."""
    association.ended_at = now
    association.end_reason = reason
    s.flush()
    for link in s.query(AssociationSeries).filter_by(association_id=association.id):
        others = (
            s.query(AssociationSeries)
            .join(Association, Association.id == AssociationSeries.association_id)
            .filter(AssociationSeries.series_id == link.series_id, Association.ended_at.is_(None))
            .count()
        )
        if not others:
            se = s.get(Series, link.series_id)
            se.quiet_deadline = now + dt.timedelta(seconds=quiet_seconds)
    s.flush()


def orientation_of(description: str) -> str:
    """The ImageOrientationPatient a scanner writes for the plane a description names (sagittal by default)."""
    words = description.lower().replace("_", " ").split()
    if any(w.startswith("cor") for w in words):
        return CORONAL
    if any(w in ("ax", "axial", "tra", "trans", "transverse") for w in words):
        return AXIAL
    return SAGITTAL


def send_series(s, study, *, description, count=20, now=T0, quiet_seconds=0.5, **kw) -> Series:
    """A series delivered and released in one association at ``now``, in the plane its description names."""
    expected = kw.pop("expected", None)
    se = make_series(
        s,
        study,
        description=description,
        expected=expected,
        now=now,
        **{
            k: v
            for k, v in kw.items()
            if k in {"body_part", "modality", "series_uid", "number", "own_object", "manufacturer", "calling_ae"}
        },
    )
    a = open_association(s, now=now)
    add_instances(
        s,
        se,
        count,
        association=a,
        now=now,
        **{k: v for k, v in kw.items() if k in {"spacing", "skip_positions", "no_position", "orientation"}},
    )
    release(s, a, now=now, quiet_seconds=quiet_seconds)
    return se
