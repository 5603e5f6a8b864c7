"""Maps the user's top-level folders onto one import namespace (``smearsight.train`` = ``train/``, ...).

setuptools' static ``package-dir`` cannot discover sub-packages of re-mapped folders, so the package
list is computed here; all other metadata lives in pyproject.toml.
"""

from setuptools import find_packages, setup

FOLDERS = {
    "smearsight": "smearsight",
    "smearsight.train": "train",
    "smearsight.export": "export",
    "smearsight.runtime": "runtime",
    "smearsight.device": "device",
    "smearsight.deploy": "deploy",
}

packages, package_dir = [], {}
for name, folder in FOLDERS.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
