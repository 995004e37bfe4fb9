"""Data: the competition folder, robust image loading, the validation split, augmentation,
the rehearsal data generator, and the :class:`~utils.data.task.Task` every model script prepares."""
