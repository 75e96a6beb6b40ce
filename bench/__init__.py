"""thinvisor's benchmarks: thinvisor against QEMU started by hand and libvirt, side by side.

``python -m bench`` (or ``make bench``) runs them and writes ``bench/results/``; see
``bench/README.md``. Each benchmark module offers ``run(log, rounds)``, returning
comparisons (``bench.harness.Comparison``) or plain dicts for ``bench.report``.
"""
