import sys

from qcowfs.cli.main import main

sys.exit(main())
