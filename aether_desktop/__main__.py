import sys

from aether_desktop.app import main

sys.exit(main())
