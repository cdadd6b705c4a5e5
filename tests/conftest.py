import shutil

import pytest


def pytest_sessionstart(session):
    missing = [t for t in ("qemu-img", "qemu-io") if shutil.which(t) is None]
    if missing:
        raise pytest.UsageError(f"missing {', '.join(missing)}: run `make test`, which installs "
                                f"qemu-utils")
