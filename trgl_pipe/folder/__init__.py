"""What a run folder holds and who may write it: the folder's lock and first files
(:mod:`~trgl_pipe.folder.run_folder`) and the checkpoints (:mod:`~trgl_pipe.folder.checkpoint`)."""
