"""Packaging glue that pyproject.toml cannot express: the top-level `kernels/` folder is installed as
`apollo_fast.kernels` (a bare top-level `kernels` would collide with an existing PyPI package)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["apollo_fast", "apollo_fast.*"]) + ["apollo_fast.kernels"],
    package_dir={"apollo_fast.kernels": "kernels"},
    package_data={"apollo_fast": ["py.typed"]},
)
