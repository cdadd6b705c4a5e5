"""The one compiled part of qcowfs, and it is optional: the sector loop of
``qcowfs.image.evp`` (``qcowfs/image/_sectors.c``). It needs a C compiler and Python's headers
(which building pyfuse3 needs anyway), not OpenSSL's: it calls libcrypto through the addresses
evp.py hands it. Where it cannot be built the install goes on without it and the encryption
runs the Python paths (docs/design.md, "Encrypted images"). Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("qcowfs.image._sectors", ["qcowfs/image/_sectors.c"],
                             optional=True)])
