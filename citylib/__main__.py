import sys

from citylib.cli import main

sys.exit(main())
