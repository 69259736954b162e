import sys

from planemesh.agent.hbone.node import main

sys.exit(main())
