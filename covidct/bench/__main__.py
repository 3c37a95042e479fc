"""``python -m covidct.bench`` (``make bench``): the framework benchmark's rows (see :mod:`covidct.bench.framework`)."""

from covidct.bench.framework import main

main()
