"""``python -m stun_exp.toy``: see ``stun_exp.toy.cli``."""
import sys

from stun_exp.toy.cli import main

sys.exit(main())
