"""Allow `python -m duct_messaging.cli`."""

import sys

from duct_messaging.cli import main

sys.exit(main())
