"""Benchmarks (``make bench``, ``make bench-predict``, ``make bench-gpu``): where the time goes, measured as
ratios within one run. Tooling: may import every stage; nothing in covidct imports it."""
