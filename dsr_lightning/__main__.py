"""`python -m dsr_lightning {train,certify,report,threshold} ...`: the console scripts dsr-train,
dsr-certify, dsr-report and dsr-threshold, by another name."""

from dsr_lightning.cli import main

raise SystemExit(main())
