"""`python -m dsr_lightning {train,certify,report} ...`"""

from dsr_lightning.cli import main

raise SystemExit(main())
