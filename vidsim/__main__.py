import sys

from vidsim.cli import main

sys.exit(main())
