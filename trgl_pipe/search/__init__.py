"""SEDONA's search (Pyeon et al., ICLR 2021): learn where to cut a network into modules and how
deep each module's auxiliary head should be, then train the result as any other run.

- :mod:`~trgl_pipe.search.relaxed`: the relaxed network, every gap between blocks a soft cut;
- :mod:`~trgl_pipe.search.meta`: the meta-gradient of the cut and head weights through unrolled
  SGD steps (``torch.func``);
- :mod:`~trgl_pipe.search.loop`: the search itself, resumable;
- :mod:`~trgl_pipe.search.result`: the decision and the override file a run and the planner take.
"""
