import sys

from citylib.run.cli import main

sys.exit(main())
