"""Lightning callbacks, each a thin adapter: gather what the trainer has, call a stage's function, log it.
The decisions themselves live in :mod:`covidct.patients` and :mod:`covidct.report`."""
