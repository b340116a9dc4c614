"""Package layout: the top-level folder ``kernels/`` installs as ``fastrlhf.kernels``.

Metadata and dependency ranges live in pyproject.toml; this file only maps folders to packages
(setuptools' ``package_dir``), which is why it exists at all. ``kernels`` alone would collide with
the unrelated PyPI package of that name.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastrlhf", "fastrlhf.*"])
packages.append("fastrlhf.kernels")

setup(
    packages=packages,
    package_dir={"fastrlhf.kernels": "kernels"},
    package_data={"fastrlhf": ["py.typed"]},
)
