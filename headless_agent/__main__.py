import sys

from headless_agent.cli import main

sys.exit(main())
