"""Result objects as DICOM files, byte for byte what ``Dataset.save_as(fh, enforce_file_format=True)`` writes,
with an element shared by several objects encoded once.

The instances of a derived series share every element but their own (`node.results.superres_series`: the
slices of a super-resolved series hold the same `DataElement` objects, all but UID, number, position,
source references and pixels). pydicom encodes each element of each file anew, sequences included; here
an element object met in more than one dataset of a batch is encoded the first time and its bytes are
reused. Everything else is pydicom's own code, called in the order ``dcmwrite`` calls it (file meta,
ambiguous-VR correction, each element in tag order), and a dataset this does not cover (not explicit VR
little endian, group 0/2 elements in the data set, an odd preamble) is written by ``save_as`` itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from copy import deepcopy
from typing import BinaryIO

from pydicom.charset import default_encoding
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO, DicomIO
from pydicom.filewriter import (
    correct_ambiguous_vr,
    correct_ambiguous_vr_element,
    write_data_element,
    write_file_meta_info,
)
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR, VR

__all__ = ["BatchWriter"]


class BatchWriter:
    """Writes the datasets of one batch; elements shared by two or more of them are encoded once."""

    def __init__(self, datasets: Sequence[Dataset]):
        seen = Counter(id(e) for ds in datasets for e in ds._dict.values())
        self._shared = {k for k, n in seen.items() if n > 1}
        self._bytes: dict[tuple[int, object], tuple[object, bytes]] = {}  # the element is held: its id stays its own

    def write(self, fh: BinaryIO, ds: Dataset) -> None:
        meta = getattr(ds, "file_meta", None)
        preamble = getattr(ds, "preamble", None)
        if (
            meta is None
            or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian
            or any(t >> 16 in (0, 2) for t in ds._dict)
            or (preamble and len(preamble) != 128)
            or ds.original_encoding != (None, None)
        ):
            ds.save_as(fh, enforce_file_format=True)
            return
        meta = deepcopy(meta)  # as dcmwrite: the dataset's own file meta is left as it was
        for meta_kw, ds_kw in (
            ("MediaStorageSOPClassUID", "SOPClassUID"),
            ("MediaStorageSOPInstanceUID", "SOPInstanceUID"),
        ):
            value = ds.get(ds_kw)
            if meta.get(meta_kw) is None or (value and value != meta.get(meta_kw)):
                setattr(meta, meta_kw, value)
        if "PixelData" in ds:
            ds["PixelData"].is_undefined_length = False
        fp = DicomIO(fh)
        fp.is_implicit_VR, fp.is_little_endian = False, True
        fp.write(preamble or b"\x00" * 128)
        fp.write(b"DICM")
        write_file_meta_info(fp, meta, enforce_standard=True)
        charset = ds.get("SpecificCharacterSet", default_encoding)
        key_charset = tuple(charset) if isinstance(charset, list | tuple) else charset
        for tag in sorted(ds._dict):
            if tag.element == 0 and tag.group > 6:  # retired group lengths are not written (PS3.5 7.2)
                continue
            elem = ds._dict[tag]
            key = (id(elem), key_charset)
            cached = self._bytes.get(key)
            if cached is not None:
                fp.write(cached[1])
                continue
            elem = ds[tag]  # a raw element is converted (and stored), as dcmwrite's __getitem__ does
            if elem.VR == VR.SQ:
                for item in elem.value:
                    correct_ambiguous_vr(item, True, [item, ds])
            elif elem.VR in AMBIGUOUS_VR:
                correct_ambiguous_vr_element(elem, ds, True, [ds])
            buf = DicomBytesIO()
            buf.is_implicit_VR, buf.is_little_endian = False, True
            write_data_element(buf, elem, charset)
            data = buf.getvalue()
            if id(elem) in self._shared:  # (a raw element converted above is a new object: never shared)
                self._bytes[key] = (elem, data)
            fp.write(data)
