"""`python -m tools.convert_wan_weights --src SRC --dst DST`: see `tools.convert_wan_weights.cli`."""

import sys

from tools.convert_wan_weights.cli import main

sys.exit(main())
