"""`python -m common.data.toy_world --help`: regenerate the toy world (see `cli.main`)."""

import sys

from common.data.toy_world.cli import main

sys.exit(main())
