"""The programs that train: one skeleton (:mod:`~trgl_pipe.training.skeleton`) around the loop
every worker runs (:mod:`~trgl_pipe.training.loop`, :mod:`~trgl_pipe.training.worker`), for one
process (:mod:`~trgl_pipe.training.single`: every regime, the simulated pipeline in
:mod:`~trgl_pipe.training.sim`) and for one torchrun rank (:mod:`~trgl_pipe.training.rank`, its
replicas in :mod:`~trgl_pipe.training.replicas`); the regimes in one process
(:mod:`~trgl_pipe.training.regimes`) and the delayed-gradient ones
(:mod:`~trgl_pipe.training.delayed`)."""
