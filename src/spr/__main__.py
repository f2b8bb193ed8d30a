import sys

from spr.cli import main

sys.exit(main())
