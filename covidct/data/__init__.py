"""Stage 1, data: a dataset folder -> cached, preprocessed slices -> a LightningDataModule.

Owns the dataset layout and label files (:mod:`~.layout`, :mod:`~.labels`, :mod:`~.split`), DICOM reading,
series choice and slice order (:mod:`~.dicom`, :mod:`~.series`, :mod:`~.hounsfield`), preprocessing and
the memory-mapped cache (:mod:`~.preprocess`, :mod:`~.lung`, :mod:`~.cache`), the datamodule and its
summary, pseudo-labels read from a file, and the synthetic dataset (:mod:`~.synthetic`).
May import: :mod:`covidct.contracts`, :mod:`covidct.errors`, :mod:`covidct.io`, :mod:`covidct.processes`.
Never imports models, patients, training, predict or report.
"""
