import sys

from kvmnetd.daemon import main

sys.exit(main())
