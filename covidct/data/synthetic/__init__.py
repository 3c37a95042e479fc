"""A seeded synthetic copy of COVID-CT-MD: real DICOM files, the real layout and label files.

The default dataset of the project (``data=synthetic``): the whole pipeline runs with no download.
Layout and label files follow the real dataset (see ``DESIGN.md``)::

    <root>/COVID-19 subjects/P001/<prefix>_<k>.dcm   (k: a random permutation, not the slice order)
    <root>/Cap subjects/cap001/...
    <root>/Normal subjects/normal001/...
    <root>/Index.csv               Label Index,Diagnosis,Relative Path,Folder/ID (labelled COVID-19, CAP)
    <root>/Slice-level-labels.npy  int32 (n_index_rows, 200, or the longest labelled series if longer);
                                   row r = r-th data row of Index.csv, column i = i-th slice by
                                   SliceLocation descending (head first)
    <root>/README.txt

Each patient is a numpy chest phantom in HU (:func:`make_phantom`): body with a fat rim, ribs,
spine, mediastinum and heart, trachea, two textured lungs with vessels, gaussian noise. COVID-19
patients get bilateral peripheral ground-glass opacities, CAP patients denser, larger, often
one-sided consolidation, Normal patients nothing. Lesions cover one contiguous run of slices (30-80%
of the patient's slices) and lie inside the lungs; a slice is labelled 1 iff a lesion voxel is in
the lung mask on it.

Series are stored like real scanners do: mostly unsigned 12-bit (stored = HU + 1024), some signed
16-bit; a fraction JPEG Lossless SV1 (1.2.840.10008.1.2.4.70, the real data's transfer syntax,
written by :func:`encode_jpeg_lossless`, since pydicom cannot encode it), some RLE Lossless.
InstanceNumber follows the acquisition direction, which is feet-to-head in some series, so only
SliceLocation / ImagePositionPatient give the head-first order.

Everything derives from ``SyntheticSpec.seed``: the same spec gives the same files, pixels and labels,
whatever the number of processes that make the patients (``SyntheticSpec.workers``). Generation resumes
after an interruption and checks the free disk first (:mod:`~.dataset`); ``experiment=full_scale`` makes
one of the real dataset's size.

Modules, each with one job: :mod:`~.spec` (what to generate, its hash), :mod:`~.dataset` (the
folder on disk, the cache, the label files), :mod:`~.patients` (who is in it and how each series is
stored), :mod:`~.phantom` (one patient's volume) built from :mod:`~.anatomy`, :mod:`~.lesions` and
:mod:`~.noise`, :mod:`~.dicom_writer` (one series as DICOM) and :mod:`~.jpeg_lossless` (the encoder).
"""

from covidct.data.synthetic.dataset import (
    CLASS_FOLDERS,
    COMPLETE_MARKER,
    ensure_dataset,
    estimate_disk,
    generate_dataset,
    is_complete,
)
from covidct.data.synthetic.dicom_writer import write_series
from covidct.data.synthetic.jpeg_lossless import encode_jpeg_lossless
from covidct.data.synthetic.patients import PatientPlan, patient_phantom, plan_patients
from covidct.data.synthetic.phantom import Phantom, make_phantom
from covidct.data.synthetic.spec import GENERATOR_VERSION, MAX_SLICES, SyntheticSpec, spec_hash

__all__ = [
    "CLASS_FOLDERS",
    "COMPLETE_MARKER",
    "GENERATOR_VERSION",
    "MAX_SLICES",
    "PatientPlan",
    "Phantom",
    "SyntheticSpec",
    "encode_jpeg_lossless",
    "ensure_dataset",
    "estimate_disk",
    "generate_dataset",
    "is_complete",
    "make_phantom",
    "patient_phantom",
    "plan_patients",
    "spec_hash",
    "write_series",
]
