"""The ``crcd-demo`` command: distil a 1-D CNN teacher into an MLP student on MNIST-1D (or digits),
offline, comparing CE, KD, CRD, CRCD and CRCD with its gradient element over several seeds.

Run ``crcd-demo --help`` or ``python -m crcd_plugin.demo``; see ``docs/demo.md``.
"""
