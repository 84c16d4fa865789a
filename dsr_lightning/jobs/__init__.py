"""Jobs: the only readers of a composed config. training (dsr-train), certification (dsr-certify and
the training job's certification), the run-checkpoint reader, resume, sweeps, loggers and W&B, the
threshold of f_R chosen for a run and its diagnosis."""
