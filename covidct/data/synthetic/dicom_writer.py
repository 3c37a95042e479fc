"""Writing one patient as a DICOM CT series: shared tags, per-slice position, pixel encodings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels.encoders import RLELosslessEncoder
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless, generate_uid

from covidct.data.synthetic.jpeg_lossless import encode_jpeg_lossless
from covidct.data.synthetic.patients import PatientPlan
from covidct.data.synthetic.phantom import Phantom
from covidct.data.synthetic.spec import SyntheticSpec, spec_hash

_INTERCEPT = -1024


def write_series(folder: Path, phantom: Phantom, plan: PatientPlan, spec: SyntheticSpec) -> None:
    """Write one CT series, one file per slice, named ``<prefix>_<k>.dcm`` with k in random order."""
    rng = np.random.default_rng([spec.seed, plan.label, plan.number, 1])
    n, size = phantom.hu.shape[0], phantom.hu.shape[1]
    uid = _uid_factory(spec, plan)
    prefix = f"{rng.integers(16**8):08X}-SYNT"
    file_numbers = rng.permutation(n) + 1
    z_top = round(float(rng.uniform(-90.0, 0.0)), 1)
    feet_first = bool(rng.random() < 0.4)  # InstanceNumber follows acquisition, not head-first order
    date = f"2020{int(rng.integers(3, 13)):02d}{int(rng.integers(1, 29)):02d}"
    ds = _series_dataset(plan, size)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.FrameOfReferenceUID = uid("frame")
    ds.StudyDate = ds.SeriesDate = date
    ds.SeriesNumber = int(rng.integers(2, 9))
    ds.PixelSpacing = [round(phantom.pixel_spacing, 6)] * 2
    ds.SliceThickness = phantom.slice_spacing
    corner = round(-(size - 1) / 2 * phantom.pixel_spacing, 4)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # one dataset, updated per slice: much faster than building 50 tags per file
        z = round(z_top - i * phantom.slice_spacing, 2)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid(f"sop-{i}")
        ds.InstanceNumber = n - i if feet_first else i + 1
        ds.SliceLocation = z
        ds.ImagePositionPatient = [corner, corner, z]
        stored = _to_stored(phantom.hu[i], plan.signed)  # slice by slice: no second copy of the volume
        ds.PixelData = _encode(stored, ds, plan.transfer_syntax)
        ds.save_as(folder / f"{prefix}_{file_numbers[i]}.dcm", enforce_file_format=True)


def _uid_factory(spec: SyntheticSpec, plan: PatientPlan) -> Callable[[str], str]:
    """Deterministic UIDs: unique per spec, patient and role."""
    base = [spec_hash(spec), plan.patient_id]
    return lambda role: generate_uid(entropy_srcs=[*base, role])


def _to_stored(hu: np.ndarray, signed: bool) -> np.ndarray:
    """HU -> stored values (stored = HU + 1024): int16, or uint16 clipped to 12 bits (any shape)."""
    stored = np.rint(hu) - _INTERCEPT
    if signed:
        return np.clip(stored, -32768, 32767).astype(np.int16)
    return np.clip(stored, 0, 4095).astype(np.uint16)


def _series_dataset(plan: PatientPlan, size: int) -> pydicom.Dataset:
    """The tags shared by all slices of a CT Image Storage series (size x size pixels)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = plan.transfer_syntax
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.Manufacturer = "covidct synthetic"
    ds.SeriesDescription = "synthetic chest CT"
    ds.PatientName = "ANONYMOUS"
    ds.PatientID = "ANONYMOUS"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if plan.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(plan.signed)
    ds.WindowCenter, ds.WindowWidth = [-600, 40], [1500, 400]
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _INTERCEPT, 1, "HU"
    if plan.transfer_syntax != ExplicitVRLittleEndian:
        ds.LossyImageCompression = "00"
        ds.PixelData = b""
        ds["PixelData"].VR = "OB"  # encapsulated
    return ds


def _encode(pixels: np.ndarray, ds: pydicom.Dataset, transfer_syntax: str) -> bytes:
    """Pixel Data bytes of one (rows, cols) uint16 / int16 slice in ``transfer_syntax``."""
    if transfer_syntax == JPEGLosslessSV1:
        return encapsulate([encode_jpeg_lossless(pixels)])
    if transfer_syntax == RLELossless:
        frame = RLELosslessEncoder.encode(
            pixels,
            encoding_plugin="pydicom",
            rows=ds.Rows,
            columns=ds.Columns,
            number_of_frames=1,
            samples_per_pixel=1,
            bits_allocated=16,
            bits_stored=ds.BitsStored,
            pixel_representation=ds.PixelRepresentation,
            photometric_interpretation="MONOCHROME2",
        )
        return encapsulate([frame])
    return pixels.tobytes()
