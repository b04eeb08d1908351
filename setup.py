"""The optional native weight scan (``stun_exp/analysis/_scan.c``); everything else is in pyproject.toml.

Optional: without a C compiler the install still succeeds and the analysis reads weights with
torch and numpy instead (same figures, see ``stun_exp.analysis.weight_report``)."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("stun_exp.analysis._scan", ["stun_exp/analysis/_scan.c"], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off"])])
