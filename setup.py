"""setup.py: packaging lives in pyproject.toml; this file exists for the compiled extension (dgg_fused._C).

The extension is added by the kernels work (csrc/); until then this builds a pure-Python package.
"""

from setuptools import setup

setup()
