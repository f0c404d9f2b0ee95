"""``python -m fastrec`` is the ``fastrec`` command."""

import sys

from fastrec.cli import main

sys.exit(main())
